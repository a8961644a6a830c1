"""Triton Mamba-3 MIMO chunked scan (forward and backward) against the float64 PyTorch reference.

On the CPU these run under TRITON_INTERPRET=1 (set in conftest) at tiny, ragged shapes with 16 or 32 rows
per chunk (chunk_size * R); on a GPU the ``gpu``-marked tests repeat them at a real size in bf16 against
an fp32 reference.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")

from hybrid.kernels.mamba3 import Mamba3State  # noqa: E402
from hybrid.kernels.mamba3.mimo import mamba3_mimo_chunk, mamba3_mimo_reference  # noqa: E402


def make(B=2, T=13, R=2, G=1, H=2, N=32, P=16, S=4, init=True, bias=True, rot=True, angle_dt=True, seed=0,
         dtype=torch.float64, device="cpu"):
    """Inputs of ``mamba3_mimo_chunk`` (every optional one present unless switched off) and an initial state."""
    gen = torch.Generator().manual_seed(seed)

    def rn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    def ru(*s):
        return torch.rand(*s, generator=gen, dtype=torch.float64)

    dt = 0.05 + 0.5 * ru(B, T, H)
    inp = dict(q=rn(B, T, R, G, N), k=rn(B, T, R, G, N), v=rn(B, T, H, P), log_decay=-2 * ru(B, T, H) * dt - 1e-3,
               dt=dt, lam=ru(B, T, H), omega=None, q_bias=None, k_bias=None, D=None, v_rank=None)
    if rot:
        inp["omega"] = math.pi * torch.tanh(rn(B, T, S)) if angle_dt else (0.3 * ru(S)).expand(B, T, S)
    if bias:
        inp.update(q_bias=rn(H, R, N), k_bias=rn(H, R, N), D=rn(H), v_rank=1 + 0.5 * rn(H, R, P))
    state = None
    if init:
        state = Mamba3State(2 * math.pi * ru(B, H, S if rot else 0), rn(B, H, P, N), rn(B, R, H, N), rn(B, H, P))
        state = Mamba3State(*(s.to(device, dtype) for s in state))
    inp = {key: (val.to(device, dtype) if torch.is_tensor(val) else val) for key, val in inp.items()}
    return inp, state


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))


def _angle_error(got, want):
    got, want = got.detach(), want.detach()
    wrapped = torch.remainder(got.double() - want.double() + math.pi, 2 * math.pi) - math.pi
    return float(wrapped.abs().max()) if wrapped.numel() else 0.0


def run(fn, inp, st, dtype, angle_dt, chunk_size, seed=1):
    """Outputs, final state and the gradients of a random linear loss on y and the final ssm, k and v with
    respect to every float input and the initial ssm, k and v (not the angle: a cache value)."""
    names = [key for key, val in inp.items() if val is not None and not (key == "omega" and not angle_dt)]
    leaves = {key: (val.to(dtype).clone().requires_grad_(key in names) if val is not None else None)
              for key, val in inp.items()}
    state = None
    if st is not None:
        state = Mamba3State(st.angle.to(dtype), *(s.to(dtype).clone().requires_grad_(True) for s in st[1:]))
    y, out = fn(**leaves, angle_dt=angle_dt, initial_state=state, chunk_size=chunk_size)
    gen = torch.Generator().manual_seed(seed)
    loss = 0
    for t in (y, out.ssm, out.k, out.v):
        loss = loss + (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.device, t.dtype)).sum()
    wrt = [leaves[key] for key in names] + ([] if state is None else list(state[1:]))
    labels = names + ([] if state is None else ["ssm0", "k0", "v0"])
    return y, out, dict(zip(labels, torch.autograd.grad(loss, wrt)))


CASES = {  # (shape and options, chunk_size): chunk_size * R rows per chunk
    "r2-ragged-init": (dict(T=13, R=2), 8),
    "r4-gqa-ragged": (dict(T=11, R=4, G=2, H=4, S=8, seed=1), 4),
    "r4-norot-plain": (dict(T=9, R=4, rot=False, bias=False, init=False, seed=2), 4),
    "r2-fixed-freq-full-rope": (dict(T=21, R=2, S=16, angle_dt=False, seed=3), 8),
    "r2-rows32-one-chunk": (dict(T=16, R=2, G=2, H=2, init=False, seed=4), 16),
    "r4-one-token": (dict(T=1, R=4, H=3, seed=5), 4),
    "r4-rows32-rot-nobias": (dict(T=19, R=4, G=2, H=2, S=8, bias=False, seed=6), 8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mimo_chunk_matches_reference(case):
    """y, the final state and every input gradient: Triton (fp32) vs autograd through the float64 reference."""
    kw, chunk_size = CASES[case]
    angle_dt = kw.get("angle_dt", True)
    inp, st = make(**kw)
    y, state, got = run(mamba3_mimo_chunk, inp, st, torch.float32, angle_dt, chunk_size)
    y_ref, state_ref, want = run(mamba3_mimo_reference, inp, st, torch.float64, angle_dt, chunk_size)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    errors = {"y": _rel(y, y_ref), "ssm": _rel(state.ssm, state_ref.ssm), "k": _rel(state.k, state_ref.k),
              "v": _rel(state.v, state_ref.v), "angle": _angle_error(state.angle, state_ref.angle)}
    errors.update({f"d{name}": _rel(got[name], want[name]) for name in want})
    assert set(got) == set(want) and all(e < 2e-5 for e in errors.values()), errors
    assert ("v_rank" in got) == kw.get("bias", True) and ("ssm0" in got) == kw.get("init", True)


def test_mimo_chunk_rejects_unsupported_shapes():
    inp, _ = make(T=5, R=2, N=32, init=False)
    with pytest.raises(ValueError, match="chunk_size must be a power of two >= 16"):
        mamba3_mimo_chunk(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in inp.items()}, chunk_size=4)
    inp, _ = make(T=5, R=2, N=16, S=4, init=False)
    with pytest.raises(ValueError, match="d_state"):
        mamba3_mimo_chunk(**{k: (v.float() if torch.is_tensor(v) else v) for k, v in inp.items()}, chunk_size=8)


@pytest.mark.parametrize("rotation", ["data_dependent", "data_independent"])
def test_layer_mimo_triton_backend_matches_torch(rotation):
    """The MIMO layer with backend=triton (interpreter on CPU) equals backend=torch: forward, prefill through
    the chunk kernels + decode through the step kernel, and parameter gradients through the Triton backward."""
    from hybrid.layers.mamba3 import Mamba3, Mamba3Config

    torch.manual_seed(0)
    kw = dict(d_state=32, headdim=16, mimo_rank=2, chunk_size=8, rotation=rotation)
    ref = Mamba3(32, Mamba3Config(**kw, backend="torch"))
    fast = Mamba3(32, Mamba3Config(**kw, backend="triton"))
    with torch.no_grad():  # perturb the MIMO scales and biases off their uniform inits
        for p in ref.parameters():
            if p.ndim == 3:
                p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 19, 32)
    assert fast._use_triton(x, None) and not ref._use_triton(x, None)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)
    caches = [m.allocate_cache(2, 19) for m in (ref, fast)]
    with torch.no_grad():
        outs = [torch.cat([m(x[:, :15], cache=c)] + [m(x[:, t:t + 1], cache=c) for t in range(15, 19)], 1)
                for m, c in zip((ref, fast), caches)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)
    for a, b in zip(caches[0].state(), caches[1].state()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    ref(x).square().mean().backward()
    fast(x).square().mean().backward()
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_layer_mimo_triton_backend_refuses_unsupported():
    from hybrid.layers.mamba3 import Mamba3, Mamba3Config

    x = torch.randn(1, 5, 32)
    m = Mamba3(32, Mamba3Config(d_state=32, headdim=16, mimo_rank=2, chunk_size=4, backend="triton"))
    with pytest.raises(RuntimeError, match=r"mimo_rank 2 = 8\) must be a power of two"):
        m(x)
    auto = Mamba3(32, Mamba3Config(d_state=32, headdim=16, mimo_rank=2, chunk_size=4, backend="auto"))
    assert not auto._use_triton(x, None)  # auto: the PyTorch reference (and never the CPU interpreter)


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_inputs():
    return make(B=2, T=1000, R=4, G=1, H=8, N=128, P=64, S=32, dtype=torch.float32, device="cuda")


def _bf16(inp):
    return {k: (v.bfloat16() if torch.is_tensor(v) and k in ("q", "k", "v") else v) for k, v in inp.items()}


@pytest.mark.gpu
def test_gpu_mimo_bf16_forward_matches_fp32_reference():
    inp, st = _gpu_inputs()
    y_ref, state_ref = mamba3_mimo_reference(**inp, initial_state=st, chunk_size=16)
    y, state = mamba3_mimo_chunk(**_bf16(inp), initial_state=st, chunk_size=16)
    assert torch.isfinite(y).all() and torch.isfinite(state.ssm).all()
    assert float((y.float() - y_ref).abs().max() / y_ref.abs().max()) < 3e-2
    assert _rel(state.ssm, state_ref.ssm) < 3e-2
    y2, state2 = mamba3_mimo_chunk(**_bf16(inp), initial_state=st, chunk_size=16)
    assert torch.equal(y, y2) and torch.equal(state.ssm, state2.ssm)  # deterministic


@pytest.mark.gpu
def test_gpu_mimo_bf16_gradients_match_fp32_reference():
    inp, st = _gpu_inputs()

    def grads(fn, cast):
        return run(fn, _bf16(inp) if cast else inp, st, torch.float32, True, 16)[2]

    got, want = grads(mamba3_mimo_chunk, True), grads(mamba3_mimo_reference, False)
    # The angle-rate gradient sums bf16-rounded terms over every later token, head and rank: looser.
    tol = {"omega": 8e-2}
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert _rel(got[name].float(), want[name]) < tol.get(name, 3e-2), name
    again = grads(mamba3_mimo_chunk, True)
    assert all(torch.equal(got[name], again[name]) for name in got)  # deterministic backward (no atomics)


@pytest.mark.gpu
def test_gpu_model_mimo_triton_backend_trains_like_torch():
    """A MIMO-4 model under bf16 autocast: Triton (auto on CUDA) vs the PyTorch reference backend."""
    from hybrid.model import build_model

    torch.manual_seed(0)
    models = {backend: build_model({"pattern": "MM", "symbols": {"M": {"mixer": "mamba3", "mimo_rank": 4, "backend": backend}}},
                                   vocab_size=256, d_model=128).cuda() for backend in ("auto", "torch")}
    models["torch"].load_state_dict(models["auto"].state_dict())
    assert models["auto"].blocks[0].mixer._use_triton(torch.zeros(1, device="cuda"), None)
    tokens = torch.randint(0, 256, (4, 200), device="cuda")
    logits = {}
    for backend, model in models.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits[backend] = model(tokens).float()
            logits[backend].logsumexp(-1).mean().backward()
    assert _rel(logits["auto"], logits["torch"]) < 3e-2
    for (name, p_fast), p_ref in zip(models["auto"].named_parameters(), models["torch"].parameters()):
        assert torch.isfinite(p_fast.grad).all(), name
        assert _rel(p_fast.grad, p_ref.grad) < 5e-2, name
