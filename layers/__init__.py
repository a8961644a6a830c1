"""Layer implementations, installed as ``hybrid.layers``. Importing registers every component."""

from hybrid.layers import attention, block_topk, chunk_gate, fusion, mamba2, mamba3, mlp, norm, router  # noqa: F401  (registration side effects)  # noqa: F401  (registration side effects)
from hybrid.layers.base import Mixer

__all__ = ["Mixer"]
