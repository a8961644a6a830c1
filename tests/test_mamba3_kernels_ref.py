"""Mamba-3 kernels: the chunked form equals the recurrent oracle, which equals the explicit T x T form.

All in float64 on tiny shapes, so agreement is to rounding (~1e-12 or better).
"""

import math

import pytest
import torch
from hybrid.kernels.mamba2 import ssd_chunk, ssd_recurrent, ssd_step
from hybrid.kernels.mamba3 import Mamba3State, mamba3_chunk, mamba3_recurrent, mamba3_step, rotate

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def make_inputs(B=2, T=37, R=1, G=2, H=4, N=8, P=4, S=2, init=True, docs=False, rank_scale=None, seed=0):
    """Random SSM inputs with the layer's value ranges: dt > 0, a < 0, lam in (0, 1)."""
    g = torch.Generator().manual_seed(seed)

    def rn(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    def ru(*shape):
        return torch.rand(*shape, generator=g, dtype=F64)

    dt = 0.05 + 0.5 * ru(B, T, H)
    inp = dict(q=rn(B, T, R, G, N), k=rn(B, T, R, G, N), v=rn(B, T, H, P), log_decay=-2 * ru(B, T, H) * dt, dt=dt,
               lam=ru(B, T, H), dtheta=(dt[..., None] * math.pi * torch.tanh(rn(B, T, H, S))) if S else None,
               q_bias=rn(H, R, N), k_bias=rn(H, R, N), D=rn(H),
               v_rank=rn(H, R, P) if (rank_scale or R > 1) else None)
    inp["initial_state"] = Mamba3State(2 * math.pi * ru(B, H, S), rn(B, H, P, N), rn(B, R, H, N), rn(B, H, P)) if init else None
    if docs:  # random non-decreasing document ids, including length-1 documents
        inp["seq_idx"] = torch.sort(torch.randint(0, 5, (B, T), generator=g), dim=1).values
    return inp


def assert_states_close(a: Mamba3State, b: Mamba3State):
    # Angles are defined mod 2pi: compare the wrapped difference.
    wrapped = torch.remainder(a.angle - b.angle + math.pi, 2 * math.pi) - math.pi
    torch.testing.assert_close(wrapped, torch.zeros_like(wrapped), **TOL)
    for x, y in zip(a[1:], b[1:]):
        torch.testing.assert_close(x.to(F64), y.to(F64), **TOL)


CASES = {
    "siso-gqa": dict(R=1, G=2, H=4, pairing="interleaved"),
    "siso-half": dict(R=1, G=1, H=2, pairing="half"),
    "siso-rope1": dict(R=1, G=1, H=2, N=8, S=4, pairing="interleaved"),
    "siso-norot": dict(R=1, G=2, H=4, S=0, pairing="interleaved"),
    "siso-docs": dict(R=1, G=2, H=4, docs=True, pairing="interleaved"),
    "mimo2-docs": dict(R=2, G=2, H=4, docs=True, pairing="half"),
    "mimo4": dict(R=4, G=1, H=2, pairing="half"),
    "mimo4-noinit-docs": dict(R=4, G=1, H=2, init=False, docs=True, pairing="half"),
    "mimo2-interleaved": dict(R=2, G=1, H=2, pairing="interleaved"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_chunk_matches_recurrent(case):
    kw = dict(CASES[case])
    pairing = kw.pop("pairing")
    inp = make_inputs(**kw)
    y_ref, s_ref = mamba3_recurrent(**inp, pairing=pairing)
    for chunk in (1, 4, 16, 64):  # T = 37 is ragged for all of them
        y, s = mamba3_chunk(**inp, pairing=pairing, chunk_size=chunk)
        torch.testing.assert_close(y, y_ref, **TOL)
        assert_states_close(s, s_ref)


def test_recurrence_matches_explicit_matrix_form():
    """Spec §3.1: y = (L_decay L_conv ∘ Q̄K̄ᵀ) x + D x for one head from a zero state; checks the oracle itself."""
    inp = make_inputs(B=1, T=12, R=1, G=1, H=1, N=8, P=3, S=2, init=False)
    y, _ = mamba3_recurrent(**inp)
    a, dt, lam = inp["log_decay"][0, :, 0], inp["dt"][0, :, 0], inp["lam"][0, :, 0]
    theta = inp["dtheta"][0, :, 0].cumsum(0)  # (T, S)
    q = rotate(inp["q"][0, :, 0, 0] + inp["q_bias"][0, 0], theta.cos(), theta.sin(), "interleaved")  # (T, N)
    k = rotate(inp["k"][0, :, 0, 0] + inp["k_bias"][0, 0], theta.cos(), theta.sin(), "interleaved")
    T = a.shape[0]
    cs = a.cumsum(0)
    decay = torch.exp(cs[:, None] - cs[None, :]).tril()  # exp(sum_{r=s+1..t} a_r), ones on the diagonal
    alpha = a.exp()
    conv = torch.diag(lam * dt) + torch.diag(((1 - lam) * dt * alpha)[1:], -1)  # gamma diagonal, beta below it
    L = decay @ conv
    x = inp["v"][0, :, 0]  # (T, P)
    expected = (L * (q @ k.T)) @ x + inp["D"][0] * x
    assert T == 12
    torch.testing.assert_close(y[0, :, 0, 0], expected, **TOL)


@pytest.mark.parametrize("R,pairing", [(1, "interleaved"), (2, "half")])
def test_state_passing_between_calls(R, pairing):
    """[0, T1) then [T1, T) with the returned state == one call; also chunk prefill then step-by-step."""
    inp = make_inputs(R=R, T=23)
    y_full, s_full = mamba3_chunk(**inp, pairing=pairing, chunk_size=4)

    def part(lo, hi, state):
        sliced = {n: (t[:, lo:hi] if n in ("q", "k", "v", "log_decay", "dt", "lam", "dtheta") else t) for n, t in inp.items()}
        sliced["initial_state"] = state
        return sliced

    y1, s1 = mamba3_chunk(**part(0, 10, inp["initial_state"]), pairing=pairing, chunk_size=4)
    y2, s2 = mamba3_chunk(**part(10, 23, s1), pairing=pairing, chunk_size=8)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y_full, **TOL)
    assert_states_close(s2, s_full)

    state, ys = s1, [y1]
    for t in range(10, 23):
        step_in = {n: v[:, t] for n, v in part(0, 23, None).items() if n in ("q", "k", "v", "log_decay", "dt", "lam", "dtheta")}
        y, state = mamba3_step(**step_in, state=state, q_bias=inp["q_bias"], k_bias=inp["k_bias"], D=inp["D"],
                               v_rank=inp["v_rank"], pairing=pairing)
        ys.append(y[:, None])
    torch.testing.assert_close(torch.cat(ys, 1), y_full, **TOL)
    assert_states_close(state, s_full)


@pytest.mark.parametrize("R,pairing", [(1, "interleaved"), (4, "half")])
def test_documents_are_independent(R, pairing):
    """A packed row gives each document what it gets alone (the first one continuing the initial state)."""
    inp = make_inputs(B=1, T=19, R=R, G=1, H=2)
    bounds = [0, 5, 6, 14, 19]  # includes a one-token document
    seq_idx = torch.cat([torch.full((hi - lo,), i) for i, (lo, hi) in enumerate(zip(bounds, bounds[1:]))])[None]
    y_packed, s_packed = mamba3_chunk(**inp, seq_idx=seq_idx, pairing=pairing, chunk_size=4)
    for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        doc = {n: (t[:, lo:hi] if n in ("q", "k", "v", "log_decay", "dt", "lam", "dtheta") else t) for n, t in inp.items()}
        if i > 0:
            doc["initial_state"] = None
        y, s = mamba3_chunk(**doc, pairing=pairing, chunk_size=4)
        torch.testing.assert_close(y_packed[:, lo:hi], y, **TOL)
    assert_states_close(s_packed, s)  # the final state is the last document's


@pytest.mark.parametrize("R,pairing,docs", [(1, "interleaved", True), (2, "half", False)])
def test_chunk_gradcheck(R, pairing, docs):
    inp = make_inputs(B=1, T=5, R=R, G=1, H=2, N=4, P=2, S=1, docs=docs, rank_scale=True, seed=1)
    seq_idx = torch.tensor([[0, 0, 1, 1, 1]]) if docs else None
    names = ["q", "k", "v", "log_decay", "dt", "lam", "dtheta", "q_bias", "k_bias", "D", "v_rank"]
    tensors = [inp[n] for n in names] + list(inp["initial_state"])
    tensors[-4] = torch.full_like(tensors[-4], 1.0)  # initial angle away from the mod-2pi wrap

    def fn(*args):
        kw = dict(zip(names, args[:len(names)]))
        y, s = mamba3_chunk(**kw, initial_state=Mamba3State(*args[len(names):]), seq_idx=seq_idx,
                            chunk_size=2, pairing=pairing)
        return (y, *s[:3])  # the returned v is the input's last row, a plain view

    args = [t.clone().requires_grad_(True) for t in tensors]
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7, rtol=1e-6)


def test_reduces_to_mamba2_ssd():
    """lam = 1, no rotation, no biases, constant A per head: Mamba-3's core is Mamba-2's SSD (spec §5 hook)."""
    g = torch.Generator().manual_seed(3)
    B, T, H, G, N, P = 2, 29, 4, 2, 8, 3
    x = torch.randn(B, T, H, P, generator=g, dtype=F64)
    dt = 0.05 + torch.rand(B, T, H, generator=g, dtype=F64)
    A = -1 - 15 * torch.rand(H, generator=g, dtype=F64)
    Bm, Cm = torch.randn(B, T, G, N, generator=g, dtype=F64), torch.randn(B, T, G, N, generator=g, dtype=F64)
    D = torch.randn(H, generator=g, dtype=F64)
    h0 = torch.randn(B, H, P, N, generator=g, dtype=F64)
    ref, ref_state = ssd_recurrent(x, dt, A, Bm, Cm, D, h0)
    # With lam = 1 the previous key and value never enter, so any cached ones must be ignored.
    state = Mamba3State(torch.zeros(B, H, 0, dtype=F64), h0, torch.randn(B, 1, H, N, dtype=F64), torch.randn(B, H, P, dtype=F64))
    ones = torch.ones_like(dt)
    y, s = mamba3_chunk(Cm[:, :, None], Bm[:, :, None], x, A * dt, dt, ones, D=D, initial_state=state, chunk_size=8)
    torch.testing.assert_close(y[:, :, 0], ref, **TOL)
    torch.testing.assert_close(s.ssm, ref_state, **TOL)
    y_ssd, s_ssd = ssd_chunk(x, dt, A, Bm, Cm, D, h0, chunk_size=8)
    torch.testing.assert_close(y_ssd, ref, **TOL)
    y1, s1 = mamba3_step(Cm[:, 0, None], Bm[:, 0, None], x[:, 0], A * dt[:, 0], dt[:, 0], ones[:, 0], state, D=D)
    y2, s2 = ssd_step(x[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], h0, D)
    torch.testing.assert_close(y1[:, 0], y2, **TOL)
    torch.testing.assert_close(s1.ssm, s2, **TOL)


def test_rotation_pairings():
    """Interleaved rotates (2i, 2i+1), half-split rotates (i, i + N/2); other channels pass; norms are kept."""
    t = torch.arange(8, dtype=F64)[None] + 1
    theta = torch.tensor([[0.3, 1.1]], dtype=F64)
    for pairing, pairs in (("interleaved", [(0, 1), (2, 3)]), ("half", [(0, 4), (1, 5)])):
        r = rotate(t, theta.cos(), theta.sin(), pairing)
        for i, (a, b) in enumerate(pairs):
            c, s = math.cos(theta[0, i]), math.sin(theta[0, i])
            assert r[0, a].item() == pytest.approx(t[0, a].item() * c - t[0, b].item() * s)
            assert r[0, b].item() == pytest.approx(t[0, a].item() * s + t[0, b].item() * c)
        untouched = sorted(set(range(8)) - {i for p in pairs for i in p})
        assert torch.equal(r[0, untouched], t[0, untouched])
        torch.testing.assert_close(r.norm(), t.norm())


def test_input_shape_errors():
    inp = make_inputs(T=6)
    with pytest.raises(ValueError, match="log_decay must be"):
        mamba3_chunk(**{**inp, "log_decay": inp["log_decay"][:, :-1]})
    with pytest.raises(ValueError, match="initial state 'ssm'"):
        mamba3_chunk(**{**inp, "initial_state": inp["initial_state"]._replace(ssm=inp["initial_state"].ssm[..., :-1])})
    with pytest.raises(ValueError, match="pairing"):
        mamba3_chunk(**inp, pairing="adjacent")
    three_groups = {n: inp[n][:, :, :, :1].expand(-1, -1, -1, 3, -1) for n in ("q", "k")}  # 3 does not divide H = 4
    with pytest.raises(ValueError, match="groups"):
        mamba3_chunk(**{**inp, **three_groups})
