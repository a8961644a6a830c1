"""Layer implementations, installed as ``hybrid.layers``. Importing registers every component."""

from hybrid.layers import attention, mamba2, mamba3, mlp, norm  # noqa: F401  (registration side effects)
from hybrid.layers.base import Mixer

__all__ = ["Mixer"]
