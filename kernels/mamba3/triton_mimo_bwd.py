"""Triton backward of the Mamba-3 MIMO chunked scan, chunk-parallel like the forward (``triton_mimo.py``).

Per chunk, over its C * R rows (row = (token, rank)), with rotated q, k, per-rank values x and the rows'
cumulative log-decay cs (a row reads its token's):

    y_j     = sum_i W[j, i] (q_j.k_i) x_i + e^{cs_j} G_c q_j + D x_j
    G_{c+1} = e^{cs_last} G_c + sum_i e^{cs_last - cs_i} scale_i x_i k_i^T
    W[j, i] = e^{cs_j - cs_i} scale_i (earlier token), gamma (same token, every rank pair), 0 (later token)

Backward, four launches:

    1. _mimo_dstate       grid (chunks, B*H)   dG_in[c] = sum_j e^{cs_j} dy_j q_j^T
    2. _mimo_state_pass_bwd grid (B*H, blocks) reverse scan over chunks: the gradient of each chunk's local
                                               state, d cs_last partial sums, the gradient of G_{-1}
    3. _mimo_bwd_query    grid (chunks, B*G)   dq (un-rotated) summed over the group's heads; per head and
                                               token: the query and intra terms of d cs, d scale, d gamma
                                               and d angle
    4. _mimo_bwd_key      grid (chunks, B*G)   dk likewise; dv per token (rank-summed through v_rank),
                                               per-chunk partials of d v_rank and d D; completes d log-decay
                                               and the within-chunk d angle (reverse cumulative sums over the
                                               chunk's tokens) and each chunk's d angle total

3 and 4 walk the heads of one group in one program, so dq and dk are summed over heads in registers: no
per-head (B, T, R, H, N) fp32 dq or dk is materialised (it would be R times the SISO backward's). The cost
is fewer, longer programs (B * G per chunk instead of B * H). Rank sums are
in-kernel reshapes (rows -> (C, R)); what is summed over B and T (biases, v_rank, D) is reduced by PyTorch
from per-chunk partials, d omega over heads from the per-head d angle. No atomics: the backward is
deterministic. The entry angles' gradient (each chunk's d angle total) flows on through ``angle_offsets``
by autograd, as do the gradients of scale, gamma and G_{-1} (``mimo.py``).

Sequence boundaries (HAS_SEQ, ``seq_idx``) mask the same terms as in the forward: the intra weights between
documents, the entering state outside the document open at the chunk start, the local state outside the
one open at its end (the state passes need nothing: a chunk where a document starts has e^{cs_last} = 0).
Angle gradients are reverse-summed within each document of a chunk (the transpose of the forward's
segmented sum); a chunk's entry-angle gradient is what its ``enter`` tokens ask, and autograd through the
reset-aware ``angle_offsets`` carries it back only as far as the document reaches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.mamba3.triton_mimo import (
    MIMO_KEY,
    _halves,
    _mimo_rows,
    _mimo_seq,
    _program,
    _row_offsets,
    _state_tile,
    _time_weights,
    _values,
    state_pass_block,
)
from hybrid.kernels.mamba3.triton_siso import _store_angle_grad, tuned


@triton.jit
def _per_token(t, C: tl.constexpr, R: tl.constexpr):
    """(C * R,) row values -> (C,) sums over each token's ranks."""
    return tl.sum(tl.reshape(t, (C, R)), axis=1)


@triton.jit
def _per_token_tile(t, C: tl.constexpr, R: tl.constexpr, W: tl.constexpr):
    """(C * R, W) row tile -> (C, W) sums over each token's ranks."""
    return tl.sum(tl.reshape(t, (C, R, W)), axis=1)


@triton.jit
def _mimo_dstate(Q, A, DT, SCALE, GAMMA, OMEGA, QB, THETA_OFF, SEQ, DY, DG_IN,
                 T, H, G, S, nc, heads_per_group, s_ob, s_ot, s_sb,
                 C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr,
                 HAS_QB: tl.constexpr, HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr):
    b, c, h, g, tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end = _program(
        A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, T, H, S, nc, heads_per_group, s_ob, s_ot, s_sb, C, R, N2, HAS_ROT,
        ANGLE_DT, HAS_SEQ)
    qlo, qhi = _halves(Q, QB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_QB, HAS_ROT)
    mm = DY.dtype.element_ty
    dy = tl.load(DY + _row_offsets(b, tok, rk, h, T, H, R, P, P), mask=live[:, None], other=0.0).to(tl.float32)
    growth = tl.exp(cs)
    if HAS_SEQ:
        growth = growth * enter  # only the document open at the chunk start read the entering state
    weighted = tl.trans((dy * growth[:, None]).to(mm))  # (P, rows)
    lo, hi = _state_tile(DG_IN, b, c, h, nc, H, P, N2)
    tl.store(lo, tl.dot(weighted, qlo.to(mm)))
    tl.store(hi, tl.dot(weighted, qhi.to(mm)))


@triton.jit
def _mimo_state_pass_bwd(DSTATES, G_IN, CS_LAST, DG_FINAL, DCSL_PART, DG0, H, nc, PN, nblk, BLOCK: tl.constexpr):
    """Reverse scan, in place over DSTATES: what chunk c's outputs ask of its entering state is read, then
    replaced by the gradient of chunk c's local state (the gradient of the state leaving chunk c)."""
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    e = blk * BLOCK + tl.arange(0, BLOCK)
    inside = e < PN
    leaving = tl.load(DG_FINAL + bh * PN + e, mask=inside, other=0.0)
    for step in range(nc):
        row = (b * nc + nc - 1 - step) * H + h
        asked = tl.load(DSTATES + row * PN + e, mask=inside, other=0.0)
        tl.store(DSTATES + row * PN + e, leaving, mask=inside)
        through = tl.exp(tl.load(CS_LAST + row))
        entering = tl.load(G_IN + row * PN + e, mask=inside, other=0.0)
        tl.store(DCSL_PART + row * nblk + blk, through * tl.sum(leaving * entering, axis=0))
        leaving = asked + through * leaving
    tl.store(DG0 + bh * PN + e, leaving, mask=inside)


@triton.jit
def _query_head(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, THETA_OFF, SEQ, G_IN, DY, DCS, DSCALE, DGAMMA, DTHETA,
                b, c, h, g, T, H, G, S, nc, s_ob, s_ot, s_sb,
                C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr,
                HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VR: tl.constexpr,
                HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Query side of chunk c for head h: stores the head's per-token d cs, d scale, d gamma and d angle
    terms, returns its dq rows (un-rotated, fp32)."""
    tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end = _mimo_rows(
        A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, b, c, h, T, H, S, nc, s_ob, s_ot, s_sb, C, R, N2, HAS_ROT, ANGLE_DT,
        HAS_SEQ)
    mm = DY.dtype.element_ty
    qlo, qhi = _halves(Q, QB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_QB, HAS_ROT)
    klo, khi = _halves(K, KB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_KB, HAS_ROT)
    _, x = _values(X, VR, b, tok, rk, live, h, T, H, R, P, HAS_VR)
    rows = _row_offsets(b, tok, rk, h, T, H, R, P, P)
    dy = tl.load(DY + rows, mask=live[:, None], other=0.0).to(mm)
    klo16, khi16 = klo.to(mm), khi.to(mm)
    scores = tl.dot(qlo.to(mm), tl.trans(klo16)) + tl.dot(qhi.to(mm), tl.trans(khi16))
    dyx = tl.dot(dy, tl.trans(x.to(mm)))  # dy_j . x_i
    w, decay, earlier, same = _time_weights(tok, cs, scale, gamma, seq, HAS_SEQ)
    dw = scores * dyx  # d loss / d W[j, i]
    mix = (dyx * w).to(mm)
    dqlo = tl.dot(mix, klo16)
    dqhi = tl.dot(mix, khi16)
    glo, ghi = _state_tile(G_IN, b, c, h, nc, H, P, N2)
    dg_lo = tl.dot(dy, tl.load(glo).to(mm))  # (rows, N/2): dy_j^T G, first half
    dg_hi = tl.dot(dy, tl.load(ghi).to(mm))
    growth = tl.exp(cs)
    if HAS_SEQ:
        growth = growth * enter  # only the document open at the chunk start read the entering state
    from_state = growth * (tl.sum(dg_lo * qlo, axis=1) + tl.sum(dg_hi * qhi, axis=1))
    dqlo += growth[:, None] * dg_lo
    dqhi += growth[:, None] * dg_hi
    pull = tl.where(earlier, dw * w, 0.0)  # d cs_j (+) and d cs_i (-) of the decay factor
    t_loc = c * C + tl.arange(0, C)
    at = (b * T + t_loc) * H + h
    on = t_loc < T
    tl.store(DCS + at, _per_token(tl.sum(pull, axis=1) - tl.sum(pull, axis=0) + from_state, C, R), mask=on)
    tl.store(DSCALE + at, _per_token(tl.sum(tl.where(earlier, dw * decay, 0.0), axis=0), C, R), mask=on)
    tl.store(DGAMMA + at, _per_token(tl.sum(tl.where(same, dw, 0.0), axis=1), C, R), mask=on)
    if HAS_ROT:
        j = tl.arange(0, N2)
        turn = _per_token_tile(qlo * dqhi - qhi * dqlo, C, R, N2)  # d/d angle of (lo c - hi s, lo s + hi c)
        tl.store(DTHETA + (at * S)[:, None] + j[None, :], turn, mask=on[:, None] & (j < S)[None, :])
        dqlo, dqhi = dqlo * cos + dqhi * sin, dqhi * cos - dqlo * sin
    return dqlo, dqhi


@triton.jit
def _key_head(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, D, THETA_OFF, SEQ, DLOCAL, DCSL, DY,
              DCS, DSCALE_Q, DTHETA, DV, DA, DSCALE, DTHETA_TOT, DD_PART, DVR_PART,
              b, c, h, g, T, H, G, S, nc, s_ob, s_ot, s_sb,
              C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr, HAS_D: tl.constexpr,
              HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VR: tl.constexpr, HAS_ROT: tl.constexpr,
              ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Key/value side of chunk c for head h: stores the head's dv, d log-decay, d scale, d angle and the
    chunk's d D and d v_rank shares; returns its dk rows (un-rotated, fp32)."""
    tok, rk, live, cs, scale, gamma, cos, sin, seq, enter, to_end = _mimo_rows(
        A, DT, SCALE, GAMMA, OMEGA, THETA_OFF, SEQ, b, c, h, T, H, S, nc, s_ob, s_ot, s_sb, C, R, N2, HAS_ROT, ANGLE_DT,
        HAS_SEQ)
    mm = DY.dtype.element_ty
    qlo, qhi = _halves(Q, QB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_QB, HAS_ROT)
    klo, khi = _halves(K, KB, b, tok, rk, live, g, h, T, G, cos, sin, R, N2, HAS_KB, HAS_ROT)
    raw, x = _values(X, VR, b, tok, rk, live, h, T, H, R, P, HAS_VR)
    rows = _row_offsets(b, tok, rk, h, T, H, R, P, P)
    dyf = tl.load(DY + rows, mask=live[:, None], other=0.0).to(tl.float32)
    dy, x16, klo16, khi16 = dyf.to(mm), x.to(mm), klo.to(mm), khi.to(mm)
    qlo16, qhi16 = qlo.to(mm), qhi.to(mm)
    scores = tl.dot(qlo16, tl.trans(klo16)) + tl.dot(qhi16, tl.trans(khi16))
    dyx = tl.dot(dy, tl.trans(x16))
    w, decay, earlier, same = _time_weights(tok, cs, scale, gamma, seq, HAS_SEQ)
    mix_t = tl.trans((dyx * w).to(mm))  # [key i, query j]
    dklo = tl.dot(mix_t, qlo16)
    dkhi = tl.dot(mix_t, qhi16)
    dx = tl.dot(tl.trans((scores * w).to(mm)), dy)  # (rows, P)

    # Local state: G_{c+1} gets sum_i e^{cs_last - cs_i} scale_i x_i k_i^T.
    cs_last = tl.min(cs, axis=0)
    open_end = to_end
    to_end = tl.where(live, tl.exp(cs_last - cs), 0.0)
    if HAS_SEQ:
        to_end = to_end * open_end  # only the document still open at the chunk's end enters the local state
    into = to_end * scale
    llo, lhi = _state_tile(DLOCAL, b, c, h, nc, H, P, N2)
    dl_lo, dl_hi = tl.load(llo).to(mm), tl.load(lhi).to(mm)
    dx += into[:, None] * (tl.dot(klo16, tl.trans(dl_lo)) + tl.dot(khi16, tl.trans(dl_hi)))
    xdl_lo = tl.dot(x16, dl_lo)  # (rows, N/2)
    xdl_hi = tl.dot(x16, dl_hi)
    dklo += into[:, None] * xdl_lo
    dkhi += into[:, None] * xdl_hi
    via_state = to_end * (tl.sum(xdl_lo * klo, axis=1) + tl.sum(xdl_hi * khi, axis=1))  # d scale_i
    if HAS_D:
        dx += tl.load(D + h).to(tl.float32) * dyf
        tl.store(DD_PART + (b * nc + c) * H + h, tl.sum(tl.sum(x * dyf, axis=1), axis=0))

    # Values: x_i = v_token * v_rank[h, rank].
    p = tl.arange(0, P)
    dv = dx
    if HAS_VR:
        dv = dx * tl.load(VR + ((h * R + rk) * P)[:, None] + p[None, :]).to(tl.float32)
        dvr = tl.sum(tl.reshape(dx * raw, (C, R, P)), axis=0)  # (R, P) this chunk's share
        r = tl.arange(0, R)
        tl.store(DVR_PART + (((b * nc + c) * H + h) * R + r)[:, None] * P + p[None, :], dvr)
    t_loc = c * C + tl.arange(0, C)
    on = t_loc < T
    at = (b * T + t_loc) * H + h
    tl.store(DV + (at * P)[:, None] + p[None, :], _per_token_tile(dv, C, R, P).to(DV.dtype.element_ty), mask=on[:, None])

    # d log-decay: cs = cumsum(a) over tokens, so d a is the reverse cumulative sum of d cs; cs_last is the
    # cs of the chunk's last row (padding adds no decay), so its gradient joins the last token's.
    dcs = tl.load(DCS + at, mask=on, other=0.0) - _per_token(via_state * scale, C, R)
    dcs_last = tl.sum(via_state * scale, axis=0) + tl.load(DCSL + (b * nc + c) * H + h)
    dcs += tl.where(tl.arange(0, C) == C - 1, dcs_last, 0.0)
    tl.store(DA + at, tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs, mask=on)
    tl.store(DSCALE + at, tl.load(DSCALE_Q + at, mask=on, other=0.0) + _per_token(via_state, C, R), mask=on)

    if HAS_ROT:
        j = tl.arange(0, N2)
        jon = j < S
        th = (at * S)[:, None] + j[None, :]
        both = on[:, None] & jon[None, :]
        turn = tl.load(DTHETA + th, mask=both, other=0.0) + _per_token_tile(klo * dkhi - khi * dklo, C, R, N2)
        seq_t, enter_t = on, on  # placeholders without documents
        if HAS_SEQ:
            seq_t, enter_t, _ = _mimo_seq(SEQ, b, c, t_loc, T, s_sb, C)
        # The chunk's total moves every later chunk's entry angle (autograd through angle_offsets).
        _store_angle_grad(DTHETA, DTHETA_TOT, turn, th, both, ((b * nc + c) * H + h) * S + j, jon, seq_t, enter_t, HAS_SEQ)
        dklo, dkhi = dklo * cos + dkhi * sin, dkhi * cos - dklo * sin
    return dklo, dkhi


@triton.jit
def _group_rows(c, T, C: tl.constexpr, R: tl.constexpr):
    i = tl.arange(0, C * R)
    tok = c * C + i // R
    return tok, i % R, tok < T


@triton.jit
def _store_group(PTR, lo, hi, b, tok, rk, live, g, T, G, R: tl.constexpr, N2: tl.constexpr):
    """Store (rows, N/2) halves into a (B, T, R, G, N) gradient (the layout of q and k)."""
    at = ((((b * T + tok) * R + rk) * G + g) * (2 * N2))[:, None] + tl.arange(0, N2)[None, :]
    tl.store(PTR + at, lo, mask=live[:, None])
    tl.store(PTR + at + N2, hi, mask=live[:, None])


@triton.jit
def _store_rank_sums(PTR, lo, hi, b, c, h, nc, H, C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr):
    """Chunk c's share of a (H, R, N) bias gradient, into a (B, nc, H, R, N) partial-sum tensor."""
    r = tl.arange(0, R)
    at = ((((b * nc + c) * H + h) * R + r) * (2 * N2))[:, None] + tl.arange(0, N2)[None, :]
    tl.store(PTR + at, tl.sum(tl.reshape(lo, (C, R, N2)), axis=0))
    tl.store(PTR + at + N2, tl.sum(tl.reshape(hi, (C, R, N2)), axis=0))


@triton.jit
def _mimo_bwd_query(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, THETA_OFF, SEQ, G_IN, DY,
                    DQ, DQB_PART, DCS, DSCALE, DGAMMA, DTHETA,
                    T, H, G, S, nc, heads_per_group, s_ob, s_ot, s_sb,
                    C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr,
                    HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VR: tl.constexpr,
                    HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """One program per (chunk, sequence, group): the group's heads one after the other, their dq summed
    in registers (no per-head dq in memory), the per-head bias gradient as per-chunk partial sums."""
    c, bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, g = bg // G, bg % G
    tok, rk, live = _group_rows(c, T, C, R)
    acc_lo = tl.zeros((C * R, N2), dtype=tl.float32)
    acc_hi = tl.zeros((C * R, N2), dtype=tl.float32)
    for hh in range(heads_per_group):
        h = g * heads_per_group + hh
        dlo, dhi = _query_head(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, THETA_OFF, SEQ, G_IN, DY, DCS, DSCALE,
                               DGAMMA, DTHETA, b, c, h, g, T, H, G, S, nc, s_ob, s_ot, s_sb, C, R, N2, P,
                               HAS_QB, HAS_KB, HAS_VR, HAS_ROT, ANGLE_DT, HAS_SEQ)
        if HAS_QB:
            _store_rank_sums(DQB_PART, dlo, dhi, b, c, h, nc, H, C, R, N2)
        acc_lo += dlo
        acc_hi += dhi
    _store_group(DQ, acc_lo, acc_hi, b, tok, rk, live, g, T, G, R, N2)


@triton.jit
def _mimo_bwd_key(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, D, THETA_OFF, SEQ, DLOCAL, DCSL, DY,
                  DCS, DSCALE_Q, DTHETA, DK, DKB_PART, DV, DA, DSCALE, DTHETA_TOT, DD_PART, DVR_PART,
                  T, H, G, S, nc, heads_per_group, s_ob, s_ot, s_sb,
                  C: tl.constexpr, R: tl.constexpr, N2: tl.constexpr, P: tl.constexpr, HAS_D: tl.constexpr,
                  HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VR: tl.constexpr, HAS_ROT: tl.constexpr,
                  ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Key/value side, one program per (chunk, sequence, group) as ``_mimo_bwd_query``."""
    c, bg = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, g = bg // G, bg % G
    tok, rk, live = _group_rows(c, T, C, R)
    acc_lo = tl.zeros((C * R, N2), dtype=tl.float32)
    acc_hi = tl.zeros((C * R, N2), dtype=tl.float32)
    for hh in range(heads_per_group):
        h = g * heads_per_group + hh
        dlo, dhi = _key_head(Q, K, X, VR, A, DT, SCALE, GAMMA, OMEGA, QB, KB, D, THETA_OFF, SEQ, DLOCAL, DCSL, DY,
                             DCS, DSCALE_Q, DTHETA, DV, DA, DSCALE, DTHETA_TOT, DD_PART, DVR_PART,
                             b, c, h, g, T, H, G, S, nc, s_ob, s_ot, s_sb, C, R, N2, P, HAS_D,
                             HAS_QB, HAS_KB, HAS_VR, HAS_ROT, ANGLE_DT, HAS_SEQ)
        if HAS_KB:
            _store_rank_sums(DKB_PART, dlo, dhi, b, c, h, nc, H, C, R, N2)
        acc_lo += dlo
        acc_hi += dhi
    _store_group(DK, acc_lo, acc_hi, b, tok, rk, live, g, T, G, R, N2)


_mimo_dstate_tuned = tuned(_mimo_dstate, key=MIMO_KEY)
_mimo_bwd_query_tuned = tuned(_mimo_bwd_query, key=MIMO_KEY)
_mimo_bwd_key_tuned = tuned(_mimo_bwd_key, restore=("DTHETA",), key=MIMO_KEY)  # read, then rewritten in place


def mimo_chunk_bwd(q, k, v, log_decay, dt, scale, gamma, omega, theta_off, q_bias, k_bias, D, v_rank, g_in, cs_last,
                   dy, dg_final, angle_dt, chunk_size, seq_idx=None):
    """Gradients of ``triton_mimo.mimo_chunk_fwd`` with respect to its inputs, in its argument order:
    q, k, v, log_decay, dt (the angle part only), scale, gamma, omega, theta_off, q_bias, k_bias, D, v_rank,
    g0 (None where an input was absent or gets none). seq_idx: as given to the forward."""
    Bsz, T, R, G, N = q.shape
    H, P = v.shape[2:]
    C = chunk_size
    nc = -(-T // C)
    S = 0 if omega is None else omega.shape[-1]
    dev = v.device
    has_rot = omega is not None
    om = omega if has_rot else dt
    dummy = dt
    dy = dy.contiguous()
    seq = seq_idx if seq_idx is not None else dt  # never read without HAS_SEQ
    shape = (T, H, G, S, nc, H // G, om.stride(0), om.stride(1), seq.stride(0))
    flags = dict(C=C, R=R, N2=N // 2, P=P, HAS_ROT=has_rot, ANGLE_DT=angle_dt, HAS_SEQ=seq_idx is not None)
    qb = q_bias if q_bias is not None else dummy
    kb = k_bias if k_bias is not None else dummy
    vr = v_rank if v_rank is not None else dummy

    dstates = torch.empty(Bsz, nc, H, P, N, device=dev, dtype=torch.float32)
    _mimo_dstate_tuned[(nc, Bsz * H)](q, log_decay, dt, scale, gamma, om, qb, theta_off, seq, dy, dstates, *shape,
                             HAS_QB=q_bias is not None, **flags)
    PN = P * N
    block = state_pass_block(PN)
    nblk = triton.cdiv(PN, block)
    dg_final = torch.zeros(Bsz, H, P, N, device=dev, dtype=torch.float32) if dg_final is None else dg_final.float()
    dcsl_part = torch.empty(Bsz, nc, H, nblk, device=dev, dtype=torch.float32)
    dg0 = torch.empty(Bsz, H, P, N, device=dev, dtype=torch.float32)
    _mimo_state_pass_bwd[(Bsz * H, nblk)](dstates, g_in, cs_last, dg_final.contiguous(), dcsl_part, dg0, H, nc, PN, nblk,
                                          BLOCK=block)
    dcsl = dcsl_part.sum(-1).contiguous()

    f32 = dict(device=dev, dtype=torch.float32)
    dq, dk = torch.empty(Bsz, T, R, G, N, **f32), torch.empty(Bsz, T, R, G, N, **f32)
    dqb_part = torch.empty(Bsz, nc, H, R, N, **f32) if q_bias is not None else dummy
    dkb_part = torch.empty(Bsz, nc, H, R, N, **f32) if k_bias is not None else dummy
    dcs, dscale_q, dgamma, da, dscale = (torch.empty(Bsz, T, H, **f32) for _ in range(5))
    dtheta = torch.empty(Bsz, T, H, max(S, 1), **f32)
    dtheta_tot = torch.empty(Bsz, nc, H, max(S, 1), **f32)
    dd_part = torch.empty(Bsz, nc, H, **f32)
    dvr_part = torch.empty(Bsz, nc, H, R, P, **f32)
    dv = torch.empty_like(v)
    group_grid = (nc, Bsz * G)  # the heads of a group run in one program: dq, dk summed in registers
    _mimo_bwd_query_tuned[group_grid](q, k, v, vr, log_decay, dt, scale, gamma, om, qb, kb, theta_off, seq, g_in, dy,
                                      dq, dqb_part, dcs, dscale_q, dgamma, dtheta, *shape, HAS_QB=q_bias is not None,
                                      HAS_KB=k_bias is not None, HAS_VR=v_rank is not None, **flags)
    _mimo_bwd_key_tuned[group_grid](q, k, v, vr, log_decay, dt, scale, gamma, om, qb, kb, D if D is not None else dummy,
                                    theta_off, seq, dstates, dcsl, dy, dcs, dscale_q, dtheta, dk, dkb_part, dv, da, dscale,
                                    dtheta_tot, dd_part, dvr_part, *shape, HAS_QB=q_bias is not None,
                                    HAS_KB=k_bias is not None, HAS_VR=v_rank is not None, HAS_D=D is not None, **flags)
    dq_bias = dqb_part.sum((0, 1)) if q_bias is not None else None  # (H, R, N)
    dk_bias = dkb_part.sum((0, 1)) if k_bias is not None else None
    d_dt = d_omega = d_theta_off = None
    if has_rot:
        dinc = dtheta[..., :S]  # (B, T, H, S) gradient of each token's angle increment
        d_theta_off = dtheta_tot[..., :S]
        if angle_dt:
            d_omega = torch.einsum("bths,bth->bts", dinc, dt)
            d_dt = torch.einsum("bths,bts->bth", dinc, omega.float())
        else:
            d_omega = dinc.sum(2)
    return (dq, dk, dv, da, d_dt, dscale, dgamma, d_omega, d_theta_off, dq_bias, dk_bias,
            dd_part.sum((0, 1)) if D is not None else None, dvr_part.sum((0, 1)) if v_rank is not None else None, dg0)
