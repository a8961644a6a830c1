"""Mamba-2 kernels: chunked SSD with its recurrent oracle, and the short causal conv."""

from hybrid.kernels.mamba2.conv import causal_conv1d
from hybrid.kernels.mamba2.ssd import ssd_chunk, ssd_recurrent, ssd_step

__all__ = ["causal_conv1d", "ssd_chunk", "ssd_recurrent", "ssd_step"]
