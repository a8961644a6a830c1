"""Whole Mamba-3 SISO mixer decode step between the two projections, as one Triton kernel.

A decode step of the layer is ``in_proj`` -> [BCNorm, dt / decay / trapezoid gate / angle rate, biases,
rotation, state update, readout, D skip, SiLU gate] -> ``out_proj``. At batch 1 the middle part is about
twenty small kernels even after torch.compile; here it is one. One program owns one (sequence, head): it
reads its slices of the ``in_proj`` row, normalises its group's B and C (every head of the group repeats
that, N values), advances the head's angles, rotates q and k, streams the (P, N) state through in (BP, N)
row blocks, and writes the gated output row that ``out_proj`` reads. The cache (angle, ssm, k, v) is
updated in place with static shapes, so the step can be captured in a CUDA graph.

Same math as ``layers/mamba3.py`` (``ssm_inputs``, ``gate_output``) and ``naive.mamba3_step``; the layer's
eager path is the oracle in the tests. Rounding follows the eager layer: B and C are rounded to the
activation type after their norm, y before the gate.

Supported: SISO (interleaved pairing), any rotation kind, learned / fixed trapezoid, both A activations,
with or without BCNorm and B/C biases, no output norm (the layer falls back to its usual step otherwise).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from hybrid.kernels.mamba3.common import Mamba3State

TWO_PI = 2 * math.pi


@triton.jit
def _log1p(t):
    """log(1 + t) for t >= 0 without losing small t (no log1p in tl)."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * t / (u - 1.0))


@triton.jit
def _softplus(x):
    """F.softplus (beta 1, threshold 20)."""
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x))))


@triton.jit
def _bc_vector(ROW, off, n, partner, NORM_W, BIAS, h, eps, N: tl.constexpr, BC_NORM: tl.constexpr,
               HAS_BIAS: tl.constexpr, dtype: tl.constexpr):
    """The head's B or C (channel n and its rotation partner): RMS-normalised with its gain, rounded to the
    activation type as the eager layer does, plus the head's bias; float32."""
    v = tl.load(ROW + off + n).to(tl.float32)
    w = tl.load(ROW + off + partner).to(tl.float32)
    if BC_NORM:
        inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / N + eps)
        v = (v * inv * tl.load(NORM_W + n).to(tl.float32)).to(dtype).to(tl.float32)
        w = (w * inv * tl.load(NORM_W + partner).to(tl.float32)).to(dtype).to(tl.float32)
    if HAS_BIAS:
        v += tl.load(BIAS + h * N + n).to(tl.float32)
        w += tl.load(BIAS + h * N + partner).to(tl.float32)
    return v, w


@triton.jit
def _mixer_step_kernel(PROJ, DT_BIAS, D, B_NORM_W, C_NORM_W, B_BIAS, C_BIAS, ROPE, ANGLE, SSM, KC, VC, OUT,
                       s_proj, s_out, H, S, heads_per_group, d_inner, off_b, off_c, off_dt, off_a, off_lam, off_th,
                       eps, a_floor, lam_fixed,
                       N: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, BC_NORM: tl.constexpr,
                       HAS_BIAS: tl.constexpr, HEAVY_TAIL: tl.constexpr, LEARNED_LAM: tl.constexpr,
                       ROTATION: tl.constexpr):
    """ROTATION: 0 none, 1 data-dependent (pi tanh(u_theta) scaled by dt), 2 data-independent (fixed rates)."""
    b, h = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    g = h // heads_per_group
    row = PROJ + b * s_proj
    dtype = OUT.dtype.element_ty
    n = tl.arange(0, N)
    partner = n ^ 1
    q, q_partner = _bc_vector(row, off_c + g * N, n, partner, C_NORM_W, C_BIAS, h, eps, N, BC_NORM, HAS_BIAS, dtype)
    k, k_partner = _bc_vector(row, off_b + g * N, n, partner, B_NORM_W, B_BIAS, h, eps, N, BC_NORM, HAS_BIAS, dtype)

    dt = _softplus(tl.load(row + off_dt + h).to(tl.float32) + tl.load(DT_BIAS + h).to(tl.float32))
    u_a = tl.load(row + off_a + h).to(tl.float32)
    if HEAVY_TAIL:  # phi(u) = 1 + u above 0, 1 / (1 - u) below
        phi = tl.where(u_a >= 0, 1.0 + u_a, 1.0 / (1.0 - tl.minimum(u_a, 0.0)))
    else:
        phi = _softplus(u_a)
    a = tl.minimum(-phi, -a_floor) * dt
    if LEARNED_LAM:
        lam = tl.sigmoid(tl.load(row + off_lam + h).to(tl.float32))
    else:
        lam = lam_fixed

    if ROTATION != 0:
        pair = n // 2
        pmask = pair < S
        if ROTATION == 1:
            u = tl.load(row + off_th + pair, mask=pmask, other=0.0).to(tl.float32)
            inc = 3.141592653589793 * (2.0 * tl.sigmoid(2.0 * u) - 1.0) * dt  # pi tanh(u) dt
        else:
            inc = tl.load(ROPE + pair, mask=pmask, other=0.0).to(tl.float32)
        theta = tl.load(ANGLE + (b * H + h) * S + pair, mask=pmask, other=0.0) + inc
        theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
        tl.store(ANGLE + (b * H + h) * S + pair, theta, mask=pmask & (n % 2 == 0))
        cos, sin = tl.cos(theta), tl.sin(theta)
        sign = tl.where(n % 2 == 0, -1.0, 1.0)  # (2i, 2i+1) -> (e c - o s, e s + o c)
        q = q * cos + sign * q_partner * sin
        k = k * cos + sign * k_partner * sin

    k_prev = tl.load(KC + (b * H + h) * N + n).to(tl.float32)
    alpha = tl.exp(a)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    d_skip = tl.load(D + h).to(tl.float32)
    for p0 in range(0, P, BP):
        p = p0 + tl.arange(0, BP)
        x = tl.load(row + d_inner + h * P + p).to(tl.float32)
        z = tl.load(row + h * P + p).to(tl.float32)
        x_prev = tl.load(VC + (b * H + h) * P + p).to(tl.float32)
        ptr = SSM + ((b * H + h) * P + p[:, None]) * N + n[None, :]
        st = alpha * tl.load(ptr).to(tl.float32) + beta * x_prev[:, None] * k_prev[None, :] + gamma * x[:, None] * k[None, :]
        tl.store(ptr, st.to(SSM.dtype.element_ty))
        y = (tl.sum(st * q[None, :], axis=1) + d_skip * x).to(dtype).to(tl.float32)
        gate = (z * tl.sigmoid(z)).to(dtype).to(tl.float32)
        tl.store(OUT + b * s_out + h * P + p, (y * gate).to(dtype))
        tl.store(VC + (b * H + h) * P + p, x.to(VC.dtype.element_ty))
    tl.store(KC + (b * H + h) * N + n, k.to(KC.dtype.element_ty))


def unsupported_reason(d_state: int, headdim: int, mimo: bool, outproj_norm: bool) -> str | None:
    """Why the fused mixer step cannot run a layer, or None."""
    if mimo:
        return "the fused mixer step is SISO only"
    if outproj_norm:
        return "the fused mixer step has no output norm"
    if d_state < 2 or d_state & (d_state - 1) or headdim < 1 or headdim & (headdim - 1):
        return f"d_state and headdim must be powers of two, got {d_state} and {headdim}"
    return None


def mamba3_mixer_step_(proj: torch.Tensor, state: Mamba3State, *, d_inner: int, heads: int, groups: int, d_state: int,
                       headdim: int, n_angles: int, dt_bias: torch.Tensor, D: torch.Tensor,
                       B_norm_weight: torch.Tensor | None, C_norm_weight: torch.Tensor | None,
                       B_bias: torch.Tensor | None, C_bias: torch.Tensor | None, rope_freq: torch.Tensor | None,
                       eps: float, A_floor: float, a_activation: str, trapezoid: str, rotation: str,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step of a SISO Mamba-3 mixer from its ``in_proj`` row to the gated row ``out_proj`` reads.

    proj (B, D_proj) with unit stride on the last axis, laid out z, x, B, C, u_dt, u_A, [u_lam], [u_theta] as
    the layer splits it; state: the layer's cache (angle (B, H, S) fp32, ssm (B, H, P, N), k (B, 1, H, N),
    v (B, H, P)), updated in place; B_bias / C_bias (H, N). Returns (B, H * P) in proj's dtype (into ``out``).
    """
    Bsz = proj.shape[0]
    H, P, N, G, S = heads, headdim, d_state, groups, n_angles
    if proj.stride(-1) != 1:
        raise ValueError("proj must have a unit stride on its last axis")
    y = torch.empty(Bsz, H * P, device=proj.device, dtype=proj.dtype) if out is None else out
    off_b = 2 * d_inner
    off_c = off_b + G * N
    off_dt = off_c + G * N
    off_a = off_dt + H
    off_lam = off_a + H
    off_th = off_lam + (H if trapezoid == "learned" else 0)
    dummy = dt_bias
    _mixer_step_kernel[(Bsz, H)](
        proj, dt_bias, D, B_norm_weight if B_norm_weight is not None else dummy,
        C_norm_weight if C_norm_weight is not None else dummy, B_bias if B_bias is not None else dummy,
        C_bias if C_bias is not None else dummy, rope_freq if rope_freq is not None else dummy,
        state.angle, state.ssm, state.k, state.v, y, proj.stride(0), y.stride(0), H, S, H // G, d_inner,
        off_b, off_c, off_dt, off_a, off_lam, off_th, eps, A_floor, 0.5 if trapezoid == "half" else 1.0,
        N=N, P=P, BP=min(P, 16), BC_NORM=B_norm_weight is not None, HAS_BIAS=B_bias is not None,
        HEAVY_TAIL=a_activation == "heavy_tail", LEARNED_LAM=trapezoid == "learned",
        ROTATION={"none": 0, "data_dependent": 1, "data_independent": 2}[rotation] if S else 0)
    return y
