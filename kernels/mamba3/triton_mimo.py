"""Triton forward kernels of the Mamba-3 MIMO chunked scan ("half" rotation pairing).

Same math as ``chunk.py`` with R > 1 (the oracle these kernels are tested against): a chunk of C tokens is
C * R rows, time-major (row i is token i // R, rank i % R), and all R x R rank pairs of two tokens share
the tokens' time weight. Organisation as in the SISO kernels (Mamba-2's SSD):

    1. _mimo_chunk_state  grid (chunks, B*H)      local state of each chunk, as if it started from zero:
                                                  sum_i e^{cs_last - cs_i} scale_i x_i k_i^T over its rows
    2. _mimo_state_pass   grid (B*H, P*N/BLOCK)   short sequential scan over chunks: the entering states
    3. _mimo_chunk_out    grid (chunks, B*H)      intra-chunk masked (rows x rows) matmuls, the entering
                                                  state, the D skip

Rotation, the per-head-and-rank biases of q and k, the per-rank value scales (x_r = v * v_rank[:, r]) and
the time weights are fused into 1 and 3. "Half" pairing rotates channels (j, j + N/2) for j < S, so the
first and second halves of N are loaded as two (rows, N/2) tiles with no reordering; chunk states are
kept in natural channel order. The cumulative log-decay and angles of a chunk are cumulative sums over
its rows in which only the rank-0 row of each token carries the token's increment, so every rank of a
token reads the token's value.

What the PyTorch side (``mimo.py``) prepares, all differentiable there: the trapezoid weights
scale_t = gamma_t + dt_{t+1} (1 - lam_{t+1}) and gamma_t = lam_t dt_t (B, T, H); each chunk's entry angle
from ``angle_offsets`` (float64, mod 2pi); the carried state entering the first chunk
G_{-1} = H_{-1} + beta'_0 sum_r x_{-1,r} k_{-1,r}^T; the final cache key. The kernels then take a plain
decaying recurrence G_t = alpha_t G_{t-1} + scale_t sum_r x_{t,r} k_{t,r}^T read as y_{t,r} = G q_{t,r}
(gamma on the diagonal).

Sequence boundaries (``seq_idx``, packed documents, ids per token: a row's document is its token's) follow
``chunk.py`` as in the SISO kernels: a compile-time flag HAS_SEQ (the kernels without it are unchanged)
masks the intra-chunk weights between rows of different documents, keeps the local state to the document
still open at the chunk's end and the entering state to the document of the token before the chunk, and
stores the chunk's log-decay as -inf where a document starts in it (the state passing needs no flag). The
angle restarts at each document: entry angles from the reset-aware ``angle_offsets`` (host, float64) reach
only the rows of the entering document, and inside a chunk a segmented cumulative sum over the rows
replaces the plain one. beta' is cut at a document's last token in ``mimo.py`` (scale is an input here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.mamba3.triton_siso import _cos_sin, _seg_cumsum, tuned, unsupported_reason

# The packed-document variants (HAS_SEQ) are tuned apart from the plain ones.
MIMO_KEY = ("C", "N2", "P", "HAS_SEQ")


@triton.jit
def _mimo_seq(SEQ, b, c, tok, T, s_sb, C: tl.constexpr):
    """Document bookkeeping of chunk c for rows (or tokens) ``tok``: their document ids (padding takes the
    last token's), ``enter`` (in the document of the token before the chunk, the first token's for chunk 0:
    the entering state and angle reach it) and ``to_end`` (in the document open at the chunk's end: it
    enters the local state), as 0/1 floats."""
    row = SEQ + b * s_sb
    seq = tl.load(row + tl.minimum(tok, T - 1))
    prev = tl.load(row + tl.maximum(c * C - 1, 0))
    last = tl.load(row + tl.minimum(c * C + C - 1, T - 1))
    return seq, (seq == prev).to(tl.float32), (seq == last).to(tl.float32)


@triton.jit
def _mimo_rows(A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, b, c, h, T, H, S, nc, s_ob, s_ot, s_sb,
               C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr,
               HAS_SEQ: tl.constexpr):
    """Row bookkeeping of chunk c for head h: token and rank of each row, cumulative log-decay, trapezoid
    weights, cos/sin of the rows' angles as (rows, N/2) tiles (columns >= S get angle 0), and with HAS_SEQ
    the rows' documents and ``enter`` / ``to_end`` weights (``_mimo_seq``; placeholders without)."""
    i = tl.arange(0, C * R)
    tok = c * C + i // R
    rk = i % R
    live = tok < T
    seq, enter, to_end = tok, live, live  # placeholders without document boundaries
    if HAS_SEQ:
        seq, enter, to_end = _mimo_seq(SEQ, b, c, tok, T, s_sb, C)
    lead = live & (rk == 0)  # the row that carries its token's increments into the cumulative sums
    at = (b * T + tok) * H + h
    cs = tl.cumsum(tl.load(A + at, mask=lead, other=0.0).to(tl.float32), axis=0)
    scale = tl.load(SCALE + at, mask=live, other=0.0).to(tl.float32)
    gamma = tl.load(GAMMA + at, mask=live, other=0.0).to(tl.float32)
    cos = 1.0
    sin = 0.0
    if HAS_ROT:
        j = tl.arange(0, N2)
        on = j < S
        inc = tl.load(OMEGA + b * s_ob + tok[:, None] * s_ot + j[None, :], mask=lead[:, None] & on[None, :], other=0.0)
        inc = inc.to(tl.float32)
        if ANGLE_DT:
            inc = inc * tl.load(DT + at, mask=lead, other=0.0).to(tl.float32)[:, None]
        entry = tl.load(THETA_OFF + ((b * nc + c) * H + h) * S + j, mask=on, other=0.0)
        if HAS_SEQ:  # restart at document starts; the entry angle reaches the entering document only
            theta = entry[None, :] * enter[:, None] + _seg_cumsum(inc, seq)
        else:
            theta = entry[None, :] + tl.cumsum(inc, axis=0)
        cos, sin = _cos_sin(theta)
    return tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end


@triton.jit
def _program(A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, T, H, S, nc, heads_per_group, s_ob, s_ot, s_sb,
             C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr,
             HAS_SEQ: tl.constexpr):
    """What every chunk program (grid (chunks, B*H)) starts from: its sequence, chunk, head and group, and
    the chunk's row bookkeeping (``_mimo_rows``)."""
    # int64 program ids: offsets into (B, chunks, H, P, N) tensors pass 2**31 at long contexts
    c, bh = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end = _mimo_rows(
        A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, b, c, h, T, H, S, nc, s_ob, s_ot, s_sb, C, R, N2, HAS_ROT, ANGLE_DT,
        HAS_SEQ)
    return b, c, h, h // heads_per_group, tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end


@triton.jit
def _halves(PTR, BIAS, b, tok, rk, live, g, h, T, G, cos, sin, R: tl.constexpr, N2: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr):
    """First and second halves (rows, N/2) of the rows' q or k vectors (B, T, R, G, N), plus the (H, R, N)
    bias, rotated pairwise: (lo, hi) -> (lo cos - hi sin, lo sin + hi cos)."""
    j = tl.arange(0, N2)
    src = ((((b * T + tok) * R + rk) * G + g) * (2 * N2))[:, None] + j[None, :]
    lo = tl.load(PTR + src, mask=live[:, None], other=0.0).to(tl.float32)
    hi = tl.load(PTR + src + N2, mask=live[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        bsrc = ((h * R + rk) * (2 * N2))[:, None] + j[None, :]
        lo += tl.load(BIAS + bsrc).to(tl.float32)
        hi += tl.load(BIAS + bsrc + N2).to(tl.float32)
    if HAS_ROT:
        lo, hi = lo * cos - hi * sin, lo * sin + hi * cos
    return lo, hi


@triton.jit
def _values(X, VR, b, tok, rk, live, h, T, H, R: tl.constexpr, P: tl.constexpr, HAS_VR: tl.constexpr):
    """The rows' raw values v (rows, P) and per-rank values x = v * v_rank[h, rank] (fp32)."""
    p = tl.arange(0, P)
    raw = tl.load(X + (((b * T + tok) * H + h) * P)[:, None] + p[None, :], mask=live[:, None], other=0.0)
    raw = raw.to(tl.float32)
    x = raw
    if HAS_VR:
        x = raw * tl.load(VR + ((h * R + rk) * P)[:, None] + p[None, :]).to(tl.float32)
    return raw, x


@triton.jit
def _row_offsets(b, tok, rk, h, T, H, R: tl.constexpr, STRIDE: tl.constexpr, W: tl.constexpr):
    """(rows, W) offsets of the rows' first W entries in a (B, T, R, H, STRIDE) tensor (y, per-head dq, dk)."""
    return ((((b * T + tok) * R + rk) * H + h) * STRIDE)[:, None] + tl.arange(0, W)[None, :]


@triton.jit
def _time_weights(tok, cs, scale, gamma, seq, HAS_SEQ: tl.constexpr):
    """[query row j, key row i] weights: e^{cs_j - cs_i} scale_i for an earlier token (of the same document
    with HAS_SEQ), gamma within a token (all R x R rank pairs of the two tokens alike). Also returns the
    decay and the two masks."""
    earlier = tok[:, None] > tok[None, :]
    if HAS_SEQ:
        earlier = earlier & (seq[:, None] == seq[None, :])  # no decay path between documents
    same = tok[:, None] == tok[None, :]
    decay = tl.where(earlier, tl.exp(tl.where(earlier, cs[:, None] - cs[None, :], 0.0)), 0.0)
    w = decay * scale[None, :] + tl.where(same, gamma[None, :], 0.0)
    return w, decay, earlier, same


@triton.jit
def _state_tile(PTR, b, c, h, nc, H, P: tl.constexpr, N2: tl.constexpr):
    """Offsets of the two (P, N/2) halves of chunk c's (P, N) state in a (B, nc, H, P, N) tensor."""
    p = tl.arange(0, P)
    lo = PTR + ((b * nc + c) * H + h) * (P * 2 * N2) + (p * (2 * N2))[:, None] + tl.arange(0, N2)[None, :]
    return lo, lo + N2


@triton.jit
def _mimo_chunk_state(K, X, VR, A, DT, SCALE, GAMMA, OMEGA, KB, THETA_OFF, SEQ, STATES, CS_LAST,
                      T, H, G, S, nc, heads_per_group, s_ob, s_ot, s_sb,
                      C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr,
                      HAS_KB: tl.constexpr, HAS_VR: tl.constexpr, HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr,
                      HAS_SEQ: tl.constexpr):
    b, c, h, g, tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end = _program(
        A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, T, H, S, nc, heads_per_group, s_ob, s_ot, s_sb, C, R, N2, HAS_ROT,
        ANGLE_DT, HAS_SEQ)
    klo, khi = _halves(K, KB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_KB, HAS_ROT)
    _, x = _values(X, VR, b, tok, rk, live, h, T, H, R, P, HAS_VR)
    cs_last = tl.min(cs, axis=0)  # log-decays are <= 0 and padding rows add none: the chunk's total
    w_end = tl.where(live, tl.exp(cs_last - cs) * scale, 0.0)
    cs_pass = cs_last
    if HAS_SEQ:
        w_end = w_end * to_end  # only the document still open at the chunk's end enters the local state
        # a document starts here: nothing of the entering state passes (e^{-inf} = 0 in both state passes)
        cs_pass = tl.where(tl.min(enter, axis=0) > 0.0, cs_last, float("-inf"))
    mm = X.dtype.element_ty  # matmul operand type: the activations' (bf16 on the GPU)
    xt = tl.trans(x.to(mm))  # (P, rows)
    lo, hi = _state_tile(STATES, b, c, h, nc, H, P, N2)
    tl.store(lo, tl.dot(xt, (klo * w_end[:, None]).to(mm)))
    tl.store(hi, tl.dot(xt, (khi * w_end[:, None]).to(mm)))
    tl.store(CS_LAST + (b * nc + c) * H + h, cs_pass)


@triton.jit
def _mimo_state_pass(STATES, CS_LAST, G0, G_FINAL, H, nc, PN, BLOCK: tl.constexpr):
    """In place over STATES: chunk c's local state is read, then replaced by the state entering chunk c."""
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    e = blk * BLOCK + tl.arange(0, BLOCK)
    inside = e < PN
    carried = tl.load(G0 + bh * PN + e, mask=inside, other=0.0)
    for c in range(nc):
        row = (b * nc + c) * H + h
        local = tl.load(STATES + row * PN + e, mask=inside, other=0.0)
        tl.store(STATES + row * PN + e, carried, mask=inside)
        carried = local + carried * tl.exp(tl.load(CS_LAST + row))
    tl.store(G_FINAL + bh * PN + e, carried, mask=inside)


@triton.jit
def _mimo_chunk_out(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, D, THETA_OFF, SEQ, G_IN, Y,
                    T, H, G, S, nc, heads_per_group, s_ob, s_ot, s_sb,
                    C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr,
                    HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VR: tl.constexpr, HAS_D: tl.constexpr,
                    HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr):
    b, c, h, g, tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end = _program(
        A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, T, H, S, nc, heads_per_group, s_ob, s_ot, s_sb, C, R, N2, HAS_ROT,
        ANGLE_DT, HAS_SEQ)
    mm = X.dtype.element_ty
    qlo, qhi = _halves(Q, QB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_QB, HAS_ROT)
    klo, khi = _halves(K, KB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_KB, HAS_ROT)
    qlo, qhi = qlo.to(mm), qhi.to(mm)
    scores = tl.dot(qlo, tl.trans(klo.to(mm))) + tl.dot(qhi, tl.trans(khi.to(mm)))  # (rows, rows) q_j . k_i
    w, _, _, _ = _time_weights(tok, cs, scale, gamma, seq, HAS_SEQ)
    _, x = _values(X, VR, b, tok, rk, live, h, T, H, R, P, HAS_VR)
    y = tl.dot((scores * w).to(mm), x.to(mm))  # (rows, P)
    glo, ghi = _state_tile(G_IN, b, c, h, nc, H, P, N2)
    entering = tl.dot(qlo, tl.trans(tl.load(glo).to(mm))) + tl.dot(qhi, tl.trans(tl.load(ghi).to(mm)))
    growth = tl.exp(cs)
    if HAS_SEQ:
        growth = growth * enter  # the entering state reaches the document open at the chunk's start only
    y += growth[:, None] * entering
    if HAS_D:
        y += tl.load(D + h).to(tl.float32) * x
    tl.store(Y + _row_offsets(b, tok, rk, h, T, H, R, P, P), y.to(Y.dtype.element_ty), mask=live[:, None])


_mimo_chunk_state_tuned = tuned(_mimo_chunk_state, key=MIMO_KEY)
_mimo_chunk_out_tuned = tuned(_mimo_chunk_out, key=MIMO_KEY)


def mimo_unsupported_reason(d_state: int, headdim: int, chunk_size: int, rank: int) -> str | None:
    """Why the MIMO kernels cannot run a shape (C * R rows per chunk: a power of two >= 16), or None."""
    return unsupported_reason(d_state, headdim, chunk_size * rank)


def state_pass_block(PN: int) -> int:
    return min(1024, triton.next_power_of_2(PN))


def mimo_chunk_fwd(q, k, v, log_decay, dt, scale, gamma, omega, theta_off, angle_dt, q_bias, k_bias, D, v_rank, g0,
                   chunk_size, seq_idx=None):
    """The forward launches on prepared inputs (see ``mimo.mamba3_mimo_chunk``, which also builds the final cache).

    q, k (B, T, R, G, N) and v (B, T, H, P) contiguous; log_decay, dt, scale, gamma (B, T, H) contiguous
    fp32; omega (B, T, S) with unit last stride, or None; theta_off (B, nc, H, S) chunk entry angles;
    q_bias, k_bias (H, R, N), D (H,), v_rank (H, R, P) contiguous or None; g0 (B, H, P, N) fp32 carried
    state entering the first chunk. Returns y (B, T, R, H, P) in v's dtype, the final carried state
    (B, H, P, N) fp32 and the states entering every chunk (B, nc, H, P, N) and the chunks' total
    log-decays (B, nc, H) (for the backward; -inf where a document starts). seq_idx (B, T) contiguous integer
    document ids (non-decreasing per row) or None; with it, scale must already be cut at document ends and
    theta_off come from the reset-aware ``angle_offsets`` (``mimo.py`` does both).
    """
    Bsz, T, R, G, N = q.shape
    H, P = v.shape[2:]
    C = chunk_size
    nc = -(-T // C)
    reason = mimo_unsupported_reason(N, P, C, R)
    if reason is not None:
        raise ValueError(f"Mamba-3 MIMO chunk kernels: {reason}")
    S = 0 if omega is None else omega.shape[-1]
    dev = v.device
    om = omega if omega is not None else dt
    dummy = dt
    states = torch.empty(Bsz, nc, H, P, N, device=dev, dtype=torch.float32)
    cs_last = torch.empty(Bsz, nc, H, device=dev, dtype=torch.float32)
    seq = seq_idx if seq_idx is not None else dt  # a pointer the kernels never read without HAS_SEQ
    shape = (T, H, G, S, nc, H // G, om.stride(0), om.stride(1), seq.stride(0))
    flags = dict(C=C, R=R, N2=N // 2, P=P, HAS_ROT=omega is not None, ANGLE_DT=angle_dt, HAS_SEQ=seq_idx is not None)
    vr = v_rank if v_rank is not None else dummy
    _mimo_chunk_state_tuned[(nc, Bsz * H)](k, v, vr, log_decay, dt, scale, gamma, om,
                                           k_bias if k_bias is not None else dummy, theta_off, seq, states, cs_last, *shape,
                                           HAS_KB=k_bias is not None, HAS_VR=v_rank is not None, **flags)
    g_final = torch.empty(Bsz, H, P, N, device=dev, dtype=torch.float32)
    PN = P * N
    block = state_pass_block(PN)
    _mimo_state_pass[(Bsz * H, triton.cdiv(PN, block))](states, cs_last, g0, g_final, H, nc, PN, BLOCK=block)
    y = torch.empty(Bsz, T, R, H, P, device=dev, dtype=v.dtype)
    _mimo_chunk_out_tuned[(nc, Bsz * H)](q, k, v, vr, log_decay, dt, scale, gamma, om,
                                         q_bias if q_bias is not None else dummy, k_bias if k_bias is not None else dummy,
                                         D if D is not None else dummy, theta_off, seq, states, y, *shape,
                                         HAS_QB=q_bias is not None, HAS_KB=k_bias is not None, HAS_VR=v_rank is not None,
                                         HAS_D=D is not None, **flags)
    return y, g_final, states, cs_last
