"""Pieces shared by the routed mixers (fusion, token_router, chunk_gate): nested configs, the gate, stats.

Every routed mixer sits on an SSM backbone (Mamba-3) that runs on every token; attention is added on
top where a gate opens. Gates are causal: a decision at position t reads only outputs at positions <= t.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from hybrid.layers.attention import AttentionConfig
from hybrid.layers.mamba3 import Mamba3Config
from torch import nn

from hybrid.registry import ConfigError, build_dataclass


def ssm_config(values: dict | None, owner: str) -> Mamba3Config:
    """The Mamba-3 backbone config of a routed mixer; a routed mixer without a backbone is an error."""
    if values is None:
        raise ConfigError(f"{owner} routes attention on top of an SSM backbone, but ssm is null: there is nothing to "
                          f"route from. Give ssm: {{}} for Mamba-3 defaults or a mapping of mamba3 settings")
    if not isinstance(values, dict):
        raise ConfigError(f"{owner}.ssm must be a mapping of mamba3 settings, got {values!r}")
    return build_dataclass(Mamba3Config, dict(values), f"{owner}.ssm (mamba3)")


def attn_config(values: dict | None, owner: str, cls: type = AttentionConfig, **extra: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{owner}.attn must be a mapping of attention settings, got {values!r}")
    clash = sorted(set(values) & set(extra))
    if clash:
        raise ConfigError(f"{owner}.attn: set {', '.join(clash)} on {owner} itself, not inside attn")
    return build_dataclass(cls, {**values, **extra}, f"{owner}.attn")


def check_capacity(capacity: float, owner: str) -> None:
    if not 0 < capacity <= 1:
        raise ConfigError(f"{owner} capacity must be in (0, 1] (the target fraction routed to attention), got {capacity}")


def rms(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Weightless RMSNorm in at least float32, returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class RouterGate(nn.Module):
    """Scalar gate logit per token, z = w . rmsnorm(h) + b, opened where z > 0 (p = sigmoid(z) > 1/2).

    Init: w ~ N(0, 1/d) makes z ~ N(b, 1) over tokens, and b = Phi^-1(capacity) then opens about a
    ``capacity`` fraction of tokens from the first step (a zero-init gate would open all or none).
    """

    def __init__(self, d_model: int, capacity: float):
        super().__init__()
        self.capacity = capacity
        self.proj = nn.Linear(d_model, 1)
        self.reset_parameters_special()

    @torch.no_grad()
    def reset_parameters_special(self) -> None:
        nn.init.normal_(self.proj.weight, std=self.proj.in_features ** -0.5)
        c = min(max(self.capacity, 1e-3), 1 - 1e-3)
        self.proj.bias.fill_(math.sqrt(2) * torch.erfinv(torch.tensor(2 * c - 1)).item())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(rms(h)).squeeze(-1)  # (B, T)


def straight_through(hard: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Value of the hard 0/1 decision, gradient of the probability."""
    return hard.to(p.dtype) + (p - p.detach())  # exactly 0/1 in value


def budget_loss(weight: torch.Tensor, capacity: float, scale: float) -> torch.Tensor:
    """scale * (realised fraction - capacity)^2, with the realised fraction differentiable through ``weight``."""
    return scale * (weight.float().mean() - capacity) ** 2


@torch.no_grad()
def gate_stats(p: torch.Tensor, hard: torch.Tensor, capacity: float) -> dict[str, float]:
    p = p.float()
    ent = -(p * p.clamp_min(1e-6).log() + (1 - p) * (1 - p).clamp_min(1e-6).log())
    return {
        "frac_routed": float(hard.float().mean()),
        "capacity": float(capacity),
        "gate_mean": float(p.mean()),
        "gate_std": float(p.std()) if p.numel() > 1 else 0.0,
        "gate_saturated": float(((p < 0.05) | (p > 0.95)).float().mean()),
        "gate_entropy": float(ent.mean()),
    }


class ModPredictor(nn.Module):
    """MoD's causal predictor: a small MLP on the (detached, normalised) router input, trained to predict
    top-k membership; its logit > 0 routes a token where top-k cannot be used (decode)."""

    def __init__(self, d_model: int, hidden: int, capacity: float):
        super().__init__()
        self.capacity = capacity
        self.net = nn.Sequential(nn.Linear(d_model, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.reset_parameters_special()

    @torch.no_grad()
    def reset_parameters_special(self) -> None:
        # Unit-scale logits around the prior's logit, so thresholding routes a mixed set from the start.
        nn.init.normal_(self.net[0].weight, std=self.net[0].in_features ** -0.5)
        nn.init.normal_(self.net[2].weight, std=2 * self.net[2].in_features ** -0.5)
        nn.init.zeros_(self.net[0].bias)
        c = min(max(self.capacity, 1e-3), 1 - 1e-3)
        self.net[2].bias.fill_(math.log(c / (1 - c)))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(rms(h.detach())).squeeze(-1)  # (B, T)


def predictor_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())
