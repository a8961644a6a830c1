"""Fused Mamba-3 decode step for MIMO (rank R = 1, 2, 4, 8) in Triton; the oracle is ``naive.mamba3_step``.

One program owns one (sequence, head): it advances the head's angles, rotates the R query and key vectors,
and streams the (P, N) fp32 state through in (BP, N) row blocks, adding the rank-summed outer products of
the previous and the current token. The state is read and written once whatever R is, which is MIMO's
point: R times the FLOPs of SISO for the same memory traffic. Every cache tensor is updated in place
with static shapes, so the step can be captured in a CUDA graph.

Layouts: q, k (B, R, G, N); v (B, H, P) raw values; per-rank value scales v_rank (H, R, P); biases (H, R, N);
cache angle (B, H, S) and ssm (B, H, P, N) in fp32, k (B, R, H, N) the last rotated key, v (B, H, P) the
last raw value; output y (B, R, H, P). ``pairing`` "interleaved" rotates channels (2i, 2i + 1), "half"
rotates (i, i + N/2); channels past the S angle pairs pass unrotated.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.mamba3.common import Mamba3State


@triton.jit
def _rotation_pairs(n, N: tl.constexpr, HALF: tl.constexpr):
    """For channels ``n``: the angle pair each belongs to, its rotation partner, the sign of the partner's sine
    term, and whether it is the pair's first channel. "half" pairs (i, i + N/2), else (2i, 2i+1) -> (e c - o s,
    e s + o c)."""
    if HALF:
        first = n < N // 2
        pair = tl.where(first, n, n - N // 2)
        partner = tl.where(first, n + N // 2, n - N // 2)
    else:
        first = n % 2 == 0
        pair = n // 2
        partner = n ^ 1
    return pair, partner, tl.where(first, -1.0, 1.0), first


@triton.jit
def _bias_and_rotate(t, w, BIAS, h, r, n, partner, cos, sin, sign, R: tl.constexpr, N: tl.constexpr,
                     HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr):
    """(R, N) per-rank vectors ``t`` (float32; ``w`` holds each channel's rotation partner, read only with HAS_ROT)
    plus the head's (R, N) bias, channel pairs rotated by the head's angles."""
    if HAS_BIAS:
        t += tl.load(BIAS + (h * R + r[:, None]) * N + n[None, :]).to(tl.float32)
        if HAS_ROT:
            w += tl.load(BIAS + (h * R + r[:, None]) * N + partner[None, :]).to(tl.float32)
    if HAS_ROT:
        t = t * cos[None, :] + sign[None, :] * w * sin[None, :]
    return t


@triton.jit
def _rank_vectors(PTR, s_r, BIAS, h, r, n, partner, cos, sin, sign, R: tl.constexpr, N: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr):
    """(R, N) per-rank vectors plus the head's (R, N) bias, channel pairs rotated by the head's angles."""
    t = tl.load(PTR + r[:, None] * s_r + n[None, :]).to(tl.float32)
    w = t
    if HAS_ROT:
        w = tl.load(PTR + r[:, None] * s_r + partner[None, :]).to(tl.float32)
    return _bias_and_rotate(t, w, BIAS, h, r, n, partner, cos, sin, sign, R, N, HAS_BIAS, HAS_ROT)


@triton.jit
def _mimo_step_kernel(Q, K, X, A, DT, LAM, OMEGA, QB, KB, VR, D, ANGLE, SSM, KC, VC, Y,
                      H, S, heads_per_group, s_qb, s_qr, s_qg, s_xb, s_xh, s_ab, s_ah, s_ob,
                      R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, HALF: tl.constexpr,
                      HAS_QB: tl.constexpr, HAS_KB: tl.constexpr, HAS_VR: tl.constexpr, HAS_D: tl.constexpr,
                      HAS_ROT: tl.constexpr, ANGLE_DT: tl.constexpr):
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    g = h // heads_per_group
    n = tl.arange(0, N)
    r = tl.arange(0, R)
    pair, partner, sign, first = _rotation_pairs(n, N, HALF)
    a = tl.load(A + b * s_ab + h * s_ah).to(tl.float32)
    dt = tl.load(DT + b * s_ab + h * s_ah).to(tl.float32)
    lam = tl.load(LAM + b * s_ab + h * s_ah).to(tl.float32)
    cos = tl.full((N,), 1.0, tl.float32)
    sin = tl.zeros((N,), tl.float32)
    if HAS_ROT:
        pmask = pair < S
        om = tl.load(OMEGA + b * s_ob + pair, mask=pmask, other=0.0).to(tl.float32)
        if ANGLE_DT:
            om = om * dt
        theta = tl.load(ANGLE + (b * H + h) * S + pair, mask=pmask, other=0.0) + om
        theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
        tl.store(ANGLE + (b * H + h) * S + pair, theta, mask=pmask & first)
        cos, sin = tl.cos(theta), tl.sin(theta)
    q = _rank_vectors(Q + b * s_qb + g * s_qg, s_qr, QB, h, r, n, partner, cos, sin, sign, R, N, HAS_QB, HAS_ROT)
    k = _rank_vectors(K + b * s_qb + g * s_qg, s_qr, KB, h, r, n, partner, cos, sin, sign, R, N, HAS_KB, HAS_ROT)
    kc_ptr = KC + ((b * R + r[:, None]) * H + h) * N + n[None, :]  # (R, N) cached keys of the last token
    k_prev = tl.load(kc_ptr).to(tl.float32)
    alpha = tl.exp(a)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    d_skip = 0.0
    if HAS_D:
        d_skip = tl.load(D + h).to(tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        v = tl.load(X + b * s_xb + h * s_xh + p).to(tl.float32)  # (BP,)
        v_prev = tl.load(VC + (b * H + h) * P + p).to(tl.float32)
        scale = tl.full((R, BP), 1.0, tl.float32)
        if HAS_VR:
            scale = tl.load(VR + (h * R + r[:, None]) * P + p[None, :]).to(tl.float32)  # (R, BP)
        x, x_prev = scale * v[None, :], scale * v_prev[None, :]
        new = tl.sum(x[:, :, None] * k[:, None, :], axis=0)  # (BP, N) rank-summed outer products
        prev = tl.sum(x_prev[:, :, None] * k_prev[:, None, :], axis=0)
        ptr = SSM + ((b * H + h) * P + p[:, None]) * N + n[None, :]
        st = alpha * tl.load(ptr) + beta * prev + gamma * new
        tl.store(ptr, st)
        y = tl.sum(st[None, :, :] * q[:, None, :], axis=2) + d_skip * x  # (R, BP)
        tl.store(Y + ((b * R + r[:, None]) * H + h) * P + p[None, :], y.to(Y.dtype.element_ty))
        tl.store(VC + (b * H + h) * P + p, v.to(VC.dtype.element_ty))
    tl.store(kc_ptr, k.to(KC.dtype.element_ty))


def unsupported_reason(R: int, N: int, P: int) -> str | None:
    if R & (R - 1) or R > 8:
        return f"mimo_rank {R} is not 1, 2, 4 or 8"
    if N & (N - 1) or N < 16:
        return f"d_state {N} is not a power of two >= 16"
    if P & (P - 1) or P < 16:
        return f"headdim {P} is not a power of two >= 16"
    return None


def mamba3_mimo_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, dt: torch.Tensor,
                      lam: torch.Tensor, state: Mamba3State, omega: torch.Tensor | None = None, angle_dt: bool = True,
                      q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None,
                      v_rank: torch.Tensor | None = None, D: torch.Tensor | None = None,
                      pairing: str = "half") -> torch.Tensor:
    """One token through the fused MIMO step, updating ``state`` in place; returns y (B, R, H, P).

    omega (B, S) is the angle rate (multiplied by dt when ``angle_dt``); state tensors must be contiguous."""
    Bsz, R, G, N = q.shape
    H, P = v.shape[1:]
    reason = unsupported_reason(R, N, P)
    if reason is not None:
        raise ValueError(f"Mamba-3 MIMO step kernel: {reason}")
    S = 0 if omega is None else omega.shape[-1]
    q, k = q.contiguous(), k.contiguous()
    y = torch.empty(Bsz, R, H, P, device=v.device, dtype=v.dtype)
    om = omega if omega is not None else dt
    placeholder = dt
    # ~R x (BP, N) fp32 products live per row block: keep the block small as R grows
    BP = max(1, min(P, 64 // (R * max(1, N // 64))))
    _mimo_step_kernel[(Bsz, H)](
        q, k, v, log_decay, dt, lam, om, q_bias if q_bias is not None else placeholder,
        k_bias if k_bias is not None else placeholder, v_rank if v_rank is not None else placeholder,
        D if D is not None else placeholder, state.angle, state.ssm, state.k, state.v, y, H, S, H // G,
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), dt.stride(0), dt.stride(1),
        om.stride(0), R=R, N=N, P=P, BP=BP, HALF=pairing == "half", HAS_QB=q_bias is not None,
        HAS_KB=k_bias is not None, HAS_VR=v_rank is not None, HAS_D=D is not None, HAS_ROT=omega is not None,
        ANGLE_DT=angle_dt)
    return y
