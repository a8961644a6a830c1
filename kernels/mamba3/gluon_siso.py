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
from hybrid.kernels.mamba3.gluon_common import (
    _acc_layout,
    _biased_pairs,
    _block_angles,
    _chunk_weights,
    _coeffs,
    _copy_chunk_blocks,
    _copy_rows,
    _cos_sin,
    _nvmma,
    _program,
    _rotate,
    _rotated_keys,
    _scan_layout,
    _store_rows,
    _tile_layout,
)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma


@gluon.jit
def _chunk_state_fwd_gluon(K, X, A, DT, LAM, OMEGA, KB, THETA_OFF, LOCAL, CS_LAST,
                           T, H, S, nc, heads_per_group,
                           s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot,
                           C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                           ROT_BLOCKS: gl.constexpr, HAS_KB: gl.constexpr, ANGLE_DT: gl.constexpr,
                           HEADS_FIRST: gl.constexpr, COALESCE: gl.constexpr, num_warps: gl.constexpr):
    """Local state of chunk c as if it started from zero, x^T (k_rot * w_end) per column block, and cs_last."""
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = X.dtype.element_ty
    ACC_B: gl.constexpr = _acc_layout(NB, num_warps)
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)

    c, b, h, g, state = _program(H, heads_per_group, nc, HEADS_FIRST)

    x_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    _copy_rows(x_s, X, b, c, h, T, s_xb8 * 8, s_xt8 * 8, s_xh, C, P, LD_P)
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
    local = LOCAL + state * P * N
    zero = gl.zeros([P, NB], gl.float32, ACC_B)
    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        kE, kO = _rotated_keys(k_s, KB, OMEGA, THETA_OFF, dt, b, c, h, j, state, T, S, s_ob, s_ot, HAS_KB,
                               j < ROT_BLOCKS, ANGLE_DT, N2, NB, C, ACC_B, SC)
        kw_s.index(0).store((kE * w_end[:, None]).to(dtype))
        kw_s.index(1).store((kO * w_end[:, None]).to(dtype))
        gl.thread_barrier()
        fence_async_shared()
        localE = warpgroup_mma(x_s.permute((1, 0)), kw_s.index(0), zero, use_acc=False)  # (P, NB)
        localO = warpgroup_mma(x_s.permute((1, 0)), kw_s.index(1), zero, use_acc=False)
        _store_rows(local + j * NB, N, P, localE.to(LOCAL.dtype.element_ty), ACC_B, P, NB, COALESCE, num_warps)
        _store_rows(local + N2 + j * NB, N, P, localO.to(LOCAL.dtype.element_ty), ACC_B, P, NB, COALESCE, num_warps)
        gl.thread_barrier()  # the next block overwrites kw_s
    gl.store(CS_LAST + state, cs_last)


@gluon.jit
def _chunk_scan_fwd_gluon(Q, K, X, A, DT, LAM, OMEGA, QB, KB, D, THETA_OFF, G_IN, Y,
                          T, H, S, nc, heads_per_group,
                          s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot,
                          C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                          ROT_BLOCKS: gl.constexpr, HAS_QB: gl.constexpr, HAS_KB: gl.constexpr, HAS_D: gl.constexpr,
                          ANGLE_DT: gl.constexpr, HEADS_FIRST: gl.constexpr, COALESCE: gl.constexpr,
                          num_warps: gl.constexpr):
    """Outputs of chunk c: y = (scores * w) x + e^{cs} q_rot G_in^T + D x."""
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = X.dtype.element_ty
    f32: gl.constexpr = gl.float32
    ACC_C: gl.constexpr = _acc_layout(C, num_warps)
    ACC_B: gl.constexpr = _acc_layout(NB, num_warps)
    ACC_P: gl.constexpr = _acc_layout(P, num_warps)
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)

    c, b, h, g, state = _program(H, heads_per_group, nc, HEADS_FIRST)

    x_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    q_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    g_s = gl.allocate_shared_memory(dtype, [2 * NBLK, P, NB], _nvmma([P, NB], dtype))
    _copy_rows(x_s, X, b, c, h, T, s_xb8 * 8, s_xt8 * 8, s_xh, C, P, LD_P)
    _copy_chunk_blocks(q_s, k_s, g_s, Q, K, G_IN, b * s_kb + g * s_kg, c * C, s_kt, T, state * P * N, C, P, N2, NB,
                       LD_B)
    async_copy.commit_group()

    # (C, C) weights [query j, key i] while the copies fly
    cs, scale, gamma, dt, tvm = _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C, VEC)
    w, _ = _chunk_weights(cs, scale, gamma, C, ACC_C, False)

    # q and k biased and rotated once, in place: they are only MMA operands here (rounded to bf16, as the Triton
    # kernel rounds them before its products)
    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        # q rotated before k is read, so that only one of them is in flight with its cos / sin (179 registers; both
        # read first took 235, offline)
        qE, qO = _biased_pairs(q_s.index(j), q_s.index(NBLK + j), QB, h, j, HAS_QB, N2, NB, ACC_B)
        if j < ROT_BLOCKS:
            cos, sin = _cos_sin(_block_angles(OMEGA, THETA_OFF, dt, b, c, state, T, S, s_ob, s_ot, j, ANGLE_DT, NB, C,
                                              ACC_B, SC))
            qE, qO = _rotate(qE, qO, cos, sin)
        kE, kO = _biased_pairs(k_s.index(j), k_s.index(NBLK + j), KB, h, j, HAS_KB, N2, NB, ACC_B)
        if j < ROT_BLOCKS:
            kE, kO = _rotate(kE, kO, cos, sin)
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
    _store_rows(Y + b * s_yb + c * C * s_yt + h * s_xh, s_yt, T - c * C, y.to(Y.dtype.element_ty), ACC_P, C, P,
                COALESCE, num_warps)


# The chunk-output kernel at 168 registers holds three programs an SM (64 KB of shared memory each) and spills
# nothing offline (Triton 3.6, sm_90; 179 uncapped). HYBRID_SCAN_FWD_MAXNREG=0 lifts the cap for A/B runs.
SCAN_MAXNREG = int(os.environ.get("HYBRID_SCAN_FWD_MAXNREG", "168"))


def chunk_state_fwd(grid, *args, flags: dict, n_angles: int, HAS_KB: bool) -> None:
    """Launches the chunk-state kernel on the Triton kernel's grid with its arguments less SEQ and SEQ's stride."""
    kernel = gluon_common.launcher(_chunk_state_fwd_gluon)
    kernel[grid](*args, **gluon_common.launch_flags(flags, n_angles), HAS_KB=HAS_KB)


def chunk_scan_fwd(grid, *args, flags: dict, n_angles: int, HAS_QB: bool, HAS_KB: bool, HAS_D: bool) -> None:
    """Launches the chunk-output kernel on the Triton kernel's grid with its arguments less SEQ and SEQ's stride."""
    kernel = gluon_common.launcher(_chunk_scan_fwd_gluon)
    kernel[grid](*args, **gluon_common.launch_flags(flags, n_angles), HAS_QB=HAS_QB, HAS_KB=HAS_KB,
                 HAS_D=HAS_D, **({"maxnreg": SCAN_MAXNREG} if SCAN_MAXNREG else {}))
