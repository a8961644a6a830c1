"""Triton Mamba-3 SISO kernels with sequence boundaries (packed documents, ``seq_idx``) against the float64
PyTorch reference ``mamba3_chunk(..., seq_idx=...)``: outputs, final state and every input gradient.

On the CPU these run under TRITON_INTERPRET=1 (conftest) at tiny shapes with chunk 16; the ``gpu`` test
repeats them at real sizes in bf16 against an fp32 reference.
"""

import pytest
import torch

pytest.importorskip("triton")

from hybrid.kernels.mamba3 import Mamba3State  # noqa: E402
from test_mamba3_triton import _check_state, _close, _rel, forward_and_grads, make  # noqa: E402

# Document lengths per row (B = 2), chunk 16. Each layout names what it covers.
LAYOUTS = {
    # row 0: three documents start inside chunk 0, one of them a single token, then a start inside chunk 1;
    # row 1: documents start exactly at chunk starts (16, 32).
    "inside-and-at-chunk-starts": ([5, 1, 3, 14, 17], [16, 16, 8]),
    # row 0: a document that runs through a whole chunk (its angle and state pass two chunk boundaries)
    # and a one-token last document (the final state); row 1: a single document.
    "through-and-single": ([3, 30, 6, 1], [40]),
    # row 0: a one-token first document (the initial state reaches token 0 only); row 1: a one-token
    # document at a chunk's last position followed by one starting at the next chunk.
    "one-token-edges": ([1, 39], [15, 1, 24]),
}


def seq_from(lengths) -> torch.Tensor:
    """(B, T) non-decreasing document ids (not starting at 0, with gaps) from per-row document lengths."""
    return torch.stack([torch.cat([torch.full((n,), 7 + 3 * d) for d, n in enumerate(row)]) for row in lengths])


def random_seq(B, T, seed, docs=6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randint(0, docs, (B, T), generator=g), dim=1).values


CASES = {
    "inside-rot-bias-init": dict(layout="inside-and-at-chunk-starts"),
    "through-rot-bias-init": dict(layout="through-and-single"),
    "edges-noinit": dict(layout="one-token-edges", init=False),
    "fixed-freq": dict(layout="inside-and-at-chunk-starts", angle_dt=False),
    "norot-nobias": dict(layout="through-and-single", rot=False, bias=False),
    "rope-full-nobias": dict(layout="one-token-edges", S=16, bias=False),
    "random-docs-gqa": dict(layout="random", T=50, G=1, H=4),
}


def _run_both(kw: dict, seq: torch.Tensor):
    """Forward + gradients (random cotangents on y and on the final ssm, k and v) through the Triton kernels
    in float32 and through the reference in float64."""
    from hybrid.kernels.mamba3.siso import mamba3_siso_chunk, mamba3_siso_reference

    angle_dt = kw.get("angle_dt", True)
    inp, st = make(**kw)
    names = [k for k, v in inp.items() if v is not None and not (k == "omega" and not angle_dt)]
    labels = names + ([] if st is None else ["ssm0", "k0", "v0"])
    return (forward_and_grads(mamba3_siso_chunk, inp, st, names, torch.float32, angle_dt, seq_idx=seq),
            forward_and_grads(mamba3_siso_reference, inp, st, names, torch.float64, angle_dt, seq_idx=seq), labels)


@pytest.mark.parametrize("case", list(CASES))
def test_seq_idx_matches_reference(case):
    """Outputs, final state and all gradients (inputs and initial state) of the packed-document kernels equal
    the float64 reference with the same seq_idx."""
    kw = dict(CASES[case])
    layout = kw.pop("layout")
    T = kw.setdefault("T", 40)
    seq = random_seq(2, T, seed=3) if layout == "random" else seq_from(LAYOUTS[layout])
    assert seq.shape == (2, T)
    (y, state, got), (y_ref, state_ref, want), labels = _run_both(kw, seq)
    _close(y, y_ref, 2e-4)
    _check_state(state, state_ref, 2e-4)
    errors = {name: _rel(a, b) for name, a, b in zip(labels, got, want)}
    assert len(errors) == len(got) and all(e < 2e-4 for e in errors.values()), errors


@pytest.mark.parametrize("heads_first", [False, True])
def test_seq_idx_several_column_blocks(monkeypatch, heads_first):
    """Packed documents with two column blocks of 8 pairs, the second partly rotated (12 angles); programs
    numbered chunks first and heads first."""
    from hybrid.kernels.mamba3 import triton_siso

    monkeypatch.setattr(triton_siso, "COL_BLOCK", 8)
    monkeypatch.setattr(triton_siso, "HEADS_FIRST_CHUNKS", -1 if heads_first else 1 << 30)
    (y, state, got), (y_ref, state_ref, want), labels = _run_both(dict(T=40, S=12), seq_from(LAYOUTS["through-and-single"]))
    _close(y, y_ref, 2e-4)
    _check_state(state, state_ref, 2e-4)
    errors = {name: _rel(a, b) for name, a, b in zip(labels, got, want)}
    assert all(e < 2e-4 for e in errors.values()), errors


def test_one_document_per_row_equals_no_seq_idx():
    """A seq_idx with one document per row (different ids per row) runs the packed kernels but computes
    what the plain kernels do."""
    from hybrid.kernels.mamba3.triton_siso import mamba3_siso_chunk_fwd

    inp, st = make(T=37)
    inp = {k: (v.float() if torch.is_tensor(v) else v) for k, v in inp.items()}
    st = Mamba3State(*(s.float() for s in st))
    seq = torch.tensor([[4], [9]]).expand(2, 37)
    y, state = mamba3_siso_chunk_fwd(**inp, initial_state=st, chunk_size=16, seq_idx=seq)
    y0, state0 = mamba3_siso_chunk_fwd(**inp, initial_state=st, chunk_size=16)
    _close(y, y0, 1e-5)
    _check_state(state, state0, 1e-5)


def test_seq_idx_shape_is_checked():
    from hybrid.kernels.mamba3.triton_siso import mamba3_siso_chunk_fwd

    inp, _ = make(T=5, init=False)
    with pytest.raises(ValueError, match="seq_idx"):
        mamba3_siso_chunk_fwd(**{k: v.float() if torch.is_tensor(v) else v for k, v in inp.items()}, chunk_size=16,
                              seq_idx=torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.gpu
def test_gpu_bf16_seq_idx_matches_fp32_reference():
    """B=2, T=1000, chunk 64 in bf16 with a few documents per row (starts inside chunks, at a chunk start, a
    one-token document): outputs, final state and gradients against the fp32 reference; two runs identical."""
    from hybrid.kernels.mamba3.siso import mamba3_siso_chunk, mamba3_siso_reference

    inp, st = make(B=2, T=1000, G=1, H=8, N=128, P=64, S=32, dtype=torch.float32, device="cuda")
    seq = seq_from(([130, 1, 301, 64, 504], [64, 192, 700, 44])).cuda()
    names = ["q", "k", "v", "log_decay", "dt", "lam", "omega", "q_bias", "k_bias", "D"]

    def run(fn, cast):
        leaves = {k: (v.to(torch.bfloat16) if cast and k in ("q", "k", "v") else v).detach().clone().requires_grad_(True)
                  for k, v in inp.items()}
        state = Mamba3State(st.angle, *(s.clone().requires_grad_(True) for s in st[1:]))
        y, out = fn(**leaves, initial_state=state, chunk_size=64, seq_idx=seq)
        gen = torch.Generator(device="cuda").manual_seed(1)
        loss = (y.float() * torch.randn(y.shape, generator=gen, device="cuda")).sum()
        for t in (out.ssm, out.k):
            loss = loss + (t.float() * torch.randn(t.shape, generator=gen, device="cuda")).sum()
        grads = torch.autograd.grad(loss, [leaves[k] for k in names] + list(state[1:]))
        return y.detach().float(), Mamba3State(*(t.detach().float() for t in out)), [g.float() for g in grads]

    (y, state, got), (y_ref, state_ref, want) = run(mamba3_siso_chunk, True), run(mamba3_siso_reference, False)
    assert torch.isfinite(y).all()
    assert float((y - y_ref).abs().max() / y_ref.abs().max()) < 3e-2
    assert float((state.ssm - state_ref.ssm).norm() / state_ref.ssm.norm()) < 3e-2
    wrapped = torch.remainder(state.angle - state_ref.angle + torch.pi, 2 * torch.pi) - torch.pi
    assert float(wrapped.abs().max()) < 1e-3
    tol = {"omega": 8e-2}  # bf16-rounded terms summed over every later token of the document, as without seq_idx
    for name, a, b in zip(names + ["ssm0", "k0", "v0"], got, want):
        assert torch.isfinite(a).all(), name
        assert float((a - b).norm() / b.norm()) < tol.get(name, 3e-2), name
    y2, state2, again = run(mamba3_siso_chunk, True)
    assert torch.equal(y, y2) and torch.equal(state.ssm, state2.ssm)
    assert all(torch.equal(a, b) for a, b in zip(got, again))  # deterministic (no atomics)
