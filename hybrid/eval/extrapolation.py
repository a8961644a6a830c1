"""Length extrapolation: train at L, evaluate the same task at longer lengths (2L, 4L, 8L by default).

Each task says what "length L" means for it (``Task.length_overrides``): the sequence length for
recall, needle and corpus tasks, the number of symbols for state tracking (``test_min_len`` =
``test_max_len`` = L), and for interleaved recall the distractors also grow so the same facts spread
over the longer context.
"""

from __future__ import annotations

from typing import Any

from hybrid.data import build_task
from hybrid.data.base import Task
from hybrid.registry import ConfigError

DEFAULT_FACTORS = (2, 4, 8)


def extrapolation_lengths(train_length: int, lengths: list[int] | None = None, extrapolate: bool = False,
                          factors: tuple[int, ...] = DEFAULT_FACTORS) -> list[int | None]:
    """The lengths to evaluate at; ``None`` means "as configured". With ``extrapolate``, lengths
    default to ``factors`` x the training length and none may be below it."""
    if lengths:
        bad = [n for n in lengths if n < 1]
        if bad:
            raise ConfigError(f"evaluation lengths must be >= 1, got {bad}")
        if extrapolate:
            short = [n for n in lengths if n < train_length]
            if short:
                raise ConfigError(f"evaluation length(s) {short} below the training length {train_length}: length "
                                  f"extrapolation evaluates at >= {train_length} (drop --extrapolate to evaluate shorter)")
        return list(lengths)
    if extrapolate:
        return [train_length * f for f in factors]
    return [None]


def task_at_length(data_cfg: dict[str, Any], length: int | None) -> Task:
    """The task of ``data_cfg`` with its evaluation examples ``length`` long (None: unchanged)."""
    task = build_task(data_cfg)
    if length is None:
        return task
    return build_task({**data_cfg, **task.length_overrides(length)})
