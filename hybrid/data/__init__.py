"""Tasks (synthetic and corpus) and the Lightning data module. Importing registers every task."""

from hybrid.data import mqar  # noqa: F401  (registration side effects)
from hybrid.data.base import Task, build_task

__all__ = ["Task", "build_task"]
