"""Single-query attention for decoding, split over the keys ("flash decoding"), in Triton.

One new query per sequence reads a whole KV cache. Two matmuls and a softmax (``attention.attention_decode_torch``,
the oracle in the tests) parallelise over batch x heads only: at batch 1 with four heads that is four rows of
work for a whole GPU, and cuBLAS's single-row products and the softmax over 100k scores run far below the card's
bandwidth. Here the keys are cut into ``splits`` ranges, enough for every SM to stream its share:

* ``_split_kernel``: one program per (sequence, query head, key range) walks its range in blocks with an online
  softmax and writes the range's running max, sum of exponentials and unnormalised output (fp32);
* ``_combine_kernel``: one program per (sequence, query head) rescales the ranges to a common max and divides.

Scores, softmax and the weighted sum stay in fp32 (the eager path rounds the scores to the activation type
first). Keys a query may not see are given by ``valid``: (S,) for every sequence or (B, S). A query that sees
no key gets zeros, as the naive oracle gives. Each output is written by one program: no atomics, deterministic.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK_S = 32  # keys per step of a program's walk (fewer for heads wider than 256, see block_keys)
# One-warp programs, about eight per SM: a warp reduces its scores and sums its values without waiting on
# other warps. Best of a sweep (scripts/bench_decode_attention.py, H200, 4 heads of 192): 1 x 102400 in 128 us
# (eager matmuls 240 us), 16 x 102400 in 1345 us (eager 1436 us: with 64 rows cuBLAS streams well too).
TARGET_PROGRAMS = 1024
NUM_WARPS, NUM_STAGES = 1, 2


@triton.jit
def _split_kernel(Q, K, V, VALID, KEY_END, M_OUT, L_OUT, ACC, S, H, G, keys_per_split, window,
                  s_qb, s_qh, s_kb, s_kh, s_ks, s_vb, s_vh, s_vs, s_valid_b, n_splits,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, HAS_VALID: tl.constexpr,
                  HAS_END: tl.constexpr, SCALE: tl.constexpr):
    bh, split = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // G  # the query heads of a group share one KV head
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + b * s_qb + h * s_qh + d, mask=dmask, other=0.0).to(tl.float32) * SCALE  # (BLOCK_D,)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    start = split * keys_per_split
    stop = tl.minimum(start + keys_per_split, S)
    if HAS_END:  # a static cache: no key at or past KEY_END (nor before KEY_END - window) is valid; skip reading them
        end = tl.load(KEY_END).to(tl.int64)
        stop = tl.minimum(stop, end)
        if window > 0:
            start = tl.maximum(start, end - window)
    offs = tl.arange(0, BLOCK_S)
    k_ptrs = k_base + (start + offs)[:, None] * s_ks + d[None, :]  # advanced by a block each step: no 64-bit
    v_ptrs = v_base + (start + offs)[:, None] * s_vs + d[None, :]  # address math per element in the loop
    m = tl.full((), float("-inf"), tl.float32)
    l_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(start, stop, BLOCK_S):
        s = s0 + offs
        inside = s < stop
        tile_mask = inside[:, None] & dmask[None, :]
        k = tl.load(k_ptrs, mask=tile_mask, other=0.0)  # (BLOCK_S, BLOCK_D); both loads in flight together
        v = tl.load(v_ptrs, mask=tile_mask, other=0.0)
        seen = inside
        if HAS_VALID:  # applied to the scores, so the key loads do not wait on it
            seen &= tl.load(VALID + b * s_valid_b + s, mask=inside, other=0) != 0
        scores = tl.where(seen, tl.sum(k.to(tl.float32) * q[None, :], axis=1), float("-inf"))  # (BLOCK_S,)
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: keep exp() away from inf - inf
        p = tl.exp(scores - m_ref)  # (BLOCK_S,), 0 where not seen
        alpha = tl.exp(m - m_ref)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        m = m_new
        k_ptrs += BLOCK_S * s_ks
        v_ptrs += BLOCK_S * s_vs
    row = bh * n_splits + split
    tl.store(M_OUT + row, m)
    tl.store(L_OUT + row, l_sum)
    tl.store(ACC + row * BLOCK_D + d, acc)


@triton.jit
def _combine_kernel(M_IN, L_IN, ACC, O, H, n_splits, s_ob, s_oh,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    d = tl.arange(0, BLOCK_D)
    m = tl.full((), float("-inf"), tl.float32)
    l_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for s0 in range(0, n_splits, BLOCK_SPLITS):  # ranges in a fixed order: the result does not depend on timing
        sp = s0 + tl.arange(0, BLOCK_SPLITS)
        smask = sp < n_splits
        rows = bh * n_splits + sp
        m_blk = tl.load(M_IN + rows, mask=smask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(m_blk, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(m_blk - m_ref)  # (BLOCK_SPLITS,), 0 for ranges that saw no key
        alpha = tl.exp(m - m_ref)
        l_sum = l_sum * alpha + tl.sum(w * tl.load(L_IN + rows, mask=smask, other=0.0), axis=0)
        part = tl.load(ACC + rows[:, None] * BLOCK_D + d[None, :], mask=smask[:, None], other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * part, axis=0)
        m = m_new
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)  # no visible key: zeros
    tl.store(O + b * s_ob + h * s_oh + d, out.to(O.dtype.element_ty), mask=d < D)


def block_keys(block_d: int) -> int:
    """Keys per step: BLOCK_S up to heads of 256 (a (32, 256) tile already spills a little at one warp, and was
    still the fastest measured at head size 192), fewer beyond so a step's tile stays at 8192 elements."""
    return max(8, min(BLOCK_S, 8192 // block_d))


def num_splits(batch_heads: int, keys: int, block_s: int = BLOCK_S) -> int:
    """Key ranges per (sequence, head): about TARGET_PROGRAMS programs in all, at least one block of keys each.
    A function of the shapes only, so a captured decode step replays with the same launch."""
    return max(1, min(triton.cdiv(keys, block_s), triton.cdiv(TARGET_PROGRAMS, batch_heads)))


def attention_decode_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                            key_end: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """q (B, H, 1, D), k / v (B, Hkv, S, D) (any strides with a unit last one), ``valid`` (S,) or (B, S) boolean
    keys the query may see (None: all) -> (B, H, 1, D) in q's dtype.

    ``key_end`` (a one-element integer tensor on the device, read by the kernel) promises that no slot at or past
    it, nor before ``key_end - window``, is valid: those slots are not read. A static cache allocated for a
    whole generation then costs what it holds so far, with shapes (and a captured graph) that never change."""
    B, H, Tq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if Tq != 1:
        raise ValueError(f"attention_decode_triton takes one query per sequence, got {Tq}")
    if H % Hkv:
        raise ValueError(f"{H} query heads cannot share {Hkv} KV heads")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k and v need a contiguous last (head) dimension")
    BLOCK_D = triton.next_power_of_2(D)
    block_s = block_keys(BLOCK_D)
    splits = num_splits(B * H, S, block_s)
    keys_per_split = triton.cdiv(triton.cdiv(S, splits), block_s) * block_s
    splits = triton.cdiv(S, keys_per_split)  # no empty ranges
    dev = q.device
    m = torch.empty(B * H * splits, device=dev, dtype=torch.float32)
    l_sum = torch.empty_like(m)
    acc = torch.empty(B * H * splits, BLOCK_D, device=dev, dtype=torch.float32)
    out = torch.empty(B, H, 1, D, device=dev, dtype=q.dtype)
    if valid is not None:
        if valid.shape[-1] != S or valid.ndim not in (1, 2):
            raise ValueError(f"valid must be (S,) or (B, S) with S = {S}, got {tuple(valid.shape)}")
        valid_u8 = valid.to(torch.uint8).contiguous()  # the kernel steps through keys with unit stride
        s_valid_b = valid_u8.stride(0) if valid.ndim == 2 else 0
    else:
        valid_u8, s_valid_b = m, 0  # never read
    _split_kernel[(B * H, splits)](
        q, k, v, valid_u8, key_end if key_end is not None else m, m, l_sum, acc, S, H, H // Hkv, keys_per_split,
        window or 0,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        s_valid_b, splits, D=D, BLOCK_D=BLOCK_D, BLOCK_S=block_s, HAS_VALID=valid is not None,
        HAS_END=key_end is not None, SCALE=1.0 / math.sqrt(D), num_warps=NUM_WARPS,
        num_stages=NUM_STAGES)
    _combine_kernel[(B * H,)](m, l_sum, acc, out, H, splits, out.stride(0), out.stride(1), D=D, BLOCK_D=BLOCK_D,
                              BLOCK_SPLITS=32, num_warps=4)
    return out
