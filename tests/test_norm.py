"""RMSNorm: the fused path (``F.rms_norm``, same dtype as the gain) against the float32 formula it replaces."""

import pytest
import torch
from hybrid.layers.norm import RMSNorm, RMSNormConfig


def rms_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.to(xf.dtype)).to(x.dtype)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32), (torch.float64, torch.float64)])
def test_rmsnorm_matches_the_float32_formula(x_dtype, w_dtype):
    torch.manual_seed(0)
    norm = RMSNorm(48, RMSNormConfig(eps=1e-5)).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48))
    x = (3 * torch.randn(2, 7, 48, dtype=torch.float64)).to(x_dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    w_ref = norm.weight.detach().clone().requires_grad_(True)
    y, y_ref = norm(x), rms_reference(x_ref, w_ref, 1e-5)
    assert y.dtype == x_dtype
    tol = dict(rtol=1e-2, atol=1e-2) if x_dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    torch.testing.assert_close(norm.weight.grad, w_ref.grad, **(dict(rtol=2e-2, atol=5e-2) if x_dtype == torch.bfloat16 else tol))
