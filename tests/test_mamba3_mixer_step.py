"""The fused mixer decode step (``triton_mixer_step.py``, SISO and MIMO) against the layer's eager path.

On the CPU the kernel runs under TRITON_INTERPRET=1 (conftest); the layer with backend "triton" uses it for
every decode step, and backend "torch" is the oracle: outputs and every cache tensor after several steps.
"""

import pytest
import torch

pytest.importorskip("triton")

from hybrid.kernels.mamba3 import triton_mixer_step  # noqa: E402
from hybrid.layers.mamba3 import Mamba3, Mamba3Config  # noqa: E402

VARIANTS = {
    "default": dict(),
    "fixed-rope-half-trapezoid": dict(rotation="data_independent", trapezoid="half", ngroups=2),
    "no-rotation-euler-softplus": dict(rotation="none", trapezoid="euler", a_activation="softplus"),
    "no-norm-no-bias": dict(bc_norm=False, bc_bias=False, rope_fraction=1.0),
    "mimo2": dict(mimo_rank=2),
    "mimo4-groups-fixed-rope": dict(mimo_rank=4, ngroups=2, rotation="data_independent", rope_fraction=1.0),
    "mimo1-no-norm-half-trapezoid": dict(is_mimo=True, bc_norm=False, trapezoid="half", a_activation="softplus"),
}


def _decode_both(variant, dtype, device, monkeypatch, d_model=64, **extra):
    """Decode 5 steps after a shared prefill with the fused step and with its oracle; returns the outputs, the
    caches, and how many times the fused kernel ran."""
    calls = []
    real = triton_mixer_step.mamba3_mixer_step_
    monkeypatch.setattr(triton_mixer_step, "mamba3_mixer_step_", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    kw = dict(d_state=32, headdim=16, chunk_size=16, fused_decode_step=True, **VARIANTS[variant]) | extra
    # fp32: the PyTorch reference step is the oracle. bf16: the unfused Triton step (SISO or MIMO), which rounds
    # at the same points (the reference keeps y in fp32 through the gate, so bf16 outputs differ by more than rounding noise).
    ref = Mamba3(d_model, Mamba3Config(**kw, backend="torch" if dtype == torch.float32 else "triton")).to(device, dtype)
    ref._use_fused_step = lambda *args: False
    fast = Mamba3(d_model, Mamba3Config(**kw, backend="triton")).to(device, dtype)
    with torch.no_grad():  # non-trivial biases and gains, so that a misplaced slice shows
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 12, d_model, dtype=dtype, device=device)
    caches = [ref.allocate_cache(2, 12), fast.allocate_cache(2, 12)]
    with torch.no_grad():
        # One prefill (the reference's: the interpreter's bf16 matmuls are unreliable) for both, then decode.
        ref.cfg.backend = "torch"
        ref(x[:, :7], cache=caches[0])
        ref.cfg.backend = "torch" if dtype == torch.float32 else "triton"
        for dst, src in zip(caches[1].state(), caches[0].state()):
            dst.copy_(src)
        outs = [torch.cat([m(x[:, t:t + 1], cache=c) for t in range(7, 12)], 1) for m, c in zip((ref, fast), caches)]
    return outs, caches, len(calls)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fused_step_matches_eager_layer(variant, split, monkeypatch):
    # float32 only on the CPU: the interpreter casts to bf16 by truncation, not round-to-nearest as the GPU does.
    # split 1: the layer's own launch config; split 2: two programs per head (what batch 1 runs on a GPU), the last
    # reader writing the angle and keys.
    if split > 1:
        monkeypatch.setattr(triton_mixer_step, "launch_config", lambda programs, headdim, rank: (headdim // 2, 4, split))
    outs, caches, calls = _decode_both(variant, torch.float32, "cpu", monkeypatch)
    assert calls == 5  # every decode step took the fused kernel
    tol = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[1], outs[0], **tol)
    for name in ("angle", "ssm", "k", "v"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), **tol, msg=name)


@pytest.mark.parametrize("split", [1, 2])
@pytest.mark.parametrize("variant", ["default", "mimo2"])
def test_fused_step_in_row_blocks(variant, split, monkeypatch):
    """Several (BP, N) blocks of the state per program (the next block's load in flight) equal one block; so do
    several programs per head, each with its part of the rows, the last to read the head's angle and keys writing
    their new values (and leaving the reader count at zero for the next step)."""
    monkeypatch.setattr(triton_mixer_step, "launch_config", lambda *args: (4, 1, split))
    outs, caches, calls = _decode_both(variant, torch.float32, "cpu", monkeypatch)
    assert calls == 5
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for name in ("angle", "ssm", "k", "v"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), rtol=1e-4, atol=1e-5, msg=name)
    assert not caches[1].readers.any()


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gpu_fused_step_bf16_matches_unfused_step(variant, monkeypatch):
    """bf16 at the issue's d_model 1024 shape: the fused step against the unfused Triton step (same rounding
    points), outputs and caches."""
    outs, caches, calls = _decode_both(variant, torch.bfloat16, "cuda", monkeypatch, d_model=1024, d_state=128,
                                       headdim=64, chunk_size=64)
    assert calls == 5
    assert float((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()) < 1e-2
    for name in ("angle", "ssm", "k", "v"):
        a, b = getattr(caches[1], name).float(), getattr(caches[0], name).float()
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-2, name


def test_unsupported_layers_fall_back():
    assert triton_mixer_step.unsupported_reason(32, 16, rank=3, outproj_norm=False)
    assert triton_mixer_step.unsupported_reason(32, 16, rank=1, outproj_norm=True)
    assert triton_mixer_step.unsupported_reason(32, 16, rank=4, outproj_norm=False) is None
    layer = Mamba3(64, Mamba3Config(d_state=32, headdim=16, chunk_size=16, outproj_norm=True, backend="triton",
                                    fused_decode_step=True))
    assert not layer._use_fused_step(torch.zeros(1, 1, 64), None)


def test_reader_count_is_scratch_not_state():
    """The fused step's reader count lives with the cache but is neither state nor KV: bench byte counts and graph
    snapshots leave it out."""
    from hybrid.decode_graph import cache_tensors

    layer = Mamba3(64, Mamba3Config(d_state=32, headdim=16, chunk_size=16))
    cache = layer.allocate_cache(2, 8)
    assert cache.readers.shape == (2, layer.H) and cache.readers.dtype == torch.int32
    assert all(t is not cache.readers for t, _ in cache_tensors(cache))
    assert len(list(cache_tensors(cache))) == 4


@pytest.mark.parametrize("variant", ["mimo2", "mimo4-groups-fixed-rope"])
def test_fused_step_tensor_core_mimo_path(variant, monkeypatch):
    """The MIMO update and readout as two products over 16 rank slots (the path for 16-bit states), forced here
    in fp32 so that the interpreter checks its slot bookkeeping exactly; two 16-row blocks per program."""
    real = triton_mixer_step.mamba3_mixer_step_
    monkeypatch.setattr(triton_mixer_step, "mamba3_mixer_step_", lambda *a, **k: real(*a, **k, dot16=True))
    monkeypatch.setattr(triton_mixer_step, "tensor_core_config", lambda *args: (16, 1, 1))
    outs, caches, calls = _decode_both(variant, torch.float32, "cpu", monkeypatch, headdim=32)
    assert calls == 5
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-5)
    for name in ("angle", "ssm", "k", "v"):
        torch.testing.assert_close(getattr(caches[1], name), getattr(caches[0], name), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [2, 4, 8])
def test_gpu_tensor_core_mimo_step_bf16_state(rank, monkeypatch):
    """The tensor-core MIMO path with a bf16 state at the issue's d_model 1024 shape, against the unfused Triton
    step: its operands are rounded to bf16, as the state is anyway."""
    real = triton_mixer_step.mamba3_mixer_step_
    monkeypatch.setattr(triton_mixer_step, "mamba3_mixer_step_", lambda *a, **k: real(*a, **k, dot16=True))
    outs, caches, calls = _decode_both("mimo2", torch.bfloat16, "cuda", monkeypatch, d_model=1024, d_state=128,
                                       headdim=64, chunk_size=64, mimo_rank=rank, state_dtype="model")
    assert calls == 5 and caches[1].ssm.dtype == torch.bfloat16
    assert float((outs[1].float() - outs[0].float()).norm() / outs[0].float().norm()) < 1e-2
    for name in ("angle", "ssm", "k", "v"):
        a, b = getattr(caches[1], name).float(), getattr(caches[0], name).float()
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-2, name


def test_tensor_core_path_default_and_launch(monkeypatch):
    """Tensor cores for MIMO with a 16-bit state (headdim >= 16); the plain path for fp32 states, SISO, headdims
    under 16, and when HYBRID_MIMO_DOT16=0 turns it off. Its launch takes whole heads while programs are few."""
    pick = triton_mixer_step.tensor_core_default
    monkeypatch.setattr(triton_mixer_step, "MIMO_DOT16", True)
    assert pick(64, 4, torch.bfloat16) and pick(64, 2, torch.float16)
    assert not pick(64, 4, torch.float32)
    assert not pick(64, 1, torch.bfloat16)
    assert not pick(8, 4, torch.bfloat16)
    monkeypatch.setattr(triton_mixer_step, "MIMO_DOT16", False)
    assert not pick(64, 4, torch.bfloat16)
    assert triton_mixer_step.tensor_core_config(32, 64) == (64, 4, 1)
    assert triton_mixer_step.tensor_core_config(512, 128) == (64, 2, 1)
    assert triton_mixer_step.tensor_core_config(8192, 64) == (16, 1, 1)
