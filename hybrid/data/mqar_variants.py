"""MQAR variants after zoology: forgetting (keys re-bound, the latest value is asked for) and
compositional (a value is bound to a *pair* of keys, so neither key alone predicts it).

forgetting_mqar:      k1 v1 .. kK vK | ku v'u .. (U updates) | queries  k v  at power-law gaps
compositional_mqar:   a b v  (K = g*g triplets over a g x g grid of (a, b)) | queries  a b v

Both add per-query metadata: ``distance`` (tokens from the binding to the query) and, for forgetting,
``updated`` (1 if the key was re-bound) and ``stale`` (the value it had before, -1 if none).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hybrid.data.base import IGNORE, Task
from hybrid.data.common import base_scores, distance_buckets, distinct, is_eval_batch, powerlaw_slots, sliced_acc
from hybrid.registry import ConfigError, register_task


def _check_common(name: str, power_a: float, num_test: int) -> None:
    if power_a <= 0:
        raise ConfigError(f"{name} power_a must be > 0, got {power_a}")
    if num_test < 1:
        raise ConfigError(f"{name} num_test must be >= 1, got {num_test}")


@dataclass
class ForgettingMQARConfig:
    vocab_size: int = 256
    seq_len: int = 128
    num_kv_pairs: int = 16
    num_updates: int = 4  # keys re-bound to a new value after all the originals
    power_a: float = 0.01
    num_test: int = 1000
    seed: int = 0

    def __post_init__(self):
        k, u = self.num_kv_pairs, self.num_updates
        if k < 1:
            raise ConfigError(f"forgetting_mqar num_kv_pairs must be >= 1, got {k}")
        if not 0 <= u <= k:
            raise ConfigError(f"forgetting_mqar num_updates must be in [0, num_kv_pairs={k}], got {u}")
        need = 4 * k + 2 * u
        if self.seq_len < need:
            raise ConfigError(f"forgetting_mqar cannot fit {k} pairs and {u} updates in seq_len {self.seq_len}: needs "
                              f"seq_len >= 4 * num_kv_pairs + 2 * num_updates = {need}")
        half = self.vocab_size // 2
        if half - 1 < k or self.vocab_size - half < k + u:
            raise ConfigError(f"forgetting_mqar vocab_size {self.vocab_size} is too small for {k} keys and {k + u} distinct "
                              f"values; needs vocab_size >= {max(2 * k + 2, 2 * (k + u))}")
        _check_common("forgetting_mqar", self.power_a, self.num_test)


@register_task("forgetting_mqar", ForgettingMQARConfig)
class ForgettingMQAR(Task):
    """MQAR whose context re-binds some keys; queries ask for the latest value."""

    def __init__(self, cfg: ForgettingMQARConfig):
        super().__init__(cfg)
        self.vocab_size, self.seq_len = cfg.vocab_size, cfg.seq_len

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        K, U, L, V = cfg.num_kv_pairs, cfg.num_updates, cfg.seq_len, cfg.vocab_size
        half = V // 2
        rows = np.arange(n)[:, None]
        keys = distinct(rng, n, K, 1, half)  # (n, K)
        vals = distinct(rng, n, K + U, half, V)  # (n, K + U): originals, then the update values
        seq = np.zeros((n, L + 1), dtype=np.int64)
        seq[:, 0:2 * K:2], seq[:, 1:2 * K:2] = keys, vals[:, :K]
        latest = vals[:, :K].copy()  # (n, K) value per key after the updates
        stale = np.full((n, K), -1, dtype=np.int64)
        write_pos = np.broadcast_to(np.arange(0, 2 * K, 2), (n, K)).copy()  # (n, K) position of the last write
        which = np.argsort(rng.random((n, K)), axis=1)[:, :U]  # (n, U) indices of re-bound keys
        upos = 2 * K + 2 * np.arange(U)
        seq[:, upos], seq[:, upos + 1] = keys[rows, which], vals[:, K:]
        stale[rows, which] = latest[rows, which]
        latest[rows, which] = vals[:, K:]
        write_pos[rows, which] = upos
        q0 = 2 * K + 2 * U
        gaps = powerlaw_slots(rng, n, (L + 1 - q0) // 2, K, cfg.power_a)  # (n, K) slot per key
        pos = q0 + 2 * gaps
        seq[rows, pos], seq[rows, pos + 1] = keys, latest
        labels = np.full((n, L), IGNORE, dtype=np.int64)
        labels[rows, pos] = latest
        meta = {name: np.full((n, L), -1, dtype=np.int64) for name in ("distance", "updated", "stale")}
        meta["distance"][rows, pos] = pos - write_pos
        meta["updated"][rows, pos] = (stale >= 0).astype(np.int64)
        meta["stale"][rows, pos] = stale
        out = {"inputs": seq[:, :L].copy(), "labels": labels, **meta}
        return {k: torch.from_numpy(v) for k, v in out.items()}

    @torch.no_grad()
    def score(self, pred, batch):
        out, correct, scored = base_scores(pred, batch)
        if is_eval_batch(batch):
            out.update(distance_buckets(correct, scored, batch["distance"]))
            out.update(sliced_acc(correct, scored, batch["updated"], "acc_updated"))
            upd = scored & (batch["updated"] == 1)
            out["err_stale"] = ((pred == batch["stale"]) & upd).sum().float() / upd.sum().clamp(min=1)
        return out


@dataclass
class CompositionalMQARConfig:
    vocab_size: int = 384
    seq_len: int = 128
    num_kv_pairs: int = 16  # a perfect square g*g: the (a, b) grid
    power_a: float = 0.01
    num_test: int = 1000
    seed: int = 0

    def __post_init__(self):
        k = self.num_kv_pairs
        g = math.isqrt(max(k, 0))
        if k < 1 or g * g != k:
            raise ConfigError(f"compositional_mqar num_kv_pairs must be a perfect square (4, 9, 16, ...), got {k}")
        if self.seq_len < 6 * k:
            raise ConfigError(f"compositional_mqar cannot fit {k} triplets in seq_len {self.seq_len}: needs seq_len >= "
                              f"6 * num_kv_pairs = {6 * k}")
        third = self.vocab_size // 3
        if third - 1 < g or self.vocab_size - 2 * third < k:
            raise ConfigError(f"compositional_mqar vocab_size {self.vocab_size} is too small for {g}+{g} keys and {k} values; "
                              f"needs vocab_size >= {max(3 * (g + 1), 3 * k)}")
        _check_common("compositional_mqar", self.power_a, self.num_test)


@register_task("compositional_mqar", CompositionalMQARConfig)
class CompositionalMQAR(Task):
    """Triplets ``a b v`` over a g x g grid of key pairs; a query ``a b`` asks for v."""

    def __init__(self, cfg: CompositionalMQARConfig):
        super().__init__(cfg)
        self.vocab_size, self.seq_len = cfg.vocab_size, cfg.seq_len

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        K, L, V = cfg.num_kv_pairs, cfg.seq_len, cfg.vocab_size
        g, third = math.isqrt(K), V // 3
        rows = np.arange(n)[:, None]
        a = distinct(rng, n, g, 1, third)  # (n, g)
        b = distinct(rng, n, g, third, 2 * third)  # (n, g)
        vals = distinct(rng, n, K, 2 * third, V)  # (n, K) one per grid cell
        order = np.argsort(rng.random((n, K)), axis=1)  # (n, K) context order of the cells
        ka, kb = a[rows, order // g], b[rows, order % g]  # (n, K)
        seq = np.zeros((n, L + 1), dtype=np.int64)
        seq[:, 0:3 * K:3], seq[:, 1:3 * K:3], seq[:, 2:3 * K:3] = ka, kb, vals
        gaps = powerlaw_slots(rng, n, (L + 1 - 3 * K) // 3, K, cfg.power_a)
        pos = 3 * K + 3 * gaps  # (n, K) position of the query's first key
        seq[rows, pos], seq[rows, pos + 1], seq[rows, pos + 2] = ka, kb, vals
        labels = np.full((n, L), IGNORE, dtype=np.int64)
        labels[rows, pos + 1] = vals
        distance = np.full((n, L), -1, dtype=np.int64)
        distance[rows, pos + 1] = pos - 3 * np.arange(K)[None, :]
        out = {"inputs": seq[:, :L].copy(), "labels": labels, "distance": distance}
        return {k: torch.from_numpy(v) for k, v in out.items()}

    @torch.no_grad()
    def score(self, pred, batch):
        out, correct, scored = base_scores(pred, batch)
        if is_eval_batch(batch):
            out.update(distance_buckets(correct, scored, batch["distance"]))
        return out
