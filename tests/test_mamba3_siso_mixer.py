"""The one-function Mamba-3 SISO mixer core (``siso_mixer.py``: in_proj output -> gated scan output) against the
layer's composed path through the PyTorch reference: output and every input / parameter gradient.

On the CPU the Triton kernels run in the interpreter at tiny, ragged shapes (T not a multiple of the chunk).
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from hybrid.kernels.mamba3.siso import mamba3_siso_reference  # noqa: E402
from hybrid.kernels.mamba3.siso_mixer import mamba3_siso_mixer, unsupported_reason  # noqa: E402
from hybrid.kernels.mamba3.triton_gate import gate_backward, gate_forward  # noqa: E402
from hybrid.layers.mamba3 import gate_output, ssm_inputs  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
H, P, G, N, S, C = 4, 16, 1, 32, 8, 16

CASES = {  # B, T, a_activation, trapezoid, rotation, packed documents
    "default": (2, 37, "heavy_tail", "learned", "data_dependent", False),
    "fixed-rope-euler": (1, 21, "heavy_tail", "euler", "data_independent", False),
    "no-rotation-half-softplus": (2, 19, "softplus", "half", "none", False),
    "packed": (2, 35, "heavy_tail", "learned", "data_dependent", True),
    # an in_proj width that is a multiple of ROW_ALIGN (208): x read and dx written in place, with rotation and
    # documents (the other aligned case, 200, has neither)
    "packed-rope-euler-aligned": (2, 35, "heavy_tail", "euler", "data_dependent", True),
}


def split_for(trapezoid, rotation):
    return [H * P, H * P, G * N, G * N, H, H, H if trapezoid == "learned" else 0, S if rotation == "data_dependent" else 0]


def composed(proj, params, act, trap, rot, seq_idx, eps=1e-5, A_floor=1e-4):
    """The layer's composed path: ssm_inputs -> the scan's PyTorch reference -> gate_output."""
    dt_bias, Bw, Cw, q_bias, k_bias, D, rope_freq = params
    B, T = proj.shape[:2]
    z, xs, Bm, Cm, u_dt, u_A, u_lam, u_th = proj.split(split_for(trap, rot), dim=-1)
    Bn, Cn, dt, log_decay, lam, omega = ssm_inputs(Bm.unflatten(-1, (1, G, N)), Cm.unflatten(-1, (1, G, N)), u_dt, u_A,
                                                   u_lam, u_th, dt_bias, Bw, Cw, eps, act, A_floor, trap, rot, proj.dtype)
    if rot == "data_independent":
        omega = rope_freq.expand(B, T, S)
    y, _ = mamba3_siso_reference(Cn.squeeze(2), Bn.squeeze(2), xs.unflatten(-1, (H, P)), log_decay, dt, lam, omega,
                                 rot == "data_dependent", q_bias, k_bias, D, chunk_size=C, seq_idx=seq_idx)
    return gate_output(y[:, :, None], z.unflatten(-1, (H, P)), None, eps, None, None).flatten(2)


@pytest.mark.parametrize("case", list(CASES))
def test_mixer_function_matches_composed_path(case):
    B, T, act, trap, rot, packed = CASES[case]
    g = torch.Generator().manual_seed(T)
    width = sum(split_for(trap, rot))
    proj = torch.randn(B, T, width, generator=g, dtype=torch.float64)
    dt_cols = slice(2 * H * P + 2 * G * N, 2 * H * P + 2 * G * N + H)
    proj[..., dt_cols] -= 3  # dt around softplus(-3): decays that keep a few chunks of memory
    params = [torch.randn(H, generator=g, dtype=torch.float64) * 0.5, 1 + 0.2 * torch.randn(N, generator=g, dtype=torch.float64),
              1 + 0.2 * torch.randn(N, generator=g, dtype=torch.float64), torch.randn(H, N, generator=g, dtype=torch.float64),
              torch.randn(H, N, generator=g, dtype=torch.float64), torch.randn(H, generator=g, dtype=torch.float64),
              0.1 * math.pi * torch.rand(S, generator=g, dtype=torch.float64)]
    seq_idx = torch.sort(torch.randint(0, 3, (B, T), generator=g), dim=1).values if packed else None
    weight = torch.randn(B, T, H * P, generator=g, dtype=torch.float64)

    def run(fn, dtype, dev):
        leaves = [t.to(dev, dtype).requires_grad_(i < 7) for i, t in enumerate([proj, *params])]
        out = fn(leaves[0], leaves[1:], dev)
        loss = (out.double() * weight.to(dev)).sum()
        grads = torch.autograd.grad(loss, leaves[:7])
        return out.detach().double().cpu(), [x.double().cpu() for x in grads]

    def fast(p, ps, dev):
        return mamba3_siso_mixer(p, split_for(trap, rot), *ps, heads=H, headdim=P, groups=G, d_state=N, eps=1e-5,
                                 a_activation=act, A_floor=1e-4, trapezoid=trap, rotation=rot, chunk_size=C,
                                 seq_idx=None if seq_idx is None else seq_idx.to(dev))

    def slow(p, ps, dev):
        return composed(p, ps, act, trap, rot, seq_idx)

    assert unsupported_reason(proj.float(), False, True, False) is None
    out, grads = run(fast, torch.float32, DEV)
    want, want_grads = run(slow, torch.float64, "cpu")
    torch.testing.assert_close(out, want, rtol=2e-4, atol=2e-4)
    names = ["proj", "dt_bias", "B_norm_weight", "C_norm_weight", "q_bias", "k_bias", "D"]
    for name, a, b in zip(names, grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * max(1.0, float(b.abs().max())), msg=name)


def test_gate_kernels_match_gate_output():
    """y * silu(z) and its gradients, z a row-strided view, dz written into a row-strided buffer."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 5, 40, generator=g, dtype=torch.float64)
    zbuf = torch.randn(2, 5, 50, generator=g, dtype=torch.float64)
    dout = torch.randn(2, 5, 40, generator=g, dtype=torch.float64)
    z = zbuf[..., 3:43]
    out = gate_forward(y.float().to(DEV), z.float().to(DEV))
    yl, zl = y.clone().requires_grad_(), z.clone().requires_grad_()
    want = gate_output(yl[:, :, None], zl, None, 1e-5, None, None)
    torch.testing.assert_close(out.double().cpu(), want.detach(), rtol=1e-5, atol=1e-5)
    dy_want, dz_want = torch.autograd.grad((want * dout).sum(), (yl, zl))
    dbuf = torch.zeros(2, 5, 60, dtype=torch.float32, device=DEV)
    dy = gate_backward(dout.float().to(DEV), y.float().to(DEV), z.float().to(DEV), dbuf[..., 7:47])
    torch.testing.assert_close(dy.double().cpu(), dy_want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbuf[..., 7:47].double().cpu(), dz_want, rtol=1e-5, atol=1e-5)
    assert not dbuf[..., :7].any() and not dbuf[..., 47:].any()  # nothing written outside the view


def test_unsupported_calls_are_named():
    proj = torch.zeros(1, 4, 8)
    assert unsupported_reason(proj, True, True, False) == "MIMO"
    assert "BCNorm" in unsupported_reason(proj, False, False, False)
    assert "norm" in unsupported_reason(proj, False, True, True)
    assert "float64" in unsupported_reason(proj.double(), False, True, False)
    assert "contiguous" in unsupported_reason(torch.zeros(2, 4, 8).transpose(0, 1), False, True, False)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["triton", "mixer"])
def test_gpu_layer_fusion_modes_match_compiled(monkeypatch, mode):
    """A 125M-width Mamba-3 layer under bf16 autocast at 2 x 1000: output and every parameter gradient with the
    Triton ssm-inputs pair or the one-function mixer core (the default, ``HYBRID_MAMBA3_FUSION``) against the
    torch.compile'd path."""
    import hybrid.layers.mamba3 as mamba3

    torch.manual_seed(0)
    layer = mamba3.Mamba3(768, mamba3.Mamba3Config()).cuda()
    x = torch.randn(2, 1000, 768, device="cuda")

    def run(fusion: str):
        monkeypatch.setattr(mamba3, "FUSION", fusion)
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1], device="cuda")).sum().backward()
        return y.float(), {name: p.grad.float().clone() for name, p in layer.named_parameters()}

    y_ref, g_ref = run("compile")
    y, g = run(mode)
    assert float((y - y_ref).norm() / y_ref.norm()) < 1e-2
    for name, ref in g_ref.items():
        assert float((g[name] - ref).norm() / ref.norm().clamp_min(1e-12)) < 2e-2, name


@pytest.mark.parametrize("rotation", ["data_dependent", "data_independent", "none"])
def test_layer_mixer_function_plumbing(rotation):
    """The layer's call of the mixer core (its split, biases, frequencies, D) gives the layer's own output and
    parameter gradients (the composed path through the PyTorch reference), interpreter on the CPU."""
    from hybrid.layers.mamba3 import Mamba3, Mamba3Config

    torch.manual_seed(0)
    kw = dict(d_state=32, headdim=16, chunk_size=16, rotation=rotation)
    ref = Mamba3(32, Mamba3Config(**kw, backend="torch")).to(DEV)
    fast = Mamba3(32, Mamba3Config(**kw, backend="triton")).to(DEV)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 21, 32, device=DEV)
    y_ref = ref(x)
    y = fast.out_proj(fast._mixer_function(fast.in_proj(x), None))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    y_ref.square().mean().backward()
    y.square().mean().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)
