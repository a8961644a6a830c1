"""Gluon (Hopper) versions of the SISO scan's two forward chunk kernels, ``_chunk_state_fwd`` and ``_chunk_scan_fwd``,
for plain sequences: same inputs, outputs, grid and math as the Triton kernels in ``triton_siso.py`` (the formulas
are there), which stay the reference, the CPU-tested path and the fallback for packed documents.

Built as the backward's Gluon kernels (``gluon_siso_bwd.py``, where they took a fifth off dq and dk on an H100): the
input tiles go to shared memory by cp.async at the program's start, q and k are biased and rotated once, in place,
and every product is a warpgroup MMA reading shared memory, the MMA transposing its operands itself.
"""

from __future__ import annotations

import os

from hybrid.kernels.mamba3 import gluon_common
from hybrid.kernels.mamba3.gluon_common import _add, _cos_sin, _nvmma, _scan_layout, _tile_layout
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma


@gluon.jit
def _program(HEADS_FIRST: gl.constexpr):
    """(chunk c, b * H + h) of this program, as ``triton_siso._chunk_and_head``."""
    if HEADS_FIRST:
        pid = gl.program_id(1).to(gl.int64) * gl.num_programs(0) + gl.program_id(0)
        c = pid // gl.num_programs(1)
        bh = pid % gl.num_programs(1)
    else:
        c = gl.program_id(0).to(gl.int64)
        bh = gl.program_id(1).to(gl.int64)
    return c, bh


@gluon.jit
def _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C: gl.constexpr, VEC: gl.constexpr):
    """Per-token coefficients of one chunk (as ``triton_siso._chunk_coeffs``, plain sequences): cumulative
    log-decay, key weight scale (gamma + the next token's beta'), gamma, dt, and the tokens' mask."""
    tv = c * C + gl.arange(0, C, layout=VEC)
    tvm = tv < T
    coef = b * s_ab + tv * s_at + h * s_ah
    a = gl.load(A + coef, mask=tvm, other=0.0).to(gl.float32)
    dt = gl.load(DT + coef, mask=tvm, other=0.0).to(gl.float32)
    lam = gl.load(LAM + coef, mask=tvm, other=0.0).to(gl.float32)
    nmask = (tv + 1) < T
    dtn = gl.load(DT + coef + s_at, mask=nmask, other=0.0).to(gl.float32)
    lamn = gl.load(LAM + coef + s_at, mask=nmask, other=1.0).to(gl.float32)
    gamma = lam * dt
    return gl.associative_scan(a, 0, _add), gamma + dtn * (1.0 - lamn), gamma, dt, tvm


@gluon.jit
def _rotate_block(E_S, O_S, BIAS, OMEGA, THETA_OFF, dt, b, h, c, state, T, S, s_ob, s_ot, j, ROT: gl.constexpr,
                  HAS_BIAS: gl.constexpr, ANGLE_DT: gl.constexpr, N: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr,
                  C: gl.constexpr, LAYOUT: gl.constexpr, SC: gl.constexpr):
    """One column block's even / odd tiles (C, NB) from shared memory, biased and (ROT) rotated by the tokens'
    cumulative angles, in fp32 registers of ``LAYOUT``; also cos and sin (meaningless without ROT)."""
    nb = j * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, LAYOUT))
    e = E_S.load(LAYOUT).to(gl.float32)
    o = O_S.load(LAYOUT).to(gl.float32)
    if HAS_BIAS:
        e += gl.load(BIAS + h * N + nb).to(gl.float32)[None, :]
        o += gl.load(BIAS + h * N + N2 + nb).to(gl.float32)[None, :]
    cos = e
    sin = o
    if ROT:
        ts = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, SC))
        ns = j * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, SC))
        sm = ns < S
        om = gl.load(OMEGA + b * s_ob + ts[:, None] * s_ot + ns[None, :], mask=(ts < T)[:, None] & sm[None, :],
                     other=0.0).to(gl.float32)
        if ANGLE_DT:
            om = om * gl.convert_layout(dt, gl.SliceLayout(1, SC))[:, None]
        theta = gl.associative_scan(om, 0, _add) + gl.load(THETA_OFF + state * S + ns, mask=sm, other=0.0)[None, :]
        cos, sin = _cos_sin(gl.convert_layout(theta, LAYOUT))
        e, o = e * cos - o * sin, e * sin + o * cos
    return e, o, cos, sin


@gluon.jit
def _chunk_state_fwd_gluon(K, X, A, DT, LAM, OMEGA, KB, THETA_OFF, LOCAL, CS_LAST,
                           T, H, S, nc, heads_per_group,
                           s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot,
                           C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                           ROT_BLOCKS: gl.constexpr, HAS_KB: gl.constexpr, ANGLE_DT: gl.constexpr,
                           HEADS_FIRST: gl.constexpr, num_warps: gl.constexpr):
    """Local state of chunk c as if it started from zero, x^T (k_rot * w_end) per column block, and cs_last."""
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = X.dtype.element_ty
    ACC_B: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, NB, 16])
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)

    c, bh = _program(HEADS_FIRST)
    b = bh // H
    h = bh % H
    g = h // heads_per_group
    state = (b * nc + c) * H + h

    x_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    tp = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, LD_P))
    pp = gl.arange(0, P, layout=gl.SliceLayout(0, LD_P))
    async_copy.async_copy_global_to_shared(x_s, X + b * (s_xb8 * 8) + tp[:, None] * (s_xt8 * 8) + h * s_xh + pp[None, :],
                                           mask=(tp < T)[:, None])
    tb = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, LD_B))
    k_rows = K + b * s_kb + g * s_kg + tb[:, None] * s_kt + gl.arange(0, NB, layout=gl.SliceLayout(0, LD_B))[None, :]
    for i in gl.static_range(2 * NBLK):
        async_copy.async_copy_global_to_shared(k_s.index(i), k_rows + (i // NBLK) * N2 + (i % NBLK) * NB,
                                               mask=(tb < T)[:, None])
    async_copy.commit_group()

    cs, scale, gamma, dt, tvm = _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C, VEC)
    cs_last = gl.min(cs, axis=0)  # log_decay <= 0 and padding adds 0: the last token's cumulative decay
    w_end = gl.convert_layout(gl.where(tvm, gl.exp(cs_last - cs) * scale, 0.0), gl.SliceLayout(1, ACC_B))

    kw_s = gl.allocate_shared_memory(dtype, [2, C, NB], _nvmma([C, NB], dtype))
    pr = gl.arange(0, P, layout=gl.SliceLayout(1, ACC_B))
    local_rows = LOCAL + state * P * N + pr[:, None] * N
    zero = gl.zeros([P, NB], gl.float32, ACC_B)
    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        kE, kO, cos, sin = _rotate_block(k_s.index(j), k_s.index(NBLK + j), KB, OMEGA, THETA_OFF, dt, b, h, c, state, T,
                                         S, s_ob, s_ot, j, j < ROT_BLOCKS, HAS_KB, ANGLE_DT, N, N2, NB, C, ACC_B, SC)
        kw_s.index(0).store((kE * w_end[:, None]).to(dtype))
        kw_s.index(1).store((kO * w_end[:, None]).to(dtype))
        gl.thread_barrier()
        fence_async_shared()
        nb = j * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, ACC_B))
        localE = warpgroup_mma(x_s.permute((1, 0)), kw_s.index(0), zero, use_acc=False)  # (P, NB)
        gl.store(local_rows + nb[None, :], localE.to(LOCAL.dtype.element_ty))
        localO = warpgroup_mma(x_s.permute((1, 0)), kw_s.index(1), zero, use_acc=False)
        gl.store(local_rows + N2 + nb[None, :], localO.to(LOCAL.dtype.element_ty))
        gl.thread_barrier()  # the next block overwrites kw_s
    gl.store(CS_LAST + state, cs_last)


@gluon.jit
def _chunk_scan_fwd_gluon(Q, K, X, A, DT, LAM, OMEGA, QB, KB, D, THETA_OFF, G_IN, Y,
                          T, H, S, nc, heads_per_group,
                          s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot,
                          C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                          ROT_BLOCKS: gl.constexpr, HAS_QB: gl.constexpr, HAS_KB: gl.constexpr, HAS_D: gl.constexpr,
                          ANGLE_DT: gl.constexpr, HEADS_FIRST: gl.constexpr, num_warps: gl.constexpr):
    """Outputs of chunk c: y = (scores * w) x + e^{cs} q_rot G_in^T + D x."""
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = X.dtype.element_ty
    f32: gl.constexpr = gl.float32
    ACC_C: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, C, 16])
    ACC_B: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, NB, 16])
    ACC_P: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, P, 16])
    ROW_C: gl.constexpr = gl.SliceLayout(1, ACC_C)
    COL_C: gl.constexpr = gl.SliceLayout(0, ACC_C)
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)

    c, bh = _program(HEADS_FIRST)
    b = bh // H
    h = bh % H
    g = h // heads_per_group
    state = (b * nc + c) * H + h

    x_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    q_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    g_s = gl.allocate_shared_memory(dtype, [2 * NBLK, P, NB], _nvmma([P, NB], dtype))
    tp = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, LD_P))
    pp = gl.arange(0, P, layout=gl.SliceLayout(0, LD_P))
    async_copy.async_copy_global_to_shared(x_s, X + b * (s_xb8 * 8) + tp[:, None] * (s_xt8 * 8) + h * s_xh + pp[None, :],
                                           mask=(tp < T)[:, None])
    tb = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, LD_B))
    nbl = gl.arange(0, NB, layout=gl.SliceLayout(0, LD_B))
    qk_rows = b * s_kb + g * s_kg + tb[:, None] * s_kt + nbl[None, :]
    g_rows = G_IN + state * P * N + gl.arange(0, P, layout=gl.SliceLayout(1, LD_B))[:, None] * N + nbl[None, :]
    for i in gl.static_range(2 * NBLK):
        col = (i // NBLK) * N2 + (i % NBLK) * NB
        async_copy.async_copy_global_to_shared(q_s.index(i), Q + qk_rows + col, mask=(tb < T)[:, None])
        async_copy.async_copy_global_to_shared(k_s.index(i), K + qk_rows + col, mask=(tb < T)[:, None])
        async_copy.async_copy_global_to_shared(g_s.index(i), g_rows + col)
    async_copy.commit_group()

    # (C, C) weights [query j, key i] while the copies fly
    cs, scale, gamma, dt, tvm = _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C, VEC)
    jr = gl.arange(0, C, layout=ROW_C)
    ic = gl.arange(0, C, layout=COL_C)
    below = jr[:, None] > ic[None, :]
    decay = gl.exp(gl.where(below, gl.convert_layout(cs, ROW_C)[:, None] - gl.convert_layout(cs, COL_C)[None, :], 0.0))
    w = gl.where(below, decay * gl.convert_layout(scale, COL_C)[None, :],
                 gl.where(jr[:, None] == ic[None, :], gl.convert_layout(gamma, COL_C)[None, :], 0.0))

    # q and k biased and rotated once, in place: they are only MMA operands here (rounded to bf16, as the Triton
    # kernel rounds them before its products)
    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        qE, qO, cos, sin = _rotate_block(q_s.index(j), q_s.index(NBLK + j), QB, OMEGA, THETA_OFF, dt, b, h, c, state, T,
                                         S, s_ob, s_ot, j, j < ROT_BLOCKS, HAS_QB, ANGLE_DT, N, N2, NB, C, ACC_B, SC)
        kE, kO, cos, sin = _rotate_block(k_s.index(j), k_s.index(NBLK + j), KB, OMEGA, THETA_OFF, dt, b, h, c, state, T,
                                         S, s_ob, s_ot, j, j < ROT_BLOCKS, HAS_KB, ANGLE_DT, N, N2, NB, C, ACC_B, SC)
        gl.thread_barrier()  # every warp has read the raw tiles
        q_s.index(j).store(qE.to(dtype))
        q_s.index(NBLK + j).store(qO.to(dtype))
        k_s.index(j).store(kE.to(dtype))
        k_s.index(NBLK + j).store(kO.to(dtype))
    gl.thread_barrier()
    fence_async_shared()
    scores = gl.zeros([C, C], f32, ACC_C)
    inter = gl.zeros([C, P], f32, ACC_P)
    for i in gl.static_range(2 * NBLK):
        scores = warpgroup_mma(q_s.index(i), k_s.index(i).permute((1, 0)), scores)  # q_j . k_i
        inter = warpgroup_mma(q_s.index(i), g_s.index(i).permute((1, 0)), inter)  # q_j G^T
    sw_s = gl.allocate_shared_memory(dtype, [C, C], _nvmma([C, C], dtype))
    sw_s.store((scores * w).to(dtype))
    gl.thread_barrier()
    fence_async_shared()
    y = warpgroup_mma(sw_s, x_s, gl.zeros([C, P], f32, ACC_P), use_acc=False)
    y += gl.exp(gl.convert_layout(cs, gl.SliceLayout(1, ACC_P)))[:, None] * inter
    if HAS_D:
        y += gl.load(D + h).to(f32) * x_s.load(ACC_P).to(f32)
    ty = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, ACC_P))
    py = gl.arange(0, P, layout=gl.SliceLayout(0, ACC_P))
    gl.store(Y + b * s_yb + ty[:, None] * s_yt + h * s_xh + py[None, :], y.to(Y.dtype.element_ty), mask=(ty < T)[:, None])


# The chunk-output kernel at 168 registers holds three programs an SM (64 KB of shared memory each) and spills
# nothing offline (Triton 3.6, sm_90; 179 uncapped). HYBRID_SCAN_FWD_MAXNREG=0 lifts the cap for A/B runs.
SCAN_MAXNREG = int(os.environ.get("HYBRID_SCAN_FWD_MAXNREG", "168"))


def chunk_state_fwd(grid, *args, flags: dict, n_angles: int, HAS_KB: bool) -> None:
    """Launches the chunk-state kernel on the Triton kernel's grid with its arguments less SEQ and SEQ's stride."""
    nb = min(gluon_common.COL_BLOCK, flags["N2"])
    _chunk_state_fwd_gluon[grid](*args, C=flags["C"], N2=flags["N2"], NB=nb, P=flags["P"], ROT_BLOCKS=-(-n_angles // nb),
                                 HAS_KB=HAS_KB, ANGLE_DT=flags["ANGLE_DT"], HEADS_FIRST=flags["HEADS_FIRST"], num_warps=4)


def chunk_scan_fwd(grid, *args, flags: dict, n_angles: int, HAS_QB: bool, HAS_KB: bool, HAS_D: bool) -> None:
    """Launches the chunk-output kernel on the Triton kernel's grid with its arguments less SEQ and SEQ's stride."""
    nb = min(gluon_common.COL_BLOCK, flags["N2"])
    _chunk_scan_fwd_gluon[grid](*args, C=flags["C"], N2=flags["N2"], NB=nb, P=flags["P"], ROT_BLOCKS=-(-n_angles // nb),
                                HAS_QB=HAS_QB, HAS_KB=HAS_KB, HAS_D=HAS_D, ANGLE_DT=flags["ANGLE_DT"],
                                HEADS_FIRST=flags["HEADS_FIRST"], num_warps=4,
                                **({"maxnreg": SCAN_MAXNREG} if SCAN_MAXNREG else {}))
