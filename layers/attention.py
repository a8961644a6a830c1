"""Causal softmax attention: grouped-query heads, RoPE or no positions, optional sliding window.

Backends (``backend``): ``auto`` picks flash-attn on CUDA when it is importable and applicable,
then FlexAttention on CUDA for windowed or document-masked training passes, else PyTorch SDPA;
``naive`` is the explicit-softmax oracle. All compute the same function. With a window, the decode
cache is a ring buffer of ``window`` slots (``hybrid.layers.sliding``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from hybrid.kernels.attention import (
    allowed_mask,
    attention_decode,
    attention_flash,
    attention_naive,
    attention_sdpa,
    flash_available,
)
from hybrid.kernels.sparse_attention import doc_starts, flex_available, sparse_attention, window_plan
from hybrid.layers.base import Mixer, check_seq_idx, compiled
from hybrid.layers.sliding import KVCache
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from hybrid.registry import ConfigError, Footprint, register_mixer


@dataclass
class AttentionConfig:
    num_heads: int = 4
    num_kv_heads: int | None = None  # None = num_heads (multi-head); 1 = multi-query
    head_dim: int | None = None  # None = d_model // num_heads
    window: int | None = None  # sliding window: each query sees itself and the window - 1 previous tokens
    position: Literal["rope", "none"] = "rope"
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    backend: Literal["auto", "sdpa", "flash", "flex", "naive", "gather", "triton"] = "auto"  # gather, triton: block_topk only
    fused_elementwise: bool = True  # RoPE as one compiled kernel on CUDA for T > 1 (eager: ~10 fp32 passes each way)

    def __post_init__(self):
        if self.num_heads < 1:
            raise ConfigError(f"attention num_heads must be >= 1, got {self.num_heads}")
        kv = self.kv_heads
        if kv < 1 or self.num_heads % kv:
            raise ConfigError(f"attention num_kv_heads ({kv}) must divide num_heads ({self.num_heads})")
        if self.window is not None and self.window < 1:
            raise ConfigError(f"attention window must be >= 1 (or null for full attention), got {self.window}")
        if self.backend in ("gather", "triton") and type(self) is AttentionConfig:
            raise ConfigError(f"attention backend '{self.backend}' is for block_topk; use auto, sdpa, flash, flex or naive")
        if self.head_dim is not None and (self.head_dim < 2 or self.head_dim % 2):
            raise ConfigError(f"attention head_dim must be even and >= 2, got {self.head_dim}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    def resolved_head_dim(self, d_model: int) -> int:
        return self.head_dim if self.head_dim is not None else d_model // self.num_heads


def rope_rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Turn the half-split channel pairs (i, i + D/2) of t (..., D) by the angles whose cos / sin (..., D/2)
    broadcast against it; float32 arithmetic, t's dtype out."""
    t1, t2 = t.float().chunk(2, dim=-1)
    return torch.cat([t1 * cos - t2 * sin, t1 * sin + t2 * cos], dim=-1).to(t.dtype)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_rotate(q, cos, sin), rope_rotate(k, cos, sin)


AttentionCache = KVCache  # (B, Hkv, slots, D) keys already rotated; a ring of `window` slots when windowed


@register_mixer("attention", AttentionConfig, is_attention=True)
class Attention(Mixer):
    """Causal multi-head attention with GQA, RoPE and an optional sliding window."""

    graph_decode = True  # via the cache's static mode (device-side position)
    float32_buffers = ("inv_freq",)

    def __init__(self, d_model: int, cfg: AttentionConfig, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.validate(d_model, cfg)
        self.n_heads, self.n_kv = cfg.num_heads, cfg.kv_heads
        self.head_dim = cfg.resolved_head_dim(d_model)
        self.q_proj = nn.Linear(d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.kv_proj = nn.Linear(d_model, 2 * self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d_model, bias=False)
        self.o_proj._is_residual_out = True
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @classmethod
    def validate(cls, d_model: int, cfg: AttentionConfig) -> None:
        if cfg.head_dim is None and d_model % cfg.num_heads:
            raise ConfigError(f"d_model ({d_model}) is not divisible by attention num_heads ({cfg.num_heads}); "
                              f"choose num_heads from the divisors of {d_model} or set head_dim")
        if cfg.resolved_head_dim(d_model) % 2:
            raise ConfigError(f"attention head_dim ({cfg.resolved_head_dim(d_model)}) must be even for RoPE")

    @classmethod
    def footprint(cls, d_model: int, cfg: AttentionConfig, dtype_bytes: int = 2) -> Footprint:
        per_token = 2 * cfg.kv_heads * cfg.resolved_head_dim(d_model) * dtype_bytes  # K and V
        return Footprint(kv_bytes_per_token=per_token, kv_max_tokens=cfg.window)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> AttentionCache:
        return KVCache.allocate(batch_size, self.n_kv, self.head_dim, max_seqlen, self.cfg.window,
                                device=device or self.o_proj.weight.device, dtype=dtype or self.o_proj.weight.dtype)

    def _rope(self, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, T, D) and k (B, Hkv, T, D) rotated to positions ``pos`` (T,) or (B, T)."""
        angles = pos.float()[..., None] * self.inv_freq  # (T, D/2) or (B, T, D/2)
        if angles.ndim == 3:  # per-row positions (gathered tokens of a router)
            angles = angles[:, None]
        cos, sin = angles.cos(), angles.sin()
        # Training and prefill: one compiled kernel each way instead of ~10 float32 passes over q and k. Decode
        # steps stay eager (CUDA-graph capture; (B, H, 1, D) is tiny).
        fused = self.cfg.fused_elementwise and q.is_cuda and q.shape[2] > 1
        return (compiled(rope_qk) if fused else rope_qk)(q, k, cos, sin)

    def qkv(self, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d_model) at positions ``pos`` (T,) or (B, T) -> q (B, H, T, D), k and v (B, Hkv, T, D), q/k rotated."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.cfg.position == "rope":
            q, k = self._rope(q, k, pos)
        return q, k, v

    def project_out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) head outputs -> (B, T, d_model)."""
        B, _, T, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def forward(self, x: torch.Tensor, cache: AttentionCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        if cache is not None and cache.device_pos is not None:
            return self._static_step(x, cache)
        B, T, _ = x.shape
        window = self.cfg.window
        offset = cache.pos if cache is not None else 0
        q_pos = torch.arange(offset, offset + T, device=x.device)
        q, k, v = self.qkv(x, q_pos)

        if cache is not None:
            k, v, k_pos = cache.extend(k, v)  # only keys inside the first query's window come back
            if window is not None:
                self.stats = {"kv_kept": float(cache.kept)}
        else:
            k_pos = q_pos
            if window is not None:  # fraction of causal (query, key) pairs inside the window
                m = min(T, window)
                allowed = m * (m + 1) / 2 + (T - m) * window
                self.stats = {"pair_density": allowed / (T * (T + 1) / 2)}

        y = self._attend(q, k, v, q_pos, k_pos, seq_idx)  # (B, H, T, D)
        return self.project_out(y)

    def _static_step(self, x: torch.Tensor, cache: AttentionCache) -> torch.Tensor:
        """One decode token whose position lives on the device (CUDA-graph capture): (B, 1, d_model)."""
        if x.shape[1] != 1:
            raise ValueError(f"a static (graph) decode step takes one token per sequence, got {x.shape[1]}")
        q, k, v = self.qkv(x, cache.device_pos)
        keys, values, valid = cache.extend_static(k, v)  # the whole buffer and which slots the query sees
        return self.project_out(attention_decode(q, keys, values, valid, *cache.static_key_bound()))

    def _attend(self, q, k, v, q_pos, k_pos, seq_idx):
        window, backend = self.cfg.window, self.cfg.backend
        if backend == "flash" and not flash_available(q):
            raise RuntimeError("attention backend 'flash' needs flash-attn, a CUDA device and fp16/bf16 activations")
        if backend in ("auto", "flash") and seq_idx is None and flash_available(q):
            return attention_flash(q, k, v, window)
        square = q.shape[2] == k.shape[2]
        if backend == "flex" or (backend == "auto" and square and flex_available(q) and (window or seq_idx is not None)):
            # Band / document block masks skip the tiles outside the window (GPU; CPU runs forward only).
            docs = doc_starts(seq_idx, q.shape[2], q.device)
            return sparse_attention(q, k, v, window_plan(q_pos[None], k.shape[2], window, docs), backend="flex")
        # Plain causal self-attention lets SDPA choose its fused causal kernel: no (T, T) mask is built.
        plain_causal = seq_idx is None and window is None and q.shape[2] == k.shape[2]
        single_query_full = q.shape[2] == 1 and (window is None or k.shape[2] <= window) and seq_idx is None
        # A prompt prefilled in pieces: the queries are the last Tq of Tk keys (bottom-right causal), which
        # SDPA's fused kernels take as a CausalBias, again without a (Tq, Tk) mask.
        chunk_causal = seq_idx is None and window is None and 1 < q.shape[2] < k.shape[2]
        if backend != "naive":
            if plain_causal:
                return attention_sdpa(q, k, v, None, is_causal=True)
            if single_query_full:
                return attention_decode(q, k, v, None)
            if chunk_causal:
                return attention_sdpa(q, k, v, causal_lower_right(q.shape[2], k.shape[2]))
        mask = allowed_mask(q_pos, k_pos, window, seq_idx, seq_idx)
        if backend == "naive":
            return attention_naive(q, k, v, mask)
        return attention_sdpa(q, k, v, mask)
