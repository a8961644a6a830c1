"""Triton kernels for Mamba-3 SISO: chunk-parallel forward (SSD layout) and the fused decode step.

Same math as ``chunk.py`` (the reference these kernels are tested against), organised so that every
chunk of every sequence is processed in parallel, as Mamba-2's SSD does:

    1. _chunk_state_fwd   grid (chunks, B*H)    local state of each chunk, as if it started from zero
    2. state_passing_fwd  (triton_state_passing.py) short sequential scan over chunks: the entering states
    3. _chunk_scan_fwd    grid (chunks, B*H)    intra-chunk masked matmuls + entering state + D skip

Rotation, B/C biases and the trapezoid weights are fused into 1 and 3; nothing of size T x H x N is
materialised. Interleaved rotation pairs (2i, 2i+1) are handled by loading even and odd state channels
as two (C, N/2) tiles: a pair is then column i of both tiles, q.k = qE.kE + qO.kO, and chunk states
are kept as [even | odd] halves internally (the final state is written back in natural order).

Angles: the layer passes omega (B, T, S) (pi * tanh(u_theta), or a fixed frequency) and whether it is
scaled by dt. Per-chunk angle totals and their exclusive prefix sums are tiny and taken in float64
(``triton_angles.py``; reduced mod 2pi, so long sequences lose no angle precision); within a chunk the
kernels add a cumulative sum of dt * omega to that offset.

Sequence boundaries (``seq_idx``, packed documents) follow ``chunk.py``: a compile-time flag HAS_SEQ (the
kernels without it are unchanged) masks the decay between tokens of different documents, cuts beta' at a
document's last token, keeps a chunk's local state to the document still open at its end and its entering
state to the document of the token before it, and stops the entering state at a chunk where a document
starts (its log-decay is stored as -inf, so the state passing needs no flag). The angle restarts at each
document start: the per-chunk entry angles come from a reset-aware prefix sum on the host, and within a
chunk a segmented cumulative sum (the plain one less a gathered per-document base) replaces the plain one.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from hybrid.kernels.launch import DirectLaunch, direct
from hybrid.kernels.mamba3.common import Mamba3State, rotate
from hybrid.kernels.mamba3.triton_angles import angle_offsets_triton
from hybrid.kernels.mamba3.triton_state_passing import state_passing_fwd
from triton.language.extra.cuda import libdevice


@triton.jit
def _seq_flags(SEQ, b, c, t, T, s_sb, C: tl.constexpr):
    """Document bookkeeping of chunk c: the tokens' document ids (padding takes the last token's), whether each
    token is in the document of the token before the chunk (``enter``: the entering state and angle reach it;
    the first token's document for chunk 0), whether it is in the document still open at the chunk's end
    (``to_end``: it enters the chunk's local state), and whether the entering state passes through the chunk
    (no document starts in it)."""
    row = SEQ + b * s_sb
    seq = tl.load(row + tl.minimum(t, T - 1))
    prev = tl.load(row + tl.maximum(c * C - 1, 0))
    last = tl.load(row + tl.minimum(c * C + C - 1, T - 1))
    return seq, (seq == prev).to(tl.float32), (seq == last).to(tl.float32), prev == last


@triton.jit
def _seg_cumsum(x, seq):
    """Inclusive cumulative sum of the (C, W) rows of ``x`` within each document (row document ids ``seq``,
    non-decreasing): the plain cumulative sum less its exclusive value at the first row of the row's document
    (gathered), so as accurate as the plain sum and without a (C, C) matmul or a tuple scan."""
    i = tl.arange(0, x.shape[0])
    first = tl.min(tl.where(seq[None, :] == seq[:, None], i[None, :], x.shape[0]), axis=1)  # (C,)
    cum = tl.cumsum(x, axis=0)
    return cum - tl.gather(cum - x, tl.broadcast_to(first[:, None], x.shape), 0)


@triton.jit
def _seg_rcumsum(x, seq):
    """Reverse of ``_seg_cumsum``: row i sums the rows j >= i of its document."""
    i = tl.arange(0, x.shape[0])
    last = tl.max(tl.where(seq[None, :] == seq[:, None], i[None, :], 0), axis=1)  # (C,)
    rcum = tl.cumsum(x, axis=0, reverse=True)
    return rcum - tl.gather(rcum - x, tl.broadcast_to(last[:, None], x.shape), 0)


@triton.jit
def _store_angle_grad(DTHETA, DTHETA_TOT, dth, th_off, th_mask, tot_off, tot_mask, seq, enter, HAS_SEQ: tl.constexpr):
    """Stores a chunk's (C, W) angle gradient per token and angle. Token t's angle sums the increments up to t, so
    each increment gets the reverse cumulative sum within the chunk; the chunk total (the gradient of its entry
    angle) goes to DTHETA_TOT, for the glue to carry over earlier chunks. With HAS_SEQ the sums stay within each
    token's document (the transpose of the forward's segmented sum) and the entry angle reaches ``enter`` tokens."""
    if HAS_SEQ:
        tl.store(DTHETA + th_off, _seg_rcumsum(dth, seq), mask=th_mask)
        tl.store(DTHETA_TOT + tot_off, tl.sum(dth * enter[:, None], axis=0), mask=tot_mask)
    else:
        total = tl.sum(dth, axis=0)
        tl.store(DTHETA + th_off, total[None, :] - tl.cumsum(dth, axis=0) + dth, mask=th_mask)
        tl.store(DTHETA_TOT + tot_off, total, mask=tot_mask)


# On a GPU the chunk kernels take cos / sin from the hardware's approximate units after a two-step reduction to
# [-pi, pi]: tl.cos / tl.sin are libdevice's exact cosf / sinf, whose Payne-Hanek path for large arguments needs
# a local-memory array and many registers in kernels that already spill (docs/perf-notes.md, "fast trig"). The
# approximations' absolute error there (about 2**-21) is far below the bf16 rounding of the rotated q and k. The
# CPU interpreter has no libdevice, so it keeps tl.cos / tl.sin.
FAST_TRIG = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _cos_sin(theta):
    """cos and sin of a float32 tensor of angles (any size: they are reduced first)."""
    if FAST_TRIG:
        turns = libdevice.rint(theta * 0.15915494309189535)
        r = tl.fma(turns, -6.2831854820251465, theta)  # 2pi as float32 is 2pi + 1.75e-7: the second step corrects
        r = tl.fma(turns, 1.7484556e-07, r)
        return libdevice.fast_cosf(r), libdevice.fast_sinf(r)
    return tl.cos(theta), tl.sin(theta)


@triton.jit
def _block_trig(OMEGA, THETA_OFF, dt, t, tmask, nb, b, c, h, nc, H, S, s_ob, s_ot, seq, enter, ANGLE_DT: tl.constexpr,
                HAS_SEQ: tl.constexpr):
    """cos and sin of the (C, NB) cumulative angles of pairs ``nb`` in one chunk for one head (angle 0 past S).
    With HAS_SEQ the sum restarts at each document start and the entry angle only reaches ``enter`` tokens."""
    smask = nb < S
    om = tl.load(OMEGA + b * s_ob + t[:, None] * s_ot + nb[None, :], mask=tmask[:, None] & smask[None, :], other=0.0)
    om = om.to(tl.float32)
    if ANGLE_DT:
        om = om * dt[:, None]
    off = tl.load(THETA_OFF + ((b * nc + c) * H + h) * S + nb, mask=smask, other=0.0)
    if HAS_SEQ:
        theta = _seg_cumsum(om, seq) + off[None, :] * enter[:, None]
    else:
        theta = tl.cumsum(om, axis=0) + off[None, :]
    return _cos_sin(theta)


@triton.jit
def _load_pairs(PTR, BIAS, t, tmask, nb, base, s_t, h, N: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Even and odd channels of pairs ``nb`` of (C, N) rows at PTR + base + t * s_t, stored as [even | odd]
    halves (so both loads are contiguous), plus the head's bias, in float32."""
    e = tl.load(PTR + base + t[:, None] * s_t + nb[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    o = tl.load(PTR + base + t[:, None] * s_t + N // 2 + nb[None, :], mask=tmask[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        e += tl.load(BIAS + h * N + nb).to(tl.float32)[None, :]
        o += tl.load(BIAS + h * N + N // 2 + nb).to(tl.float32)[None, :]
    return e, o


@triton.jit
def _rotate(e, o, cos, sin):
    return e * cos - o * sin, e * sin + o * cos


@triton.jit
def _unrotate(de, do, cos, sin):
    """Transpose of ``_rotate``: carries gradients back to the un-rotated channels."""
    return de * cos + do * sin, do * cos - de * sin


@triton.jit
def _rotated_pairs(PTR, BIAS, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_t, b, c, h, nc, H, S, s_ob, s_ot, seq, enter,
                   N: tl.constexpr, HAS_BIAS: tl.constexpr, ROT: tl.constexpr, ANGLE_DT: tl.constexpr,
                   HAS_SEQ: tl.constexpr):
    """``_load_pairs`` rotated by the tokens' angles when ROT (the block holds rotated pairs)."""
    e, o = _load_pairs(PTR, BIAS, t, tmask, nb, base, s_t, h, N, HAS_BIAS)
    if ROT:
        cos, sin = _block_trig(OMEGA, THETA_OFF, dt, t, tmask, nb, b, c, h, nc, H, S, s_ob, s_ot, seq, enter, ANGLE_DT,
                               HAS_SEQ)
        e, o = _rotate(e, o, cos, sin)
    return e, o


@triton.jit
def _qk_pairs(Q, K, QB, KB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot, seq, enter,
              N: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, ROT: tl.constexpr, ANGLE_DT: tl.constexpr,
              HAS_SEQ: tl.constexpr):
    """Pairs ``nb`` of q and k of one chunk and head, biased and (when ROT) rotated. q and k of a token share its
    angle, so the block's cos / sin (a cumulative sum and two transcendentals per element) are taken once for
    both; they are returned for the backward's un-rotation (meaningless when not ROT)."""
    qE, qO = _load_pairs(Q, QB, t, tmask, nb, base, s_kt, h, N, HAS_QB)
    kE, kO = _load_pairs(K, KB, t, tmask, nb, base, s_kt, h, N, HAS_KB)
    cos, sin = qE, qO
    if ROT:
        cos, sin = _block_trig(OMEGA, THETA_OFF, dt, t, tmask, nb, b, c, h, nc, H, S, s_ob, s_ot, seq, enter, ANGLE_DT,
                               HAS_SEQ)
        qE, qO = _rotate(qE, qO, cos, sin)
        kE, kO = _rotate(kE, kO, cos, sin)
    return qE, qO, kE, kO, cos, sin


@triton.jit
def _chunk_coeffs(A, DT, LAM, SEQ, b, h, t, tmask, T, s_ab, s_at, s_ah, s_sb, HAS_SEQ: tl.constexpr):
    """Per-token coefficients of one chunk: cumulative log-decay, key weight (gamma + next beta'), gamma, dt.
    With HAS_SEQ, beta' is cut at a document's last token."""
    a = tl.load(A + b * s_ab + t * s_at + h * s_ah, mask=tmask, other=0.0).to(tl.float32)
    dt = tl.load(DT + b * s_ab + t * s_at + h * s_ah, mask=tmask, other=0.0).to(tl.float32)
    lam = tl.load(LAM + b * s_ab + t * s_at + h * s_ah, mask=tmask, other=0.0).to(tl.float32)
    nmask = (t + 1) < T
    dtn = tl.load(DT + b * s_ab + (t + 1) * s_at + h * s_ah, mask=nmask, other=0.0).to(tl.float32)
    lamn = tl.load(LAM + b * s_ab + (t + 1) * s_at + h * s_ah, mask=nmask, other=1.0).to(tl.float32)
    if HAS_SEQ:
        seq = tl.load(SEQ + b * s_sb + t, mask=tmask, other=0)
        dtn = tl.where(tl.load(SEQ + b * s_sb + t + 1, mask=nmask, other=0) == seq, dtn, 0.0)
    gamma = lam * dt
    scale = gamma + dtn * (1.0 - lamn)  # beta' of token t + 1 enters the state with token t's key
    return tl.cumsum(a, axis=0), scale, gamma, dt


@triton.jit
def _chunk_and_head(HEADS_FIRST: tl.constexpr):
    """(chunk c, b * H + h) of this program on the (chunks, B * H) grid. Numbered chunks first (launch order),
    the heads that read one chunk's group-shared q and k run nc programs apart; at long sequences q and k
    have left L2 by the next head. HEADS_FIRST numbers programs heads first, so a chunk's heads run together
    and read q and k from L2. At few chunks the launch order measured faster (docs/perf-notes.md)."""
    if HEADS_FIRST:
        n_chunks, n_heads = tl.num_programs(0), tl.num_programs(1)
        pid = tl.program_id(1).to(tl.int64) * n_chunks + tl.program_id(0)
        return pid // n_heads, pid % n_heads
    return tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)


ROW_ALIGN = 8  # elements; ``_row_strides`` tells the compiler so (16-byte token rows in 16-bit types: loads vectorise)
_ROW_ALIGN = tl.constexpr(ROW_ALIGN)  # jitted code reads only constexpr globals


@triton.jit
def _row_strides(s_b8, s_t8):
    """x's or dx's batch and token strides from their arguments in units of ROW_ALIGN (``row_strides``): the product
    tells the compiler the rows are aligned, where an odd multiple of 8 (a column slice of the in_proj output, token
    stride 3432 at d_model 768) as a plain argument would be read in 2-byte loads. Scalar arguments take no hint."""
    return s_b8 * _ROW_ALIGN, s_t8 * _ROW_ALIGN


@triton.jit
def _chunk_program(A, DT, LAM, SEQ, T, H, heads_per_group, s_ab, s_at, s_ah, s_sb, C: tl.constexpr,
                   HAS_SEQ: tl.constexpr, HEADS_FIRST: tl.constexpr):
    """What every chunk kernel starts from: its chunk c, sequence b, head h and group g (int64: offsets into
    (B, chunks, H, P, N) state tensors pass 2**31 at long contexts and large batches), the chunk's token
    indices, the document flags of ``_seq_flags`` (placeholders without documents) and the coefficients."""
    c, bh = _chunk_and_head(HEADS_FIRST)
    b, h = bh // H, bh % H
    g = h // heads_per_group
    t = c * C + tl.arange(0, C)
    tmask = t < T
    seq, enter, to_end, through = tmask, tmask, tmask, tmask
    if HAS_SEQ:
        seq, enter, to_end, through = _seq_flags(SEQ, b, c, t, T, s_sb, C)
    cs, scale, gamma, dt = _chunk_coeffs(A, DT, LAM, SEQ, b, h, t, tmask, T, s_ab, s_at, s_ah, s_sb, HAS_SEQ)
    return c, b, h, g, t, tmask, seq, enter, to_end, through, cs, scale, gamma, dt


@triton.jit
def _chunk_scores(Q, K, QB, KB, OMEGA, THETA_OFF, dt, t, tmask, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot, seq, enter,
                  C: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, ROT_BLOCKS: tl.constexpr,
                  HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, ANGLE_DT: tl.constexpr, dtype: tl.constexpr,
                  HAS_SEQ: tl.constexpr):
    """(C, C) scores q_j . k_i of rotated, biased q and k, summed over column blocks of NB pairs so that only
    one block of q and k is live at a time. q and k take their cos / sin apart: sharing them (``_qk_pairs``) keeps
    both live at once, and made the forward kernel 9% slower on an H200 (docs/perf-notes.md)."""
    scores = tl.zeros((C, C), dtype=tl.float32)
    for j in tl.static_range(N2 // NB):
        nb = j * NB + tl.arange(0, NB)
        qE, qO = _rotated_pairs(Q, QB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot,
                                seq, enter, 2 * N2, HAS_QB, j < ROT_BLOCKS, ANGLE_DT, HAS_SEQ)
        kE, kO = _rotated_pairs(K, KB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot,
                                seq, enter, 2 * N2, HAS_KB, j < ROT_BLOCKS, ANGLE_DT, HAS_SEQ)
        scores += tl.dot(qE.to(dtype), tl.trans(kE.to(dtype)))
        scores += tl.dot(qO.to(dtype), tl.trans(kO.to(dtype)))
    return scores


@triton.jit
def _chunk_state_fwd(K, X, A, DT, LAM, OMEGA, KB, THETA_OFF, SEQ, LOCAL, CS_LAST,
                     T, H, S, nc, heads_per_group,
                     s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_sb,
                     C: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, ROT_BLOCKS: tl.constexpr,
                     HAS_KB: tl.constexpr, ANGLE_DT: tl.constexpr, HAS_SEQ: tl.constexpr, HEADS_FIRST: tl.constexpr):
    c, b, h, g, t, tmask, seq, enter, to_end, through, cs, scale, gamma, dt = _chunk_program(
        A, DT, LAM, SEQ, T, H, heads_per_group, s_ab, s_at, s_ah, s_sb, C, HAS_SEQ, HEADS_FIRST)
    p = tl.arange(0, P)
    s_xb, s_xt = _row_strides(s_xb8, s_xt8)
    x = tl.load(X + b * s_xb + t[:, None] * s_xt + h * s_xh + p[None, :], mask=tmask[:, None], other=0.0)
    cs_last = tl.min(cs, axis=0)  # log_decay <= 0 and padding adds 0: the last token's cumulative decay
    w_end = tl.where(tmask, tl.exp(cs_last - cs) * scale, 0.0)  # (C,)
    if HAS_SEQ:
        w_end = w_end * to_end  # only the document still open at the chunk's end reaches the next chunk
    xt = tl.trans(x).to(X.dtype.element_ty)  # (P, C)
    base = LOCAL + ((b * nc + c) * H + h) * P * 2 * N2
    for j in tl.static_range(N2 // NB):
        nb = j * NB + tl.arange(0, NB)
        kE, kO = _rotated_pairs(K, KB, OMEGA, THETA_OFF, dt, t, tmask, nb, b * s_kb + g * s_kg, s_kt, b, c, h, nc, H, S,
                                s_ob, s_ot, seq, enter, 2 * N2, HAS_KB, j < ROT_BLOCKS, ANGLE_DT, HAS_SEQ)
        localE = tl.dot(xt, (kE * w_end[:, None]).to(X.dtype.element_ty))  # (P, NB)
        localO = tl.dot(xt, (kO * w_end[:, None]).to(X.dtype.element_ty))
        tl.store(base + p[:, None] * 2 * N2 + nb[None, :], localE.to(LOCAL.dtype.element_ty))
        tl.store(base + p[:, None] * 2 * N2 + N2 + nb[None, :], localO.to(LOCAL.dtype.element_ty))
    if HAS_SEQ:
        cs_last = tl.where(through, cs_last, float("-inf"))  # a document starts here: the entering state stops
    tl.store(CS_LAST + (b * nc + c) * H + h, cs_last)


@triton.jit
def _chunk_scan_fwd(Q, K, X, A, DT, LAM, OMEGA, QB, KB, D, THETA_OFF, SEQ, G_IN, Y,
                    T, H, S, nc, heads_per_group,
                    s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_sb,
                    C: tl.constexpr, N2: tl.constexpr, NB: tl.constexpr, P: tl.constexpr, ROT_BLOCKS: tl.constexpr,
                    HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_D: tl.constexpr, ANGLE_DT: tl.constexpr,
                    HAS_SEQ: tl.constexpr, HEADS_FIRST: tl.constexpr):
    c, b, h, g, t, tmask, seq, enter, to_end, through, cs, scale, gamma, dt = _chunk_program(
        A, DT, LAM, SEQ, T, H, heads_per_group, s_ab, s_at, s_ah, s_sb, C, HAS_SEQ, HEADS_FIRST)
    p = tl.arange(0, P)
    base = b * s_kb + g * s_kg
    dtype = X.dtype.element_ty
    scores = _chunk_scores(Q, K, QB, KB, OMEGA, THETA_OFF, dt, t, tmask, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot,
                           seq, enter, C, N2, NB, ROT_BLOCKS, HAS_QB, HAS_KB, ANGLE_DT, dtype, HAS_SEQ)
    i = tl.arange(0, C)
    below = i[:, None] > i[None, :]
    if HAS_SEQ:
        below = below & (seq[:, None] == seq[None, :])  # no decay path between documents
    decay = tl.exp(tl.where(below, cs[:, None] - cs[None, :], 0.0))  # exponent <= 0 where used
    w = tl.where(below, decay * scale[None, :], tl.where(i[:, None] == i[None, :], gamma[None, :], 0.0))
    s_xb, s_xt = _row_strides(s_xb8, s_xt8)
    x = tl.load(X + b * s_xb + t[:, None] * s_xt + h * s_xh + p[None, :], mask=tmask[:, None], other=0.0)
    y = tl.dot((scores * w).to(dtype), x.to(dtype))  # (C, P)
    ecs = tl.exp(cs)
    if HAS_SEQ:
        ecs = ecs * enter  # the entering state reaches the document open at the chunk's start only
    gbase = G_IN + ((b * nc + c) * H + h) * P * 2 * N2
    for j in tl.static_range(N2 // NB):
        nb = j * NB + tl.arange(0, NB)
        qE, qO = _rotated_pairs(Q, QB, OMEGA, THETA_OFF, dt, t, tmask, nb, base, s_kt, b, c, h, nc, H, S, s_ob, s_ot,
                                seq, enter, 2 * N2, HAS_QB, j < ROT_BLOCKS, ANGLE_DT, HAS_SEQ)
        gE = tl.load(gbase + p[:, None] * 2 * N2 + nb[None, :]).to(dtype)  # (P, NB)
        gO = tl.load(gbase + p[:, None] * 2 * N2 + N2 + nb[None, :]).to(dtype)
        y += ecs[:, None] * (tl.dot(qE.to(dtype), tl.trans(gE)) + tl.dot(qO.to(dtype), tl.trans(gO)))
    if HAS_D:
        y += tl.load(D + h).to(tl.float32) * x.to(tl.float32)
    tl.store(Y + b * s_yb + t[:, None] * s_yt + h * s_xh + p[None, :], y.to(Y.dtype.element_ty), mask=tmask[:, None])


@contextlib.contextmanager
def mma_sync_compile():
    """Within this block Triton compiles matmuls for Hopper as mma.sync instead of wgmma (it reads
    DISABLE_MMA_V3 when it compiles, and the variable is part of its disk-cache key). Triton 3.6's wgmma path
    faults on some of the chunk kernels (probabilistic illegal addresses, non-finite values: docs/perf-notes.md,
    v7 and v8); those kernels are exact with mma.sync. Launches of an already compiled kernel are unaffected."""
    before = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = before


class MmaSync:
    """An autotuned kernel whose every config is compiled under ``mma_sync_compile`` (its compiles happen
    inside its launches). Indexed by a grid as the kernel is; other attributes are the autotuner's."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            with mma_sync_compile():
                return launch(*args, **kwargs)
        return run

    def __getattr__(self, name):
        return getattr(self.kernel, name)


class ChosenConfig:
    """An autotuned kernel that launches the config Triton chose for a key directly, once the autotuner has chosen
    it. The autotuner's own work per launch (dicts of every argument, a key holding every tensor's dtype as a string)
    cost ~26 us of host time on the H100 machine, on top of the JIT's ~32 us (``scripts/host_cost_mamba3.py``); a
    Mamba-3 block makes five such launches per training step, and its forward was host-bound. The chosen config's
    launches then go through ``DirectLaunch``, which skips the JIT's work as well. The key here is the same
    information as the autotuner's: the tuning key's values (passed as keywords) and the dtypes of the tensor
    arguments. Other attributes are the autotuner's."""

    def __init__(self, autotuner, key: tuple[str, ...]):
        self.autotuner = autotuner
        self.key = key
        self.chosen: dict[tuple, dict] = {}
        launcher = direct(autotuner.fn)  # the chosen config's launches skip the JIT's per-call work too
        self.launcher = launcher if isinstance(launcher, DirectLaunch) else None

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            if not all(name in kwargs for name in self.key):  # a key value passed by position: no cheap key
                return self.autotuner.run(*args, grid=grid, warmup=False, **kwargs)
            key = tuple(kwargs[name] for name in self.key) + tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            config = self.chosen.get(key)
            if config is not None:
                if self.launcher is not None:
                    return self.launcher.launch(grid, args, {**kwargs, **config})
                return self.autotuner.fn.run(*args, grid=grid, warmup=False, **kwargs, **config)
            out = self.autotuner.run(*args, grid=grid, warmup=False, **kwargs)
            best = getattr(self.autotuner, "best_config", None)
            if best is not None and not best.pre_hook:
                self.chosen[key] = best.all_kwargs()
            return out
        return run

    def __getattr__(self, name):
        return getattr(self.autotuner, name)


def extra_caps() -> list[tuple[int, int, int]]:
    """Diagnostic: ``HYBRID_TRITON_CAPS="4,1,168;8,1,128"`` offers every tuned kernel these (warps, stages, maxnreg)
    configs too, for register-cap experiments without code changes (docs/perf-notes.md, "Chunk 32 again")."""
    caps = []
    for spec in filter(None, os.environ.get("HYBRID_TRITON_CAPS", "").split(";")):
        parts = spec.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"HYBRID_TRITON_CAPS: expected 'warps,stages,maxnreg' entries separated by ';', got {spec!r}")
        caps.append(tuple(int(p) for p in parts))
    return caps


def tuned(kernel, restore: tuple[str, ...] = (), key: tuple[str, ...] = ("C", "N2", "P"),
          capped: tuple[tuple[int, int, int], ...] = (), mma_sync: bool = False):
    """On a GPU, choose num_warps / num_stages per tile shape by timing (Triton autotune, once per shape).
    ``restore`` names buffers the kernel reads and rewrites in place: the tuner restores them between
    trial runs. ``capped`` adds (warps, stages, maxnreg) configs: a register cap that fits more programs on an
    SM for some spills. ``mma_sync`` compiles the kernel without Hopper's wgmma (``MmaSync``). The interpreter
    (CPU tests) runs the kernel as written; ``HYBRID_TRITON_TUNE=fixed`` (the GPU tests) compiles one config only."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return kernel
    configs = [triton.Config({}, num_warps=w, num_stages=st) for w in (4, 8) for st in (1, 2, 3)]
    configs += [triton.Config({}, num_warps=w, num_stages=st, maxnreg=m) for w, st, m in (*capped, *extra_caps())]
    if os.environ.get("HYBRID_TRITON_TUNE", "all") == "fixed":
        # One config, no timing: each config of these kernels takes seconds to compile, and the GPU tests check
        # values, not speed (scripts/check_scan_determinism.py runs every config).
        configs = [triton.Config({}, num_warps=8, num_stages=1)]
    autotuned = ChosenConfig(triton.autotune(configs, key=list(key), restore_value=list(restore))(kernel), key)
    return MmaSync(autotuned) if mma_sync else autotuned


# The packed-document variants (HAS_SEQ) are tuned apart from the plain ones.
SISO_KEY = ("C", "N2", "P", "HAS_SEQ", "HEADS_FIRST")
# Register caps that won on an H100 at 8 x 4096 (docs/perf-notes.md, "register caps"); the big backward kernels
# only lost with them.
_chunk_state_fwd_tuned = tuned(_chunk_state_fwd, key=SISO_KEY, capped=((4, 2, 128),))
_chunk_scan_fwd_tuned = tuned(_chunk_scan_fwd, key=SISO_KEY, capped=((4, 1, 168),))


def unsupported_reason(d_state: int, headdim: int, chunk_size: int) -> str | None:
    """Why these kernels cannot run a shape (tile sizes must be powers of two, matmul sides >= 16), or None."""
    def pow2(n: int) -> bool:
        return n >= 1 and n & (n - 1) == 0
    if not (pow2(d_state) and d_state >= 32):
        return f"d_state must be a power of two >= 32, got {d_state}"
    if not (pow2(headdim) and headdim >= 16):
        return f"headdim must be a power of two >= 16, got {headdim}"
    if not (pow2(chunk_size) and chunk_size >= 16):
        return f"chunk_size must be a power of two >= 16, got {chunk_size}"
    return None


# Pairs per column block: the chunk kernels walk the state channels in blocks of this many pairs (and their
# cos/sin), so that only one block of rotated q and k is live beside the (C, C) tiles. Tests lower it to
# cover several blocks at tiny d_state.
COL_BLOCK = 32


# Above this many chunks per sequence the chunk kernels number their programs heads first (``_chunk_and_head``):
# on an H100 that took 0.5-1.7 ms off f+b at 2 x 16k and 1 x 64k, and cost 0.16 ms at 8 x 4k (64 chunks).
HEADS_FIRST_CHUNKS = 128


def kernel_flags(chunk_size: int, d_state: int, headdim: int, n_angles: int, angle_dt: bool, has_seq: bool = False,
                 n_chunks: int = 0) -> dict:
    """Compile-time shape flags shared by the chunk kernels (forward and backward)."""
    n2 = d_state // 2
    nb = min(COL_BLOCK, n2)
    return dict(C=chunk_size, N2=n2, NB=nb, P=headdim, ROT_BLOCKS=-(-n_angles // nb), ANGLE_DT=angle_dt, HAS_SEQ=has_seq,
                HEADS_FIRST=n_chunks > HEADS_FIRST_CHUNKS)


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Storage type of the per-chunk states: 16-bit with 16-bit activations (the kernels cast states to the
    activation type before their matmuls anyway), float32 otherwise. Sums across chunks are always fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def _to_eo(t: torch.Tensor) -> torch.Tensor:
    """(..., N) natural channel order -> [even | odd] halves, as one strided copy (on an H100 ~25% faster than a
    cat of the two strided halves)."""
    return t.unflatten(-1, (-1, 2)).transpose(-1, -2).reshape(t.shape)


def _from_eo(t: torch.Tensor) -> torch.Tensor:
    """Inverse of ``_to_eo``."""
    return t.unflatten(-1, (2, -1)).transpose(-1, -2).reshape(t.shape)


def seq_chunks(seq_idx: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Document ids per chunk (B, nc, C) (padding takes the last token's), and per chunk (B, nc) the document
    of the token before it (the first token's for chunk 0: the initial state's) and of its last token."""
    Bsz, T = seq_idx.shape
    nc = -(-T // chunk_size)
    seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(Bsz, nc * chunk_size - T)], dim=1).view(Bsz, nc, chunk_size)
    last = seq[:, :, -1]
    prev = torch.cat([seq[:, :1, 0], last[:, :-1]], dim=1)
    return seq, prev, last


def chunk_rows(t: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """(B, T, X) -> (B, chunks, chunk_size, X), zeros past T; no copy when T is a multiple of the chunk."""
    Bsz, T, X = t.shape
    nc = -(-T // chunk_size)
    pad = nc * chunk_size - T
    return (torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t.contiguous()).view(Bsz, nc, chunk_size, X)


def cumsum_dim1(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    """``x.cumsum(1)`` for x (B, n, ...) over chunks, as two short scans: within blocks of ``block`` steps, then
    over the block totals. A scan along an outer dim walks its length one dependent step at a time: over the
    1024 chunks of a 64k sequence that took ~0.2 ms on an H100 for a few MB of data."""
    n = x.shape[1]
    if n <= 4 * block:  # a short scan is one small kernel; the two levels cost a few
        return x.cumsum(1)
    nb = -(-n // block)
    pad = [0, 0] * (x.ndim - 2) + [0, nb * block - n]
    inner = torch.nn.functional.pad(x, pad).view(x.shape[0], nb, block, *x.shape[2:]).cumsum(2)
    ends = inner[:, :, -1]
    inner = inner + (ends.cumsum(1) - ends)[:, :, None]  # plus everything before the block
    return inner.view(x.shape[0], nb * block, *x.shape[2:])[:, :n]


def restart_cumsum(vals: torch.Tensor, restart: torch.Tensor) -> torch.Tensor:
    """out_c = vals_c + (0 if restart_c else out_{c-1}) along dim 1, without a loop: vals (B, n, ...), restart (B, n)."""
    Bsz, n = restart.shape
    cum = cumsum_dim1(vals)
    idx = torch.arange(n, device=vals.device).expand(Bsz, n)
    first = torch.where(restart, idx, torch.zeros_like(idx)).cummax(1).values  # last restart at or before c (0 if none)
    first = first.view(Bsz, n, *([1] * (vals.ndim - 2))).expand_as(vals)
    return cum - (cum - vals).gather(1, first)  # sum of vals over [first, c]


def angle_offsets(omega: torch.Tensor, dt: torch.Tensor, angle_dt: bool, theta0: torch.Tensor | None,
                  chunk_size: int, heads: int, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Angle of each chunk's entry (B, nc, H, S) float32 and the final angle (B, H, S) float64, both mod 2pi:
    two small Triton launches (``triton_angles.py``), or with packed documents the tensor ops of
    ``angle_offsets_torch``. The tensor ops also where autograd must see the angles (the MIMO scan takes the
    entry angles' gradient back to dt and omega through them), and off the GPU outside the interpreter."""
    tracked = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (omega, dt, theta0))
    if seq_idx is None and not tracked and (dt.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return angle_offsets_triton(omega, dt, angle_dt, theta0, chunk_size, heads)
    return angle_offsets_torch(omega, dt, angle_dt, theta0, chunk_size, heads, seq_idx)


def angle_offsets_torch(omega: torch.Tensor, dt: torch.Tensor, angle_dt: bool, theta0: torch.Tensor | None,
                        chunk_size: int, heads: int, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``angle_offsets`` as float64 tensor ops (the oracle of ``triton_angles.py``, and the path for packed documents).

    With ``seq_idx`` the angle restarts at 0 at each document start (``theta0`` only reaches the first document):
    a chunk's entry is the angle of the token before it, so each chunk contributes the increments of the
    document still open at its end, added to the previous chunk's end only when no document starts in it.
    """
    Bsz, T = dt.shape[:2]
    S = omega.shape[-1]
    nc = -(-T // chunk_size)
    om = chunk_rows(omega.double(), chunk_size)
    to_end = None
    if seq_idx is not None:
        seq, prev, last = seq_chunks(seq_idx, chunk_size)
        to_end = (seq == last[..., None]).double()  # (B, nc, C)
    if angle_dt:  # per-chunk totals sum_t dt_t omega_t as a small float64 batched matmul (no (B, T, H, S) tensor)
        d = chunk_rows(dt.double(), chunk_size)
        inc = torch.einsum("bcth,bcts->bchs", d if to_end is None else d * to_end[..., None], om)
    elif to_end is None:
        inc = om.sum(2)[:, :, None, :].expand(Bsz, nc, heads, S)
    else:
        inc = torch.einsum("bct,bcts->bcs", to_end, om)[:, :, None, :].expand(Bsz, nc, heads, S)
    start = torch.zeros(Bsz, heads, S, dtype=torch.float64, device=dt.device) if theta0 is None else theta0.double()
    if seq_idx is None:
        total = start[:, None] + cumsum_dim1(inc)  # (B, nc, H, S) angle after each chunk
    else:
        restart = torch.cat([torch.ones_like(last[:, :1], dtype=torch.bool), last != prev], dim=1)
        total = restart_cumsum(torch.cat([start[:, None], inc], dim=1), restart)[:, 1:]
    entry = torch.cat([start[:, None], total[:, :-1]], dim=1)
    two_pi = 2 * math.pi
    return torch.remainder(entry, two_pi).float().contiguous(), torch.remainder(total[:, -1], two_pi)


def mamba3_siso_chunk_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, dt: torch.Tensor,
                          lam: torch.Tensor, omega: torch.Tensor | None = None, angle_dt: bool = True,
                          q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                          D: torch.Tensor | None = None, initial_state: Mamba3State | None = None,
                          chunk_size: int = 64, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba3State]:
    """Chunk-parallel Mamba-3 SISO forward (interleaved pairing). No autograd; see ``siso.mamba3_siso_chunk``.

    q, k (B, T, G, N); v (B, T, H, P); log_decay, dt, lam (B, T, H); omega (B, T, S) angle rate (the
    increment is dt * omega when ``angle_dt`` else omega) or None for no rotation; q_bias, k_bias (H, N);
    D (H,); seq_idx (B, T) integer document ids, non-decreasing along each row, or None (one document per
    row). Returns y (B, T, H, P) in v's dtype and the final state (angle, ssm in float32), that of each row's
    last document.
    """
    y, state, _ = chunk_forward(q, k, v, log_decay, dt, lam, omega, angle_dt, q_bias, k_bias, D, initial_state, chunk_size,
                                seq_idx)
    return y, state


def rows_fit(t: torch.Tensor) -> bool:
    """Whether a (B, T, H, P) x or dx can go to the chunk kernels as it is: each token's H * P values contiguous,
    token rows any multiple of ROW_ALIGN elements apart (e.g. a column slice of the in_proj output, read in place)."""
    B, T, H, P = t.shape
    return (t.stride(3) == 1 and (H == 1 or t.stride(2) == P) and (B == 1 or t.stride(0) % ROW_ALIGN == 0)
            and (T == 1 or t.stride(1) % ROW_ALIGN == 0))


def empty_rows(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (B, T, H, P) tensor that ``rows_fit``: contiguous, its rows padded when H * P is not a
    multiple of ROW_ALIGN."""
    B, T, H, P = shape
    width = -(-H * P // ROW_ALIGN) * ROW_ALIGN
    return torch.empty(B, T, width, dtype=dtype, device=device)[..., :H * P].unflatten(-1, (H, P))


def row_strides(t: torch.Tensor) -> tuple[int, int]:
    """A tensor that ``rows_fit``'s batch and token strides in units of ROW_ALIGN, as the chunk kernels take them (a
    size-1 dimension's stride is never used: 0)."""
    B, T = t.shape[:2]
    return (0 if B == 1 else t.stride(0) // ROW_ALIGN), (0 if T == 1 else t.stride(1) // ROW_ALIGN)


def heads_in_rows(v: torch.Tensor) -> torch.Tensor:
    """v as the chunk kernels read it (``rows_fit``); copied only when it does not fit."""
    if rows_fit(v):
        return v
    out = empty_rows(v.shape, v.dtype, v.device)
    out.copy_(v)
    return out


def scan_strides(q, v, y, dt, om, seq) -> tuple[int, ...]:
    """The chunk kernels' stride arguments. x (``v``, which ``rows_fit``) and y / dy have their own batch and token
    strides (x's in units of ROW_ALIGN) and share the head stride P."""
    return (q.stride(0), q.stride(1), q.stride(2), *row_strides(v), y.stride(0), y.stride(1), y.shape[3],
            dt.stride(0), dt.stride(1), dt.stride(2), om.stride(0), om.stride(1), seq.stride(0))


def in_gluon(kernel: str, v: torch.Tensor, flags: dict) -> bool:
    """Whether the forward's chunk-state (``state``) or chunk-output (``fwd``) kernel (``gluon_siso.py``) or the
    backward's query-side (``dq``), dx local-state (``dx``) or key-side (``dk``) kernel (``gluon_siso_bwd.py``) runs
    as its Gluon version (on an H100 at 8 x 4096 the Gluon dk takes 0.88 ms where the Triton one takes 1.13).
    ``HYBRID_SCAN_STATE`` / ``_FWD`` / ``_DQ`` / ``_DX`` / ``_DK``:
    ``auto`` takes it where it applies (an sm_90 GPU, plain sequences, bf16 activations, chunk 64;
    ``gluon_common.applies``) under the Triton release it was written and tested against (``GLUON_TRITON``: Gluon's
    API still moves between releases); ``gluon`` takes it wherever it applies; ``triton`` never. Defaults in
    ``GLUON_DEFAULT``. The module is imported only when asked for."""
    name = f"HYBRID_SCAN_{kernel.upper()}"
    mode = os.environ.get(name, GLUON_DEFAULT[kernel])
    if mode not in ("auto", "triton", "gluon"):
        raise ValueError(f"{name} must be auto, triton or gluon, got {mode!r}")
    if mode == "triton" or not v.is_cuda or flags["HAS_SEQ"]:
        return False
    if not triton.__version__.startswith(GLUON_TRITON):
        if mode == "auto":
            return False
        raise RuntimeError(f"{name}=gluon needs Triton {GLUON_TRITON}x (the Gluon kernels follow its API, which later "
                           f"releases changed); this is Triton {triton.__version__}. Use auto or triton.")
    from hybrid.kernels.mamba3 import gluon_common

    return gluon_common.applies(kernel, v, flags)


# The Triton release (major.minor) the Gluon kernels were written and tested against, and each kernel's default
# (each on where its GPU equality tests pass and it beats its Triton kernel; docs/perf-notes.md).
GLUON_TRITON = "3.6."
GLUON_DEFAULT = {"state": "triton", "fwd": "auto", "dq": "auto", "dx": "auto", "dk": "auto"}


def chunk_forward(q, k, v, log_decay, dt, lam, omega, angle_dt, q_bias, k_bias, D, initial_state, chunk_size, seq_idx=None,
                  need_state=True):
    """The forward launches; also returns what the backward needs (a dict of tensors and flags). Without
    ``need_state`` (training: no cache) the final state is not assembled and comes back as None."""
    Bsz, T, G, N = q.shape
    H, P = v.shape[2:]
    C = chunk_size
    nc = -(-T // C)
    S = 0 if omega is None else omega.shape[-1]
    dev = v.device
    k_nat = k
    # [even | odd] channel order: one cheap pass over the group-shared q and k makes every kernel load contiguous.
    q, k, v = _to_eo(q).contiguous(), _to_eo(k).contiguous(), heads_in_rows(v)
    log_decay, dt, lam = log_decay.contiguous(), dt.contiguous(), lam.contiguous()
    if seq_idx is not None:
        if seq_idx.shape != (Bsz, T) or seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex:
            raise ValueError(f"seq_idx must be an integer (B, T) = {(Bsz, T)} tensor, got {seq_idx.dtype} {tuple(seq_idx.shape)}")
        seq_idx = seq_idx.to(dev).contiguous()
    seq = seq_idx if seq_idx is not None else dt  # a pointer the kernels never read without HAS_SEQ
    if omega is not None:
        omega = omega if omega.stride(-1) == 1 else omega.contiguous()
        theta_off, theta_final = angle_offsets(omega, dt, angle_dt, None if initial_state is None else initial_state.angle,
                                               C, H, seq_idx)
    else:
        theta_off = torch.zeros(1, device=dev)
        theta_final = torch.zeros(Bsz, H, 0, device=dev)
    om = omega if omega is not None else torch.zeros(1, 1, 1, device=dev)
    qb = _to_eo(q_bias).contiguous() if q_bias is not None else q
    kb = _to_eo(k_bias).contiguous() if k_bias is not None else k

    local = torch.empty(Bsz, nc, H, P, N, device=dev, dtype=state_dtype(v.dtype))
    cs_last = torch.empty(Bsz, nc, H, device=dev, dtype=torch.float32)
    y = torch.empty(v.shape, device=dev, dtype=v.dtype)  # contiguous: dy arrives so (autograd, or .contiguous())
    strides = scan_strides(q, v, y, dt, om, seq)
    flags = kernel_flags(C, N, P, S, angle_dt, seq_idx is not None, nc)
    # the same kernels written for Hopper (gluon_siso.py; no SEQ)
    state_gluon, fwd_gluon = in_gluon("state", v, flags), in_gluon("fwd", v, flags)
    if state_gluon or fwd_gluon:
        from hybrid.kernels.mamba3 import gluon_siso
    if state_gluon:
        gluon_siso.chunk_state_fwd((nc, Bsz * H), k, v, log_decay, dt, lam, om, kb, theta_off, local, cs_last,
                                   T, H, S, nc, H // G, *strides[:-1], flags=flags, n_angles=S,
                                   HAS_KB=k_bias is not None)
    else:
        _chunk_state_fwd_tuned[(nc, Bsz * H)](k, v, log_decay, dt, lam, om, kb, theta_off, seq, local, cs_last,
                                              T, H, S, nc, H // G, *strides, HAS_KB=k_bias is not None, **flags)

    # G_{-1} = H_{-1} + beta'_0 x_{-1} k_{-1}^T: the previous token's trapezoid half not yet in the state.
    g0 = torch.zeros(Bsz, H, P, N, device=dev, dtype=torch.float32)
    if initial_state is not None:
        beta0 = (dt[:, 0] * (1 - lam[:, 0])).float()  # (B, H)
        prev = initial_state.v.float()[..., :, None] * initial_state.k[:, 0].float()[..., None, :]  # (B, H, P, N)
        g0 = _to_eo(initial_state.ssm.float() + beta0[..., None, None] * prev).contiguous()
    g_in, g_final = state_passing_fwd(local, cs_last, g0)  # g_in in the chunk states' storage type; adds in fp32

    if fwd_gluon:
        gluon_siso.chunk_scan_fwd((nc, Bsz * H), q, k, v, log_decay, dt, lam, om, qb, kb, D if D is not None else dt,
                                  theta_off, g_in, y, T, H, S, nc, H // G, *strides[:-1], flags=flags, n_angles=S,
                                  HAS_QB=q_bias is not None, HAS_KB=k_bias is not None, HAS_D=D is not None)
    else:
        _chunk_scan_fwd_tuned[(nc, Bsz * H)](q, k, v, log_decay, dt, lam, om, qb, kb, D if D is not None else dt,
                                             theta_off, seq, g_in, y, T, H, S, nc, H // G, *strides,
                                             HAS_QB=q_bias is not None, HAS_KB=k_bias is not None, HAS_D=D is not None,
                                             **flags)

    state = None
    if need_state:  # final cache: last token's biased key rotated with its own angle, and its raw value
        k_last = k_nat[:, -1].float().repeat_interleave(H // G, dim=1)  # (B, H, N)
        if k_bias is not None:
            k_last = k_last + k_bias.float()
        if S:
            k_last = rotate(k_last, theta_final.cos().float(), theta_final.sin().float(), "interleaved")
        state = Mamba3State(theta_final.float(), _from_eo(g_final), k_last.to(k_nat.dtype)[:, None],
                            v[:, -1].clone())  # not a view that would keep the in_proj output alive
    ctx = dict(q=q, k=k, v=v, log_decay=log_decay, dt=dt, lam=lam, om=om, qb=qb, kb=kb, D=D if D is not None else dt,
               theta_off=theta_off, theta_final=theta_final, g_in=g_in, cs_last=cs_last,
               seq=seq_idx, chunk_size=C, nc=nc, S=S, angle_dt=angle_dt, has_rot=omega is not None, has_qb=q_bias is not None,
               has_kb=k_bias is not None, has_d=D is not None, has_init=initial_state is not None,
               k_last=None if state is None else state.k,
               v0=None if initial_state is None else initial_state.v, k0=None if initial_state is None else initial_state.k)
    return y, state, ctx


@triton.jit
def _rotate_vec(PTR, BIAS, n, partner, h, cos, sin, sign, N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr):
    """(N,) vector plus the head's bias, pairs (2i, 2i+1) rotated: v_n cos - v_{n^1} sin (even n), + (odd n)."""
    v = tl.load(PTR + n).to(tl.float32)
    if HAS_ROT:
        w = tl.load(PTR + partner).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(BIAS + h * N + n).to(tl.float32)
        if HAS_ROT:
            w += tl.load(BIAS + h * N + partner).to(tl.float32)
    if HAS_ROT:
        v = v * cos + sign * w * sin
    return v


@triton.jit
def _step_kernel(Q, K, X, A, DT, LAM, OMEGA, QB, KB, D, ANGLE, SSM, KC, VC, Y,
                 H, S, heads_per_group, s_qb, s_qg, s_xb, s_xh, s_ab, s_ah, s_ob,
                 N: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, HAS_QB: tl.constexpr, HAS_KB: tl.constexpr,
                 HAS_D: tl.constexpr, HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr):
    """One token for one (sequence, head); the cache (angle, ssm, k, v) is updated in place.

    One program owns a (sequence, head) so that every cache entry is read before it is overwritten; the
    (P, N) state streams through in (BP, N) row blocks in natural channel order (coalesced).
    """
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    g = h // heads_per_group
    n = tl.arange(0, N)
    partner = n ^ 1
    a = tl.load(A + b * s_ab + h * s_ah).to(tl.float32)
    dt = tl.load(DT + b * s_ab + h * s_ah).to(tl.float32)
    lam = tl.load(LAM + b * s_ab + h * s_ah).to(tl.float32)
    cos = 1.0
    sin = 0.0
    sign = tl.where(n % 2 == 0, -1.0, 1.0)
    if HAS_ROT:
        pair = n // 2
        pmask = pair < S
        om = tl.load(OMEGA + b * s_ob + pair, mask=pmask, other=0.0).to(tl.float32)
        if ANGLE_DT:
            om = om * dt
        theta = tl.load(ANGLE + (b * H + h) * S + pair, mask=pmask, other=0.0) + om
        theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
        tl.store(ANGLE + (b * H + h) * S + pair, theta, mask=pmask & (n % 2 == 0))
        cos, sin = tl.cos(theta), tl.sin(theta)
    q = _rotate_vec(Q + b * s_qb + g * s_qg, QB, n, partner, h, cos, sin, sign, N, HAS_QB, HAS_ROT)
    k = _rotate_vec(K + b * s_qb + g * s_qg, KB, n, partner, h, cos, sin, sign, N, HAS_KB, HAS_ROT)
    k_prev = tl.load(KC + (b * H + h) * N + n).to(tl.float32)
    alpha = tl.exp(a)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(D + h).to(tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        x = tl.load(X + b * s_xb + h * s_xh + p).to(tl.float32)
        x_prev = tl.load(VC + (b * H + h) * P + p).to(tl.float32)
        ptr = SSM + ((b * H + h) * P + p[:, None]) * N + n[None, :]
        st = alpha * tl.load(ptr) + beta * x_prev[:, None] * k_prev[None, :] + gamma * x[:, None] * k[None, :]
        tl.store(ptr, st)
        y = tl.sum(st * q[None, :], axis=1) + d_skip * x
        tl.store(Y + (b * H + h) * P + p, y.to(Y.dtype.element_ty))
        tl.store(VC + (b * H + h) * P + p, x.to(VC.dtype.element_ty))
    tl.store(KC + (b * H + h) * N + n, k.to(KC.dtype.element_ty))


def mamba3_siso_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, dt: torch.Tensor,
                      lam: torch.Tensor, state: Mamba3State, omega: torch.Tensor | None = None, angle_dt: bool = True,
                      q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                      D: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused decode step, updating ``state`` in place (static shapes: CUDA-graph capturable).

    q, k (B, G, N); v (B, H, P); log_decay, dt, lam (B, H); omega (B, S) or None; state tensors contiguous
    with ssm and angle in float32. Returns y (B, H, P) (written into ``out`` when given).
    """
    Bsz, G, N = q.shape
    H, P = v.shape[1:]
    S = 0 if omega is None else omega.shape[-1]
    y = torch.empty_like(v) if out is None else out
    om = omega if omega is not None else q
    _step_kernel[(Bsz, H)](q, k, v, log_decay, dt, lam, om, q_bias if q_bias is not None else q,
                           k_bias if k_bias is not None else q, D if D is not None else dt,
                           state.angle, state.ssm, state.k, state.v, y, H, S, H // G,
                           q.stride(0), q.stride(1), v.stride(0), v.stride(1), dt.stride(0), dt.stride(1),
                           om.stride(0), N=N, P=P, BP=min(P, 16), HAS_QB=q_bias is not None, HAS_KB=k_bias is not None,
                           HAS_D=D is not None, HAS_ROT=omega is not None, ANGLE_DT=angle_dt)
    return y

