"""Hymba-style fusion: Mamba-3 and attention heads read the same input in parallel, in one layer.

    y = beta_a * rmsnorm(attn(x)) * g_t  +  beta_s * rmsnorm(ssm(x))

``beta_a`` and ``beta_s`` are learned per-channel (d_model) weights; each branch is normalised first so
the betas alone set the mix (their norms are logged: where does this layer use attention?). With
``token_gate`` a per-token gate g_t = sigmoid(w . x_t + b) scales the attention branch (g = 1 without
it). Both branches run on every token (soft, dense fusion): the decode cache is the SSM state plus the
attention KV cache (a ring buffer when the attention is windowed, as in Hymba's local layers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hybrid.layers.attention import Attention
from hybrid.layers.base import Mixer, check_seq_idx
from hybrid.layers.mamba3 import Mamba3, Mamba3Cache
from hybrid.layers.routing import attn_config, rms, ssm_config
from hybrid.layers.sliding import KVCache
from torch import nn

from hybrid.registry import ConfigError, Footprint, register_mixer


@dataclass
class FusionConfig:
    ssm: dict | None = field(default_factory=dict)  # Mamba-3 settings of the SSM heads; null is an error
    attn: dict = field(default_factory=dict)  # attention settings: num_heads, window, ...
    token_gate: bool = False  # per-token sigmoid gate on the attention branch
    beta_init: float = 0.1  # both branches start equal and small (normalised outputs have unit RMS)

    def __post_init__(self):
        if self.beta_init <= 0:
            raise ConfigError(f"fusion beta_init must be > 0, got {self.beta_init}")
        self.ssm_cfg = ssm_config(self.ssm, "fusion")
        self.attn_cfg = attn_config(self.attn, "fusion")


@dataclass
class FusionCache:
    ssm: Mamba3Cache
    attn: KVCache


@register_mixer("fusion", FusionConfig, is_attention=True)
class Fusion(Mixer):
    """Parallel Mamba-3 and attention heads, normalised and mixed per channel (Hymba)."""

    def __init__(self, d_model: int, cfg: FusionConfig, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.validate(d_model, cfg)
        self.ssm = Mamba3(d_model, cfg.ssm_cfg, layer_idx)
        self.attn = Attention(d_model, cfg.attn_cfg, layer_idx)
        self.beta_attn = nn.Parameter(torch.empty(d_model))
        self.beta_ssm = nn.Parameter(torch.empty(d_model))
        self.beta_attn._no_weight_decay = self.beta_ssm._no_weight_decay = True
        self.gate = nn.Linear(d_model, 1) if cfg.token_gate else None
        self.last_route: torch.Tensor | None = None
        self.reset_parameters_special()

    @torch.no_grad()
    def reset_parameters_special(self) -> None:
        self.beta_attn.fill_(self.cfg.beta_init)
        self.beta_ssm.fill_(self.cfg.beta_init)
        if self.gate is not None:  # the gate starts half open, with a spread that lets it learn
            nn.init.normal_(self.gate.weight, std=self.d_model ** -0.5)
            nn.init.zeros_(self.gate.bias)

    @classmethod
    def validate(cls, d_model: int, cfg: FusionConfig) -> None:
        Mamba3.validate(d_model, cfg.ssm_cfg)
        Attention.validate(d_model, cfg.attn_cfg)

    @classmethod
    def footprint(cls, d_model: int, cfg: FusionConfig, dtype_bytes: int = 2) -> Footprint:
        ssm = Mamba3.footprint(d_model, cfg.ssm_cfg, dtype_bytes)
        attn = Attention.footprint(d_model, cfg.attn_cfg, dtype_bytes)
        return Footprint(ssm.state_bytes, attn.kv_bytes_per_token, attn.kv_max_tokens)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> FusionCache:
        return FusionCache(self.ssm.allocate_cache(batch_size, max_seqlen, device, dtype),
                           self.attn.allocate_cache(batch_size, max_seqlen, device, dtype))

    def forward(self, x: torch.Tensor, cache: FusionCache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        s = self.ssm(x, cache=None if cache is None else cache.ssm, seq_idx=seq_idx)  # (B, T, d)
        a = self.attn(x, cache=None if cache is None else cache.attn, seq_idx=seq_idx)  # (B, T, d)
        a = self.beta_attn * rms(a)
        with torch.no_grad():
            self.stats = {"beta_ratio": float(self.beta_attn.norm() / self.beta_ssm.norm().clamp_min(1e-12)),
                          **{f"attn_{k}": v for k, v in self.attn.stats.items()}}
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x).to(torch.promote_types(x.dtype, torch.float32))).to(a.dtype)  # (B, T, 1)
            a = a * g
            self.last_route = (g[..., 0] > 0.5).detach()
            with torch.no_grad():
                self.stats.update(gate_mean=float(g.mean()), gate_std=float(g.float().std()) if g.numel() > 1 else 0.0,
                                  gate_saturated=float(((g < 0.05) | (g > 0.95)).float().mean()))
        return a + self.beta_ssm * rms(s)
