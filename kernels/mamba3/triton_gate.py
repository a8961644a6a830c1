"""The Mamba-3 SISO output gate, out = y * silu(z), forward and backward as one launch each.

y is the scan output (B, T, H * P), z the gate columns of the in_proj output (a strided view: one token row every
``s_z`` elements). The backward writes dz straight into the caller's buffer (the z columns of d(in_proj output)),
so no concatenation of slice gradients follows. Float32 math, one rounding at each store. The oracle is
``hybrid.layers.mamba3.gate_output`` (without the per-head norm and MIMO terms, which this path does not take).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.launch import direct
from hybrid.kernels.mamba3.common import token_row_stride

GATE_BLOCK = 1024


@triton.jit
def _gate_fwd(Y, Z, OUT, cols, s_z, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < cols
    y = tl.load(Y + row * cols + c, mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + row * s_z + c, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + row * cols + c, (y * z / (1.0 + tl.exp(-z))).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gate_bwd(DOUT, Y, Z, DY, DZ, cols, s_z, s_dz, BLOCK: tl.constexpr):
    """dy = dout silu(z); dz = dout y silu'(z), silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < cols
    dout = tl.load(DOUT + row * cols + c, mask=m, other=0.0).to(tl.float32)
    y = tl.load(Y + row * cols + c, mask=m, other=0.0).to(tl.float32)
    z = tl.load(Z + row * s_z + c, mask=m, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-z))
    tl.store(DY + row * cols + c, (dout * z * sig).to(DY.dtype.element_ty), mask=m)
    tl.store(DZ + row * s_dz + c, (dout * y * sig * (1.0 + z * (1.0 - sig))).to(DZ.dtype.element_ty), mask=m)


def _rows(t: torch.Tensor, cols: int) -> int:
    """The token stride of a (B, T, cols) view with evenly spaced rows (checked)."""
    stride = token_row_stride(t) if t.shape[-1] == cols else None
    if stride is None:
        raise ValueError(f"gate: expected evenly spaced (B, T, {cols}) rows, got shape {tuple(t.shape)} strides {t.stride()}")
    return stride


def gate_forward(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """(B, T, C) contiguous y and (B, T, C) row-strided z -> y * silu(z), (B, T, C) in y's dtype."""
    B, T, cols = y.shape
    out = torch.empty_like(y)
    direct(_gate_fwd)[(B * T, triton.cdiv(cols, GATE_BLOCK))](y, z, out, cols, _rows(z, cols), BLOCK=GATE_BLOCK, num_warps=4)
    return out


def gate_backward(dout: torch.Tensor, y: torch.Tensor, z: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """Writes d z into ``dz`` (a row-strided (B, T, C) view) and returns d y, (B, T, C) in y's dtype."""
    B, T, cols = y.shape
    dout = dout.contiguous()
    dy = torch.empty_like(y)
    direct(_gate_bwd)[(B * T, triton.cdiv(cols, GATE_BLOCK))](dout, y, z, dy, dz, cols, _rows(z, cols), _rows(dz, cols),
                                                              BLOCK=GATE_BLOCK, num_warps=4)
    return dy
