"""Multi-query associative recall (MQAR), zoology-style.

    inputs:  k1 v1 k2 v2 ... kK vK  0 0 k3 0 0 0 k1 0 ...   (context of K pairs, then queries)
    labels:  .  .  .  .      .  .   . . v3 . . . v1 . ...   (the value is scored at its key's query)

Keys are drawn from [1, V/2) and values from [V/2, V), distinct within a sequence. Each key is
queried once, at a gap in the query region drawn without replacement from a power law
p(g) ~ (g + 1)^(a - 1) that favours short gaps (a = 0.01 as in zoology).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hybrid.data.base import IGNORE, Task
from hybrid.data.common import distinct, powerlaw_slots
from hybrid.registry import ConfigError, register_task


@dataclass
class MQARConfig:
    vocab_size: int = 256
    seq_len: int = 128
    num_kv_pairs: int = 16
    power_a: float = 0.01
    # "zero": pad non-query positions with token 0. "random": pad with random value tokens, which can
    # never be mistaken for a query (zoology's random filler could repeat keys; zoology#29).
    filler: Literal["zero", "random"] = "zero"
    num_test: int = 1000
    seed: int = 0

    def __post_init__(self):
        k = self.num_kv_pairs
        if k < 1:
            raise ConfigError(f"mqar num_kv_pairs must be >= 1, got {k}")
        if self.seq_len < 4 * k:
            raise ConfigError(f"mqar cannot fit {k} key-value pairs in seq_len {self.seq_len}: the context and the "
                              f"queries need seq_len >= 4 * num_kv_pairs = {4 * k} (raise seq_len or lower num_kv_pairs)")
        if self.vocab_size // 2 - 1 < k:
            raise ConfigError(f"mqar vocab_size {self.vocab_size} has only {self.vocab_size // 2 - 1} key tokens for "
                              f"{k} distinct keys; needs vocab_size >= {2 * k + 2}")
        if self.power_a <= 0:
            raise ConfigError(f"mqar power_a must be > 0, got {self.power_a}")
        if self.num_test < 1:
            raise ConfigError(f"mqar num_test must be >= 1, got {self.num_test}")


@register_task("mqar", MQARConfig)
class MQAR(Task):
    """Multi-query associative recall: K key-value pairs, then every key queried once."""

    def __init__(self, cfg: MQARConfig):
        super().__init__(cfg)
        self.vocab_size, self.seq_len = cfg.vocab_size, cfg.seq_len

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        K, L, V = cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
        half = V // 2
        keys = distinct(rng, n, K, 1, half)  # (n, K) in [1, V/2)
        values = distinct(rng, n, K, half, V)  # (n, K) in [V/2, V)
        seq = np.zeros((n, L + 1), dtype=np.int64)  # one extra token: labels are inputs shifted by one
        seq[:, 0:2 * K:2], seq[:, 1:2 * K:2] = keys, values
        gaps = powerlaw_slots(rng, n, (L + 1 - 2 * K) // 2, K, cfg.power_a)  # (n, K): key i -> query slot
        pos = 2 * K + 2 * gaps  # (n, K) query positions
        rows = np.arange(n)[:, None]
        seq[rows, pos], seq[rows, pos + 1] = keys, values
        inputs = seq[:, :L].copy()
        labels = np.full((n, L), IGNORE, dtype=np.int64)
        labels[rows, pos] = values
        if cfg.filler == "random":
            free = inputs == 0
            free[:, : 2 * K] = False
            inputs[free] = rng.integers(half, V, size=int(free.sum()))
        return {"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}
