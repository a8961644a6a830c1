"""Conventions shared by every Mamba-3 kernel: the carried state, channel pairing, head/rank expansion.

All kernels take the SSM inputs *after* the layer's projections:

    q, k        (B, T, R, G, N)  C and B after BCNorm, before the per-head bias and the rotation
    v           (B, T, H, P)     x, raw (MIMO expands it per rank with ``v_rank``)
    log_decay   (B, T, H)        a = A * dt  (< 0)
    dt          (B, T, H)        step size (> 0)
    lam         (B, T, H)        trapezoid gate, post-sigmoid (1 = exponential Euler = Mamba-2)
    dtheta      (B, T, H, S)     per-token angle increment (dt * pi * tanh(u_theta) in the layer), or None
    q_bias, k_bias (H, R, N)     per-head-and-rank biases, or None
    D           (H,)             skip, or None
    v_rank      (H, R, P)        MIMO value expansion x_r = x * v_rank[:, r], or None (all ones)

and return ``y`` (B, T, R, H, P) — the SSM output plus ``D * x_r`` per rank, before any gate — with a
``Mamba3State``. Heads ``[g*H/G, (g+1)*H/G)`` share group g. Rotation pairs state channels
``(2i, 2i+1)`` ("interleaved", SISO) or ``(i, i + N/2)`` ("half", MIMO) for i < S.
Computation runs in float32, or float64 when v is float64.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

TWO_PI = 2 * math.pi
PAIRINGS = ("interleaved", "half")


class Mamba3State(NamedTuple):
    """What a sequence carries from one call to the next (the decode cache contents)."""

    angle: torch.Tensor  # (B, H, S) cumulative rotation angle of the last token, in [0, 2pi)
    ssm: torch.Tensor  # (B, H, P, N) the state H_t
    k: torch.Tensor  # (B, R, H, N) last token's key: biased and rotated with its own angle
    v: torch.Tensor  # (B, H, P) last token's raw value, before the MIMO rank expansion


def zero_state(batch: int, heads: int, headdim: int, d_state: int, n_angles: int, rank: int = 1,
               device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> Mamba3State:
    """The state of a sequence that has seen no tokens."""
    def z(*shape):
        return torch.zeros(shape, device=device, dtype=dtype)
    return Mamba3State(z(batch, heads, n_angles), z(batch, heads, headdim, d_state), z(batch, rank, heads, d_state),
                       z(batch, heads, headdim))


def token_row_stride(*views: torch.Tensor) -> int | None:
    """The token stride shared by (B, T, ...) views whose B * T rows are evenly spaced with contiguous channels (e.g.
    column slices of one (B, T, D) tensor), or None. Views with no channels are ignored."""
    strides = set()
    for v in views:
        if v is None or v.shape[-1] == 0:
            continue
        B, T = v.shape[:2]
        if v.stride(-1) != 1 or (B > 1 and v.stride(0) != T * v.stride(1)):
            return None
        strides.add(v.stride(1))
    return strides.pop() if len(strides) == 1 else None


def compute_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.promote_types(v.dtype, torch.float32)


def rotate(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairing: str) -> torch.Tensor:
    """Rotate channel pairs of ``t`` (..., N) by angles with ``cos``/``sin`` (..., S); channels past the pairs pass."""
    S, N = cos.shape[-1], t.shape[-1]
    if S == 0:
        return t
    if pairing == "interleaved":
        a, b = t[..., 0:2 * S:2], t[..., 1:2 * S:2]
        rotated = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)  # (..., 2S)
        return torch.cat([rotated, t[..., 2 * S:]], dim=-1)
    if pairing == "half":
        half = N // 2
        a, b = t[..., :S], t[..., half:half + S]
        return torch.cat([a * cos - b * sin, t[..., S:half], a * sin + b * cos, t[..., half + S:]], dim=-1)
    raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")


def to_heads(t: torch.Tensor, bias: torch.Tensor | None, heads: int) -> torch.Tensor:
    """(..., R, G, N) group tensor -> (..., R, H, N) per head, plus the (H, R, N) bias."""
    groups = t.shape[-2]
    t = t.repeat_interleave(heads // groups, dim=-2) if groups != heads else t
    if bias is not None:
        t = t + bias.transpose(0, 1).to(t.dtype)  # (R, H, N)
    return t


def expand_rank(v: torch.Tensor, v_rank: torch.Tensor | None, rank: int) -> torch.Tensor:
    """(..., H, P) raw value -> (..., R, H, P) per-rank value."""
    if v_rank is None:
        return v.unsqueeze(-3).expand(*v.shape[:-2], rank, *v.shape[-2:])
    return v.unsqueeze(-3) * v_rank.transpose(0, 1).to(v.dtype)  # (R, H, P) broadcast


def check_inputs(q, k, v, log_decay, dt, lam, dtheta, q_bias, k_bias, D, v_rank, state, seq_idx, pairing) -> None:
    """Shape checks with messages that name the offending argument."""
    if q.ndim != 5 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, T, R, G, N); got {tuple(q.shape)} and {tuple(k.shape)}")
    Bsz, T, R, G, N = q.shape
    if v.ndim != 4 or v.shape[:2] != (Bsz, T):
        raise ValueError(f"v must be (B, T, H, P) = ({Bsz}, {T}, H, P), got {tuple(v.shape)}")
    H, P = v.shape[2:]
    if H % G:
        raise ValueError(f"number of groups ({G}) must divide the number of heads ({H})")
    for name, t in (("log_decay", log_decay), ("dt", dt), ("lam", lam)):
        if t.shape != (Bsz, T, H):
            raise ValueError(f"{name} must be (B, T, H) = {(Bsz, T, H)}, got {tuple(t.shape)}")
    if dtheta is not None:
        if dtheta.ndim != 4 or dtheta.shape[:3] != (Bsz, T, H):
            raise ValueError(f"dtheta must be (B, T, H, S), got {tuple(dtheta.shape)}")
        if N % 2 or 2 * dtheta.shape[-1] > N:
            raise ValueError(f"{dtheta.shape[-1]} rotation angles need an even d_state >= {2 * dtheta.shape[-1]}, got {N}")
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        if t is not None and t.shape != (H, R, N):
            raise ValueError(f"{name} must be (H, R, N) = {(H, R, N)}, got {tuple(t.shape)}")
    if D is not None and D.shape != (H,):
        raise ValueError(f"D must be (H,) = ({H},), got {tuple(D.shape)}")
    if v_rank is not None and v_rank.shape != (H, R, P):
        raise ValueError(f"v_rank must be (H, R, P) = {(H, R, P)}, got {tuple(v_rank.shape)}")
    if state is not None:
        S = 0 if dtheta is None else dtheta.shape[-1]
        want = Mamba3State((Bsz, H, S), (Bsz, H, P, N), (Bsz, R, H, N), (Bsz, H, P))
        for name, t, shape in zip(Mamba3State._fields, state, want):
            if tuple(t.shape) != shape:
                raise ValueError(f"initial state '{name}' must be {shape}, got {tuple(t.shape)}")
    if seq_idx is not None and seq_idx.shape != (Bsz, T):
        raise ValueError(f"seq_idx must be (B, T) = {(Bsz, T)}, got {tuple(seq_idx.shape)}")
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
