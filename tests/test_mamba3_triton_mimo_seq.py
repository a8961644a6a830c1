"""Triton Mamba-3 MIMO kernels with sequence boundaries (packed documents, ``seq_idx``) against the float64
PyTorch reference ``mamba3_chunk(..., seq_idx=..., pairing="half")``: outputs, final state and every input
gradient.

On the CPU these run under TRITON_INTERPRET=1 (conftest) at tiny shapes with 16 or 32 rows per chunk
(chunk_size * R); the ``gpu`` test repeats them at a real size in bf16 against an fp32 reference.
"""

import functools

import pytest
import torch

pytest.importorskip("triton")

from hybrid.kernels.mamba3 import Mamba3State  # noqa: E402
from hybrid.kernels.mamba3.mimo import mamba3_mimo_chunk, mamba3_mimo_reference  # noqa: E402
from test_mamba3_triton_mimo import _angle_error, _rel, make, run  # noqa: E402
from test_mamba3_triton_seq import random_seq, seq_from  # noqa: E402

# Document lengths per row (B = 2), read with chunk 8 (or 4). Each layout names what it covers.
LAYOUTS = {
    # row 0: four documents start inside chunk 0 (one of them a single token), one at a chunk start (16) and
    # one inside the ragged last chunk; row 1: documents start exactly at chunk starts (8, 16).
    "inside-and-at-chunk-starts": ([3, 1, 2, 10, 3, 2], [8, 8, 5]),
    # row 0: a document that runs through a whole chunk (its angle and state pass two chunk boundaries) and a
    # one-token last document (the final state); row 1: a single document.
    "through-and-single": ([2, 15, 3, 1], [21]),
    # row 0: a one-token first document (the initial state reaches token 0 only); row 1: a one-token document
    # at a chunk's last position followed by one starting at the next chunk.
    "one-token-edges": ([1, 20], [7, 1, 13]),
}


CASES = {  # (make() options, chunk_size, layout): chunk_size * R rows per chunk
    "r2-inside-rot-bias-init": (dict(T=21, R=2), 8, "inside-and-at-chunk-starts"),
    "r4-through-gqa": (dict(T=21, R=4, G=2, H=4, S=8, seed=1), 4, "through-and-single"),
    "r2-edges-noinit": (dict(T=21, R=2, init=False, seed=2), 8, "one-token-edges"),
    "r4-fixed-freq-full-rope-rows32": (dict(T=21, R=4, S=16, angle_dt=False, seed=3), 8, "inside-and-at-chunk-starts"),
    "r2-norot-nobias": (dict(T=21, R=2, rot=False, bias=False, seed=4), 8, "through-and-single"),
    "r4-rot-nobias-edges": (dict(T=21, R=4, bias=False, seed=5), 4, "one-token-edges"),
    "r2-random-docs": (dict(T=30, R=2, G=2, H=2, seed=6), 8, "random"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_mimo_seq_idx_matches_reference(case):
    """y, the final state and every gradient (inputs and initial ssm/k/v) of the packed-document kernels (fp32)
    equal autograd through the float64 reference with the same seq_idx."""
    kw, chunk_size, layout = CASES[case]
    T = kw["T"]
    seq = random_seq(2, T, seed=3) if layout == "random" else seq_from(LAYOUTS[layout])
    assert seq.shape == (2, T)
    angle_dt = kw.get("angle_dt", True)
    inp, st = make(**kw)
    fast = functools.partial(mamba3_mimo_chunk, seq_idx=seq)
    ref = functools.partial(mamba3_mimo_reference, seq_idx=seq)
    y, state, got = run(fast, inp, st, torch.float32, angle_dt, chunk_size)
    y_ref, state_ref, want = run(ref, inp, st, torch.float64, angle_dt, chunk_size)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    errors = {"y": _rel(y, y_ref), "ssm": _rel(state.ssm, state_ref.ssm), "k": _rel(state.k, state_ref.k),
              "v": _rel(state.v, state_ref.v), "angle": _angle_error(state.angle, state_ref.angle)}
    errors.update({f"d{name}": _rel(got[name], want[name]) for name in want})
    assert set(got) == set(want) and all(e < 2e-5 for e in errors.values()), errors
    assert ("ssm0" in got) == kw.get("init", True)


def test_mimo_one_document_per_row_equals_no_seq_idx():
    """A seq_idx with one document per row (different ids per row) runs the packed kernels but computes what
    the plain kernels do, gradients included."""
    inp, st = make(T=19, R=2, seed=7)
    seq = torch.tensor([[4], [9]]).expand(2, 19)
    y, state, got = run(functools.partial(mamba3_mimo_chunk, seq_idx=seq), inp, st, torch.float32, True, 8)
    y0, state0, want = run(mamba3_mimo_chunk, inp, st, torch.float32, True, 8)
    torch.testing.assert_close(y, y0, rtol=1e-5, atol=1e-5)
    for a, b in zip(state, state0):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_mimo_seq_idx_shape_is_checked():
    inp, _ = make(T=5, R=2, init=False)
    inp = {k: v.float() if torch.is_tensor(v) else v for k, v in inp.items()}
    with pytest.raises(ValueError, match="seq_idx"):
        mamba3_mimo_chunk(**inp, chunk_size=8, seq_idx=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="seq_idx"):
        mamba3_mimo_chunk(**inp, chunk_size=8, seq_idx=torch.zeros(2, 5))


@pytest.mark.gpu
def test_gpu_mimo_bf16_seq_idx_matches_fp32_reference():
    """B=2, T=1000, R=4, chunk 16 in bf16 with a few documents per row (starts inside chunks, at a chunk start,
    a one-token document): outputs, final state and gradients against the fp32 reference; two runs identical."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    inp, st = make(B=2, T=1000, R=4, G=1, H=8, N=128, P=64, S=32, dtype=torch.float32, device="cuda")
    seq = seq_from(([130, 1, 301, 64, 504], [64, 192, 700, 44])).cuda()
    names = [k for k, v in inp.items() if v is not None]

    def go(fn, cast):
        leaves = {k: (v.to(torch.bfloat16) if cast and k in ("q", "k", "v") else v).detach().clone().requires_grad_(True)
                  for k, v in inp.items() if v is not None}
        state = Mamba3State(st.angle, *(s.clone().requires_grad_(True) for s in st[1:]))
        y, out = fn(**leaves, initial_state=state, chunk_size=16, seq_idx=seq)
        gen = torch.Generator(device="cuda").manual_seed(1)
        loss = (y.float() * torch.randn(y.shape, generator=gen, device="cuda")).sum()
        for t in (out.ssm, out.k):
            loss = loss + (t.float() * torch.randn(t.shape, generator=gen, device="cuda")).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names] + list(state[1:]))
        return y.detach().float(), Mamba3State(*(t.detach().float() for t in out)), [g.float() for g in grads]

    (y, state, got), (y_ref, state_ref, want) = go(mamba3_mimo_chunk, True), go(mamba3_mimo_reference, False)
    assert torch.isfinite(y).all()
    assert float((y - y_ref).abs().max() / y_ref.abs().max()) < 3e-2
    assert _rel(state.ssm, state_ref.ssm) < 3e-2
    assert _angle_error(state.angle, state_ref.angle) < 1e-3
    tol = {"omega": 8e-2}  # bf16-rounded terms summed over every later token of the document, as without seq_idx
    for name, a, b in zip(names + ["ssm0", "k0", "v0"], got, want):
        assert torch.isfinite(a).all(), name
        assert _rel(a, b) < tol.get(name, 3e-2), name
    y2, state2, again = go(mamba3_mimo_chunk, True)
    assert torch.equal(y, y2) and torch.equal(state.ssm, state2.ssm)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic (no atomics)
