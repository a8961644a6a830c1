"""Each chunk's entry angle for the Mamba-3 chunk kernels, in two small launches.

    1. _angle_chunk_totals  grid (B * nc)               inc[b, c, h, s] = sum over the chunk's tokens of dt * omega
    2. _angle_prefix        grid (B, cdiv(H * S, BLK))  entry = start + exclusive prefix of inc over chunks, mod 2pi

Both in float64: at 64k tokens an angle reaches ~1e5 rad before its reduction mod 2pi, where float32 would keep
only ~1e-2 rad. The oracle is ``triton_siso.angle_offsets_torch`` (the same sums as float64 tensor ops), which
also serves packed documents (``seq_idx``), whose angles restart at every document. These two launches replaced
~15 tensor ops (a float64 batched matmul, a blocked cumulative sum, concatenations, remainders) whose issue cost
the host ~0.27 ms per layer call: the forward of a Mamba-3 block was host-bound in training (docs/perf-notes.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.launch import direct

TWO_PI = tl.constexpr(6.283185307179586)  # a constexpr: jitted code reads no other globals


@triton.jit
def _angle_chunk_totals(DT, OM, INC, T, H, S, nc, s_db, s_dt, s_dh, s_ob, s_ot,
                        C: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, TB: tl.constexpr, ANGLE_DT: tl.constexpr):
    """inc[b, c] (H, S) = sum_t dt[b, t, h] omega[b, t, s] over chunk c's tokens (omega alone without ANGLE_DT).
    Products of float32 inputs are exact in float64; TB tokens per step keep the (TB, BH, BS) tile small."""
    pid = tl.program_id(0).to(tl.int64)
    b, c = pid // nc, pid % nc
    h = tl.arange(0, BH)
    s = tl.arange(0, BS)
    acc = tl.zeros((BH, BS), dtype=tl.float64)
    for t0 in range(0, C, TB):
        t = c * C + t0 + tl.arange(0, TB)
        tm = t < T
        om = tl.load(OM + b * s_ob + t[:, None] * s_ot + s[None, :], mask=tm[:, None] & (s[None, :] < S),
                     other=0.0).to(tl.float64)  # (TB, BS)
        if ANGLE_DT:
            dt = tl.load(DT + b * s_db + t[:, None] * s_dt + h[None, :] * s_dh, mask=tm[:, None] & (h[None, :] < H),
                         other=0.0).to(tl.float64)  # (TB, BH)
            acc += tl.sum(dt[:, :, None] * om[:, None, :], axis=0)
        else:
            acc += tl.sum(om, axis=0)[None, :]
    tl.store(INC + ((pid * H + h[:, None]) * S + s[None, :]), acc, mask=(h[:, None] < H) & (s[None, :] < S))


@triton.jit
def _mod_two_pi(x):
    return x - TWO_PI * tl.floor(x / TWO_PI)


@triton.jit
def _angle_prefix(INC, START, OFF, FINAL, nc, HS, CB: tl.constexpr, BLK: tl.constexpr, HAS_START: tl.constexpr):
    """For one row b and BLK of its (head, angle) pairs: walk the chunks CB at a time, keeping the float64 angle
    reached so far; each chunk's entry (start + increments of the chunks before it) is stored mod 2pi in float32,
    the angle after the last chunk mod 2pi in float64."""
    b = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLK + tl.arange(0, BLK)
    jm = j < HS
    carry = tl.zeros((BLK,), dtype=tl.float64)
    if HAS_START:
        carry += tl.load(START + b * HS + j, mask=jm, other=0.0).to(tl.float64)
    for c0 in range(0, nc, CB):
        c = c0 + tl.arange(0, CB)
        m = (c[:, None] < nc) & jm[None, :]
        off = (b * nc + c[:, None]) * HS + j[None, :]
        inc = tl.load(INC + off, mask=m, other=0.0)  # (CB, BLK) float64
        entry = carry[None, :] + tl.cumsum(inc, axis=0) - inc
        tl.store(OFF + off, _mod_two_pi(entry).to(tl.float32), mask=m)
        carry += tl.sum(inc, axis=0)
    tl.store(FINAL + b * HS + j, _mod_two_pi(carry), mask=jm)


def angle_offsets_triton(omega: torch.Tensor, dt: torch.Tensor, angle_dt: bool, theta0: torch.Tensor | None,
                         chunk_size: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(entry angle per chunk (B, nc, H, S) float32, final angle (B, H, S) float64), both mod 2pi; omega (B, T, S)
    with any batch / time strides, dt (B, T, H), theta0 (B, H, S) or None. One document per row."""
    Bsz, T = dt.shape[:2]
    S = omega.shape[-1]
    nc = -(-T // chunk_size)
    if omega.stride(-1) != 1:
        omega = omega.contiguous()
    dev = dt.device
    inc = torch.empty(Bsz, nc, heads, S, device=dev, dtype=torch.float64)
    BH, BS = triton.next_power_of_2(heads), triton.next_power_of_2(S)
    TB = max(1, min(chunk_size, 4096 // (BH * BS)))  # a (TB, BH, BS) float64 tile of at most 4096 elements
    direct(_angle_chunk_totals)[(Bsz * nc,)](dt, omega, inc, T, heads, S, nc, dt.stride(0), dt.stride(1), dt.stride(2),
                                             omega.stride(0), omega.stride(1), C=chunk_size, BH=BH, BS=BS, TB=TB,
                                             ANGLE_DT=angle_dt, num_warps=4)
    off = torch.empty(Bsz, nc, heads, S, device=dev, dtype=torch.float32)
    final = torch.empty(Bsz, heads, S, device=dev, dtype=torch.float64)
    HS = heads * S
    # Narrow column blocks and long chunk blocks: the walk over chunks is the latency, the columns are parallel.
    # 64 chunks a step: at 128 the float64 cumulative sum spilled for sm_90 (scripts/offline_compile_check.py).
    BLK, CB = min(32, triton.next_power_of_2(HS)), min(64, triton.next_power_of_2(nc))
    start = theta0.contiguous() if theta0 is not None else final  # never read without HAS_START
    direct(_angle_prefix)[(Bsz, triton.cdiv(HS, BLK))](inc, start, off, final, nc, HS, CB=CB, BLK=BLK,
                                                       HAS_START=theta0 is not None, num_warps=4)
    return off, final
