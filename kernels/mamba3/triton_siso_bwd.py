"""Triton backward of the Mamba-3 SISO chunked scan, chunk-parallel like the forward.

Forward per chunk (``triton_siso.py``), with rotated q, k and in-chunk cumulative log-decay cs:

    y_j     = sum_{i<j} e^{cs_j - cs_i} scale_i (q_j.k_i) x_i + gamma_j (q_j.k_j) x_j + e^{cs_j} G_c q_j + D x_j
    G_{c+1} = e^{cs_last} G_c + sum_i e^{cs_last - cs_i} scale_i x_i k_i^T

Backward, four launches mirroring the forward:

    1. _chunk_scan_bwd_dq grid (chunks, B*H)   query side of chunk c: dq (un-rotated, per head), the intra and
                                               inter terms of d log-decay, d scale, d gamma, d angle, and
                                               dG_in[c] = sum_j e^{cs_j} dy_j q_j^T (what chunk c's outputs ask of G_c);
                                               from the scores it holds, dx's intra-chunk and skip terms and d D
    2. state_passing_bwd  (triton_state_passing.py) reverse scan: dG_c = dG_in[c] + e^{cs_last} dG_{c+1}; the gradient
                                               into each chunk's local state; partial sums of d cs_last
    3. _chunk_scan_bwd_dx (same grid)          dx's local-state term, added in place (k rotated, no scores)
    4. _chunk_scan_bwd_dk (same grid)          key side: dk, local-state terms; completes d log-decay and d angle
                                               (reverse cumulative sums). Separate kernels keep fewer (C, C) and
                                               (C, N/2) tiles live per program (a fused key/value kernel spilled ~110
                                               registers a thread); the scores are taken twice (forward and dq).

Glue (``mamba3_siso_chunk_bwd``): PyTorch sums the per-head q/k gradients into their groups and biases and
carries each chunk's entry-angle gradient back over the chunks before it (a reverse cumulative sum); one
kernel (``_coef_grads``) then turns d scale / d gamma into d dt / d lambda and the angle gradient into
d omega / d dt. Deterministic (no atomics) except for one option: on a GPU outside deterministic mode, dq / dk
are summed over a group's heads by fp32 atomics in the kernels (``group_sums_by_atomics``).

Sequence boundaries (HAS_SEQ, ``seq_idx``) mask the same terms as in the forward: the intra weights between
documents, the entering state outside the document open at the chunk start, the local state outside the
one open at its end (the state passing needs nothing: a chunk where a document starts has e^{cs_last} = 0).
Angle gradients are reverse-summed within each document of a chunk (the transpose of the forward's
segmented sum); a chunk's entry-angle gradient is what its ``enter`` tokens ask, and the glue carries it
back over earlier chunks only as far as the document reaches (a reset-aware reverse sum over chunks).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from hybrid.kernels.launch import direct
from hybrid.kernels.mamba3.triton_siso import (
    ROW_ALIGN,
    SISO_KEY,
    _chunk_program,
    _chunk_scores,
    _from_eo,
    _qk_pairs,
    _rotated_pairs,
    _row_strides,
    _store_angle_grad,
    _to_eo,
    _unrotate,
    cumsum_dim1,
    empty_rows,
    in_gluon,
    kernel_flags,
    restart_cumsum,
    row_strides,
    rows_fit,
    scan_strides,
    seq_chunks,
    state_dtype,
    tuned,
)
from hybrid.kernels.mamba3.triton_state_passing import state_passing_bwd


@triton.jit
def _intra_weights(cs, scale, gamma, seq, C: tl.constexpr, HAS_SEQ: tl.constexpr):
    """The forward's (C, C) intra-chunk decay and weights, [query j, key i]."""
    i = tl.arange(0, C)
    below = i[:, None] > i[None, :]
    if HAS_SEQ:
        below = below & (seq[:, None] == seq[None, :])
    diag = i[:, None] == i[None, :]
    decay = tl.where(below, tl.exp(tl.where(below, cs[:, None] - cs[None, :], 0.0)), 0.0)
    w = decay * scale[None, :] + tl.where(diag, gamma[None, :], 0.0)
    return decay, w, below, diag


@triton.jit
def _intra_weights_t(cs, scale, gamma, seq, C: tl.constexpr, HAS_SEQ: tl.constexpr):
    """Transpose of ``_intra_weights``' w, [key i, query j], built as such."""
    i = tl.arange(0, C)
    above = i[:, None] < i[None, :]
    if HAS_SEQ:
        above = above & (seq[:, None] == seq[None, :])
    decay_t = tl.where(above, tl.exp(tl.where(above, cs[None, :] - cs[:, None], 0.0)), 0.0)
    return decay_t * scale[:, None] + tl.where(i[:, None] == i[None, :], gamma[:, None], 0.0)


@triton.jit
def _qk_grad_out(PTR, dE, dO, b, t, tmask, h, g, T, H, heads_per_group, nb, N2: tl.constexpr, GROUP_SUM: tl.constexpr):
    """A column block of a head's dq or dk (C, NB) each half, stored per head (B, T, H, N) for the glue to sum over
    the group's heads, or with GROUP_SUM added straight into the group's fp32 rows (B, T, G, N) by atomics: the
    per-head tensor's write and read (0.5 GB at 8 x 4k, 32 heads, bf16) become L2 atomics on a buffer that stays in
    L2. The order of the additions then varies between runs, so the glue uses this only outside deterministic mode."""
    if GROUP_SUM:
        off = ((b * T + t[:, None]) * (H // heads_per_group) + g) * 2 * N2 + nb[None, :]
        tl.atomic_add(PTR + off, dE, mask=tmask[:, None], sem="relaxed")
        tl.atomic_add(PTR + off + N2, dO, mask=tmask[:, None], sem="relaxed")
    else:
        off = ((b * T + t[:, None]) * H + h) * 2 * N2 + nb[None, :]
        tl.store(PTR + off, dE, mask=tmask[:, None])
        tl.store(PTR + off + N2, dO, mask=tmask[:, None])


@triton.jit
def _chunk_scan_bwd_dq(Q, K, X, A, DT, LAM, OMEGA, QB, KB, D, THETA_OFF, SEQ, G_IN, DY,
                       DQH, DQB_PART, DCS_PART, DSCALE, DGAMMA, DTHETA, DG_IN, DX, DD_PART,
                       T, H, S, nc, heads_per_group,
                       s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_sb, s_db8, s_dt8,
                       C: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, ROT_BLOCKS: tl.constexpr,
                       HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_D: tl.constexpr, ANGLE_DT: tl.constexpr,
                       HAS_SEQ: tl.constexpr, HEADS_FIRST: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Query side of chunk c: dq (un-rotated, per head, and its sum over the chunk for the bias), the
    decay/scale/gamma terms of the intra and inter parts, the query half of d angle, and what the chunk's outputs
    ask of its entering state, dG_in = sum_j e^{cs_j} dy_j q_j^T (from the same rotated q blocks). Also dx's
    intra-chunk and skip terms, dx_i = sum_j w_ji s_ji dy_j + D dy_i, from the scores it holds anyway (the dx kernel
    adds the local-state term), and d D's chunk sum (the trace of dy x^T)."""
    c, b, h, g, t, tmask, seq, enter, to_end, through, cs, scale, gamma, dt = _chunk_program(
        A, DT, LAM, SEQ, T, H, heads_per_group, s_ab, s_at, s_ah, s_sb, C, HAS_SEQ, HEADS_FIRST)
    p = tl.arange(0, P)
    base = b * s_kb + g * s_kg
    dtype = X.dtype.element_ty
    scores = _chunk_scores(Q, K, QB, KB, OMEGA, THETA_OFF, dt, t, tmask, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot,
                           seq, enter, C, N2, NB, ROT_BLOCKS, HAS_QB, HAS_KB, ANGLE_DT, dtype, HAS_SEQ)
    head_p = h * s_xh + p[None, :]
    s_xb, s_xt = _row_strides(s_xb8, s_xt8)
    x = tl.load(X + b * s_xb + t[:, None] * s_xt + head_p, mask=tmask[:, None], other=0.0).to(dtype)
    s_db, s_dt = _row_strides(s_db8, s_dt8)
    dy = tl.load(DY + b * s_yb + t[:, None] * s_yt + head_p, mask=tmask[:, None], other=0.0).to(dtype)
    dyx = tl.dot(dy, tl.trans(x))  # dy_j . x_i
    decay, w, below, diag = _intra_weights(cs, scale, gamma, seq, C, HAS_SEQ)
    dw = scores * dyx
    sw = scores * w  # [query j, key i]
    if HAS_D:  # the skip term D dy_i rides on the diagonal
        sw += tl.where(diag, tl.load(D + h).to(tl.float32), 0.0)
        dd = tl.sum(tl.sum(tl.where(diag, dyx, 0.0), axis=1), axis=0)
    sw = sw.to(dtype)
    pw = tl.where(below, dw * w, 0.0)
    dcs = tl.sum(pw, axis=1) - tl.sum(pw, axis=0)
    dscale = tl.sum(tl.where(below, dw * decay, 0.0), axis=0)
    dgamma = tl.sum(tl.where(diag, dw, 0.0), axis=1)
    a1 = (dyx * w).to(dtype)

    ecs = tl.exp(cs)
    if HAS_SEQ:
        ecs = ecs * enter  # only the document open at the chunk start read the entering state
    gbase = G_IN + ((b * nc + c) * H + h) * P * 2 * N2
    dgbase = DG_IN + ((b * nc + c) * H + h) * P * 2 * N2
    dye = tl.trans(dy.to(tl.float32) * ecs[:, None]).to(dtype)  # (P, C)
    part = DQB_PART + ((b * nc + c) * H + h) * 2 * N2
    for j in tl.static_range(N2 // NB):
        nb = j * NB + tl.arange(0, NB)
        qE, qO, kE, kO, cos, sin = _qk_pairs(Q, K, QB, KB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H,
                                             S, s_ob, s_ot, seq, enter, 2 * N2, HAS_QB, HAS_KB, j < ROT_BLOCKS, ANGLE_DT,
                                             HAS_SEQ)
        dyGE = tl.dot(dy, tl.load(gbase + p[:, None] * 2 * N2 + nb[None, :]).to(dtype))  # (C, NB): rows of dy^T G
        dyGO = tl.dot(dy, tl.load(gbase + p[:, None] * 2 * N2 + N2 + nb[None, :]).to(dtype))
        dcs += ecs * (tl.sum(dyGE * qE, axis=1) + tl.sum(dyGO * qO, axis=1))  # inter part
        tl.store(dgbase + p[:, None] * 2 * N2 + nb[None, :], tl.dot(dye, qE.to(dtype)).to(DG_IN.dtype.element_ty))
        tl.store(dgbase + p[:, None] * 2 * N2 + N2 + nb[None, :], tl.dot(dye, qO.to(dtype)).to(DG_IN.dtype.element_ty))
        dqE = tl.dot(a1, kE.to(dtype)) + ecs[:, None] * dyGE
        dqO = tl.dot(a1, kO.to(dtype)) + ecs[:, None] * dyGO
        if j < ROT_BLOCKS:
            dth = qE * dqO - qO * dqE  # d/dtheta of (e c - o s, e s + o c), query half
            tl.store(DTHETA + ((b * T + t[:, None]) * H + h) * S + nb[None, :], dth,
                     mask=tmask[:, None] & (nb < S)[None, :])
            dqE, dqO = _unrotate(dqE, dqO, cos, sin)
        _qk_grad_out(DQH, dqE, dqO, b, t, tmask, h, g, T, H, heads_per_group, nb, N2, GROUP_SUM)
        if HAS_QB:
            tl.store(part + nb, tl.sum(dqE, axis=0))
            tl.store(part + N2 + nb, tl.sum(dqO, axis=0))
    coef = b * s_ab + t * s_at + h * s_ah
    tl.store(DCS_PART + coef, dcs, mask=tmask)
    tl.store(DSCALE + coef, dscale, mask=tmask)
    tl.store(DGAMMA + coef, dgamma, mask=tmask)
    # Last: a store (DX, DD_PART) before the column loop would keep the compiler from reusing the scores' q / k
    # loads and angles in the loop's first block, as it must assume the store may alias them (dq grew 20%).
    dx = tl.dot(tl.trans(sw), dy)  # (C, P) [key i]: sum_j w_ji s_ji dy_j + D dy_i
    tl.store(DX + b * s_db + t[:, None] * s_dt + head_p, dx.to(DX.dtype.element_ty), mask=tmask[:, None])
    if HAS_D:
        tl.store(DD_PART + (b * nc + c) * H + h, dd)


@triton.jit
def _chunk_scan_bwd_dx(K, A, DT, LAM, OMEGA, KB, THETA_OFF, SEQ, DLOCAL, DX,
                       T, H, S, nc, heads_per_group,
                       s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_sb, s_db8, s_dt8,
                       C: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, ROT_BLOCKS: tl.constexpr,
                       HAS_KB: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """Local-state term of dx for chunk c, added in place to what ``_chunk_scan_bwd_dq`` stored there:
    dx_i += e_i k_i dL^T, dL the gradient of the chunk's local state. Only k is rotated here, and no (C, C)
    tile is formed."""
    c, b, h, g, t, tmask, seq, enter, to_end, through, cs, scale, gamma, dt = _chunk_program(
        A, DT, LAM, SEQ, T, H, heads_per_group, s_ab, s_at, s_ah, s_sb, C, HAS_SEQ, HEADS_FIRST)
    p = tl.arange(0, P)
    base = b * s_kb + g * s_kg
    dtype = DLOCAL.dtype.element_ty
    lbase = DLOCAL + ((b * nc + c) * H + h) * P * 2 * N2
    kdl = tl.zeros((C, P), dtype=tl.float32)  # k_i dL^T
    for j in tl.static_range(N2 // NB):
        nb = j * NB + tl.arange(0, NB)
        kE, kO = _rotated_pairs(K, KB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot,
                                seq, enter, 2 * N2, HAS_KB, j < ROT_BLOCKS, ANGLE_DT, HAS_SEQ)
        kdl += tl.dot(kE.to(dtype), tl.trans(tl.load(lbase + p[:, None] * 2 * N2 + nb[None, :])))
        kdl += tl.dot(kO.to(dtype), tl.trans(tl.load(lbase + p[:, None] * 2 * N2 + N2 + nb[None, :])))
    # Local state: G_{c+1} gets sum_i e_i x_i k_i^T with e_i = e^{cs_last - cs_i} scale_i.
    e = tl.where(tmask, tl.exp(tl.min(cs, axis=0) - cs), 0.0) * scale
    if HAS_SEQ:
        e = e * to_end  # only the document still open at the chunk's end enters the local state
    s_db, s_dt = _row_strides(s_db8, s_dt8)
    dx_off = b * s_db + t[:, None] * s_dt + h * s_xh + p[None, :]
    dx = tl.load(DX + dx_off, mask=tmask[:, None], other=0.0).to(tl.float32) + e[:, None] * kdl
    tl.store(DX + dx_off, dx.to(DX.dtype.element_ty), mask=tmask[:, None])


@triton.jit
def _chunk_scan_bwd_dk(Q, K, X, A, DT, LAM, OMEGA, QB, KB, THETA_OFF, SEQ, DLOCAL, DCSL, DY,
                       DCS_PART, DSCALE, DTHETA, DKH, DKB_PART, DA, DTHETA_TOT,
                       T, H, S, nc, heads_per_group,
                       s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_sb,
                       C: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, ROT_BLOCKS: tl.constexpr,
                       HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr,
                       HEADS_FIRST: tl.constexpr, GROUP_SUM: tl.constexpr):
    """Key side of chunk c: dk (un-rotated, per head, and its chunk sum for the bias), the local-state terms,
    d log-decay (reverse cumulative sum of everything d cs), d scale, and d angle (completed and reverse-summed).
    Runs after ``_chunk_scan_bwd_dq``, whose d cs, d scale and d angle it completes in place."""
    c, b, h, g, t, tmask, seq, enter, to_end, through, cs, scale, gamma, dt = _chunk_program(
        A, DT, LAM, SEQ, T, H, heads_per_group, s_ab, s_at, s_ah, s_sb, C, HAS_SEQ, HEADS_FIRST)
    p = tl.arange(0, P)
    base = b * s_kb + g * s_kg
    dtype = X.dtype.element_ty
    head_p = h * s_xh + p[None, :]
    s_xb, s_xt = _row_strides(s_xb8, s_xt8)
    x = tl.load(X + b * s_xb + t[:, None] * s_xt + head_p, mask=tmask[:, None], other=0.0).to(dtype)
    dy = tl.load(DY + b * s_yb + t[:, None] * s_yt + head_p, mask=tmask[:, None], other=0.0).to(dtype)
    w_t = _intra_weights_t(cs, scale, gamma, seq, C, HAS_SEQ)
    a1t = (tl.dot(x, tl.trans(dy)) * w_t).to(dtype)  # [key i, query j] of (dy_j . x_i) w_ji

    # Local state: G_{c+1} gets sum_i e_i x_i k_i^T with e_i = e^{cs_last - cs_i} scale_i.
    cs_last = tl.min(cs, axis=0)
    to_end_w = tl.where(tmask, tl.exp(cs_last - cs), 0.0)
    if HAS_SEQ:
        to_end_w = to_end_w * to_end  # only the document still open at the chunk's end enters the local state
    e = to_end_w * scale
    m_loc = tl.zeros((C,), dtype=tl.float32)  # d scale_i from the local state, over all channel blocks
    lbase = DLOCAL + ((b * nc + c) * H + h) * P * 2 * N2
    part = DKB_PART + ((b * nc + c) * H + h) * 2 * N2
    for j in tl.static_range(N2 // NB):
        nb = j * NB + tl.arange(0, NB)
        qE, qO, kE, kO, cos, sin = _qk_pairs(Q, K, QB, KB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H,
                                             S, s_ob, s_ot, seq, enter, 2 * N2, HAS_QB, HAS_KB, j < ROT_BLOCKS, ANGLE_DT,
                                             HAS_SEQ)
        xdLE = tl.dot(x, tl.load(lbase + p[:, None] * 2 * N2 + nb[None, :]).to(dtype))  # (C, NB)
        xdLO = tl.dot(x, tl.load(lbase + p[:, None] * 2 * N2 + N2 + nb[None, :]).to(dtype))
        m_loc += (tl.sum(xdLE * kE, axis=1) + tl.sum(xdLO * kO, axis=1)) * to_end_w
        dkE = tl.dot(a1t, qE.to(dtype)) + e[:, None] * xdLE
        dkO = tl.dot(a1t, qO.to(dtype)) + e[:, None] * xdLO
        if j < ROT_BLOCKS:
            smask = nb < S
            th_off = ((b * T + t[:, None]) * H + h) * S + nb[None, :]
            th_mask = tmask[:, None] & smask[None, :]
            dth = tl.load(DTHETA + th_off, mask=th_mask, other=0.0) + (kE * dkO - kO * dkE)
            _store_angle_grad(DTHETA, DTHETA_TOT, dth, th_off, th_mask, ((b * nc + c) * H + h) * S + nb, smask, seq, enter,
                              HAS_SEQ)
            dkE, dkO = _unrotate(dkE, dkO, cos, sin)
        _qk_grad_out(DKH, dkE, dkO, b, t, tmask, h, g, T, H, heads_per_group, nb, N2, GROUP_SUM)
        if HAS_KB:
            tl.store(part + nb, tl.sum(dkE, axis=0))
            tl.store(part + N2 + nb, tl.sum(dkO, axis=0))

    coef = b * s_ab + t * s_at + h * s_ah
    i = tl.arange(0, C)
    dcs = tl.load(DCS_PART + coef, mask=tmask, other=0.0) - m_loc * scale
    dcs_last = tl.sum(m_loc * scale, axis=0) + tl.load(DCSL + (b * nc + c) * H + h)
    dcs += tl.where(i == C - 1, dcs_last, 0.0)  # cs_last is cs at the chunk's end (padding adds no decay)
    tl.store(DA + coef, tl.sum(dcs, axis=0) - tl.cumsum(dcs, axis=0) + dcs, mask=tmask)  # cs = cumsum(a)
    tl.store(DSCALE + coef, tl.load(DSCALE + coef, mask=tmask, other=0.0) + m_loc, mask=tmask)


# With GROUP_SUM dq / dk add into a zeroed buffer: the tuner restores it between its trial runs.
_chunk_scan_bwd_dq_tuned = tuned(_chunk_scan_bwd_dq, restore=("DQH",), key=(*SISO_KEY, "GROUP_SUM"))
# dk compiles without wgmma: Triton 3.6's wgmma path faulted on dk and the old dx (which formed a (C, C) tile) with
# several column blocks (illegal addresses, non-finite values: docs/perf-notes.md v7, v8), and with one block
# (exact) they ran 50% slower. The local-state-only dx has no (C, C) tile and runs exact on wgmma, 2-5% faster.
_chunk_scan_bwd_dx_tuned = tuned(_chunk_scan_bwd_dx, restore=("DX",), key=SISO_KEY)
_chunk_scan_bwd_dk_tuned = tuned(_chunk_scan_bwd_dk, restore=("DSCALE", "DTHETA", "DKH"), key=(*SISO_KEY, "GROUP_SUM"),
                                 mma_sync=True)

@triton.jit
def _coef_grads(DSCALE, DGAMMA, DT, LAM, SEQ, DINC, LATER, OM, D_DT, D_LAM, D_OMEGA,
                rows, T, H, S, C, nc, s_ob, s_ot,
                BT: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, HAS_SEQ: tl.constexpr, HAS_ROT: tl.constexpr,
                ANGLE_DT: tl.constexpr, LATER_ROWS: tl.constexpr):
    """The chain rule from the chunk kernels' per-token results to the scan's coefficient inputs, for BT tokens
    of the flattened (B * T) and all heads:

        scale_t = lam_t dt_t + dt_{t+1} (1 - lam_{t+1}) [same document],  gamma_t = lam_t dt_t
        d dt_t  = (d scale_t + d gamma_t) lam_t + d scale_{t-1} (1 - lam_t) + sum_s dinc_ts omega_ts [ANGLE_DT]
        d lam_t = (d scale_t + d gamma_t - d scale_{t-1}) dt_t
        d omega_ts = sum_h dinc_ths dt_th  (sum_h dinc_ths without ANGLE_DT)

    dinc is the per-head angle gradient (any float type) plus what later chunks ask of the token's increment, an
    (H, S) row per chunk or per token (packed documents). LATER_ROWS: 0 none; 1 per chunk, the program's BT
    tokens in one chunk (one (H, S) load, broadcast: gathering it per token cost as much as dinc's read); 2 per
    chunk, gathered per token (ragged lengths); 3 per token. One pass over dinc, sums in float32."""
    r = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)  # rows of the flattened (B * T)
    h = tl.arange(0, BH)
    rm, hm = r < rows, h < H
    m2 = rm[:, None] & hm[None, :]
    off = r[:, None] * H + h[None, :]  # (BT, BH) into (B, T, H)
    dself = tl.load(DSCALE + off, mask=m2, other=0.0) + tl.load(DGAMMA + off, mask=m2, other=0.0)
    dt = tl.load(DT + off, mask=m2, other=0.0).to(tl.float32)
    lam = tl.load(LAM + off, mask=m2, other=0.0).to(tl.float32)
    tt = r % T
    prev = rm & (tt > 0)  # scale_{t-1} holds dt_t: same row, and with packed documents the same document
    if HAS_SEQ:
        prev = prev & (tl.load(SEQ + r - 1, mask=prev, other=0) == tl.load(SEQ + r, mask=rm, other=0))
    dprev = tl.load(DSCALE + off - H, mask=prev[:, None] & hm[None, :], other=0.0)
    d_dt = dself * lam + dprev * (1 - lam)
    d_lam = (dself - dprev) * dt
    if HAS_ROT:
        s = tl.arange(0, BS)
        sm = s < S
        m3 = m2[:, :, None] & sm[None, None, :]
        dinc = tl.load(DINC + off[:, :, None] * S + s[None, None, :], mask=m3, other=0.0).to(tl.float32)  # (BT, BH, BS)
        if LATER_ROWS == 1:
            r0 = tl.program_id(0).to(tl.int64) * BT
            crow = (r0 // T) * nc + (r0 % T) // C  # the chunk of all BT tokens
            later = tl.load(LATER + (crow * H + h[:, None]) * S + s[None, :], mask=hm[:, None] & sm[None, :], other=0.0)
            dinc += later[None, :, :]
        if LATER_ROWS == 2:
            crow = (r // T) * nc + tt // C  # each token's chunk
            dinc += tl.load(LATER + (crow[:, None] * H + h[None, :])[:, :, None] * S + s[None, None, :], mask=m3, other=0.0)
        if LATER_ROWS == 3:
            dinc += tl.load(LATER + off[:, :, None] * S + s[None, None, :], mask=m3, other=0.0)
        if ANGLE_DT:
            om = tl.load(OM + (r // T)[:, None] * s_ob + tt[:, None] * s_ot + s[None, :], mask=rm[:, None] & sm[None, :],
                         other=0.0).to(tl.float32)  # (BT, BS)
            d_omega = tl.sum(dinc * dt[:, :, None], axis=1)
            d_dt += tl.sum(dinc * om[:, None, :], axis=2)
        else:
            d_omega = tl.sum(dinc, axis=1)
        tl.store(D_OMEGA + r[:, None] * S + s[None, :], d_omega, mask=rm[:, None] & sm[None, :])
    tl.store(D_DT + off, d_dt, mask=m2)
    tl.store(D_LAM + off, d_lam, mask=m2)


# Elements of the per-head angle gradient per program of ``_coef_grads`` (its one large read) and its warps: at 32
# heads x 32 angles, 16 tokens at 4 warps (or 8 at 2) were the fastest of the H100 sweep (scripts/sweep_coef_grads.py).
COEF_BLOCK, COEF_WARPS = 16384, 4


def coef_grads(dscale: torch.Tensor, dgamma: torch.Tensor, dt: torch.Tensor, lam: torch.Tensor, seq_idx: torch.Tensor | None,
               dinc: torch.Tensor | None, later: torch.Tensor | None, om: torch.Tensor | None, angle_dt: bool,
               chunk_size: int, later_per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d dt, d lam, d omega) in float32 from d scale, d gamma (B, T, H) float32 and, with rotation, the per-head
    angle gradient dinc (B, T, H, S) plus ``later``: (B, nc, H, S) per chunk, or (B, T, H, S) per token with
    ``later_per_token``, or None. See ``_coef_grads``: one launch replaces an elementwise chain and the angle
    contractions."""
    Bsz, T, H = dscale.shape
    has_rot = dinc is not None
    S = dinc.shape[-1] if has_rot else 0
    f32 = dict(device=dscale.device, dtype=torch.float32)
    d_dt, d_lam = torch.empty(Bsz, T, H, **f32), torch.empty(Bsz, T, H, **f32)
    d_omega = torch.empty(Bsz, T, S, **f32) if has_rot else None
    BH, BS = triton.next_power_of_2(H), triton.next_power_of_2(max(S, 1))
    BT = triton.next_power_of_2(max(1, COEF_BLOCK // (BH * BS))) if has_rot else max(1, min(256, COEF_BLOCK // BH))
    rows = Bsz * T
    if later is None:
        later_rows = 0
    elif later_per_token:
        later_rows = 3
    else:
        later_rows = 1 if T % BT == 0 and chunk_size % BT == 0 else 2
    om_ = om if (has_rot and angle_dt) else dscale
    nc = -(-T // chunk_size)
    dummy = dscale
    direct(_coef_grads)[(triton.cdiv(rows, BT),)](
        dscale, dgamma, dt.contiguous(), lam.contiguous(), seq_idx if seq_idx is not None else dummy,
        dinc.contiguous() if has_rot else dummy, later.contiguous() if later is not None else dummy, om_,
        d_dt, d_lam, d_omega if has_rot else dummy, rows, T, H, S, chunk_size, nc, om_.stride(0), om_.stride(1),
        BT=BT, BH=BH, BS=BS, HAS_SEQ=seq_idx is not None, HAS_ROT=has_rot, ANGLE_DT=angle_dt, LATER_ROWS=later_rows,
        num_warps=COEF_WARPS)
    return d_dt, d_lam, d_omega


def group_sums_by_atomics(device: torch.device) -> bool:
    """Whether dq / dk are summed over each group's heads by atomics in the kernels (faster; the order of the fp32
    additions varies between runs) or stored per head and summed after (bit-reproducible). ``HYBRID_SCAN_GROUP_SUM``:
    ``auto`` (default) takes atomics on a GPU unless determinism is asked for, by
    ``torch.use_deterministic_algorithms(True)`` or ``HYBRID_DETERMINISTIC=1`` (the GPU tests set it);
    ``atomic`` / ``store`` force one way (tests of both paths, A/B runs)."""
    mode = os.environ.get("HYBRID_SCAN_GROUP_SUM", "auto")
    if mode not in ("auto", "atomic", "store"):
        raise ValueError(f"HYBRID_SCAN_GROUP_SUM must be auto, atomic or store, got {mode!r}")
    if mode != "auto":
        return mode == "atomic"
    deterministic = torch.are_deterministic_algorithms_enabled() or os.environ.get("HYBRID_DETERMINISTIC") == "1"
    return device.type == "cuda" and not deterministic


def mamba3_siso_chunk_bwd(ctx: dict, dy: torch.Tensor, d_ssm: torch.Tensor | None, d_k_last: torch.Tensor | None,
                          d_v_last: torch.Tensor | None, dx_out: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
    """Gradients of ``mamba3_siso_chunk_fwd`` given what it saved (``ctx``) and the output gradients.

    Returns a dict with q, k, v, log_decay, dt, lam, omega, q_bias, k_bias, D, ssm0, k0, v0 (None where
    the input was absent). The initial angle gets no gradient (it is a cache value, not a parameter).
    ``dx_out``: where v's gradient goes (B, T, H, P), e.g. the x columns of d(in_proj output); it must ``rows_fit``
    (each token's H * P values contiguous, token rows a multiple of ROW_ALIGN apart). Allocated when None.
    """
    q, k, v, a, dt, lam, om = (ctx[n] for n in ("q", "k", "v", "log_decay", "dt", "lam", "om"))
    Bsz, T, G, N = q.shape
    H, P = v.shape[2:]
    C, nc, S, angle_dt = ctx["chunk_size"], ctx["nc"], ctx["S"], ctx["angle_dt"]
    dev = v.device
    has_rot, has_qb, has_kb, has_d = S > 0 and ctx["has_rot"], ctx["has_qb"], ctx["has_kb"], ctx["has_d"]
    dy = dy.contiguous()
    seq_idx = ctx.get("seq")
    seq = seq_idx if seq_idx is not None else dt  # never read without HAS_SEQ
    strides = scan_strides(q, v, dy, dt, om, seq)
    flags = kernel_flags(C, N, P, S if ctx["has_rot"] else 0, angle_dt, seq_idx is not None, nc)

    f32 = dict(device=dev, dtype=torch.float32)
    # Per-head dq / dk (0.5 GB each in fp32 at 8 x 4k x 32 heads) are only summed over the heads of a group: 16-bit
    # storage with 16-bit activations halves their traffic; the sum runs in fp32, and its result is rounded to the
    # activation type anyway.
    part = dict(device=dev, dtype=state_dtype(v.dtype))
    group_sum = group_sums_by_atomics(dev)
    if group_sum:  # summed over each group's heads by the kernels, in fp32 (see _qk_grad_out)
        dqh, dkh = torch.zeros(Bsz, T, G, N, **f32), torch.zeros(Bsz, T, G, N, **f32)
    else:
        dqh, dkh = torch.empty(Bsz, T, H, N, **part), torch.empty(Bsz, T, H, N, **part)
    # Per-(chunk, head) sums of dq / dk for the bias gradients: far smaller than a second pass over dqh / dkh.
    dqb_part = torch.empty(Bsz, nc, H, N, **f32) if has_qb else dqh
    dkb_part = torch.empty(Bsz, nc, H, N, **f32) if has_kb else dkh
    if dx_out is None:
        dx = empty_rows(v.shape, v.dtype, dev)
    elif dx_out.shape != v.shape or dx_out.dtype != v.dtype or not rows_fit(dx_out):
        raise ValueError(f"dx_out must be a {v.dtype} {tuple(v.shape)} tensor that rows_fit (each token's heads contiguous, "
                         f"rows a multiple of {ROW_ALIGN} apart), got {dx_out.dtype} {tuple(dx_out.shape)} strides "
                         f"{dx_out.stride()}")
    else:
        dx = dx_out
    dx_strides = row_strides(dx)
    da, dscale, dgamma = (torch.empty(Bsz, T, H, **f32) for _ in range(3))
    # The per-head angle gradient is only summed over heads and angles (coef_grads): 16 bits with 16-bit activations,
    # as the per-head dq / dk.
    dtheta = torch.empty(Bsz, T, H, max(S, 1), **part)
    dtheta_tot = torch.empty(Bsz, nc, H, max(S, 1), **f32)
    dd_part = torch.empty(Bsz, nc, H, **f32)
    dcs_part = torch.empty(Bsz, T, H, **f32)
    common = (T, H, S, nc, H // G, *strides)
    dg_in = torch.empty(Bsz, nc, H, P, N, device=dev, dtype=state_dtype(v.dtype))
    # The Gluon versions of dq / dx / dk (gluon_siso_bwd.py; plain sequences: no SEQ) where they are on (in_gluon).
    dq_gluon, dx_gluon, dk_gluon = (in_gluon(name, v, flags) for name in ("dq", "dx", "dk"))
    if dq_gluon or dx_gluon or dk_gluon:
        from hybrid.kernels.mamba3 import gluon_siso_bwd
    n_angles = S if has_rot else 0
    if dq_gluon:
        gluon_siso_bwd.chunk_scan_bwd_dq(
            (nc, Bsz * H), q, k, v, a, dt, lam, om, ctx["qb"], ctx["kb"], ctx["D"], ctx["theta_off"], ctx["g_in"], dy,
            dqh, dqb_part, dcs_part, dscale, dgamma, dtheta, dg_in, dx, dd_part, *common[:-1], *dx_strides, flags=flags,
            n_angles=n_angles, HAS_QB=has_qb, HAS_KB=has_kb, HAS_D=has_d, GROUP_SUM=group_sum)
    else:
        _chunk_scan_bwd_dq_tuned[(nc, Bsz * H)](q, k, v, a, dt, lam, om, ctx["qb"], ctx["kb"], ctx["D"], ctx["theta_off"],
                                                seq, ctx["g_in"], dy,
                                                dqh, dqb_part, dcs_part, dscale, dgamma, dtheta, dg_in, dx, dd_part, *common,
                                                *dx_strides,
                                                HAS_QB=has_qb, HAS_KB=has_kb, HAS_D=has_d, GROUP_SUM=group_sum, **flags)

    dg_final = torch.zeros(Bsz, H, P, N, device=dev, dtype=torch.float32)
    if d_ssm is not None:
        dg_final = _to_eo(d_ssm.float()).contiguous()
    dlocal, dcsl, dg0 = state_passing_bwd(dg_in, ctx["g_in"], ctx["cs_last"], dg_final)

    if dx_gluon:
        gluon_siso_bwd.chunk_scan_bwd_dx((nc, Bsz * H), k, a, dt, lam, om, ctx["kb"], ctx["theta_off"], dlocal, dx,
                                         *common[:-1], *dx_strides, flags=flags, n_angles=n_angles, HAS_KB=has_kb)
    else:
        _chunk_scan_bwd_dx_tuned[(nc, Bsz * H)](k, a, dt, lam, om, ctx["kb"], ctx["theta_off"], seq, dlocal, dx, *common,
                                                *dx_strides, HAS_KB=has_kb, **flags)
    if dk_gluon:
        gluon_siso_bwd.chunk_scan_bwd_dk(
            (nc, Bsz * H), q, k, v, a, dt, lam, om, ctx["qb"], ctx["kb"], ctx["theta_off"], dlocal, dcsl, dy, dcs_part,
            dscale, dtheta, dkh, dkb_part, da, dtheta_tot, *common[:-1], flags=flags,
            n_angles=n_angles, HAS_QB=has_qb, HAS_KB=has_kb, GROUP_SUM=group_sum)
    else:
        _chunk_scan_bwd_dk_tuned[(nc, Bsz * H)](q, k, v, a, dt, lam, om, ctx["qb"], ctx["kb"], ctx["theta_off"], seq,
                                                dlocal, dcsl, dy, dcs_part, dscale, dtheta, dkh, dkb_part, da, dtheta_tot,
                                                *common, HAS_QB=has_qb, HAS_KB=has_kb, GROUP_SUM=group_sum, **flags)

    # Final-state key: k_last = rot(k[:, -1] + k_bias, theta_final), per head.
    dkh_last = None
    dtheta_final = None
    if d_k_last is not None:
        dkl = d_k_last[:, 0].float()  # (B, H, N) natural order
        if has_rot:
            k_rot = ctx["k_last"][:, 0].float()
            c_, s_ = ctx["theta_final"].cos().float(), ctx["theta_final"].sin().float()  # (B, H, S)
            e_, o_ = dkl[..., 0:2 * S:2], dkl[..., 1:2 * S:2]
            ke, ko = k_rot[..., 0:2 * S:2], k_rot[..., 1:2 * S:2]
            dtheta_final = ke * o_ - ko * e_
            un = torch.stack([e_ * c_ + o_ * s_, o_ * c_ - e_ * s_], dim=-1).flatten(-2)
            dkl = torch.cat([un, dkl[..., 2 * S:]], dim=-1)
        dkh_last = dkl

    dk_bias = _from_eo(dkb_part.sum((0, 1))) if has_kb else None
    hpg = H // G
    if dkh_last is not None:
        dkh[:, -1] += _to_eo(dkh_last).view(Bsz, G, hpg, N).sum(2) if group_sum else _to_eo(dkh_last)
        if has_kb:
            dk_bias = dk_bias + dkh_last.sum(0)
    # The [even | odd] layout is a fixed channel permutation: it commutes with the sums over heads and over
    # (B, T), so sum first and permute only the small results (the per-head tensors are 0.5 GB each at 8 x 4k).
    grads: dict[str, torch.Tensor | None] = {
        # Summed straight into q's / k's type (the reduction accumulates in fp32 and rounds once, as the cast to
        # that type did after it), so with 16-bit inputs the permutation moves 16-bit values.
        "q": _from_eo(dqh.to(q.dtype) if group_sum else dqh.view(Bsz, T, G, hpg, N).sum(3, dtype=q.dtype)),
        "k": _from_eo(dkh.to(k.dtype) if group_sum else dkh.view(Bsz, T, G, hpg, N).sum(3, dtype=k.dtype)),
        "q_bias": _from_eo(dqb_part.sum((0, 1))) if has_qb else None,
        "k_bias": dk_bias,
        "D": dd_part.sum((0, 1)) if has_d else None,
        "log_decay": da,
    }
    if d_v_last is not None:
        dx[:, -1] += d_v_last.to(dx.dtype)
    grads["v"] = dx

    later = None  # what the chunks after a token ask of its angle increment
    if has_rot:
        tot = dtheta_tot[..., :S]  # (B, nc, H, S) gradient of each chunk's entry angle
        if seq_idx is None:
            later = cumsum_dim1(tot.flip(1)).flip(1) - tot  # what the chunks after c add to each increment of chunk c
            if dtheta_final is not None:
                later = later + dtheta_final[:, None]  # theta_final = theta_{T-1}: every increment moves it
        else:
            # later_c = u_c + [no document starts in chunk c + 1] later_{c+1}, u_c = d entry_{c+1} (d theta_final for
            # the last chunk): the entry of chunk c + 1 is the angle of chunk c's last document. It reaches only the
            # tokens of that document (to_end), so it goes to the glue kernel per token.
            seq_c, prev, last = seq_chunks(seq_idx, C)
            final = dtheta_final if dtheta_final is not None else torch.zeros_like(tot[:, 0])
            u = torch.cat([tot[:, 1:], final[:, None]], dim=1).double()
            chain = torch.cat([last[:, 1:] == prev[:, 1:], torch.zeros_like(last[:, :1], dtype=torch.bool)], dim=1)
            later = restart_cumsum(u.flip(1), (~chain).flip(1)).flip(1).float()
            later = later[:, :, None] * (seq_c == last[..., None]).float()[..., None, None]  # (B, nc, C, H, S)
            later = later.reshape(Bsz, nc * C, H, S)[:, :T]
    # scale_i = lam_i dt_i + dt_{i+1} (1 - lam_{i+1}) [same document], gamma_i = lam_i dt_i, and the angle
    # increments dt_i omega_i: one kernel from d scale, d gamma and the angle gradient to d dt, d lam, d omega.
    d_dt, d_lam, grads["omega"] = coef_grads(dscale, dgamma, dt, lam, seq_idx, dtheta[..., :S] if has_rot else None, later,
                                             om, angle_dt, C, later_per_token=seq_idx is not None)

    # Initial state: G_{-1} = ssm0 + beta'_0 x0 k0^T with beta'_0 = dt_0 (1 - lam_0).
    grads["ssm0"] = grads["k0"] = grads["v0"] = None
    if ctx["has_init"]:
        dg0n = _from_eo(dg0)  # (B, H, P, N)
        x0, k0 = ctx["v0"].float(), ctx["k0"][:, 0].float()  # (B, H, P), (B, H, N)
        dt0, lam0 = dt[:, 0].float(), lam[:, 0].float()  # (B, H)
        beta0 = dt0 * (1 - lam0)
        grads["ssm0"] = dg0n
        grads["v0"] = beta0[..., None] * torch.einsum("bhpn,bhn->bhp", dg0n, k0)
        grads["k0"] = (beta0[..., None] * torch.einsum("bhpn,bhp->bhn", dg0n, x0))[:, None]
        d_beta0 = torch.einsum("bhpn,bhp,bhn->bh", dg0n, x0, k0)
        d_dt[:, 0] += d_beta0 * (1 - lam0)
        d_lam[:, 0] -= d_beta0 * dt0
    grads["dt"], grads["lam"] = d_dt, d_lam
    return grads
