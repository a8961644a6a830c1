"""Whole Mamba-3 mixer decode step (SISO or MIMO) between the two projections, as one Triton kernel.

A decode step of the layer is ``in_proj`` -> [BCNorm, dt / decay / trapezoid gate / angle rate, biases,
rotation, state update, readout, D skip, SiLU gate, MIMO contraction] -> ``out_proj``. At batch 1 the middle
part is about twenty small kernels even after torch.compile; here it is one. One program owns one
(sequence, head): it reads its slices of the ``in_proj`` row, normalises its group's B and C per rank (every
head of the group repeats that, N values each), advances the head's angles, rotates q and k, streams the
(P, N) state through in (BP, N) row blocks, and writes the gated output row that ``out_proj`` reads. The
state is read and written once whatever the rank R: MIMO adds R-fold FLOPs in registers, not traffic. The
cache (angle, ssm, k, v) is updated in place with static shapes, so the step can be captured in a CUDA graph.

Same math as ``layers/mamba3.py`` (``ssm_inputs``, ``gate_output``) and ``naive.mamba3_step``; the layer's
eager path is the oracle in the tests. Rounding follows the eager layer: B and C are rounded to the
activation type after their norm, y before the gate, and MIMO's scaled gate and per-rank products before
the sum over ranks.

Supported: SISO and MIMO (rank 1, 2, 4, 8), any rotation kind, learned / fixed trapezoid, both A activations,
with or without BCNorm and B/C biases, no output norm (the layer falls back to its usual step otherwise).
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from hybrid.kernels.mamba3.common import Mamba3State
from hybrid.kernels.mamba3.triton_mimo_step import _bias_and_rotate, _rotation_pairs

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
def _rank_vectors(ROW, off, r, g, G, n, partner, NORM_W, BIAS, h, cos, sin, sign, eps, R: tl.constexpr, N: tl.constexpr,
                  BC_NORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ROT: tl.constexpr, dtype: tl.constexpr):
    """The head's B or C for every rank, (R, N) float32: RMS-normalised with its gain and rounded to the activation
    type as the eager layer does, plus the head's bias, channel pairs rotated by the head's angles (cos, sin)."""
    base = ROW + off + (r[:, None] * G + g) * N
    v = tl.load(base + n[None, :]).to(tl.float32)
    w = v
    if HAS_ROT:
        w = tl.load(base + partner[None, :]).to(tl.float32)
    if BC_NORM:
        inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=1) / N + eps)  # (R,)
        v = (v * inv[:, None] * tl.load(NORM_W + n)[None, :].to(tl.float32)).to(dtype).to(tl.float32)
        if HAS_ROT:
            w = (w * inv[:, None] * tl.load(NORM_W + partner)[None, :].to(tl.float32)).to(dtype).to(tl.float32)
    return _bias_and_rotate(v, w, BIAS, h, r, n, partner, cos, sin, sign, R, N, HAS_BIAS, HAS_ROT)


@triton.jit
def _mixer_step_kernel(PROJ, DT_BIAS, D, B_NORM_W, C_NORM_W, B_BIAS, C_BIAS, ROPE, MIMO_X, MIMO_Z, MIMO_O,
                       ANGLE, SSM, KC, VC, OUT, READERS, s_proj, s_out, H, G, S, heads_per_group, d_inner,
                       off_b, off_c, off_dt, off_a, off_lam, off_th, eps, a_floor, lam_fixed,
                       R: tl.constexpr, N: tl.constexpr, P: tl.constexpr, BP: tl.constexpr, SPLIT: tl.constexpr,
                       HALF: tl.constexpr, MIMO: tl.constexpr, BC_NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
                       HEAVY_TAIL: tl.constexpr, LEARNED_LAM: tl.constexpr, ROTATION: tl.constexpr,
                       DOT16: tl.constexpr, RK: tl.constexpr):
    """ROTATION: 0 none, 1 data-dependent (pi tanh(u_theta) scaled by dt), 2 data-independent (fixed rates).
    HALF pairs channels (i, i + N/2) (MIMO), else (2i, 2i + 1) (SISO). MIMO: per-rank scales of x, z and the output.
    DOT16 (MIMO with a 16-bit state): the rank-summed update and the readout are two tensor-core products in the
    state's type, over RK = 16 rank slots (rows j hold rank j % R: the R previous keys, the R current keys, zeros).

    SPLIT programs share a (sequence, head), each with P / SPLIT of its state rows: at batch 1 one program per head
    leaves most SMs idle. They all read the head's angle and cached keys, so those are rewritten only once every
    program has read them: each counts itself in on READERS (B, H) after its reads, and the last to arrive writes
    the new values and resets the count (the values are the same whichever program writes them)."""
    b, h, part = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
    g = h // heads_per_group
    row = PROJ + b * s_proj
    dtype = OUT.dtype.element_ty
    n = tl.arange(0, N)
    slot = tl.arange(0, RK)
    r = slot % R  # the rank each of the RK slots holds (RK = R unless DOT16)
    # The first state block is loaded before the prologue (dependent loads and reductions) so the two overlap.
    PART: tl.constexpr = P // SPLIT  # state rows of this program: [first_row, first_row + PART)
    first_row = part * PART
    rows = first_row + tl.arange(0, BP)
    ssm = SSM + (b * H + h) * P * N
    st_next = tl.load(ssm + rows[:, None] * N + n[None, :])
    pair, partner, sign, first = _rotation_pairs(n, N, HALF)

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

    cos = tl.full((N,), 1.0, tl.float32)
    sin = tl.zeros((N,), tl.float32)
    if ROTATION != 0:
        pmask = pair < S
        if ROTATION == 1:
            u = tl.load(row + off_th + pair, mask=pmask, other=0.0).to(tl.float32)
            inc = 3.141592653589793 * (2.0 * tl.sigmoid(2.0 * u) - 1.0) * dt  # pi tanh(u) dt
        else:
            inc = tl.load(ROPE + pair, mask=pmask, other=0.0).to(tl.float32)
        theta = tl.load(ANGLE + (b * H + h) * S + pair, mask=pmask, other=0.0) + inc
        theta = theta - 6.283185307179586 * tl.floor(theta / 6.283185307179586)
        if SPLIT == 1:  # the one program of the head owns its angle (a split writes it at the end)
            tl.store(ANGLE + (b * H + h) * S + pair, theta, mask=pmask & first)
        cos, sin = tl.cos(theta), tl.sin(theta)
    q = _rank_vectors(row, off_c, r, g, G, n, partner, C_NORM_W, C_BIAS, h, cos, sin, sign, eps, R, N, BC_NORM, HAS_BIAS,
                      ROTATION != 0, dtype)  # (R, N)
    k = _rank_vectors(row, off_b, r, g, G, n, partner, B_NORM_W, B_BIAS, h, cos, sin, sign, eps, R, N, BC_NORM, HAS_BIAS,
                      ROTATION != 0, dtype)
    kc = KC + ((b * R + r[:, None]) * H + h) * N + n[None, :]  # (R, N) cached keys of the last token
    k_prev = tl.load(kc).to(tl.float32)
    if not MIMO:  # SISO: plain (N,) vectors and (BP, N) tiles
        q1, k1, k_prev1 = tl.sum(q, axis=0), tl.sum(k, axis=0), tl.sum(k_prev, axis=0)
    if DOT16:  # the products' operands, once per program: keys (RK, N) and queries (N, RK)
        keys16 = tl.where(slot[:, None] < R, k_prev, tl.where(slot[:, None] < 2 * R, k, 0.0)).to(SSM.dtype.element_ty)
        q_t16 = tl.trans(tl.where(slot[:, None] < R, q, 0.0).to(SSM.dtype.element_ty))

    alpha = tl.exp(a)
    beta = (1.0 - lam) * dt * alpha
    gamma = lam * dt
    d_skip = tl.load(D + h).to(tl.float32)
    for p0 in range(0, PART, BP):
        p = p0 + rows
        st_old = st_next.to(tl.float32)
        if BP < PART:  # the next block's load is in flight during this block's math (none after the last)
            nxt = p + BP
            st_next = tl.load(ssm + nxt[:, None] * N + n[None, :], mask=(nxt < first_row + PART)[:, None], other=0.0)
        x = tl.load(row + d_inner + h * P + p).to(tl.float32)
        z = tl.load(row + h * P + p).to(tl.float32)
        x_prev = tl.load(VC + (b * H + h) * P + p).to(tl.float32)
        if DOT16:  # (BP, RK) tiles: slot j of row p holds rank j % R
            scale = tl.load(MIMO_X + (h * R + r[None, :]) * P + p[:, None]).to(tl.float32)
            coef = tl.where(slot[None, :] < R, beta * x_prev[:, None],
                            tl.where(slot[None, :] < 2 * R, gamma * x[:, None], 0.0)) * scale
            st = alpha * st_old + tl.dot(coef.to(SSM.dtype.element_ty), keys16)
            y = (tl.dot(st.to(SSM.dtype.element_ty), q_t16) + d_skip * scale * x[:, None]).to(dtype).to(tl.float32)
            zr = (z[:, None] * tl.load(MIMO_Z + (h * R + r[None, :]) * P + p[:, None]).to(tl.float32)).to(dtype)
            zr = zr.to(tl.float32)
            o = (y * (zr * tl.sigmoid(zr)).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            o = (o * tl.load(MIMO_O + (h * R + r[None, :]) * P + p[:, None]).to(tl.float32)).to(dtype).to(tl.float32)
            out = tl.sum(tl.where(slot[None, :] < R, o, 0.0), axis=1)
        elif MIMO:
            scale = tl.load(MIMO_X + (h * R + r[:, None]) * P + p[None, :]).to(tl.float32)  # (R, BP)
            # rank-summed outer products of the previous and the current token: (R, BP, N) summed over R
            upd = (beta * scale * x_prev[None, :])[:, :, None] * k_prev[:, None, :] \
                + (gamma * scale * x[None, :])[:, :, None] * k[:, None, :]
            st = alpha * st_old + tl.sum(upd, axis=0)
            y = (tl.sum(st[None, :, :] * q[:, None, :], axis=2) + d_skip * scale * x[None, :]).to(dtype).to(tl.float32)
            # gate per rank, then the contraction over ranks (rounded as the eager layer)
            zr = (z[None, :] * tl.load(MIMO_Z + (h * R + r[:, None]) * P + p[None, :]).to(tl.float32)).to(dtype)
            zr = zr.to(tl.float32)
            o = (y * (zr * tl.sigmoid(zr)).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            o = (o * tl.load(MIMO_O + (h * R + r[:, None]) * P + p[None, :]).to(tl.float32)).to(dtype).to(tl.float32)
            out = tl.sum(o, axis=0)
        else:
            st = alpha * st_old + (beta * x_prev)[:, None] * k_prev1[None, :] + (gamma * x)[:, None] * k1[None, :]
            y = (tl.sum(st * q1[None, :], axis=1) + d_skip * x).to(dtype).to(tl.float32)
            out = y * (z * tl.sigmoid(z)).to(dtype).to(tl.float32)
        tl.store(ssm + p[:, None] * N + n[None, :], st.to(SSM.dtype.element_ty))
        tl.store(OUT + b * s_out + h * P + p, out.to(dtype))
        tl.store(VC + (b * H + h) * P + p, x.to(VC.dtype.element_ty))
    if SPLIT > 1:  # acq_rel: this program's reads of the angle and keys happen before the last arrival's writes
        arrived = tl.atomic_add(READERS + b * H + h, 1, sem="acq_rel")
        tl.store(READERS + b * H + h, 0, mask=arrived == SPLIT - 1)
        # (the count is broadcast before the comparison: the interpreter cannot `and` a tensor mask with a scalar)
        if ROTATION != 0:
            tl.store(ANGLE + (b * H + h) * S + pair, theta, mask=pmask & first & (pair * 0 + arrived == SPLIT - 1))
        last = (slot[:, None] * 0 + n[None, :] * 0 + arrived) == SPLIT - 1
        if DOT16:  # only the first R of the RK slots are real ranks
            last = last & (slot[:, None] < R)
        tl.store(kc, k.to(KC.dtype.element_ty), mask=last)
    elif DOT16:  # only the first R of the RK slots are real ranks
        tl.store(kc, k.to(KC.dtype.element_ty), mask=(slot[:, None] < R) & (n[None, :] < N))
    else:
        tl.store(kc, k.to(KC.dtype.element_ty))


# HYBRID_MIMO_DOT16=0 keeps the plain MIMO path for 16-bit states too (A/B runs)
MIMO_DOT16 = os.environ.get("HYBRID_MIMO_DOT16", "1") != "0"


def unsupported_reason(d_state: int, headdim: int, rank: int, outproj_norm: bool) -> str | None:
    """Why the fused mixer step cannot run a layer, or None."""
    if outproj_norm:
        return "the fused mixer step has no output norm"
    if rank < 1 or rank & (rank - 1) or rank > 8:
        return f"mimo_rank must be 1, 2, 4 or 8, got {rank}"
    if d_state < 2 or d_state & (d_state - 1) or headdim < 1 or headdim & (headdim - 1):
        return f"d_state and headdim must be powers of two, got {d_state} and {headdim}"
    return None


def launch_config(programs: int, headdim: int, rank: int) -> tuple[int, int, int]:
    """(state rows per block, warps, programs per (sequence, head)) of the step kernel for ``programs`` = batch x
    heads, from ``scripts/sweep_mixer_step.py`` on an H100 (``docs/reports/mixer_step_sweep_h100_v3.json``, the same
    pick for fp32 and bf16 states; the row split from ``_v4.json``, batch 1: MIMO-4 10.9 -> 5.5 us, SISO 4.6 -> 4.5)."""
    if programs < 512:  # a few programs per SM: latency-bound, so split the heads' rows over more programs
        if rank == 1:
            split = max(1, min(headdim // 16, 128 // programs))
            return (8, 4, split) if split > 1 else (min(headdim, 32), 4, 1)
        split = max(1, min(headdim // 8, 256 // programs))  # MIMO's rows carry R-fold work: split finer
        return (headdim // split, 2, split) if split > 1 else (min(headdim, 64), 8, 1)
    return min(headdim, 8), 1, 1  # bandwidth-bound: many small programs


def tensor_core_default(headdim: int, rank: int, state_dtype: torch.dtype) -> bool:
    """Whether a MIMO step runs its update and readout as tensor-core products by default: with a 16-bit state (the
    operands are rounded to the state's type, which the state is anyway) and headdims of 16 or more (the product's
    rows). Measured on an H100, MIMO-4, bf16 state, kernel alone: batch 1 (32 programs) 5.5 -> 4.8 us, batch 16
    (512) 17.5 -> 9.6 us (``docs/reports/mixer_step_sweep_h100_v7.json``), Table 6 (8192) 195 -> 136 us (``_v6``)."""
    return MIMO_DOT16 and rank > 1 and state_dtype in (torch.bfloat16, torch.float16) and headdim >= 16


def tensor_core_config(programs: int, headdim: int) -> tuple[int, int, int]:
    """(state rows per block, warps, programs per head) of the tensor-core MIMO step, from the same sweeps: whole
    heads of up to 64 rows per program while programs are few, 16-row single-warp programs when they are many."""
    if programs < 256:
        return min(headdim, 64), 4, 1
    if programs < 2048:
        return min(headdim, 64), 2, 1
    return 16, 1, 1


def mamba3_mixer_step_(proj: torch.Tensor, state: Mamba3State, *, d_inner: int, heads: int, groups: int, d_state: int,
                       headdim: int, n_angles: int, dt_bias: torch.Tensor, D: torch.Tensor,
                       B_norm_weight: torch.Tensor | None, C_norm_weight: torch.Tensor | None,
                       B_bias: torch.Tensor | None, C_bias: torch.Tensor | None, rope_freq: torch.Tensor | None,
                       eps: float, A_floor: float, a_activation: str, trapezoid: str, rotation: str, rank: int = 1,
                       mimo_x: torch.Tensor | None = None, mimo_z: torch.Tensor | None = None,
                       mimo_o: torch.Tensor | None = None, pairing: str = "interleaved", out: torch.Tensor | None = None,
                       readers: torch.Tensor | None = None, block_rows: int | None = None, num_warps: int | None = None,
                       row_split: int | None = None, dot16: bool | None = None) -> torch.Tensor:
    """One decode step of a Mamba-3 mixer (SISO, or MIMO of rank R) from its ``in_proj`` row to the gated row
    ``out_proj`` reads.

    proj (B, D_proj) with unit stride on the last axis, laid out z, x (H, P), B, C (R, G, N), u_dt, u_A, [u_lam],
    [u_theta] as the layer splits it; state: the layer's cache (angle (B, H, S) fp32, ssm (B, H, P, N), k (B, R, H, N),
    v (B, H, P)), updated in place; B_bias / C_bias (H, R, N); MIMO's per-rank scales mimo_x / mimo_z / mimo_o
    (H, R, P), or None for SISO. ``pairing`` "interleaved" rotates channels (2i, 2i + 1) (the layer's SISO),
    "half" (i, i + N/2) (its MIMO). ``readers`` (B, H) int32 zeros, kept with the cache (``Mamba3Cache.readers``), lets
    several programs share a head (``row_split``); without it each head is one program. Returns (B, H * P) in proj's
    dtype (into ``out``). ``block_rows`` / ``num_warps`` / ``row_split`` override ``launch_config``.
    """
    Bsz = proj.shape[0]
    H, P, N, G, S, R = heads, headdim, d_state, groups, n_angles, rank
    if proj.stride(-1) != 1:
        raise ValueError("proj must have a unit stride on its last axis")
    mimo = mimo_x is not None
    if mimo and (mimo_z is None or mimo_o is None) or R > 1 and not mimo:
        raise ValueError("a MIMO step needs all three of the mimo_x, mimo_z and mimo_o scales")
    y = torch.empty(Bsz, H * P, device=proj.device, dtype=proj.dtype) if out is None else out
    off_b = 2 * d_inner
    off_c = off_b + R * G * N
    off_dt = off_c + R * G * N
    off_a = off_dt + H
    off_lam = off_a + H
    off_th = off_lam + (H if trapezoid == "learned" else 0)
    # MIMO with a 16-bit state: update and readout as tensor-core products (blocks of 16 rows at least)
    # (``dot16=True`` forces it whatever the state's type: the CPU tests check the path in fp32)
    if dot16 is None:
        dot16 = tensor_core_default(P, R, state.ssm.dtype)
    dot16 = dot16 and mimo
    bp, warps, split = tensor_core_config(Bsz * H, P) if dot16 else launch_config(Bsz * H, P, R)
    bp, warps, split = block_rows or bp, num_warps or warps, (row_split or split) if readers is not None else 1
    if P % split or bp > P // split:
        raise ValueError(f"{split} programs per head cannot share {P} state rows in blocks of {bp}")
    if readers is not None and (readers.shape != (Bsz, H) or readers.dtype != torch.int32):
        raise ValueError(f"readers must be a (B, H) = {(Bsz, H)} int32 tensor, got {readers.dtype} {tuple(readers.shape)}")
    if dot16:
        bp = max(bp, 16)
        if bp > P // split:
            raise ValueError(f"the MIMO tensor-core step needs 16 state rows per program, got {P // split}")
    dummy = dt_bias

    def arg(t):
        return t if t is not None else dummy

    _mixer_step_kernel[(Bsz, H, split)](
        proj, dt_bias, D, arg(B_norm_weight), arg(C_norm_weight), arg(B_bias), arg(C_bias), arg(rope_freq),
        arg(mimo_x), arg(mimo_z), arg(mimo_o), state.angle, state.ssm, state.k, state.v, y, arg(readers), proj.stride(0),
        y.stride(0), H, G, S, H // G, d_inner, off_b, off_c, off_dt, off_a, off_lam, off_th, eps, A_floor,
        0.5 if trapezoid == "half" else 1.0,
        R=R, N=N, P=P, BP=bp, SPLIT=split, HALF=pairing == "half", MIMO=mimo, BC_NORM=B_norm_weight is not None,
        HAS_BIAS=B_bias is not None,
        HEAVY_TAIL=a_activation == "heavy_tail", LEARNED_LAM=trapezoid == "learned",
        ROTATION={"none": 0, "data_dependent": 1, "data_independent": 2}[rotation] if S else 0,
        DOT16=dot16, RK=16 if dot16 else R, num_warps=warps)
    return y
