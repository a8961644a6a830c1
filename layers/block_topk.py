"""Block top-k sparse attention (MoBA / NSA selection): each query reads its own block plus the top-k past blocks.

Keys are grouped in blocks of ``block_size`` tokens (counted from each document's start). A query sees

    its own block causally  +  the ``topk`` complete past blocks with the highest q . mean(K_block)
    (+ the last ``window`` keys when a window is set)

Selection is scored per KV head (summed over its query heads, so a GQA group reads the same blocks).
``select="block"`` scores once per query block with the block's first query, so a whole query block
shares one selection (a block-sparse mask: FlexAttention skips unselected tiles); ``select="token"``
scores every query on its own (MoBA's rule; its FlexAttention mask is the union over a query tile).
Both are causal: only complete past blocks are candidates and a block's first query is known when the
block starts, so decoding reproduces the parallel pass. Selection is made once in PyTorch
(``hybrid.kernels.sparse_attention``) and every backend executes that plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from hybrid.kernels.sparse_attention import (
    SparsePlan,
    attention_gathered,
    block_means,
    doc_starts,
    key_blocks,
    pair_counts,
    select_blocks,
    sparse_attention,
)
from hybrid.layers.attention import Attention, AttentionConfig
from hybrid.layers.base import check_seq_idx, triton_runnable
from hybrid.layers.sliding import KVCache

from hybrid.registry import ConfigError, Footprint, register_mixer


@dataclass
class BlockTopkConfig(AttentionConfig):
    # backend: auto | flex | sdpa | naive as for attention, plus "gather" (MoBA's layout: each query block
    # attends densely to its gathered selected blocks) and "triton" (the block-sparse kernel of
    # kernels/block_topk_triton.py), both for training passes without documents with select=block and no
    # window. auto takes triton on CUDA where it applies, else Flex on CUDA, else SDPA.
    block_size: int = 64
    topk: int = 8  # past blocks read per query, besides its own block
    select: Literal["block", "token"] = "block"  # one selection per query block, or per query (MoBA)
    max_past_blocks: int | None = None  # only blocks this far back are candidates (None = all)
    flex_tile: int = 128  # FlexAttention BlockMask tile (GPU)

    def __post_init__(self):
        super().__post_init__()
        if self.block_size < 1:
            raise ConfigError(f"block_topk block_size must be >= 1, got {self.block_size}")
        if self.topk < 0:
            raise ConfigError(f"block_topk topk must be >= 0, got {self.topk}")
        if self.max_past_blocks is not None:
            if self.max_past_blocks < 1:
                raise ConfigError(f"block_topk max_past_blocks must be >= 1 (or null for all), got {self.max_past_blocks}")
            if self.topk > self.max_past_blocks:
                raise ConfigError(f"block_topk topk ({self.topk}) is larger than the number of past blocks allowed "
                                  f"(max_past_blocks={self.max_past_blocks}); lower topk or raise max_past_blocks")
        if self.backend in ("gather", "triton") and (self.select != "block" or self.window is not None):
            raise ConfigError(f"block_topk backend {self.backend} needs select=block and no window "
                              "(one selection per query block)")
        if self.backend == "flash":
            raise ConfigError("block_topk has no flash-attn path (flash-attn takes no block-sparse masks); "
                              "use backend auto, flex, sdpa or naive")
        if self.flex_tile < 16 or self.flex_tile % 16:
            raise ConfigError(f"block_topk flex_tile must be a multiple of 16, got {self.flex_tile}")


@dataclass
class BlockTopkCache:
    kv: KVCache  # every key stays selectable, so the cache is not windowed
    q_first: torch.Tensor  # (B, H, D) first query of the current block (scores the block's selection)

    @property
    def pos(self) -> int:
        return self.kv.pos


@register_mixer("block_topk", BlockTopkConfig, is_attention=True)
class BlockTopk(Attention):
    """Block top-k sparse attention: own block causally plus the top-k past blocks (MoBA / NSA style)."""

    graph_decode = False  # block selection at decode is host-side

    @classmethod
    def footprint(cls, d_model: int, cfg: BlockTopkConfig, dtype_bytes: int = 2) -> Footprint:
        D = cfg.resolved_head_dim(d_model)
        return Footprint(state_bytes=cfg.num_heads * D * dtype_bytes, kv_bytes_per_token=2 * cfg.kv_heads * D * dtype_bytes)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> BlockTopkCache:
        device = device or self.o_proj.weight.device
        dtype = dtype or self.o_proj.weight.dtype
        kv = KVCache.allocate(batch_size, self.n_kv, self.head_dim, max_seqlen, None, device=device, dtype=dtype)
        return BlockTopkCache(kv, torch.zeros(batch_size, self.n_heads, self.head_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, cache: BlockTopkCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        T = x.shape[1]
        offset = cache.pos if cache is not None else 0
        q_pos = torch.arange(offset, offset + T, device=x.device)
        q, k, v = self.qkv(x, q_pos)  # (B, H, T, D), (B, Hkv, T, D)
        if cache is not None:
            k, v, _ = cache.kv.extend(k, v)  # all keys 0 .. offset + T - 1
        plan = block_topk_plan(q, k, q_pos, self.cfg, seq_idx, cache)
        allowed, causal = pair_counts(plan)
        self.stats = {"pair_density": allowed / causal, "kv_kept": float(k.shape[2])}
        backend = self.cfg.backend
        if cache is not None and backend in ("flex", "gather", "triton"):
            backend = "sdpa"  # decode is one query row: nothing to tile
        if self._use_kernel(q, backend, cache, seq_idx):
            bs = self.cfg.block_size
            return self.project_out(block_topk_attention(q, k, v, plan.sel[:, :, ::bs], bs))
        if backend == "gather" and seq_idx is None:
            bs = self.cfg.block_size
            y = attention_gathered(q, k, v, plan.sel[:, :, ::bs], bs, bs)  # rows of a block share its selection
            return self.project_out(y)
        if backend == "gather":
            backend = "auto"  # packed documents: blocks are no longer aligned to the sequence
        return self.project_out(sparse_attention(q, k, v, plan, backend, tile=self.cfg.flex_tile))

    def _use_kernel(self, q: torch.Tensor, backend: str, cache, seq_idx) -> bool:
        """Whether this training pass runs the block-sparse Triton kernel (backend triton, or auto on CUDA)."""
        if backend not in ("auto", "triton") or cache is not None:
            return False
        cfg = self.cfg
        if seq_idx is not None or cfg.select != "block" or cfg.window is not None:
            reason = "packed documents (seq_idx) are not supported"  # select/window are checked in the config
        elif not triton_runnable(q, backend):
            reason = "needs triton and a CUDA device (or TRITON_INTERPRET=1)"
        else:
            from hybrid.kernels.block_topk_triton import unsupported_reason

            reason = unsupported_reason(q, cfg.block_size)
        if reason is not None and backend == "triton":
            raise RuntimeError(f"block_topk backend 'triton': {reason}; use backend 'auto'")
        return reason is None


def block_topk_attention(q, k, v, sel, block):
    """The Triton kernel (imported late: triton is optional)."""
    from hybrid.kernels.block_topk_triton import block_topk_attention as kernel

    return kernel(q, k, v, sel, block)


def block_topk_plan(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, cfg: BlockTopkConfig,
                    seq_idx: torch.Tensor | None, cache: BlockTopkCache | None = None,
                    chunk: int | None = None) -> SparsePlan:
    """The plan of block top-k attention for queries q (B, H, Tq, D) at ``q_pos`` over keys k (B, Hkv, Tk, D).

    ``chunk`` (a multiple of ``block_size``) sets the query group that shares the own-range start and,
    with ``select="block"``, the selection (chunk_gate uses chunks; block_topk uses its blocks).
    With a cache, ``cache.q_first`` supplies the first query of a group that started in an earlier call
    and is updated to the last group's first query.
    """
    B, H, Tq, _ = q.shape
    Tk, size = k.shape[2], cfg.block_size
    chunk = chunk or size
    docs = doc_starts(seq_idx, Tk, q.device)  # (B | 1, Tk); queries and keys coincide without a cache
    q_docs = docs[:, -Tq:].expand(B, Tq)
    blocks = key_blocks(Tk, size, docs)
    pos = q_pos[None].expand(B, Tq)
    own = q_docs + (pos - q_docs) // chunk * chunk  # (B, Tq) first position of the query's own group
    lo = own if cfg.window is None else torch.minimum(own, pos - cfg.window + 1)
    lo = torch.maximum(lo, q_docs)
    means = block_means(k, blocks)
    if cfg.select == "token":
        sel = select_blocks(q, means, blocks, own, q_docs, cfg.topk, cfg.max_past_blocks)
    else:
        sel = _select_per_group(q, means, blocks, pos, own, q_docs, cfg, cache)
    return SparsePlan(pos, lo, q_docs, Tk, sel, blocks)


def _select_per_group(q, means, blocks, pos, own, q_docs, cfg, cache) -> torch.Tensor:
    """Score each query group once, with its first query, and share the selection across the group."""
    B, H, Tq, D = q.shape
    first = pos == own  # (B, Tq) rows that open a group
    first[:, 0] = True  # the first row's group may have opened in an earlier call (decode)
    n_first = int(first.sum(1).max())
    rows = torch.argsort((~first).to(torch.int8), dim=1, stable=True)[:, :n_first]  # (B, n_first) group openers
    q_first = q.gather(2, rows[:, None, :, None].expand(B, H, n_first, D))
    if cache is not None and int(own[0, 0]) < int(pos[0, 0]):  # group opened before this call
        q_first[:, :, 0] = cache.q_first.to(q.dtype)
    sel = select_blocks(q_first, means, blocks, own.gather(1, rows), q_docs.gather(1, rows), cfg.topk, cfg.max_past_blocks)
    group = torch.cumsum(first.long(), dim=1) - 1  # (B, Tq) index of each row's opener among `rows`
    if cache is not None:
        cache.q_first.copy_(q_first.gather(2, group[:, -1][:, None, None, None].expand(B, H, 1, D))[:, :, 0])
    return sel.gather(2, group[:, None, :, None].expand(B, sel.shape[1], Tq, sel.shape[3]))
