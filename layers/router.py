"""Token router: a Mamba-3 backbone on every token, attention only for the tokens a router picks.

    s = ssm(x)                                  every token (B, T, d)
    route_t = gate(s_t) > 0                     causal, per token (routing="threshold")
    y = s + w_t * attn(x)_t                     attention only at routed tokens; zero elsewhere

``routing="threshold"`` (SeqBoat / Taipan style): p = sigmoid(gate), a hard straight-through decision
w = 1[p > 1/2] (value) with the gradient of p, and a budget loss ``budget_weight * (mean w - capacity)^2``.
``routing="topk"`` (Mixture-of-Depths): in training the top ``capacity * T`` router logits of each row
are routed (not causal) and scaled by w = sigmoid(logit); an MLP predictor on the detached router
input learns top-k membership (BCE, ``aux_weight``). Evaluation and decoding threshold the predictor
(causal), or re-run top-k with ``eval_routing="topk"`` (parallel passes only) to expose the mismatch.

``attend="compact"``: routed tokens attend only to routed tokens (gather, causal attention on the
compacted sequence, scatter back: cost ~ (capacity * T)^2; the decode cache keeps routed tokens only).
``attend="query_only"``: routed queries attend to every key (optionally windowed; cost ~ capacity * T^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from hybrid.kernels.attention import attention_sdpa
from hybrid.kernels.sparse_attention import doc_starts, sparse_attention, window_plan
from hybrid.layers.attention import Attention
from hybrid.layers.base import Mixer, check_seq_idx
from hybrid.layers.mamba3 import Mamba3, Mamba3Cache
from hybrid.layers.routing import (
    ModPredictor,
    RouterGate,
    attn_config,
    budget_loss,
    check_capacity,
    gate_stats,
    predictor_loss,
    ssm_config,
    straight_through,
)
from hybrid.layers.sliding import KVCache

from hybrid.registry import ConfigError, Footprint, register_mixer


@dataclass
class TokenRouterConfig:
    ssm: dict | None = field(default_factory=dict)  # Mamba-3 settings of the backbone; null is an error
    attn: dict = field(default_factory=dict)  # attention settings: num_heads, num_kv_heads, window, position, ...
    capacity: float = 0.25  # target fraction of tokens routed to attention
    routing: Literal["threshold", "topk"] = "threshold"
    attend: Literal["compact", "query_only"] = "compact"
    eval_routing: Literal["threshold", "topk"] = "threshold"  # topk routing: how parallel eval passes route
    budget_weight: float = 1.0  # threshold routing: weight of (realised - capacity)^2
    aux_weight: float = 0.1  # topk routing: weight of the predictor's BCE
    predictor_hidden: int = 32

    def __post_init__(self):
        check_capacity(self.capacity, "token_router")
        self.ssm_cfg = ssm_config(self.ssm, "token_router")
        self.attn_cfg = attn_config(self.attn, "token_router")
        if self.attn_cfg.backend == "flex":
            raise ConfigError("token_router attention runs on gathered tokens (SDPA / flash); backend flex does not apply")
        if self.budget_weight < 0 or self.aux_weight < 0 or self.predictor_hidden < 1:
            raise ConfigError("token_router budget_weight and aux_weight must be >= 0 and predictor_hidden >= 1")
        if self.eval_routing == "topk" and self.routing != "topk":
            raise ConfigError("token_router eval_routing=topk needs routing=topk")


@dataclass
class TokenRouterCache:
    ssm: Mamba3Cache
    kv: KVCache | None  # query_only: every key (a ring when windowed)
    # compact: (B, Hkv, max_seqlen, D) routed keys only, packed per row ("kv": counted as KV cache, not state)
    k: torch.Tensor | None = field(metadata={"kv": True})
    v: torch.Tensor | None = field(metadata={"kv": True})
    k_pos: torch.Tensor | None = field(metadata={"kv": True})  # (B, max_seqlen) position of each packed key
    count: torch.Tensor | None  # (B,) routed keys held per row
    pos: int = 0
    routed: float = 0.0  # tokens routed so far (all rows)


@register_mixer("token_router", TokenRouterConfig, is_attention=True)
class TokenRouter(Mixer):
    """Mamba-3 on every token plus attention for router-picked tokens (threshold or MoD top-k)."""

    def __init__(self, d_model: int, cfg: TokenRouterConfig, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.validate(d_model, cfg)
        self.ssm = Mamba3(d_model, cfg.ssm_cfg, layer_idx)
        self.attn = Attention(d_model, cfg.attn_cfg, layer_idx)
        self.gate = RouterGate(d_model, cfg.capacity)
        self.predictor = ModPredictor(d_model, cfg.predictor_hidden, cfg.capacity) if cfg.routing == "topk" else None
        self.last_route: torch.Tensor | None = None  # (B, T) bool decisions of the last call (routing metrics)

    @classmethod
    def validate(cls, d_model: int, cfg: TokenRouterConfig) -> None:
        Mamba3.validate(d_model, cfg.ssm_cfg)
        Attention.validate(d_model, cfg.attn_cfg)

    @classmethod
    def footprint(cls, d_model: int, cfg: TokenRouterConfig, dtype_bytes: int = 2) -> Footprint:
        ssm = Mamba3.footprint(d_model, cfg.ssm_cfg, dtype_bytes)
        attn = Attention.footprint(d_model, cfg.attn_cfg, dtype_bytes)  # an upper bound: compact keeps routed tokens only
        return Footprint(ssm.state_bytes, attn.kv_bytes_per_token, attn.kv_max_tokens)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> TokenRouterCache:
        device = device or self.attn.o_proj.weight.device
        dtype = dtype or self.attn.o_proj.weight.dtype
        ssm = self.ssm.allocate_cache(batch_size, max_seqlen, device, dtype)
        a = self.attn
        if self.cfg.attend == "query_only":
            kv = KVCache.allocate(batch_size, a.n_kv, a.head_dim, max_seqlen, self.cfg.attn_cfg.window, device, dtype)
            return TokenRouterCache(ssm, kv, None, None, None, None)
        shape = (batch_size, a.n_kv, max_seqlen, a.head_dim)
        return TokenRouterCache(ssm, None, torch.zeros(shape, device=device, dtype=dtype),
                                torch.zeros(shape, device=device, dtype=dtype),
                                torch.zeros(batch_size, max_seqlen, dtype=torch.long, device=device),
                                torch.zeros(batch_size, dtype=torch.long, device=device))

    # ------------------------------------------------------------------ routing decisions
    def _route(self, s: torch.Tensor, seq_idx, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(hard (B, T) bool, weight (B, T)): which tokens attend, and the factor on their attention output."""
        cfg = self.cfg
        logits = self.gate(s)  # (B, T)
        p = torch.sigmoid(logits.to(torch.promote_types(logits.dtype, torch.float32)))
        if cfg.routing == "threshold":
            hard = logits > 0
            w = straight_through(hard, p)
            self.aux_loss = budget_loss(w, cfg.capacity, cfg.budget_weight) if cache is None else None
            self.stats.update(gate_stats(p, hard, cfg.capacity))
            return hard, w
        # Mixture-of-Depths: top-k of the router logits in training; the causal predictor elsewhere.
        pred = self.predictor(s)  # (B, T) logits
        parallel = cache is None
        topk = _row_topk(logits, cfg.capacity) if parallel else None
        use_topk = parallel and (self.training or cfg.eval_routing == "topk")
        hard = topk if use_topk else pred > 0
        self.aux_loss = cfg.aux_weight * predictor_loss(pred, topk) if parallel else None
        self.stats.update(gate_stats(torch.sigmoid(pred), hard, cfg.capacity))
        if parallel:
            with torch.no_grad():
                self.stats["frac_threshold"] = float((pred > 0).float().mean())
                self.stats["predictor_acc"] = float(((pred > 0) == topk).float().mean())
        return hard, hard.to(p.dtype) * p

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, cache: TokenRouterCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        B, T, _ = x.shape
        self.stats = {}
        s = self.ssm(x, cache=None if cache is None else cache.ssm, seq_idx=seq_idx)  # (B, T, d)
        hard, w = self._route(s, seq_idx, cache)
        self.last_route = hard.detach()
        offset = cache.pos if cache is not None else 0
        if self.cfg.attend == "compact":
            out = self._compact(x, hard, offset, seq_idx, cache)
        else:
            out = self._query_only(x, hard, offset, seq_idx, cache)
        if cache is not None:
            cache.pos = offset + T
            cache.routed += float(hard.sum())
            self.stats["cache_frac_routed"] = cache.routed / (cache.pos * B)
        return s + w.to(s.dtype)[..., None] * out

    def _gather_routed(self, x: torch.Tensor, hard: torch.Tensor):
        """Routed tokens first, in order: idx (B, N) positions, valid (B, N), xr (B, N, d)."""
        counts = hard.sum(1)
        N = int(counts.max()) if hard.numel() else 0
        idx = torch.argsort((~hard).to(torch.int8), dim=1, stable=True)[:, :N]
        valid = torch.arange(N, device=x.device)[None] < counts[:, None]
        return idx, valid, x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

    @staticmethod
    def _scatter(y: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor, T: int) -> torch.Tensor:
        out = y.new_zeros(y.shape[0], T, y.shape[-1])
        return out.scatter(1, idx[..., None].expand_as(y), y * valid[..., None].to(y.dtype))

    def _compact(self, x, hard, offset, seq_idx, cache) -> torch.Tensor:
        B, T, _ = x.shape
        idx, valid, xr = self._gather_routed(x, hard)
        N = idx.shape[1]
        if N == 0:
            self.stats.update(pair_density=0.0, kv_kept=0.0 if cache is None else float(cache.count.float().mean()))
            return torch.zeros_like(x)
        pos = idx + offset  # (B, N) original positions: RoPE keeps true distances
        q, k, v = self.attn.qkv(xr, pos)  # (B, H, N, D), (B, Hkv, N, D)
        window = self.cfg.attn_cfg.window
        if cache is None and seq_idx is None and window is None:
            # Padding sits after every routed token, so plain causal attention on the compacted
            # sequence is exact for the routed rows (and lets SDPA use its fused causal kernels).
            y = attention_sdpa(q, k, v, None, is_causal=True)
            allowed = (valid.sum(1).float() * (valid.sum(1).float() + 1) / 2).sum()
        else:
            if cache is not None:
                k, v, k_pos, k_valid = self._append_compact(cache, k, v, pos, valid)
                k_doc = q_doc = None
            else:
                k_pos, k_valid = pos, valid
                q_doc = k_doc = None if seq_idx is None else seq_idx.gather(1, idx)
            mask = (k_pos[:, None, :] <= pos[:, :, None]) & k_valid[:, None, :] & valid[:, :, None]  # (B, N, Nk)
            if window is not None:
                mask &= k_pos[:, None, :] > pos[:, :, None] - window
            if q_doc is not None:
                mask &= q_doc[:, :, None] == k_doc[:, None, :]
            y = _masked_attention(q, k, v, mask[:, None])
            allowed = mask.sum().float()
        self.stats["pair_density"] = float(allowed) / (B * T * (T + 1) / 2 if cache is None else B * T * (offset + (T + 1) / 2))
        self.stats["kv_kept"] = float(valid.sum(1).float().mean()) if cache is None else float(cache.count.float().mean())
        return self._scatter(self.attn.project_out(y), idx, valid, T)

    @staticmethod
    def _append_compact(cache, k, v, pos, valid):
        """Pack this call's routed keys after each row's held ones; return every held key with positions."""
        for b in range(k.shape[0]):  # rows route different numbers of tokens; decode batches are small
            n, m = int(cache.count[b]), int(valid[b].sum())
            cache.k[b, :, n:n + m] = k[b, :, :m]
            cache.v[b, :, n:n + m] = v[b, :, :m]
            cache.k_pos[b, n:n + m] = pos[b, :m]
            cache.count[b] = n + m
        Nk = int(cache.count.max())
        k_valid = torch.arange(Nk, device=k.device)[None] < cache.count[:, None]
        return cache.k[:, :, :Nk], cache.v[:, :, :Nk], cache.k_pos[:, :Nk], k_valid

    def _query_only(self, x, hard, offset, seq_idx, cache) -> torch.Tensor:
        B, T, _ = x.shape
        pos = torch.arange(offset, offset + T, device=x.device)
        q, k, v = self.attn.qkv(x, pos)
        if cache is not None:
            k, v, k_pos = cache.kv.extend(k, v)
            first_key = int(k_pos[0])
        else:
            first_key = 0
        idx, valid, _ = self._gather_routed(x, hard)
        N = idx.shape[1]
        kept = float(k.shape[2])
        if N == 0:
            self.stats.update(pair_density=0.0, kv_kept=kept)
            return torch.zeros_like(x)
        qr = q.gather(2, idx[:, None, :, None].expand(-1, q.shape[1], -1, q.shape[3]))  # (B, H, N, D)
        q_pos = idx + offset  # (B, N)
        docs = doc_starts(seq_idx, T, x.device).expand(B, T).gather(1, idx)
        # Keys are positions first_key .. : shift to key indices, plan, and close the padding rows.
        plan = window_plan(q_pos - first_key, k.shape[2], self.cfg.attn_cfg.window, docs).close(~valid)
        y = sparse_attention(qr, k, v, plan, backend="naive" if self.cfg.attn_cfg.backend == "naive" else "sdpa")
        allowed = ((plan.q_pos - plan.lo + 1).clamp(min=0) * valid).sum().float()
        self.stats["pair_density"] = float(allowed) / (B * T * (T + 1) / 2 if cache is None else B * T * (offset + (T + 1) / 2))
        self.stats["kv_kept"] = kept
        return self._scatter(self.attn.project_out(y), idx, valid, T)


def _row_topk(logits: torch.Tensor, capacity: float) -> torch.Tensor:
    """(B, T) bool: the top ceil(capacity * T) logits of each row (MoD's routing; sees the whole row)."""
    T = logits.shape[1]
    k = max(1, math.ceil(capacity * T))
    idx = logits.topk(k, dim=1).indices
    return torch.zeros_like(logits, dtype=torch.bool).scatter(1, idx, True)


def _masked_attention(q, k, v, mask) -> torch.Tensor:
    """SDPA under a boolean mask (B, 1, Nq, Nk); rows with no key output zeros (padding rows)."""
    empty = ~mask.any(-1, keepdim=True)
    mask = mask | (empty & (torch.arange(k.shape[2], device=q.device) == 0))
    return attention_sdpa(q, k, v, mask).masked_fill(empty, 0.0)
