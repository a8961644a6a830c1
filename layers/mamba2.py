"""Mamba-2 mixer: short causal conv, data-independent decay, exponential-Euler SSD, gated RMSNorm.

    z, xBC, u_dt = in_proj(u);   x, B, C = silu(conv1d(xBC))       (depthwise, causal, width d_conv)
    dt = softplus(u_dt + dt_bias),  A = -exp(A_log)                 (one A per head)
    H_t = exp(A dt_t) H_{t-1} + dt_t x_t B_t^T,   y_t = H_t C_t + D x_t
    out = out_proj(RMSNorm_groups(y * silu(z)) w)                 (gate before the norm)

The baseline Mamba-3 is compared against; numbers and inits follow docs/mamba3-spec.md §5. Kernels live
in ``hybrid.kernels.mamba2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from hybrid.kernels.mamba2 import causal_conv1d, ssd_chunk, ssd_step
from hybrid.layers.base import Mixer, check_seq_idx
from torch import nn

from hybrid.registry import ConfigError, Footprint, register_mixer


@dataclass
class Mamba2Config:
    d_state: int = 128  # N
    d_conv: int = 4  # width of the causal depthwise conv over x, B, C
    expand: float = 2.0  # d_inner = int(expand * d_model)
    headdim: int = 64  # P
    ngroups: int = 1  # G
    A_init_range: tuple[float, float] = (1.0, 16.0)  # -A drawn uniformly from this range
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    conv_bias: bool = True
    norm_eps: float = 1e-5
    chunk_size: int = 256  # power of two
    backend: Literal["auto", "torch"] = "auto"  # "auto" = fastest available; only the PyTorch path exists now

    def __post_init__(self):
        self.A_init_range = tuple(self.A_init_range)
        if self.backend not in ("auto", "torch"):
            raise ConfigError(f"mamba2 backend must be 'auto' or 'torch', got {self.backend!r}")
        if self.d_state < 1 or self.d_conv < 1 or self.headdim < 1 or self.ngroups < 1 or self.expand <= 0:
            raise ConfigError(f"mamba2 d_state, d_conv, headdim, ngroups and expand must be positive, got "
                              f"{self.d_state}, {self.d_conv}, {self.headdim}, {self.ngroups}, {self.expand}")
        if self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1):
            raise ConfigError(f"mamba2 chunk_size must be a power of two, got {self.chunk_size}")
        lo, hi = self.A_init_range if len(self.A_init_range) == 2 else (0, -1)
        if not 0 < lo <= hi:
            raise ConfigError(f"mamba2 A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}")
        if not 0 < self.dt_min <= self.dt_max or self.dt_init_floor < 0:
            raise ConfigError(f"mamba2 needs 0 < dt_min <= dt_max and dt_init_floor >= 0, got "
                              f"{self.dt_min}, {self.dt_max}, {self.dt_init_floor}")
        if self.norm_eps <= 0:
            raise ConfigError(f"mamba2 norm_eps must be > 0, got {self.norm_eps}")

    def d_inner(self, d_model: int) -> int:
        return int(self.expand * d_model)


@dataclass
class Mamba2Cache:
    conv: torch.Tensor  # (B, d_inner + 2GN, d_conv) last d_conv pre-conv xBC inputs (model dtype)
    ssm: torch.Tensor  # (B, H, P, N) state (model dtype, as published)


@register_mixer("mamba2", Mamba2Config)
class Mamba2(Mixer):
    """Mamba-2 SSM (SSD) with a short causal conv and gated RMSNorm."""

    graph_decode = True  # the step updates its cache tensors in place

    def __init__(self, d_model: int, cfg: Mamba2Config, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.validate(d_model, cfg)
        self.d_inner = d_in = cfg.d_inner(d_model)
        self.P, self.N, self.G = cfg.headdim, cfg.d_state, cfg.ngroups
        self.H = H = d_in // cfg.headdim
        self.conv_dim = d_in + 2 * self.G * self.N
        self.in_proj = nn.Linear(d_model, d_in + self.conv_dim + H, bias=False)  # z, xBC, dt
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.d_conv, groups=self.conv_dim, bias=cfg.conv_bias)
        self.out_proj = nn.Linear(d_in, d_model, bias=False)
        self.out_proj._is_residual_out = True
        self.dt_bias = nn.Parameter(torch.empty(H))
        self.A_log = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True
        self.norm_weight = nn.Parameter(torch.empty(d_in))
        self.reset_parameters_special()

    @classmethod
    def validate(cls, d_model: int, cfg: Mamba2Config) -> None:
        d_in = cfg.d_inner(d_model)
        if d_in < 1 or d_in % cfg.headdim:
            raise ConfigError(f"mamba2 headdim ({cfg.headdim}) must divide the inner width expand * d_model = "
                              f"{cfg.expand} * {d_model} = {d_in}")
        heads = d_in // cfg.headdim
        if heads % cfg.ngroups:
            raise ConfigError(f"mamba2 ngroups ({cfg.ngroups}) must divide the number of heads ({heads} = {d_in} / {cfg.headdim})")

    @classmethod
    def footprint(cls, d_model: int, cfg: Mamba2Config, dtype_bytes: int = 2) -> Footprint:
        d_in = cfg.d_inner(d_model)
        conv = (d_in + 2 * cfg.ngroups * cfg.d_state) * cfg.d_conv
        ssm = (d_in // cfg.headdim) * cfg.headdim * cfg.d_state
        return Footprint(state_bytes=dtype_bytes * (conv + ssm))

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> Mamba2Cache:
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        return Mamba2Cache(torch.zeros(batch_size, self.conv_dim, self.cfg.d_conv, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.H, self.P, self.N, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters_special(self) -> None:
        cfg = self.cfg
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt0 = torch.exp(torch.rand(self.H, device=self.dt_bias.device) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))  # softplus^{-1}(dt0)
        a_lo, a_hi = cfg.A_init_range
        self.A_log.copy_(torch.log(torch.empty(self.H, device=self.A_log.device).uniform_(a_lo, a_hi)))
        self.D.fill_(1.0)
        self.norm_weight.fill_(1.0)

    def forward(self, x: torch.Tensor, cache: Mamba2Cache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        cfg = self.cfg
        Bsz, T, _ = x.shape
        H, P, N, G = self.H, self.P, self.N, self.G
        cdt = torch.promote_types(x.dtype, torch.float32)
        z, xBC, u_dt = self.in_proj(x).split([self.d_inner, self.conv_dim, H], dim=-1)
        xBC, conv_state = causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias,
                                        None if cache is None else cache.conv, seq_idx)
        xs, Bm, Cm = F.silu(xBC).split([self.d_inner, G * N, G * N], dim=-1)
        xs, Bm, Cm = xs.view(Bsz, T, H, P), Bm.view(Bsz, T, G, N), Cm.view(Bsz, T, G, N)
        dt = F.softplus(u_dt.to(cdt) + self.dt_bias.to(cdt))  # (B, T, H)
        A = -self.A_log.to(cdt).exp()  # (H,)

        if cache is not None and T == 1:
            y, state = ssd_step(xs[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], cache.ssm, self.D)
            y = y.unsqueeze(1)
        else:
            y, state = ssd_chunk(xs, dt, A, Bm, Cm, self.D, None if cache is None else cache.ssm, seq_idx,
                                 cfg.chunk_size)  # (B, T, H, P)
        if cache is not None:
            cache.conv.copy_(conv_state)
            cache.ssm.copy_(state)

        y = y.reshape(Bsz, T, G, self.d_inner // G) * F.silu(z.to(cdt)).view(Bsz, T, G, self.d_inner // G)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)  # RMSNorm per group
        y = y.reshape(Bsz, T, self.d_inner) * self.norm_weight.to(cdt)
        return self.out_proj(y.to(x.dtype))
