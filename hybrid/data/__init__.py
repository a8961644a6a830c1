"""Tasks (synthetic and corpus) and the Lightning data module. Importing registers every task."""

from hybrid.data import (  # noqa: F401  (registration side effects)
    interleaved,
    lm,
    mqar,
    mqar_variants,
    needle,
    state_tracking,
)
from hybrid.data.base import Task, build_task

__all__ = ["Task", "build_task"]
