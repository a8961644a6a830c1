"""The Triton pair for the Mamba-3 layer's pre-scan elementwise work (``triton_ssm_inputs.py``) against the layer's
own ``ssm_inputs`` through autograd: every output and every input / parameter gradient.

On the CPU the kernels run in Triton's interpreter (tiny shapes); the inputs are column slices of one (B, T, D)
tensor, as the layer passes them.
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from hybrid.kernels.mamba3.triton_ssm_inputs import ROWS_PER_PROGRAM, ssm_inputs_triton, unsupported_reason  # noqa: E402
from hybrid.layers.mamba3 import ssm_inputs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

CASES = {  # B, T, R, G, N, H, S, a_activation, trapezoid, rotation
    "default": (2, 21, 1, 1, 32, 4, 8, "heavy_tail", "learned", "data_dependent"),
    "ragged": (1, ROWS_PER_PROGRAM + 5, 1, 2, 24, 3, 6, "heavy_tail", "learned", "data_dependent"),
    "softplus-half": (2, 9, 1, 1, 16, 5, 4, "softplus", "half", "data_dependent"),
    "euler-fixed-rope": (1, 13, 1, 1, 16, 4, 0, "heavy_tail", "euler", "data_independent"),
    "mimo": (2, 7, 2, 2, 16, 4, 4, "heavy_tail", "learned", "none"),
}


def slices(B, T, R, G, N, H, S, trapezoid, dtype, device="cpu", seed=0):
    """Column slices of one (B, T, D) tensor in the layer's order, with values reaching softplus's threshold, the
    decay floor (A above -A_floor) and both branches of heavy_tail."""
    widths = [R * G * N, R * G * N, H, H, H if trapezoid == "learned" else 0, S]
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(B, T, sum(widths) + 3, generator=g, dtype=torch.float64) * 2  # 3 columns no slice reads
    u_dt_col, u_A_col = 2 * R * G * N, 2 * R * G * N + H
    proj[0, 0, u_dt_col] = 25.0  # softplus' linear branch
    proj[0, 1, u_A_col] = -3e4  # heavy_tail(u) = 1 / (1 - u) < A_floor: the clamp holds
    proj = proj.to(device, dtype).requires_grad_()
    parts = proj[..., :sum(widths)].split(widths, dim=-1)
    Bm, Cm = parts[0].unflatten(-1, (R, G, N)), parts[1].unflatten(-1, (R, G, N))
    return proj, (Bm, Cm, *parts[2:])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssm_inputs_kernels_match_layer_function(case, dtype):
    B, T, R, G, N, H, S, act, trap, rot = CASES[case]
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(H, generator=g, dtype=torch.float64), 1 + 0.2 * torch.randn(N, generator=g, dtype=torch.float64),
              1 + 0.2 * torch.randn(N, generator=g, dtype=torch.float64)]
    eps, A_floor = 1e-5, 1e-4

    def run(fn, dev, dtype_in):
        proj, sl = slices(B, T, R, G, N, H, S, trap, dtype_in, dev)
        ps = [p.to(dev, torch.float32).requires_grad_() for p in params]
        cdt = torch.promote_types(dtype_in, torch.float32)
        out = fn(*sl, ps[0], ps[1], ps[2], eps, act, A_floor, trap, rot, cdt)
        gen = torch.Generator().manual_seed(2)
        loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(dev)).sum()
                   for o in out if o is not None and o.requires_grad)
        grads = torch.autograd.grad(loss, [proj, *ps])
        return [None if o is None else o.detach().double().cpu() for o in out], [x.double().cpu() for x in grads]

    assert unsupported_reason(*slices(B, T, R, G, N, H, S, trap, dtype)[1], params[1], torch.float32) is None
    got, got_grads = run(ssm_inputs_triton, DEV, dtype)
    want, want_grads = run(ssm_inputs, "cpu", dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


def test_unsupported_inputs_are_named():
    B, T, R, G, N, H, S = 1, 4, 1, 1, 16, 2, 4
    _, sl = slices(B, T, R, G, N, H, S, "learned", torch.float32)
    w = torch.ones(N)
    assert "BCNorm" in unsupported_reason(*sl, None, torch.float32)
    assert "float64" in unsupported_reason(*sl, w, torch.float64)
    Bm, Cm, *rest = sl
    assert "rows of one" in unsupported_reason(Bm.contiguous(), Cm, *rest, w, torch.float32)

