"""Helpers shared by the synthetic tasks: vectorised sampling and sliced accuracy.

Metadata convention: a task may add per-position tensors to its batches, (B, T) or (B, T, C), that
describe the query scored at that position (``distance``, ``updated``, ...); they are only meaningful
where ``labels != IGNORE``. Sliced metrics read them; nothing else does.
"""

from __future__ import annotations

import numpy as np
import torch

from hybrid.data.base import IGNORE, base_scores  # noqa: F401  (re-exported for the task modules)


def distinct(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
    """(n, k) ids, distinct within each row, uniform from [low, high): the first k of a random
    permutation (argsort of uniforms), which vectorises over rows."""
    if k > high - low:
        raise ValueError(f"cannot draw {k} distinct ids from [{low}, {high})")
    return low + np.argsort(rng.random((n, high - low)), axis=1)[:, :k]


def powerlaw_slots(rng: np.random.Generator, n: int, slots: int, k: int, power_a: float) -> np.ndarray:
    """(n, k) distinct slot indices in [0, slots), favouring small ones: p(g) ~ (g + 1)^(a - 1),
    without replacement (Gumbel top-k), as zoology places MQAR queries."""
    log_w = (power_a - 1) * np.log(np.arange(1, slots + 1))
    return np.argsort(-(log_w + rng.gumbel(size=(n, slots))), axis=1)[:, :k]


def log2_bucket(x: torch.Tensor) -> torch.Tensor:
    """0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...: the bucket b covers [2^(b-1), 2^b)."""
    x = x.clamp(min=0).float()
    return torch.where(x > 0, torch.floor(torch.log2(x.clamp(min=1))) + 1, torch.zeros_like(x)).long()


def sliced_acc(correct: torch.Tensor, scored: torch.Tensor, key: torch.Tensor, name: str,
               labels_of: dict[int, str] | None = None) -> dict[str, torch.Tensor]:
    """Accuracy per value of ``key`` over scored positions: ``{name}/{value}``. Empty slices are left
    out (a NaN would poison the epoch average)."""
    out: dict[str, torch.Tensor] = {}
    k = key[scored]
    c = correct[scored].float()
    for v in torch.unique(k).tolist():
        sel = k == v
        label = labels_of.get(v, str(v)) if labels_of else str(v)
        out[f"{name}/{label}"] = c[sel].mean()
    return out


def distance_buckets(correct: torch.Tensor, scored: torch.Tensor, distance: torch.Tensor) -> dict[str, torch.Tensor]:
    """Accuracy by log2 distance bucket, keyed by the bucket's lower edge: ``acc_dist/64`` covers 64..127."""
    b = log2_bucket(distance)
    names = {i: str(0 if i == 0 else 2 ** (i - 1)) for i in range(64)}
    return sliced_acc(correct, scored, b, "acc_dist", names)


def is_eval_batch(batch: dict[str, torch.Tensor]) -> bool:
    """Training batches carry ``batch_index``; sliced metrics are computed only on evaluation batches,
    so the training log stays small and training steps stay cheap."""
    return "batch_index" not in batch


def scaled(acc: torch.Tensor, chance: float) -> torch.Tensor:
    """Scaled accuracy (Grazzi et al.): 0 = chance, 1 = perfect."""
    return (acc - chance) / (1.0 - chance)
