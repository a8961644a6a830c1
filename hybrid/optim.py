"""AdamW with warmup + cosine, warmup-stable-decay (WSD) or constant learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hybrid.registry import ConfigError


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = min_lr_ratio * lr (cosine and wsd)
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly to the floor

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optim lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"optim decay_fraction must be in (0, 1], got {self.decay_fraction}")
        self.betas = tuple(self.betas)


class LRSchedule:
    """Multiplier on the base lr at each step. A callable object rather than a closure so LambdaLR's
    state_dict stores its fields (plain numbers, loadable with ``weights_only=True``)."""

    def __init__(self, cfg: OptimConfig, total_steps: int):
        self.kind, self.warmup = cfg.schedule, cfg.warmup_steps
        self.total, self.floor, self.decay_fraction = max(1, total_steps), cfg.min_lr_ratio, cfg.decay_fraction

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "cosine":
            progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
            return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_start = self.total - int(self.decay_fraction * self.total)
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, self.total - decay_start))
        return 1.0 - (1.0 - self.floor) * progress


def build_optimizer(model, cfg: OptimConfig, total_steps: int):
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, LRSchedule(cfg, total_steps))
    return opt, sched
