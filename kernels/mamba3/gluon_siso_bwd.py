"""Gluon (Hopper) versions of the SISO scan's backward chunk kernels, ``_chunk_scan_bwd_dk`` (key side),
``_chunk_scan_bwd_dq`` (query side) and ``_chunk_scan_bwd_dx`` (dx's local-state term), for plain sequences.

Same inputs, outputs and math as the Triton kernels in ``triton_siso_bwd.py`` (the formulas are there); those stay
the reference, the CPU-tested path (Gluon has no interpreter) and the fallback for packed documents.

Why second implementations: the Triton dk runs its three products on mma.sync (Triton 3.6's wgmma path faulted on
it), staging every operand through registers and shared memory, and both load their tiles synchronously in their
column loops; at 255 registers two programs share an SM and each waits ~7 cycles per instruction
(``docs/perf-notes.md``, "Eighteenth session"). Here, written against the hardware:

- at the start every input tile (x, dy, the chunk's q / k blocks, the state or state-gradient tile) goes to shared
  memory by cp.async, so the loads overlap the coefficient work and hold no registers;
- every product is a warpgroup MMA reading shared memory, the MMA transposing its operands itself; products of
  register values (a1 / a1t, sw, dy e^{cs}, rotated q / k) are written there once: with an A operand in registers
  Triton 3.6's wgmma faulted;
- dk: the local-state term e * (x dL) is the initial accumulator of a1t @ q_rot (dx's local-state term k_rot dL^T as
  a fourth product here cost what the dx kernel takes, plus a zeroing pass: it has its own kernel, below);
- dq: q and k are rotated once (q into its own buffer: its elementwise terms use fp32 q, rotated again from the kept
  angles, since the angle-rate gradient is sensitive to q's bf16 rounding).

On an H100 at 8 x 4096: dq 1.02 ms (Triton 1.49), dx 0.26 (0.34), dk 0.86 (1.13). They support
what the launcher passes for plain sequences: any rotation extent (ROT_BLOCKS), biases, angles scaled by dt or not,
heads numbered first or not, dq / dk summed over a group's heads by atomics or stored per head.
"""

from __future__ import annotations

import os

from hybrid.kernels.mamba3 import gluon_common
from hybrid.kernels.mamba3.gluon_common import (
    _acc_layout,
    _add,
    _at_least_one,
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
def _chunk_scan_bwd_dk_gluon(Q, K, X, A, DT, LAM, OMEGA, QB, KB, THETA_OFF, DLOCAL, DCSL, DY,
                             DCS_PART, DSCALE, DTHETA, DKH, DKB_PART, DA, DTHETA_TOT,
                             T, H, S, nc, heads_per_group,
                             s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot,
                             C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                             ROT_BLOCKS: gl.constexpr, HAS_QB: gl.constexpr, HAS_KB: gl.constexpr,
                             ANGLE_DT: gl.constexpr, HEADS_FIRST: gl.constexpr, GROUP_SUM: gl.constexpr,
                             COALESCE: gl.constexpr, num_warps: gl.constexpr):
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = X.dtype.element_ty
    f32: gl.constexpr = gl.float32
    # One warpgroup: every MMA is M = C rows (64) over four warps.
    ACC_C: gl.constexpr = _acc_layout(C, num_warps)
    ACC_B: gl.constexpr = _acc_layout(NB, num_warps)
    ROW_B: gl.constexpr = gl.SliceLayout(1, ACC_B)
    COL_B: gl.constexpr = gl.SliceLayout(0, ACC_B)
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)

    c, b, h, g, state = _program(H, heads_per_group, nc, HEADS_FIRST)

    # -- every input tile to shared memory, in two groups: (x, dy) first, for the first product.
    x_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    dy_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    _copy_rows(x_s, X, b, c, h, T, s_xb8 * 8, s_xt8 * 8, s_xh, C, P, LD_P)
    _copy_rows(dy_s, DY, b, c, h, T, s_yb, s_yt, s_xh, C, P, LD_P)
    async_copy.commit_group()
    q_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    dl_s = gl.allocate_shared_memory(dtype, [2 * NBLK, P, NB], _nvmma([P, NB], dtype))
    _copy_chunk_blocks(q_s, k_s, dl_s, Q, K, DLOCAL, b * s_kb + g * s_kg, c * C, s_kt, T, state * P * N, C, P, N2, NB,
                       LD_B)
    async_copy.commit_group()

    # -- per-token coefficients while the copies fly
    cs, scale, gamma, dt, tvm = _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C, VEC)
    coef = b * s_ab + (c * C + gl.arange(0, C, layout=VEC)) * s_at + h * s_ah
    cs_last = gl.min(cs, axis=0)
    to_end_w = gl.where(tvm, gl.exp(cs_last - cs), 0.0)

    w_t, _ = _chunk_weights(cs, scale, gamma, C, ACC_C, True)  # [key i, query j]

    async_copy.wait_group(1)
    gl.thread_barrier()
    fence_async_shared()
    xdy = warpgroup_mma(x_s, dy_s.permute((1, 0)), gl.zeros([C, C], f32, ACC_C), use_acc=False)  # [key i, query j]
    # a1t feeds its MMA from shared memory: with the A operand in registers, Triton 3.6's wgmma lowering faulted
    # here (illegal addresses, non-finite values, as it did on the Triton dk), and the store costs one 8 KB tile.
    a1t = gl.allocate_shared_memory(dtype, [C, C], _nvmma([C, C], dtype))
    a1t.store((xdy * w_t).to(dtype))

    t = c * C + gl.arange(0, C, layout=ROW_B)
    tmask = t < T
    tew_r = gl.convert_layout(to_end_w, ROW_B)
    e_r = gl.convert_layout(to_end_w * scale, ROW_B)
    m_loc = gl.zeros([C], f32, ROW_B)  # d scale_i from the local state, over all channel blocks
    qrot_s = gl.allocate_shared_memory(dtype, [2, C, NB], _nvmma([C, NB], dtype))
    ts = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, SC))
    tsm = ts < T
    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        nb = j * NB + gl.arange(0, NB, layout=COL_B)
        qE = q_s.index(j).load(ACC_B).to(f32)
        qO = q_s.index(NBLK + j).load(ACC_B).to(f32)
        kE = k_s.index(j).load(ACC_B).to(f32)
        kO = k_s.index(NBLK + j).load(ACC_B).to(f32)
        if HAS_QB:
            qE += gl.load(QB + h * N + nb).to(f32)[None, :]
            qO += gl.load(QB + h * N + N2 + nb).to(f32)[None, :]
        if HAS_KB:
            kE += gl.load(KB + h * N + nb).to(f32)[None, :]
            kO += gl.load(KB + h * N + N2 + nb).to(f32)[None, :]
        if j < ROT_BLOCKS:
            # Cumulative angles of this block's pairs, scanned in a blocked layout, then cos / sin in the MMA's.
            ns = j * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, SC))
            sm = ns < S
            om = gl.load(OMEGA + b * s_ob + ts[:, None] * s_ot + ns[None, :], mask=tsm[:, None] & sm[None, :],
                         other=0.0).to(f32)
            if ANGLE_DT:
                om = om * gl.convert_layout(dt, gl.SliceLayout(1, SC))[:, None]
            theta = gl.associative_scan(om, 0, _add) + gl.load(THETA_OFF + state * S + ns, mask=sm, other=0.0)[None, :]
            cos_s, sin_s = _cos_sin(theta)
            cos = gl.convert_layout(cos_s, ACC_B)
            sin = gl.convert_layout(sin_s, ACC_B)
            qE, qO = qE * cos - qO * sin, qE * sin + qO * cos
            kE, kO = kE * cos - kO * sin, kE * sin + kO * cos
        qrot_s.index(0).store(qE.to(dtype))
        qrot_s.index(1).store(qO.to(dtype))
        gl.thread_barrier()
        fence_async_shared()
        zero = gl.zeros([C, NB], f32, ACC_B)
        xdLE = warpgroup_mma(x_s, dl_s.index(j), zero, use_acc=False)
        xdLO = warpgroup_mma(x_s, dl_s.index(NBLK + j), zero, use_acc=False)
        m_loc += (gl.sum(xdLE * kE, axis=1) + gl.sum(xdLO * kO, axis=1)) * tew_r
        dkE = warpgroup_mma(a1t, qrot_s.index(0), e_r[:, None] * xdLE)
        dkO = warpgroup_mma(a1t, qrot_s.index(1), e_r[:, None] * xdLO)
        if j < ROT_BLOCKS:
            dth = gl.convert_layout(kE * dkO - kO * dkE, SC)
            th_off = ((b * T + ts[:, None]) * H + h) * S + ns[None, :]
            th_mask = tsm[:, None] & sm[None, :]
            dth += gl.load(DTHETA + th_off, mask=th_mask, other=0.0).to(f32)
            total = gl.sum(dth, axis=0)
            rcum = total[None, :] - gl.associative_scan(dth, 0, _add) + dth  # each increment: the angles after it
            gl.store(DTHETA + th_off, rcum.to(DTHETA.dtype.element_ty), mask=th_mask)
            gl.store(DTHETA_TOT + state * S + ns, total, mask=sm)
            dkE, dkO = dkE * cos + dkO * sin, dkO * cos - dkE * sin
        if GROUP_SUM:
            off = ((b * T + t[:, None]) * (H // heads_per_group) + g) * N + nb[None, :]
            gl.atomic_add(DKH + off, dkE, mask=tmask[:, None], sem="relaxed")
            gl.atomic_add(DKH + off + N2, dkO, mask=tmask[:, None], sem="relaxed")
        else:
            dk_rows = DKH + ((b * T + c * C) * H + h) * N + j * NB
            _store_rows(dk_rows, H * N, T - c * C, dkE.to(DKH.dtype.element_ty), ACC_B, C, NB, COALESCE, num_warps)
            _store_rows(dk_rows + N2, H * N, T - c * C, dkO.to(DKH.dtype.element_ty), ACC_B, C, NB, COALESCE,
                        num_warps)
        if HAS_KB:
            gl.store(DKB_PART + state * N + nb, gl.sum(dkE, axis=0))
            gl.store(DKB_PART + state * N + N2 + nb, gl.sum(dkO, axis=0))
        gl.thread_barrier()  # the next block overwrites qrot_s

    # d log-decay: reverse cumulative sum of everything d cs (plus d cs_last at the chunk's end); d scale's local part.
    m_v = gl.convert_layout(m_loc, VEC)
    dcs = gl.load(DCS_PART + coef, mask=tvm, other=0.0) - m_v * scale
    dcs_last = gl.sum(m_v * scale, axis=0) + gl.load(DCSL + state)
    dcs += gl.where(gl.arange(0, C, layout=VEC) == C - 1, dcs_last, 0.0)
    gl.store(DA + coef, gl.sum(dcs, axis=0) - gl.associative_scan(dcs, 0, _add) + dcs, mask=tvm)
    gl.store(DSCALE + coef, gl.load(DSCALE + coef, mask=tvm, other=0.0) + m_v, mask=tvm)


@gluon.jit
def _chunk_scan_bwd_dq_gluon(Q, K, X, A, DT, LAM, OMEGA, QB, KB, D, THETA_OFF, G_IN, DY,
                             DQH, DQB_PART, DCS_PART, DSCALE, DGAMMA, DTHETA, DG_IN, DX, DD_PART,
                             T, H, S, nc, heads_per_group,
                             s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_db8, s_dt8,
                             C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                             ROT_BLOCKS: gl.constexpr, HAS_QB: gl.constexpr, HAS_KB: gl.constexpr, HAS_D: gl.constexpr,
                             ANGLE_DT: gl.constexpr, HEADS_FIRST: gl.constexpr, GROUP_SUM: gl.constexpr,
                             COALESCE: gl.constexpr, num_warps: gl.constexpr):
    """Query side of chunk c (``_chunk_scan_bwd_dq``'s outputs): q and k are biased and rotated once into shared
    memory (k in place) as the operands of the scores and of the column loop's products; the column loop rotates q
    again in fp32 for its elementwise terms from the kept angles. The scores, the dx product and dG_in read their
    operands from shared memory (a1, sw and dy e^{cs} are written there once)."""
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = X.dtype.element_ty
    f32: gl.constexpr = gl.float32
    ACC_C: gl.constexpr = _acc_layout(C, num_warps)
    ACC_B: gl.constexpr = _acc_layout(NB, num_warps)
    ACC_P: gl.constexpr = _acc_layout(P, num_warps)
    ROW_B: gl.constexpr = gl.SliceLayout(1, ACC_B)
    COL_B: gl.constexpr = gl.SliceLayout(0, ACC_B)
    ROW_C: gl.constexpr = gl.SliceLayout(1, ACC_C)
    COL_C: gl.constexpr = gl.SliceLayout(0, ACC_C)
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)
    FLAT: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])

    c, b, h, g, state = _program(H, heads_per_group, nc, HEADS_FIRST)

    # -- input tiles to shared memory: (x, dy) first, then q / k blocks and the entering state G.
    x_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    dy_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    _copy_rows(x_s, X, b, c, h, T, s_xb8 * 8, s_xt8 * 8, s_xh, C, P, LD_P)
    _copy_rows(dy_s, DY, b, c, h, T, s_yb, s_yt, s_xh, C, P, LD_P)
    async_copy.commit_group()
    q_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    qr_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))  # q biased and rotated
    g_s = gl.allocate_shared_memory(dtype, [2 * NBLK, P, NB], _nvmma([P, NB], dtype))
    _copy_chunk_blocks(q_s, k_s, g_s, Q, K, G_IN, b * s_kb + g * s_kg, c * C, s_kt, T, state * P * N, C, P, N2, NB,
                       LD_B)
    async_copy.commit_group()

    # -- per-token coefficients and the (C, C) weights [query j, key i]
    cs, scale, gamma, dt, tvm = _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C, VEC)
    jr = gl.arange(0, C, layout=ROW_C)
    ic = gl.arange(0, C, layout=COL_C)
    below = jr[:, None] > ic[None, :]
    diag = jr[:, None] == ic[None, :]
    w, decay = _chunk_weights(cs, scale, gamma, C, ACC_C, False)

    async_copy.wait_group(1)
    gl.thread_barrier()
    fence_async_shared()
    dyx = warpgroup_mma(dy_s, x_s.permute((1, 0)), gl.zeros([C, C], f32, ACC_C), use_acc=False)  # dy_j . x_i

    # -- q and k biased and rotated once, in place; the angles kept for un-rotating dq in the column loop.
    t = c * C + gl.arange(0, C, layout=ROW_B)
    tmask = t < T
    th_s = gl.allocate_shared_memory(f32, [_at_least_one(ROT_BLOCKS), C, NB], FLAT)
    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        qE, qO = _biased_pairs(q_s.index(j), q_s.index(NBLK + j), QB, h, j, HAS_QB, N2, NB, ACC_B)
        kE, kO = _biased_pairs(k_s.index(j), k_s.index(NBLK + j), KB, h, j, HAS_KB, N2, NB, ACC_B)
        if j < ROT_BLOCKS:
            theta = _block_angles(OMEGA, THETA_OFF, dt, b, c, state, T, S, s_ob, s_ot, j, ANGLE_DT, NB, C, ACC_B, SC)
            th_s.index(j).store(theta)  # read back by the same threads, in the same layout
            cos, sin = _cos_sin(theta)
            qE, qO = _rotate(qE, qO, cos, sin)
            kE, kO = _rotate(kE, kO, cos, sin)
        gl.thread_barrier()  # every warp has read the raw k tiles
        qr_s.index(j).store(qE.to(dtype))
        qr_s.index(NBLK + j).store(qO.to(dtype))
        k_s.index(j).store(kE.to(dtype))
        k_s.index(NBLK + j).store(kO.to(dtype))
    gl.thread_barrier()
    fence_async_shared()
    scores = gl.zeros([C, C], f32, ACC_C)
    for i in gl.static_range(2 * NBLK):
        scores = warpgroup_mma(qr_s.index(i), k_s.index(i).permute((1, 0)), scores)  # q_j . k_i

    dw = scores * dyx
    sw = scores * w  # [query j, key i]
    if HAS_D:  # the skip term D dy_i rides on the diagonal
        sw += gl.where(diag, gl.load(D + h).to(f32), 0.0)
        dd = gl.sum(gl.sum(gl.where(diag, dyx, 0.0), axis=1), axis=0)
    pw = gl.where(below, dw * w, 0.0)
    dcs = gl.convert_layout(gl.sum(pw, axis=1), ROW_B) - gl.convert_layout(gl.sum(pw, axis=0), ROW_B)
    dscale = gl.sum(gl.where(below, dw * decay, 0.0), axis=0)
    dgamma = gl.sum(gl.where(diag, dw, 0.0), axis=1)
    a1_s = gl.allocate_shared_memory(dtype, [C, C], _nvmma([C, C], dtype))
    a1_s.store((dyx * w).to(dtype))
    sw_s = gl.allocate_shared_memory(dtype, [C, C], _nvmma([C, C], dtype))
    sw_s.store(sw.to(dtype))
    # dy_j e^{cs_j}: its transpose is the A operand of dG_in = sum_j e^{cs_j} dy_j q_j^T
    ecs_p = gl.exp(gl.convert_layout(cs, gl.SliceLayout(1, ACC_P)))
    dye_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    dye_s.store((dy_s.load(ACC_P).to(f32) * ecs_p[:, None]).to(dtype))
    ecs = gl.exp(gl.convert_layout(cs, ROW_B))
    gl.thread_barrier()
    fence_async_shared()

    dg = DG_IN + state * P * N
    zero = gl.zeros([C, NB], f32, ACC_B)
    zero_p = gl.zeros([P, NB], f32, ACC_B)
    for j in gl.static_range(NBLK):
        nb = j * NB + gl.arange(0, NB, layout=COL_B)
        # q again in fp32 for the elementwise terms (d angle, d cs): rounded to bf16 there, the angle-rate gradient
        # moved 2.7% from the Triton kernel's (first GPU run)
        qE, qO = _biased_pairs(q_s.index(j), q_s.index(NBLK + j), QB, h, j, HAS_QB, N2, NB, ACC_B)
        if j < ROT_BLOCKS:
            cos, sin = _cos_sin(th_s.index(j).load(ACC_B))
            qE, qO = _rotate(qE, qO, cos, sin)
        dyGE = warpgroup_mma(dy_s, g_s.index(j), zero, use_acc=False)  # (C, NB): rows of dy G^T
        dyGO = warpgroup_mma(dy_s, g_s.index(NBLK + j), zero, use_acc=False)
        dcs += ecs * (gl.sum(dyGE * qE, axis=1) + gl.sum(dyGO * qO, axis=1))  # inter part
        dgE = warpgroup_mma(dye_s.permute((1, 0)), qr_s.index(j), zero_p, use_acc=False)  # (P, NB)
        _store_rows(dg + j * NB, N, P, dgE.to(DG_IN.dtype.element_ty), ACC_B, P, NB, COALESCE, num_warps)
        dgO = warpgroup_mma(dye_s.permute((1, 0)), qr_s.index(NBLK + j), zero_p, use_acc=False)
        _store_rows(dg + N2 + j * NB, N, P, dgO.to(DG_IN.dtype.element_ty), ACC_B, P, NB, COALESCE, num_warps)
        dqE = warpgroup_mma(a1_s, k_s.index(j), ecs[:, None] * dyGE)
        dqO = warpgroup_mma(a1_s, k_s.index(NBLK + j), ecs[:, None] * dyGO)
        if j < ROT_BLOCKS:
            th_mask = tmask[:, None] & (nb < S)[None, :]
            gl.store(DTHETA + ((b * T + t[:, None]) * H + h) * S + nb[None, :],
                     (qE * dqO - qO * dqE).to(DTHETA.dtype.element_ty), mask=th_mask)
            dqE, dqO = dqE * cos + dqO * sin, dqO * cos - dqE * sin
        if GROUP_SUM:
            off = ((b * T + t[:, None]) * (H // heads_per_group) + g) * N + nb[None, :]
            gl.atomic_add(DQH + off, dqE, mask=tmask[:, None], sem="relaxed")
            gl.atomic_add(DQH + off + N2, dqO, mask=tmask[:, None], sem="relaxed")
        else:
            dq_rows = DQH + ((b * T + c * C) * H + h) * N + j * NB
            _store_rows(dq_rows, H * N, T - c * C, dqE.to(DQH.dtype.element_ty), ACC_B, C, NB, COALESCE, num_warps)
            _store_rows(dq_rows + N2, H * N, T - c * C, dqO.to(DQH.dtype.element_ty), ACC_B, C, NB, COALESCE,
                        num_warps)
        if HAS_QB:
            gl.store(DQB_PART + state * N + nb, gl.sum(dqE, axis=0))
            gl.store(DQB_PART + state * N + N2 + nb, gl.sum(dqO, axis=0))

    coef_r = b * s_ab + t * s_at + h * s_ah
    gl.store(DCS_PART + coef_r, dcs, mask=tmask)
    ic_v = c * C + gl.arange(0, C, layout=COL_C)
    gl.store(DSCALE + b * s_ab + ic_v * s_at + h * s_ah, dscale, mask=ic_v < T)
    jr_v = c * C + jr
    gl.store(DGAMMA + b * s_ab + jr_v * s_at + h * s_ah, dgamma, mask=jr_v < T)
    dx = warpgroup_mma(sw_s.permute((1, 0)), dy_s, gl.zeros([C, P], f32, ACC_P), use_acc=False)  # [key i]
    _store_rows(DX + b * (s_db8 * 8) + c * C * (s_dt8 * 8) + h * s_xh, s_dt8 * 8, T - c * C, dx.to(DX.dtype.element_ty),
                ACC_P, C, P, COALESCE, num_warps)
    if HAS_D:
        gl.store(DD_PART + state, dd)


@gluon.jit
def _chunk_scan_bwd_dx_gluon(K, A, DT, LAM, OMEGA, KB, THETA_OFF, DLOCAL, DX,
                             T, H, S, nc, heads_per_group,
                             s_kb, s_kt, s_kg, s_xb8, s_xt8, s_yb, s_yt, s_xh, s_ab, s_at, s_ah, s_ob, s_ot, s_db8, s_dt8,
                             C: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, P: gl.constexpr,
                             ROT_BLOCKS: gl.constexpr, HAS_KB: gl.constexpr, ANGLE_DT: gl.constexpr,
                             HEADS_FIRST: gl.constexpr, COALESCE: gl.constexpr, num_warps: gl.constexpr):
    """dx_i += e_i k_rot,i dL^T onto what dq stored (``_chunk_scan_bwd_dx``): k, dL and dx's rows go to shared memory
    by cp.async at the start, k is biased and rotated in place, and the product is one MMA chain over the blocks."""
    NBLK: gl.constexpr = N2 // NB
    N: gl.constexpr = 2 * N2
    dtype: gl.constexpr = DLOCAL.dtype.element_ty
    ACC_B: gl.constexpr = _acc_layout(NB, num_warps)
    ACC_P: gl.constexpr = _acc_layout(P, num_warps)
    VEC: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    LD_P: gl.constexpr = _tile_layout(P, num_warps)
    LD_B: gl.constexpr = _tile_layout(NB, num_warps)
    SC: gl.constexpr = _scan_layout(NB, num_warps)

    c, b, h, g, state = _program(H, heads_per_group, nc, HEADS_FIRST)

    k_s = gl.allocate_shared_memory(dtype, [2 * NBLK, C, NB], _nvmma([C, NB], dtype))
    dl_s = gl.allocate_shared_memory(dtype, [2 * NBLK, P, NB], _nvmma([P, NB], dtype))
    dx_s = gl.allocate_shared_memory(dtype, [C, P], _nvmma([C, P], dtype))
    tb = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, LD_B))
    nbl = gl.arange(0, NB, layout=gl.SliceLayout(0, LD_B))
    k_rows = K + b * s_kb + g * s_kg + tb[:, None] * s_kt + nbl[None, :]
    dl_rows = DLOCAL + state * P * N + gl.arange(0, P, layout=gl.SliceLayout(1, LD_B))[:, None] * N + nbl[None, :]
    for i in gl.static_range(2 * NBLK):  # a block's k and dL issued together, as in _copy_chunk_blocks
        col = (i // NBLK) * N2 + (i % NBLK) * NB
        async_copy.async_copy_global_to_shared(k_s.index(i), k_rows + col, mask=(tb < T)[:, None])
        async_copy.async_copy_global_to_shared(dl_s.index(i), dl_rows + col)
    _copy_rows(dx_s, DX, b, c, h, T, s_db8 * 8, s_dt8 * 8, s_xh, C, P, LD_P)
    async_copy.commit_group()

    # Local state: G_{c+1} gets sum_i e_i x_i k_i^T with e_i = e^{cs_last - cs_i} scale_i.
    cs, scale, gamma, dt, tvm = _coeffs(A, DT, LAM, b, h, c, T, s_ab, s_at, s_ah, C, VEC)
    e = gl.where(tvm, gl.exp(gl.min(cs, axis=0) - cs) * scale, 0.0)

    async_copy.wait_group(0)
    gl.thread_barrier()
    for j in gl.static_range(NBLK):
        kE, kO = _rotated_keys(k_s, KB, OMEGA, THETA_OFF, dt, b, c, h, j, state, T, S, s_ob, s_ot, HAS_KB,
                               j < ROT_BLOCKS, ANGLE_DT, N2, NB, C, ACC_B, SC)
        gl.thread_barrier()  # every warp has read the raw tiles
        k_s.index(j).store(kE.to(dtype))
        k_s.index(NBLK + j).store(kO.to(dtype))
    gl.thread_barrier()
    fence_async_shared()
    kdl = gl.zeros([C, P], gl.float32, ACC_P)
    for i in gl.static_range(2 * NBLK):
        kdl = warpgroup_mma(k_s.index(i), dl_s.index(i).permute((1, 0)), kdl)  # k_rot dL^T, (C, P)
    dx = dx_s.load(ACC_P).to(gl.float32) + gl.convert_layout(e, gl.SliceLayout(1, ACC_P))[:, None] * kdl
    _store_rows(DX + b * (s_db8 * 8) + c * C * (s_dt8 * 8) + h * s_xh, s_dt8 * 8, T - c * C, dx.to(DX.dtype.element_ty),
                ACC_P, C, P, COALESCE, num_warps)


# A register cap for A/B runs (0: none). 16-pair blocks at 168 registers (three programs an SM) tied the uncapped
# 32-pair blocks; 32-pair blocks at 168 spill and lose (docs/perf-notes.md, eighteenth session).
MAXNREG = int(os.environ.get("HYBRID_SCAN_DK_MAXNREG", "0"))


def chunk_scan_bwd_dq(grid, *args, flags: dict, n_angles: int, HAS_QB: bool, HAS_KB: bool, HAS_D: bool,
                      GROUP_SUM: bool) -> None:
    """Launches the query-side kernel on the Triton dq's grid with its arguments less SEQ and SEQ's stride."""
    kernel = gluon_common.launcher(_chunk_scan_bwd_dq_gluon)
    kernel[grid](*args, **gluon_common.launch_flags(flags, n_angles), HAS_QB=HAS_QB, HAS_KB=HAS_KB,
                 HAS_D=HAS_D, GROUP_SUM=GROUP_SUM)


def chunk_scan_bwd_dk(grid, *args, flags: dict, n_angles: int, HAS_QB: bool, HAS_KB: bool, GROUP_SUM: bool) -> None:
    """Launches the key-side kernel on the Triton dk's grid with its arguments less SEQ and SEQ's stride."""
    kernel = gluon_common.launcher(_chunk_scan_bwd_dk_gluon)
    kernel[grid](*args, **gluon_common.launch_flags(flags, n_angles), HAS_QB=HAS_QB, HAS_KB=HAS_KB,
                 GROUP_SUM=GROUP_SUM, **({"maxnreg": MAXNREG} if MAXNREG else {}))


def chunk_scan_bwd_dx(grid, *args, flags: dict, n_angles: int, HAS_KB: bool) -> None:
    """Launches dx's local-state kernel on the Triton dx kernel's grid with its arguments less SEQ and SEQ's stride."""
    kernel = gluon_common.launcher(_chunk_scan_bwd_dx_gluon)
    kernel[grid](*args, **gluon_common.launch_flags(flags, n_angles), HAS_KB=HAS_KB)
