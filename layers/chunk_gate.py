"""Chunk gate: a Mamba-3 backbone decides, chunk by chunk, whether the next chunk gets attention.

    s = ssm(x)                                             every token
    p_j = sigmoid(gate(s at the last token of chunk j-1))  known before chunk j starts (causal)
    open_j = p_j > 1/2                                      straight-through, budget loss to `capacity`
    y_t = s_t + w_j * attn(x)_t  for t in an open chunk j; y_t = s_t in a closed one

An open chunk's queries attend to their own chunk causally plus the ``topk`` past key blocks scored
MoBA-style (q . mean(K_block), ``block_size`` dividing ``chunk_size``), plus an optional window. Closed
chunks are empty rows of the plan: FlexAttention skips their tiles and the SDPA path never gathers
them, so a closed chunk saves real attention compute. The first chunk of a document reads a zero
gate input (only the gate bias). Decoding reuses a chunk's gate, computed once when the chunk starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from hybrid.kernels.sparse_attention import doc_starts, pair_counts, plan_is_square, sparse_attention
from hybrid.layers.base import Mixer, check_seq_idx
from hybrid.layers.block_topk import BlockTopk, BlockTopkCache, BlockTopkConfig, block_topk_plan
from hybrid.layers.mamba3 import Mamba3, Mamba3Cache
from hybrid.layers.routing import (
    RouterGate,
    attn_config,
    budget_loss,
    check_capacity,
    gate_stats,
    ssm_config,
    straight_through,
)

from hybrid.registry import ConfigError, Footprint, register_mixer


@dataclass
class ChunkGateConfig:
    ssm: dict | None = field(default_factory=dict)  # Mamba-3 settings of the backbone; null is an error
    attn: dict = field(default_factory=dict)  # attention settings: num_heads, num_kv_heads, window, backend, ...
    chunk_size: int = 64  # gate granularity: one decision per chunk
    block_size: int | None = None  # key-block size for top-k (must divide chunk_size); None = chunk_size
    topk: int = 4  # past key blocks per open chunk
    select: Literal["block", "token"] = "block"  # one selection per chunk (its first query), or per query
    max_past_blocks: int | None = None
    capacity: float = 0.5  # target fraction of open chunks
    budget_weight: float = 1.0

    def __post_init__(self):
        check_capacity(self.capacity, "chunk_gate")
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_gate chunk_size must be >= 1, got {self.chunk_size}")
        block = self.chunk_size if self.block_size is None else self.block_size
        if block < 1 or self.chunk_size % block:
            raise ConfigError(f"chunk_gate block_size ({block}) must divide chunk_size ({self.chunk_size}): "
                              f"a chunk's own keys must be whole blocks")
        if self.budget_weight < 0:
            raise ConfigError(f"chunk_gate budget_weight must be >= 0, got {self.budget_weight}")
        self.ssm_cfg = ssm_config(self.ssm, "chunk_gate")
        # The sparse pattern is ours; the attention block gets it through a block_topk config.
        self.attn_cfg = attn_config(self.attn, "chunk_gate", BlockTopkConfig, block_size=block, topk=self.topk,
                                    select=self.select, max_past_blocks=self.max_past_blocks)


@dataclass
class ChunkGateCache:
    ssm: Mamba3Cache
    attn: BlockTopkCache
    last_s: torch.Tensor  # (B, d) SSM output at the last consumed token (the next chunk's gate input)
    gate_p: torch.Tensor  # (B,) gate probability of the chunk holding the last consumed token
    opened: float = 0.0  # tokens in open chunks so far (all rows)

    @property
    def pos(self) -> int:
        return self.attn.pos


@register_mixer("chunk_gate", ChunkGateConfig, is_attention=True)
class ChunkGate(Mixer):
    """Mamba-3 plus block-sparse attention in the chunks a causal gate opens."""

    def __init__(self, d_model: int, cfg: ChunkGateConfig, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.validate(d_model, cfg)
        self.ssm = Mamba3(d_model, cfg.ssm_cfg, layer_idx)
        self.attn = BlockTopk(d_model, cfg.attn_cfg, layer_idx)
        self.gate = RouterGate(d_model, cfg.capacity)
        self.last_route: torch.Tensor | None = None  # (B, T) bool: token in an open chunk

    @classmethod
    def validate(cls, d_model: int, cfg: ChunkGateConfig) -> None:
        Mamba3.validate(d_model, cfg.ssm_cfg)
        BlockTopk.validate(d_model, cfg.attn_cfg)

    @classmethod
    def footprint(cls, d_model: int, cfg: ChunkGateConfig, dtype_bytes: int = 2) -> Footprint:
        ssm = Mamba3.footprint(d_model, cfg.ssm_cfg, dtype_bytes)
        attn = BlockTopk.footprint(d_model, cfg.attn_cfg, dtype_bytes)
        gate = d_model * dtype_bytes + 4
        return Footprint(ssm.state_bytes + attn.state_bytes + gate, attn.kv_bytes_per_token)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> ChunkGateCache:
        device = device or self.attn.o_proj.weight.device
        dtype = dtype or self.attn.o_proj.weight.dtype
        return ChunkGateCache(self.ssm.allocate_cache(batch_size, max_seqlen, device, dtype),
                              self.attn.allocate_cache(batch_size, max_seqlen, device, dtype),
                              torch.zeros(batch_size, self.d_model, device=device, dtype=dtype),
                              torch.zeros(batch_size, device=device, dtype=torch.promote_types(dtype, torch.float32)))

    def _gate(self, s: torch.Tensor, pos: torch.Tensor, docs: torch.Tensor, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token, the gate probability and decision of its chunk (B, T), from the SSM output before the chunk."""
        B, T, d = s.shape
        offset = int(pos[0, 0])
        C = self.cfg.chunk_size
        start = docs + (pos - docs) // C * C  # (B, T) first position of each token's chunk
        prev = s.new_zeros(B, 1, d) if cache is None else cache.last_s[:, None].to(s.dtype)
        s_ext = torch.cat([prev, s], dim=1)  # s_ext[:, j] = SSM output at position offset + j - 1
        src = (start - offset).clamp(min=0)  # the token just before the chunk, in s_ext
        g_in = s_ext.gather(1, src[..., None].expand(B, T, d))
        g_in = g_in.masked_fill((start == docs)[..., None], 0.0)  # a document's first chunk has no past
        logit = self.gate(g_in)
        p = torch.sigmoid(logit.to(torch.promote_types(logit.dtype, torch.float32)))  # (B, T)
        if cache is not None:  # chunks that opened in an earlier call keep their decision
            p = torch.where(start < offset, cache.gate_p[:, None], p)
        return p, p > 0.5

    def forward(self, x: torch.Tensor, cache: ChunkGateCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        B, T, _ = x.shape
        cfg = self.cfg
        s = self.ssm(x, cache=None if cache is None else cache.ssm, seq_idx=seq_idx)  # (B, T, d)
        offset = cache.pos if cache is not None else 0
        pos = torch.arange(offset, offset + T, device=x.device)
        docs = doc_starts(seq_idx, T, x.device).expand(B, T)
        p, hard = self._gate(s, pos[None].expand(B, T), docs, cache)
        w = straight_through(hard, p)
        self.last_route = hard.detach()
        self.aux_loss = budget_loss(w, cfg.capacity, cfg.budget_weight) if cache is None else None
        self.stats = gate_stats(p, hard, cfg.capacity)
        C = cfg.chunk_size
        chunk_first = (pos[None] - docs) % C == 0  # one decision per chunk: count it at the chunk's first token
        if bool(chunk_first.any()):
            self.stats["frac_chunks_open"] = float(hard[chunk_first].float().mean())

        q, k, v = self.attn.qkv(x, pos)
        if cache is not None:
            k, v, _ = cache.attn.kv.extend(k, v)
        plan = block_topk_plan(q, k, pos, cfg.attn_cfg, seq_idx, None if cache is None else cache.attn, chunk=C)
        plan = plan.close(~hard)
        allowed, causal = pair_counts(plan)
        self.stats.update(pair_density=allowed / causal, kv_kept=float(k.shape[2]))
        out = self._attend(q, k, v, plan, hard)
        if cache is not None:
            cache.last_s.copy_(s[:, -1])
            cache.gate_p.copy_(p[:, -1])
            cache.opened += float(hard.sum())
            self.stats["cache_frac_routed"] = cache.opened / ((offset + T) * B)
        return s + w.to(s.dtype)[..., None] * out

    def _attend(self, q, k, v, plan, hard) -> torch.Tensor:
        backend = self.cfg.attn_cfg.backend
        if backend == "flex" or (backend == "auto" and q.is_cuda and plan_is_square(plan)):
            # Closed chunks are empty rows: their tiles never run.
            return self.attn.project_out(sparse_attention(q, k, v, plan, "flex", tile=self.cfg.attn_cfg.flex_tile))
        B, H, T, D = q.shape
        counts = hard.sum(1)
        N = int(counts.max())
        if N == 0:
            return q.new_zeros(B, T, self.d_model)
        rows = torch.argsort((~hard).to(torch.int8), dim=1, stable=True)[:, :N]  # open queries first
        qr = q.gather(2, rows[:, None, :, None].expand(B, H, N, D))
        y = self.attn.project_out(sparse_attention(qr, k, v, plan.rows(rows), "naive" if backend == "naive" else "sdpa"))
        valid = torch.arange(N, device=q.device)[None] < counts[:, None]
        out = y.new_zeros(B, T, y.shape[-1])
        return out.scatter(1, rows[..., None].expand_as(y), y * valid[..., None].to(y.dtype))
