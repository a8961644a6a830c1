"""Pieces shared by the Gluon (Hopper) chunk kernels of the Mamba-3 SISO scan (``gluon_siso.py``, forward;
``gluon_siso_bwd.py``, backward): shared-memory and register layouts, the fast trig, and which launches the Gluon
kernels can take. Gluon needs an sm_90 GPU and Triton's Gluon (3.6 API); the Triton kernels are the reference.
"""

from __future__ import annotations

import os

import torch
from hybrid.kernels.launch import direct
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.extra import libdevice
from triton.experimental.gluon.language.nvidia.ampere import async_copy

# Pairs per column block of the Gluon kernels (the Triton kernels' COL_BLOCK is 32): HYBRID_SCAN_GLUON_NB for A/B runs.
COL_BLOCK = int(os.environ.get("HYBRID_SCAN_GLUON_NB", "32"))
# Output tiles leave through a layout of 16-byte row vectors (1) or straight from the MMA's accumulator layout (0),
# whose 4- and 8-byte pieces half-fill the 32-byte sectors: HYBRID_SCAN_GLUON_COALESCE for A/B runs.
COALESCE = os.environ.get("HYBRID_SCAN_GLUON_COALESCE", "1") == "1"
# Relaunch the Gluon kernels through DirectLaunch (kernels/launch.py), skipping the JIT's ~100 us of host time a call
# as the Triton kernels do: a GluonJITFunction is a JITFunction with the same launcher, but no GPU run has checked
# it yet, so opt-in (HYBRID_GLUON_DIRECT=1) until the equality tests' relaunch check and an A/B have run.
DIRECT = os.environ.get("HYBRID_GLUON_DIRECT", "0") == "1"


@gluon.jit
def _add(a, b):
    return a + b


@gluon.constexpr_function
def _nvmma(shape, dtype):
    """Swizzled shared layout a warpgroup MMA reads (and cp.async writes) for a (rows, cols) 16-bit tile."""
    return gl.NVMMASharedLayout.get_default_for(shape, dtype)


@gluon.constexpr_function
def _acc_layout(n, num_warps):
    """Registers of a warpgroup MMA's (64 rows, n) fp32 accumulator (and of the tiles combined with it elementwise):
    four warps of 16 rows, instructions n columns wide."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, n, 16])


@gluon.constexpr_function
def _at_least_one(n):
    return max(n, 1)


@gluon.constexpr_function
def _tile_layout(cols, num_warps):
    """Registers of a (rows, cols) 16-bit tile for loading: 16-byte vectors along a row, rows across lanes/warps."""
    per_row = min(cols // 8, 32)
    return gl.BlockedLayout([1, 8], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.constexpr_function
def _store_layout(cols, bits, num_warps):
    """Registers of a (rows, cols) tile for storing: 16-byte vectors along a row, rows across lanes/warps."""
    vec = min(128 // bits, cols)
    per_row = min(cols // vec, 32)
    return gl.BlockedLayout([1, vec], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.jit
def _store_rows(base, row_stride, n_rows, tile, SRC: gl.constexpr, ROWS: gl.constexpr, COLS: gl.constexpr,
                COALESCE: gl.constexpr, num_warps: gl.constexpr):
    """tile (ROWS, COLS), held in layout SRC, to base[r * row_stride + col] for rows r < n_rows. Coalesced, it moves
    through shared memory into 16-byte row vectors first (as Triton's coalescing pass does for its kernels)."""
    if COALESCE:
        L: gl.constexpr = _store_layout(COLS, tile.dtype.primitive_bitwidth, num_warps)
        out = gl.convert_layout(tile, L)
    else:
        L: gl.constexpr = SRC
        out = tile
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, L))
    col = gl.arange(0, COLS, layout=gl.SliceLayout(0, L))
    gl.store(base + r[:, None] * row_stride + col[None, :], out, mask=(r < n_rows)[:, None])


@gluon.constexpr_function
def _scan_layout(cols, num_warps):
    """Registers of a (rows, cols) fp32 tile scanned along its rows (angles, angle gradients)."""
    per_row = min(cols, 32)
    return gl.BlockedLayout([1, 1], [32 // per_row, per_row], [num_warps, 1], [1, 0])


@gluon.jit
def _cos_sin(theta):
    """cos and sin from the hardware's approximate units after a two-step reduction to [-pi, pi], as the Triton
    kernels take them (``triton_siso._cos_sin``)."""
    turns = libdevice.rint(theta * 0.15915494309189535)
    r = gl.fma(turns, -6.2831854820251465, theta)
    r = gl.fma(turns, 1.7484556e-07, r)
    return libdevice.fast_cosf(r), libdevice.fast_sinf(r)


@gluon.jit
def _program(H, heads_per_group, nc, HEADS_FIRST: gl.constexpr):
    """This program's chunk c, sequence b, head h, group g and its row of the (B, nc, H, ...) per-chunk tensors, on
    the (chunks, B * H) grid numbered as ``triton_siso._chunk_and_head`` does."""
    if HEADS_FIRST:
        pid = gl.program_id(1).to(gl.int64) * gl.num_programs(0) + gl.program_id(0)
        c = pid // gl.num_programs(1)
        bh = pid % gl.num_programs(1)
    else:
        c = gl.program_id(0).to(gl.int64)
        bh = gl.program_id(1).to(gl.int64)
    b = bh // H
    h = bh % H
    return c, b, h, h // heads_per_group, (b * nc + c) * H + h


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
def _chunk_weights(cs, scale, gamma, C: gl.constexpr, LAYOUT: gl.constexpr, KEYS_IN_ROWS: gl.constexpr):
    """The chunk's (C, C) intra-chunk weights in ``LAYOUT``, w[query j, key i] = e^{cs_j - cs_i} scale_i below the
    diagonal (j > i), gamma_i on it, 0 above (with KEYS_IN_ROWS its transpose, [key i, query j]); and the decay
    e^{cs_j - cs_i} alone, 0 off the strict lower triangle (as ``triton_siso._chunk_scores`` weighs the scores)."""
    ROW: gl.constexpr = gl.SliceLayout(1, LAYOUT)
    COL: gl.constexpr = gl.SliceLayout(0, LAYOUT)
    if KEYS_IN_ROWS:
        query = gl.arange(0, C, layout=COL)[None, :]
        key = gl.arange(0, C, layout=ROW)[:, None]
        cs_q = gl.convert_layout(cs, COL)[None, :]
        cs_k = gl.convert_layout(cs, ROW)[:, None]
        scale_k = gl.convert_layout(scale, ROW)[:, None]
        gamma_k = gl.convert_layout(gamma, ROW)[:, None]
    else:
        query = gl.arange(0, C, layout=ROW)[:, None]
        key = gl.arange(0, C, layout=COL)[None, :]
        cs_q = gl.convert_layout(cs, ROW)[:, None]
        cs_k = gl.convert_layout(cs, COL)[None, :]
        scale_k = gl.convert_layout(scale, COL)[None, :]
        gamma_k = gl.convert_layout(gamma, COL)[None, :]
    below = query > key
    decay = gl.where(below, gl.exp(gl.where(below, cs_q - cs_k, 0.0)), 0.0)
    return decay * scale_k + gl.where(query == key, gamma_k, 0.0), decay


@gluon.jit
def _copy_rows(DST, PTR, b, c, h, T, s_b, s_t, s_h, C: gl.constexpr, P: gl.constexpr, LAYOUT: gl.constexpr):
    """cp.async of a chunk's (C, P) rows of one head, PTR + b s_b + t s_t + h s_h + p, into DST (zeros past T)."""
    t = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, LAYOUT))
    p = gl.arange(0, P, layout=gl.SliceLayout(0, LAYOUT))
    async_copy.async_copy_global_to_shared(DST, PTR + b * s_b + t[:, None] * s_t + h * s_h + p[None, :],
                                           mask=(t < T)[:, None])


@gluon.jit
def _copy_chunk_blocks(q_s, k_s, st_s, Q, K, ST, qk_base, t0, s_kt, T, st_row, C: gl.constexpr, P: gl.constexpr,
                       N2: gl.constexpr, NB: gl.constexpr, LAYOUT: gl.constexpr):
    """cp.async of a chunk's q and k rows (C, N), Q / K + qk_base + t s_kt (zeros from T on), and of one (P, N) state,
    ST + st_row + p N, into the 2 N2 / NB column blocks of q_s, k_s and st_s. Channels are stored as [even | odd]
    halves: block i holds half i // (N2 / NB), pairs (i % (N2 / NB)) NB + [0, NB). The three copies of a block are
    issued together (issuing all of q first cost dk six more barriers, offline)."""
    NBLK: gl.constexpr = N2 // NB
    tb = t0 + gl.arange(0, C, layout=gl.SliceLayout(1, LAYOUT))
    nbl = gl.arange(0, NB, layout=gl.SliceLayout(0, LAYOUT))
    pb = gl.arange(0, P, layout=gl.SliceLayout(1, LAYOUT))
    tbm = (tb < T)[:, None]
    qk_rows = qk_base + tb[:, None] * s_kt + nbl[None, :]
    st_rows = ST + st_row + pb[:, None] * (2 * N2) + nbl[None, :]
    for i in gl.static_range(2 * NBLK):
        col = (i // NBLK) * N2 + (i % NBLK) * NB
        async_copy.async_copy_global_to_shared(q_s.index(i), Q + qk_rows + col, mask=tbm)
        async_copy.async_copy_global_to_shared(k_s.index(i), K + qk_rows + col, mask=tbm)
        async_copy.async_copy_global_to_shared(st_s.index(i), st_rows + col)


@gluon.jit
def _biased_pairs(E_S, O_S, BIAS, h, j, HAS_BIAS: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr,
                  LAYOUT: gl.constexpr):
    """Column block j's even / odd (C, NB) tiles from shared memory plus the head's bias, in fp32 registers."""
    nb = j * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, LAYOUT))
    e = E_S.load(LAYOUT).to(gl.float32)
    o = O_S.load(LAYOUT).to(gl.float32)
    if HAS_BIAS:
        e += gl.load(BIAS + h * 2 * N2 + nb).to(gl.float32)[None, :]
        o += gl.load(BIAS + h * 2 * N2 + N2 + nb).to(gl.float32)[None, :]
    return e, o


@gluon.jit
def _block_angles(OMEGA, THETA_OFF, dt, b, c, state, T, S, s_ob, s_ot, j, ANGLE_DT: gl.constexpr, NB: gl.constexpr,
                  C: gl.constexpr, LAYOUT: gl.constexpr, SC: gl.constexpr):
    """Cumulative angles (C, NB) of column block j's pairs for one chunk and head (0 past S), in ``LAYOUT``: the
    in-chunk sum of dt * omega (or omega) is scanned in the blocked layout SC (scans do not lower on MMA layouts)
    and the chunk's entry angle added."""
    ts = c * C + gl.arange(0, C, layout=gl.SliceLayout(1, SC))
    ns = j * NB + gl.arange(0, NB, layout=gl.SliceLayout(0, SC))
    sm = ns < S
    om = gl.load(OMEGA + b * s_ob + ts[:, None] * s_ot + ns[None, :], mask=(ts < T)[:, None] & sm[None, :],
                 other=0.0).to(gl.float32)
    if ANGLE_DT:
        om = om * gl.convert_layout(dt, gl.SliceLayout(1, SC))[:, None]
    theta = gl.associative_scan(om, 0, _add) + gl.load(THETA_OFF + state * S + ns, mask=sm, other=0.0)[None, :]
    return gl.convert_layout(theta, LAYOUT)


@gluon.jit
def _rotate(e, o, cos, sin):
    return e * cos - o * sin, e * sin + o * cos


@gluon.jit
def _rotated_keys(K_S, KB, OMEGA, THETA_OFF, dt, b, c, h, j, state, T, S, s_ob, s_ot, HAS_KB: gl.constexpr,
                  ROTATED: gl.constexpr, ANGLE_DT: gl.constexpr, N2: gl.constexpr, NB: gl.constexpr, C: gl.constexpr,
                  LAYOUT: gl.constexpr, SC: gl.constexpr):
    """Column block j's even / odd key tiles from K_S (blocks as ``_copy_chunk_blocks`` lays them out) plus the head's
    bias, rotated by their angles where the block holds rotated pairs, in fp32 registers of ``LAYOUT``."""
    NBLK: gl.constexpr = N2 // NB
    e, o = _biased_pairs(K_S.index(j), K_S.index(NBLK + j), KB, h, j, HAS_KB, N2, NB, LAYOUT)
    if ROTATED:
        cos, sin = _cos_sin(_block_angles(OMEGA, THETA_OFF, dt, b, c, state, T, S, s_ob, s_ot, j, ANGLE_DT, NB, C,
                                          LAYOUT, SC))
        e, o = _rotate(e, o, cos, sin)
    return e, o


def applies(kernel: str, v: torch.Tensor, flags: dict) -> bool:
    """Whether a Gluon kernel (``state``, ``fwd``: the forward's chunk kernels; ``dq``, ``dx``, ``dk``) can run: an sm_90
    GPU, plain sequences, bf16 activations (the type tested; fp16 would need its own GPU run), a chunk of 64 (one
    warpgroup's MMA rows), a head size the MMAs take (products with the head size as their rows, dq's dG_in and the
    forward's chunk state, need a multiple of 64)."""
    head_ok = flags["P"] % 64 == 0 if kernel in ("dq", "fwd", "state") else flags["P"] % 16 == 0
    return (v.is_cuda and torch.cuda.get_device_capability(v.device) == (9, 0) and not flags["HAS_SEQ"]
            and v.dtype == torch.bfloat16 and flags["C"] == 64 and head_ok
            and 16 <= flags["P"] <= 256 and flags["N2"] >= 16)


def launch_flags(flags: dict, n_angles: int) -> dict:
    """The shape flags a Gluon chunk kernel takes, from the Triton kernels' (``triton_siso.kernel_flags``): its own
    column block of ``COL_BLOCK`` pairs (at most N / 2), the rotated blocks counted at that width, four warps (one
    warpgroup: every MMA has the chunk's 64 rows)."""
    nb = min(COL_BLOCK, flags["N2"])
    return dict(C=flags["C"], N2=flags["N2"], NB=nb, P=flags["P"], ROT_BLOCKS=-(-n_angles // nb),
                ANGLE_DT=flags["ANGLE_DT"], HEADS_FIRST=flags["HEADS_FIRST"], COALESCE=COALESCE, num_warps=4)


def launcher(kernel):
    """The Gluon kernel to index with a grid: its ``DirectLaunch`` where ``DIRECT`` is on, else the kernel."""
    return direct(kernel) if DIRECT else kernel
