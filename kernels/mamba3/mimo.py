"""Differentiable Mamba-3 MIMO chunked scan on Triton (forward ``triton_mimo.py``, backward
``triton_mimo_bwd.py``), and the same function through the PyTorch reference, with identical arguments.

    q, k (B, T, R, G, N)   C and B after BCNorm (group-shared, natural channel order), R ranks
    v (B, T, H, P)         x, raw; rank r reads x_r = x * v_rank[:, r]
    log_decay, dt, lam (B, T, H)
    omega (B, T, S)        angle rate: the increment is dt * omega (``angle_dt``) or omega; None = no rotation
    q_bias, k_bias (H, R, N), D (H,), v_rank (H, R, P)
    initial_state          Mamba3State with k (B, R, H, N); its angle gets no gradient (a cache value)
    seq_idx (B, T)         integer document ids per token, non-decreasing along each row (packed documents),
                           or None: documents never interact, the angle restarts at each one, the initial
                           state belongs to each row's first document and the final state is its last's

Returns y (B, T, R, H, P) (the SSM output plus D * x_r, before the gate) and the final Mamba3State.
Rotation pairs channels (i, i + N/2) ("half", as the MIMO layer does).

Only the scan itself is an autograd.Function; the small pieces around it are plain PyTorch, so autograd
differentiates them: the trapezoid weights scale and gamma (B, T, H) from dt and lambda (beta' cut at a
document's last token), each chunk's entry angle (float64 chunk totals and their prefix sums, restarting
at document starts: ``angle_offsets``), the state entering the first chunk from the initial cache (it
belongs to the first document), and the final cache key (the last token's rotated key per rank, with the
last document's angle).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hybrid.kernels.mamba3.chunk import mamba3_chunk
from hybrid.kernels.mamba3.common import Mamba3State, check_inputs, expand_rank, rotate, to_heads
from hybrid.kernels.mamba3.triton_mimo import mimo_chunk_fwd
from hybrid.kernels.mamba3.triton_mimo_bwd import mimo_chunk_bwd
from hybrid.kernels.mamba3.triton_siso import angle_offsets


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


class _MimoScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, dt, scale, gamma, omega, theta_off, q_bias, k_bias, D, v_rank, g0,
                angle_dt, chunk_size, seq_idx):
        y, g_final, g_in, cs_last = mimo_chunk_fwd(q, k, v, log_decay, dt, scale, gamma, omega, theta_off, angle_dt,
                                                   q_bias, k_bias, D, v_rank, g0, chunk_size, seq_idx)
        ctx.save_for_backward(q, k, v, log_decay, dt, scale, gamma, omega, theta_off, q_bias, k_bias, D, v_rank,
                              g_in, cs_last)
        ctx.angle_dt, ctx.chunk_size, ctx.seq_idx = angle_dt, chunk_size, seq_idx
        ctx.dtypes = [None if t is None else t.dtype for t in (q, k, v, log_decay, dt, scale, gamma, omega, theta_off,
                                                               q_bias, k_bias, D, v_rank, g0)]
        return y, g_final

    @staticmethod
    def backward(ctx, dy, dg_final):
        grads = mimo_chunk_bwd(*ctx.saved_tensors, dy, dg_final, ctx.angle_dt, ctx.chunk_size, ctx.seq_idx)
        out = [None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*out, None, None, None)


def _prepare(dt: torch.Tensor, lam: torch.Tensor, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Trapezoid weights (B, T, H) fp32: gamma_t = lam_t dt_t and scale_t = gamma_t + dt_{t+1} (1 - lam_{t+1}),
    the second term only when token t + 1 is in token t's document."""
    dtf, lamf = dt.float(), lam.float()
    gamma = lamf * dtf
    borrowed = dtf[:, 1:] * (1 - lamf[:, 1:])  # beta' of token t + 1 enters the state with token t's key
    if seq_idx is not None:
        borrowed = borrowed * (seq_idx[:, 1:] == seq_idx[:, :-1])[..., None]  # cut at a document's last token
    return (gamma + F.pad(borrowed, (0, 0, 0, 1))).contiguous(), gamma.contiguous()


def mamba3_mimo_chunk(q, k, v, log_decay, dt, lam, omega=None, angle_dt=True, q_bias=None, k_bias=None, D=None,
                      v_rank=None, initial_state: Mamba3State | None = None,
                      chunk_size: int = 16, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba3State]:
    """Mamba-3 MIMO chunked scan with Triton forward and backward kernels (chunk_size tokens, chunk_size * R
    rows per chunk: a power of two >= 16; d_state a power of two >= 32, headdim a power of two >= 16)."""
    Bsz, T, R, G, N = q.shape
    H, P = v.shape[2:]
    S = 0 if omega is None else omega.shape[-1]
    if omega is not None and (omega.shape[:2] != (Bsz, T) or omega.ndim != 3 or N % 2 or 2 * S > N):
        raise ValueError(f"omega must be (B, T, S) = ({Bsz}, {T}, S) with 2 S <= d_state = {N}, got {tuple(omega.shape)}")
    check_inputs(q, k, v, log_decay, dt, lam, None, q_bias, k_bias, D, v_rank, None, None, "half")
    if initial_state is not None:
        want = Mamba3State((Bsz, H, S), (Bsz, H, P, N), (Bsz, R, H, N), (Bsz, H, P))
        for name, t, size in zip(Mamba3State._fields, initial_state, want):
            if tuple(t.shape) != size:
                raise ValueError(f"initial state '{name}' must be {size}, got {tuple(t.shape)}")
    if T == 0:
        raise ValueError("mamba3_mimo_chunk needs at least one token")
    dev = v.device
    if seq_idx is not None:
        if tuple(seq_idx.shape) != (Bsz, T) or seq_idx.dtype.is_floating_point or seq_idx.dtype.is_complex:
            raise ValueError(f"seq_idx must be an integer (B, T) = {(Bsz, T)} tensor, got {seq_idx.dtype} {tuple(seq_idx.shape)}")
        seq_idx = seq_idx.to(dev).contiguous()
    scale, gamma = _prepare(dt, lam, seq_idx)
    if omega is not None:
        omega = omega if omega.stride(-1) == 1 else omega.contiguous()
        theta0 = None if initial_state is None else initial_state.angle.detach()
        theta_off, theta_final = angle_offsets(omega, dt, angle_dt, theta0, chunk_size, H, seq_idx)
    else:
        theta_off = torch.zeros(1, device=dev)
        theta_final = torch.zeros(Bsz, H, 0, device=dev, dtype=torch.float64)
    g0 = torch.zeros(Bsz, H, P, N, device=dev, dtype=torch.float32)
    if initial_state is not None:
        # G_{-1} = H_{-1} + beta'_0 sum_r x_{-1,r} k_{-1,r}^T: the previous token's trapezoid half not yet in H.
        beta0 = (dt[:, 0].float() * (1 - lam[:, 0].float()))[..., None, None]  # (B, H, 1, 1)
        x_prev = expand_rank(initial_state.v.float(), None if v_rank is None else v_rank.float(), R)  # (B, R, H, P)
        prev = torch.einsum("brhp,brhn->bhpn", x_prev, initial_state.k.float())
        g0 = initial_state.ssm.float() + beta0 * prev
    y, g_final = _MimoScan.apply(q.contiguous(), k.contiguous(), v.contiguous(), log_decay.float().contiguous(),
                                 dt.float().contiguous(), scale, gamma, omega, theta_off, _contig(q_bias), _contig(k_bias),
                                 _contig(D), _contig(v_rank), g0.contiguous(), angle_dt, chunk_size, seq_idx)
    # Final cache: the last token's biased key per rank, rotated with its own angle (its document's), and its raw value.
    k_last = to_heads(k[:, -1].float(), None if k_bias is None else k_bias.float(), H)  # (B, R, H, N)
    if S:
        k_last = rotate(k_last, theta_final.cos()[:, None].float(), theta_final.sin()[:, None].float(), "half")
    return y, Mamba3State(theta_final.float(), g_final, k_last.to(k.dtype), v[:, -1])


def mamba3_mimo_reference(q, k, v, log_decay, dt, lam, omega=None, angle_dt=True, q_bias=None, k_bias=None, D=None,
                          v_rank=None, initial_state: Mamba3State | None = None,
                          chunk_size: int = 16, seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, Mamba3State]:
    """``mamba3_mimo_chunk`` through the PyTorch chunked reference (``chunk.py``, "half" pairing): the test oracle."""
    dtheta = None
    if omega is not None:
        om = omega[:, :, None, :]  # (B, T, 1, S), shared by heads
        dtheta = dt[..., None] * om if angle_dt else om.expand(*dt.shape, omega.shape[-1])
    return mamba3_chunk(q, k, v, log_decay, dt, lam, dtheta, q_bias, k_bias, D, v_rank, initial_state=initial_state,
                        seq_idx=seq_idx, chunk_size=chunk_size, pairing="half")
