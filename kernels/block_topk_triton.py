"""Block-sparse attention for block top-k selection (MoBA / NSA layout), forward and backward in Triton.

Query block g (rows g*BS .. g*BS + BS - 1) attends to the key blocks ``sel[b, hkv, g, :]`` (complete past
blocks, -1 = unused slot) in full and to its own block causally. That is the plan of ``block_topk`` with
``select="block"`` and no window or documents; ``attention_gathered`` (``sparse_attention.py``) computes the
same function densely and is the oracle in the tests.

* forward: one program per (query block, query head) walks its selected blocks then its own block with an
  online softmax, and stores the log-sum-exp for the backward;
* backward, dq: the same walk, recomputing probabilities from the log-sum-exp;
* backward, dk/dv: one program per (key block, KV head) walks the query blocks that selected it, read from
  an inverted index (CSR, built by a sort in PyTorch), for every query head of its GQA group, then its
  own block causally. Each output is written by exactly one program: deterministic, no atomics.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _fwd_kernel(Q, K, V, SEL, O, LSE, T, H, HKV, G, scale,
                KK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // (H // HKV)
    rows = g * BS + tl.arange(0, BS)
    d = tl.arange(0, D)
    q_base = Q + (b * H + h) * T * D
    kv_base = (b * HKV + hk) * T * D
    q = tl.load(q_base + rows[:, None] * D + d[None, :])  # (BS, D); T is padded to whole blocks
    m = tl.full((BS,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BS,), tl.float32)
    acc = tl.zeros((BS, D), tl.float32)
    sel_base = SEL + ((b * HKV + hk) * G + g) * KK
    for s in tl.static_range(KK + 1):
        if s < KK:
            blk = tl.load(sel_base + s).to(tl.int64)
        else:
            blk = g  # own block, causal
        if blk >= 0:
            cols = blk * BS + tl.arange(0, BS)
            k = tl.load(K + kv_base + cols[:, None] * D + d[None, :])  # (BS, D)
            v = tl.load(V + kv_base + cols[:, None] * D + d[None, :])
            qk = tl.dot(q, tl.trans(k)) * scale  # (BS, BS)
            if s == KK:
                qk = tl.where(cols[None, :] <= rows[:, None], qk, float("-inf"))
            m_new = tl.maximum(m, tl.max(qk, 1))
            p = tl.exp(qk - m_new[:, None])
            alpha = tl.exp(m - m_new)
            l_sum = l_sum * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
    out = acc / l_sum[:, None]
    tl.store(O + (b * H + h) * T * D + rows[:, None] * D + d[None, :], out.to(O.dtype.element_ty))
    tl.store(LSE + (b * H + h) * T + rows, m + tl.log(l_sum))


@triton.jit
def _bwd_dq_kernel(Q, K, V, SEL, DO, LSE, DELTA, DQ, T, H, HKV, G, scale,
                   KK: tl.constexpr, BS: tl.constexpr, D: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // (H // HKV)
    rows = g * BS + tl.arange(0, BS)
    d = tl.arange(0, D)
    q_off = (b * H + h) * T * D + rows[:, None] * D + d[None, :]
    kv_base = (b * HKV + hk) * T * D
    q = tl.load(Q + q_off)
    do = tl.load(DO + q_off)
    lse = tl.load(LSE + (b * H + h) * T + rows)
    delta = tl.load(DELTA + (b * H + h) * T + rows)
    dq = tl.zeros((BS, D), tl.float32)
    sel_base = SEL + ((b * HKV + hk) * G + g) * KK
    for s in tl.static_range(KK + 1):
        if s < KK:
            blk = tl.load(sel_base + s).to(tl.int64)
        else:
            blk = g
        if blk >= 0:
            cols = blk * BS + tl.arange(0, BS)
            k = tl.load(K + kv_base + cols[:, None] * D + d[None, :])
            v = tl.load(V + kv_base + cols[:, None] * D + d[None, :])
            qk = tl.dot(q, tl.trans(k)) * scale
            if s == KK:
                qk = tl.where(cols[None, :] <= rows[:, None], qk, float("-inf"))
            p = tl.exp(qk - lse[:, None])  # (BS, BS) probabilities
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + q_off, (dq * scale).to(DQ.dtype.element_ty))


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, QLIST, QSTART, DK, DV, T, H, HKV, NB, scale,
                     BS: tl.constexpr, D: tl.constexpr):
    j = tl.program_id(0).to(tl.int64)  # key block
    bhk = tl.program_id(1).to(tl.int64)
    b, hk = bhk // HKV, bhk % HKV
    GQ = H // HKV
    cols = j * BS + tl.arange(0, BS)
    d = tl.arange(0, D)
    kv_off = (b * HKV + hk) * T * D + cols[:, None] * D + d[None, :]
    k = tl.load(K + kv_off)  # (BS, D)
    v = tl.load(V + kv_off)
    dk = tl.zeros((BS, D), tl.float32)
    dv = tl.zeros((BS, D), tl.float32)
    lo = tl.load(QSTART + bhk * NB + j)
    hi = tl.load(QSTART + bhk * NB + j + 1)
    for i in range(lo, hi + 1):  # the query blocks that selected block j, then block j itself (causal)
        if i < hi:
            g = tl.load(QLIST + i).to(tl.int64)
        else:
            g = j
        rows = g * BS + tl.arange(0, BS)
        for hq in range(GQ):
            h = hk * GQ + hq
            q_off = (b * H + h) * T * D + rows[:, None] * D + d[None, :]
            q = tl.load(Q + q_off)
            do = tl.load(DO + q_off)
            lse = tl.load(LSE + (b * H + h) * T + rows)
            delta = tl.load(DELTA + (b * H + h) * T + rows)
            qk = tl.dot(q, tl.trans(k)) * scale  # (BS queries, BS keys)
            if i == hi:
                qk = tl.where(cols[None, :] <= rows[:, None], qk, float("-inf"))
            p = tl.exp(qk - lse[:, None])
            dv += tl.dot(tl.trans(p.to(do.dtype)), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    tl.store(DK + kv_off, (dk * scale).to(DK.dtype.element_ty))
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty))


def _inverted_index(sel: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sel (B, Hkv, G, KK) -> for every (b, hkv, key block): the query blocks that selected it, as CSR
    (flat list of query-block ids, int32; start offsets (B * Hkv * nb + 1,), int32)."""
    B, Hkv, G, KK = sel.shape
    bh = torch.arange(B * Hkv, device=sel.device).view(B, Hkv, 1, 1)
    g = torch.arange(G, device=sel.device).view(1, 1, G, 1).expand(B, Hkv, G, KK)
    valid = sel >= 0
    key = (bh * nb + sel.clamp(min=0))[valid]  # flat (b, hkv, key block) of every valid selection
    order = torch.argsort(key, stable=True)
    qlist = g[valid][order].to(torch.int32)
    counts = torch.bincount(key, minlength=B * Hkv * nb)
    start = torch.zeros(B * Hkv * nb + 1, dtype=torch.int32, device=sel.device)
    start[1:] = torch.cumsum(counts, 0)
    return qlist, start


class _BlockTopkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sel, block):
        B, H, T, D = q.shape
        Hkv, G, KK = k.shape[1], sel.shape[2], sel.shape[3]
        scale = 1.0 / math.sqrt(D)
        o = torch.empty_like(q)
        lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
        sel = sel.to(torch.int32).contiguous()
        _fwd_kernel[(G, B * H)](q, k, v, sel, o, lse, T, H, Hkv, G, scale, KK=KK, BS=block, D=D)
        ctx.save_for_backward(q, k, v, sel, o, lse)
        ctx.block = block
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, sel, o, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        Hkv, G, KK = k.shape[1], sel.shape[2], sel.shape[3]
        block, scale = ctx.block, 1.0 / math.sqrt(D)
        do = do.contiguous()
        delta = (o.float() * do.float()).sum(-1)  # (B, H, T): rowsum(dO * O), the softmax-gradient correction
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _bwd_dq_kernel[(G, B * H)](q, k, v, sel, do, lse, delta, dq, T, H, Hkv, G, scale, KK=KK, BS=block, D=D)
        qlist, start = _inverted_index(sel, G)
        _bwd_dkdv_kernel[(G, B * Hkv)](q, k, v, do, lse, delta, qlist, start, dk, dv, T, H, Hkv, G, scale,
                                       BS=block, D=D)
        return dq, dk, dv, None, None


def unsupported_reason(q: torch.Tensor, block: int) -> str | None:
    """Why the kernel cannot run these inputs (None when it can)."""
    D = q.shape[-1]
    if block < 16 or block & (block - 1):
        return f"block_size {block} is not a power of two >= 16"
    if D < 16 or D & (D - 1):
        return f"head_dim {D} is not a power of two >= 16"
    return None


def block_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor,
                         block: int) -> torch.Tensor:
    """q (B, H, T, D), k/v (B, Hkv, T, D), sel (B, Hkv, G, KK) selected past key blocks per query block of
    ``block`` rows (-1 = none; G = ceil(T / block)) -> (B, H, T, D)."""
    reason = unsupported_reason(q, block)
    if reason is not None:
        raise ValueError(f"block top-k Triton kernel: {reason}")
    T = q.shape[2]
    pad = sel.shape[2] * block - T
    if pad:  # padded keys sit after every real query of the last block, where the causal mask hides them
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _BlockTopkAttention.apply(q, k, v, sel, block)[:, :, :T]
