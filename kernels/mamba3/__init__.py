"""Mamba-3 kernels: the recurrent oracle (``naive``) and the chunked PyTorch form (``chunk``).

Triton kernels (imported from their modules, as triton is optional): the SISO chunked scan with its
backward and decode step (``siso``, ``triton_siso``, ``triton_siso_bwd``), the MIMO chunked scan with its
backward (``mimo``, ``triton_mimo``, ``triton_mimo_bwd``) and the MIMO decode step (``triton_mimo_step``).
"""

from hybrid.kernels.mamba3.chunk import mamba3_chunk
from hybrid.kernels.mamba3.common import Mamba3State, rotate, zero_state
from hybrid.kernels.mamba3.naive import mamba3_recurrent, mamba3_step

__all__ = ["Mamba3State", "mamba3_chunk", "mamba3_recurrent", "mamba3_step", "rotate", "zero_state"]
