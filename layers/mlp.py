"""Feed-forward blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hybrid.layers.base import compiled
from torch import nn

from hybrid.registry import ConfigError, register_ffn


@dataclass
class SwiGLUConfig:
    mult: float = 4.0  # hidden = round(2/3 * mult * d_model) to a multiple of `multiple_of` (LLaMA sizing)
    multiple_of: int = 16
    hidden: int | None = None  # explicit hidden width; overrides `mult`
    # silu(gate) * up as one compiled kernel each way on CUDA for T > 1. Eager, the halves of the w13 output are
    # strided views: silu and the product forward, three products and silu's backward, then the concatenation of the
    # two halves' gradients, each a separate pass. Measured on an H100 (fifteenth session): -8 ms a 125M training
    # step at 8 x 4096 for every pattern (docs/perf-notes.md, "The SwiGLU activation in one kernel each way").
    fused_elementwise: bool = True

    def __post_init__(self):
        if self.mult <= 0:
            raise ConfigError(f"swiglu mult must be > 0, got {self.mult}")
        if self.multiple_of < 1:
            raise ConfigError(f"swiglu multiple_of must be >= 1, got {self.multiple_of}")

    def hidden_dim(self, d_model: int) -> int:
        if self.hidden is not None:
            return self.hidden
        h = int(2 * self.mult * d_model / 3)
        return self.multiple_of * ((h + self.multiple_of - 1) // self.multiple_of)


@register_ffn("swiglu", SwiGLUConfig)
class SwiGLU(nn.Module):
    """Gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, d_model: int, cfg: SwiGLUConfig | None = None):
        super().__init__()
        self.cfg = cfg or SwiGLUConfig()
        hidden = self.cfg.hidden_dim(d_model)
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and up in one matmul
        self.w2 = nn.Linear(hidden, d_model, bias=False)
        self.w2._is_residual_out = True  # depth-scaled init in the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w13(x)  # (B, T, 2 * hidden)
        fused = self.cfg.fused_elementwise and x.is_cuda and x.shape[1] > 1  # decode steps stay eager (graph-captured)
        return self.w2((compiled(swiglu) if fused else swiglu)(gate_up))


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """(..., 2 * hidden) -> (..., hidden): silu(gate) * up, the halves in that order."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass
class GeluMLPConfig:
    mult: float = 4.0


@register_ffn("mlp", GeluMLPConfig)
class GeluMLP(nn.Module):
    """Plain two-layer GELU MLP (GPT-2 style)."""

    def __init__(self, d_model: int, cfg: GeluMLPConfig | None = None):
        super().__init__()
        hidden = int((cfg or GeluMLPConfig()).mult * d_model)
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)
        self.proj._is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))
