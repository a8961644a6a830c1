"""Differentiable Mamba-3 SISO scan on Triton (forward ``triton_siso.py``, backward ``triton_siso_bwd.py``),
and the same function through the PyTorch reference, with identical arguments.

    q, k (B, T, G, N)   C and B after BCNorm (group-shared, natural channel order)
    v (B, T, H, P)      x
    log_decay, dt, lam (B, T, H)
    omega (B, T, S)     angle rate: the increment is dt * omega (``angle_dt``) or omega; None = no rotation
    q_bias, k_bias (H, N), D (H,)
    initial_state       Mamba3State with k (B, 1, H, N); its angle gets no gradient (a cache value)
    seq_idx (B, T)      integer document ids, non-decreasing along each row (packed documents), or None:
                        documents never interact, the angle restarts at each one, the initial state belongs
                        to each row's first document and the final state is that of its last

Returns y (B, T, H, P) and the final Mamba3State.
"""

from __future__ import annotations

import torch
from hybrid.kernels.mamba3.chunk import mamba3_chunk
from hybrid.kernels.mamba3.common import Mamba3State
from hybrid.kernels.mamba3.triton_siso import chunk_forward
from hybrid.kernels.mamba3.triton_siso_bwd import mamba3_siso_chunk_bwd

_INPUTS = ("q", "k", "v", "log_decay", "dt", "lam", "omega", "q_bias", "k_bias", "D")


class _SisoChunk(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, dt, lam, omega, q_bias, k_bias, D, angle, ssm, k_prev, v_prev, angle_dt, chunk_size,
                seq_idx, need_state):
        init = None if angle is None else Mamba3State(angle, ssm, k_prev, v_prev)
        y, state, saved = chunk_forward(q, k, v, log_decay, dt, lam, omega, angle_dt, q_bias, k_bias, D, init, chunk_size,
                                        seq_idx, need_state)
        tensors = {key: val for key, val in saved.items() if torch.is_tensor(val)}
        ctx.names = list(tensors)
        ctx.flags = {key: val for key, val in saved.items() if not torch.is_tensor(val) and val is not None}
        ctx.save_for_backward(*tensors.values())
        ctx.dtypes = [None if t is None else t.dtype for t in (q, k, v, log_decay, dt, lam, omega, q_bias, k_bias, D)]
        ctx.init_dtypes = None if init is None else (ssm.dtype, k_prev.dtype, v_prev.dtype)
        # Outputs nobody uses (the final state, when a caller asks for it without a cache) get None, not zero tensors
        # that the backward would then carry through its final-state terms, including a copy of the (B, T, H, P) dx.
        ctx.set_materialize_grads(False)
        if state is None:
            return y, None, None, None, None
        ctx.mark_non_differentiable(state.angle)
        return y, state.angle, state.ssm, state.k, state.v  # a copy of v's last token, not a view of an input

    @staticmethod
    def backward(ctx, dy, d_angle, d_ssm, d_k, d_v):
        saved = dict(zip(ctx.names, ctx.saved_tensors))
        saved.update(ctx.flags)
        for key in ("v0", "k0", "seq"):
            saved.setdefault(key, None)
        if dy is None:  # only the final state was used
            dy = torch.zeros_like(saved["v"])
        g = mamba3_siso_chunk_bwd(saved, dy, d_ssm, d_k, d_v)
        out = [None if dtype is None or g[name] is None else g[name].to(dtype)
               for name, dtype in zip(_INPUTS, ctx.dtypes)]
        init = [None, None, None, None]
        if ctx.init_dtypes is not None:
            init = [None, *(g[name].to(dtype) for name, dtype in zip(("ssm0", "k0", "v0"), ctx.init_dtypes))]
        return (*out, *init, None, None, None, None)


def mamba3_siso_chunk(q, k, v, log_decay, dt, lam, omega=None, angle_dt=True, q_bias=None, k_bias=None, D=None,
                      initial_state: Mamba3State | None = None, chunk_size: int = 64,
                      seq_idx: torch.Tensor | None = None, need_state: bool = True) -> tuple[torch.Tensor, Mamba3State | None]:
    """Mamba-3 SISO chunked scan with Triton forward and backward kernels. ``need_state=False`` (training without
    a cache) skips assembling the final state and returns None in its place."""
    st = initial_state if initial_state is not None else (None, None, None, None)
    y, *state = _SisoChunk.apply(q, k, v, log_decay, dt, lam, omega, q_bias, k_bias, D, *st, angle_dt, chunk_size, seq_idx,
                                 need_state)
    return y, (Mamba3State(*state) if need_state else None)


def mamba3_siso_reference(q, k, v, log_decay, dt, lam, omega=None, angle_dt=True, q_bias=None, k_bias=None, D=None,
                          initial_state: Mamba3State | None = None, chunk_size: int = 64,
                          seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba3State]:
    """``mamba3_siso_chunk`` through the PyTorch chunked reference (``chunk.py``): the test oracle."""
    dtheta = None
    if omega is not None:
        S = omega.shape[-1]
        dtheta = dt[..., None] * omega[:, :, None, :] if angle_dt else omega[:, :, None, :].expand(*dt.shape, S)
    y, state = mamba3_chunk(q[:, :, None], k[:, :, None], v, log_decay, dt, lam, dtheta,
                            None if q_bias is None else q_bias[:, None], None if k_bias is None else k_bias[:, None],
                            D, initial_state=initial_state, seq_idx=seq_idx, chunk_size=chunk_size, pairing="interleaved")
    return y[:, :, 0], state
