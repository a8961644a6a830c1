"""Pieces shared by the Gluon (Hopper) chunk kernels of the Mamba-3 SISO scan (``gluon_siso.py``, forward;
``gluon_siso_bwd.py``, backward): shared-memory and register layouts, the fast trig, and which launches the Gluon
kernels can take. Gluon needs an sm_90 GPU and Triton's Gluon (3.6 API); the Triton kernels are the reference.
"""

from __future__ import annotations

import os

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.extra import libdevice

# Pairs per column block of the Gluon kernels (the Triton kernels' COL_BLOCK is 32): HYBRID_SCAN_GLUON_NB for A/B runs.
COL_BLOCK = int(os.environ.get("HYBRID_SCAN_GLUON_NB", "32"))


@gluon.jit
def _add(a, b):
    return a + b


@gluon.constexpr_function
def _nvmma(shape, dtype):
    """Swizzled shared layout a warpgroup MMA reads (and cp.async writes) for a (rows, cols) 16-bit tile."""
    return gl.NVMMASharedLayout.get_default_for(shape, dtype)


@gluon.constexpr_function
def _at_least_one(n):
    return max(n, 1)


@gluon.constexpr_function
def _tile_layout(cols, num_warps):
    """Registers of a (rows, cols) 16-bit tile for loading: 16-byte vectors along a row, rows across lanes/warps."""
    per_row = min(cols // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _scan_layout(cols, num_warps):
    """Registers of a (rows, cols) fp32 tile scanned along its rows (angles, angle gradients)."""
    per_row = min(cols, 32)
    return gl.BlockedLayout([1, 1], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.jit
def _cos_sin(theta):
    """cos and sin from the hardware's approximate units after a two-step reduction to [-pi, pi], as the Triton
    kernels take them (``triton_siso._cos_sin``)."""
    turns = libdevice.rint(theta * 0.15915494309189535)
    r = gl.fma(turns, -6.2831854820251465, theta)
    r = gl.fma(turns, 1.7484556e-07, r)
    return libdevice.fast_cosf(r), libdevice.fast_sinf(r)


def applies(kernel: str, v: torch.Tensor, flags: dict) -> bool:
    """Whether a Gluon kernel (``fwd``: the forward's two chunk kernels; ``dq``, ``dk``) can run the launch: an sm_90
    GPU, plain sequences, bf16 activations (the type tested; fp16 would need its own GPU run), a chunk of 64 (one
    warpgroup's MMA rows), a head size the MMAs take (products with the head size as their rows, dq's dG_in and the
    forward's chunk state, need a multiple of 64)."""
    head_ok = flags["P"] % 64 == 0 if kernel in ("dq", "fwd") else flags["P"] % 16 == 0
    return (v.is_cuda and torch.cuda.get_device_capability(v.device) == (9, 0) and not flags["HAS_SEQ"]
            and v.dtype == torch.bfloat16 and flags["C"] == 64 and head_ok
            and 16 <= flags["P"] <= 256 and flags["N2"] >= 16)
