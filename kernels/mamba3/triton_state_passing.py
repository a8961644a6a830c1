"""Inter-chunk state passing of the Mamba-3 SISO scan (the sequential step between the chunk kernels of
``triton_siso.py`` and ``triton_siso_bwd.py``), K chunks per step so that several chunks' loads are in flight.

Forward, per (sequence, head) and channel, with a_c = e^{cs_last[c]} (0 where a document starts, cs_last = -inf):

    G_{-1} = G0,   G_c = a_c G_{c-1} + local_c,   G_in[c] = G_{c-1},   G_final = G_{nc-1}

Backward, the transposed recurrence run from the last chunk, with dG_{nc-1} = dG_final:

    dlocal[c] = dG_c,   d cs_last[c] = a_c sum(dG_c * G_in[c]),   dG_{c-1} = a_c dG_c + dG_in[c],   dG0 = dG_{-1}

Both are x -> a x + b maps applied in sequence. Composition is associative,
(a1, b1) then (a2, b2) = (a1 a2, a2 b1 + b2), so a (K, BLOCK) tile of K consecutive chunks, loaded at once, is
combined by ``tl.associative_scan`` along the chunk axis; row k then holds the maps of the tile's first k + 1
chunks composed, (A_k, B_k), and the state after them is A_k g + B_k with g the state carried into the tile.
Rows past either end of the sequence load a = 1, b = 0 (the identity), so the last row is the carry out.
A scan of one chunk a step waits a full DRAM latency per chunk (one chunk of every program in flight, 0.5 MB
across the GPU at 1 x 64k tokens); here each step issues the next tile's loads before it scans the current one.

The scan is inclusive (row k: the state after chunk c_k) while G_in and dlocal want the state *entering* a chunk:
that is the inclusive result of the chunk before it, so each row is stored one chunk further along
(G_in[c + 1] = G_c, dlocal[c - 1] = dG_{c - 1}), and the chunk at the sequence start (G_in[0] = G0, dlocal[nc-1] =
dG_final) is written before the loop. Nothing is divided by a decay (a_c may be 0). Sums run in float32 whatever
the storage type of the chunk states.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.launch import direct

# Chunks per step: each step loads the next tile while it scans this one, so K rows of each tensor it reads are in
# flight at a time. At 1 x 64k tokens (32 heads, 64 x 128 states, bf16) a chunk is 0.5 MB across the whole GPU, far
# less than an H100 needs in flight to cover a DRAM latency (~2 MB); 8 rows are ~4 MB: 8 chunks of one tensor in the
# forward, 4 chunks of two (dG_in and G_in) in the backward, whose tiles at K = 8 would spill registers.
K_FWD, K_BWD = 8, 4
# Launch at least this many programs where the state allows: with few sequences and heads, narrower channel blocks
# give every SM of a 132-SM H100 several programs (at 1 x 64k, 1024-channel blocks make 256 programs: two on most
# SMs, one on a few), so the loads in flight are spread evenly over the SMs.
MIN_PROGRAMS = 1024


@triton.jit
def _then(a1, b1, a2, b2):
    """x -> a1 x + b1, then x -> a2 x + b2."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _load_rows(X, CS_LAST, idx, ok, offs, m, PN):
    """Rows idx (K,) of X, (K, BLOCK) in the storage type, and their log-decays (K,). Rows not ok read as the
    identity map: cs = 0 (a = 1) and x = 0."""
    cs = tl.load(CS_LAST + idx, mask=ok, other=0.0)
    x = tl.load(X + idx[:, None] * PN + offs[None, :], mask=ok[:, None] & m[None, :], other=0.0)
    return cs, x


@triton.jit
def _compose(cs, x):
    """Row k: the maps (e^cs, x) of rows 0..k composed, (A, B), (K, BLOCK) fp32 each."""
    return tl.associative_scan((tl.broadcast_to(tl.exp(cs)[:, None], x.shape), x.to(tl.float32)), 0, _then)


@triton.jit
def _last_row(t, rows, K: tl.constexpr):
    """Row K - 1 of a (K, BLOCK) tile (a select: exact)."""
    return tl.sum(tl.where(rows[:, None] == K - 1, t, 0.0), axis=0)


@triton.jit
def _state_passing_fwd_k(LOCAL, CS_LAST, G0, G_IN, G_FINAL, H, nc, PN, K: tl.constexpr, BLOCK: tl.constexpr):
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    rows = tl.arange(0, K)
    g = tl.load(G0 + bh * PN + offs, mask=m, other=0.0)  # (BLOCK,) fp32 carry: G before the tile
    tl.store(G_IN + (b * nc * H + h) * PN + offs, g.to(G_IN.dtype.element_ty), mask=m)  # G_in[0] = G0
    idx = (b * nc + rows) * H + h  # (K,) rows of chunks 0..K-1
    cs, x = _load_rows(LOCAL, CS_LAST, idx, rows < nc, offs, m, PN)
    for c0 in range(0, nc, K):
        c = c0 + rows
        # The next tile's loads go out before this tile's scan. A tile loaded and scanned in the same step is not all in
        # flight at once: ptxas interleaves its rows' loads with the scan that consumes them (sm_90 SASS of Triton
        # 3.9, bf16: 2 of 8 rows issued before the first use, then a wait per row or two). Loads with no consumer in
        # the step cannot be held back that way.
        cs_next, x_next = _load_rows(LOCAL, CS_LAST, idx + K * H, c + K < nc, offs, m, PN)
        A, B = _compose(cs, x)
        gc = A * g[None, :] + B  # (K, BLOCK): G_c
        tl.store(G_IN + (idx + H)[:, None] * PN + offs[None, :], gc.to(G_IN.dtype.element_ty),
                 mask=(c + 1 < nc)[:, None] & m[None, :])  # G_in[c + 1] = G_c
        g = _last_row(gc, rows, K)
        idx, cs, x = idx + K * H, cs_next, x_next
    tl.store(G_FINAL + bh * PN + offs, g, mask=m)


@triton.jit
def _state_passing_bwd_k(DG_IN, G_IN, CS_LAST, DG_FINAL, DLOCAL, DCSL_PART, DG0, H, nc, PN, nblk,
                         K: tl.constexpr, BLOCK: tl.constexpr):
    bh, blk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    m = offs < PN
    rows = tl.arange(0, K)
    ds = tl.load(DG_FINAL + bh * PN + offs, mask=m, other=0.0)  # (BLOCK,) fp32 carry: dG of the chunk above the tile
    last = (b * nc + nc - 1) * H + h
    tl.store(DLOCAL + last * PN + offs, ds.to(DLOCAL.dtype.element_ty), mask=m)  # dlocal[nc - 1] = dG_final
    g = tl.load(G_IN + last * PN + offs, mask=m, other=0.0).to(tl.float32)
    tl.store(DCSL_PART + last * nblk + blk, tl.sum(ds * g, axis=0) * tl.exp(tl.load(CS_LAST + last)))
    c = nc - 1 - rows  # (K,) descending chunks: the reverse scan is a forward scan of the tile
    idx = (b * nc + c) * H + h
    # Row k yields dG_{c-1}: it goes to chunk c - 1, with that chunk's G_in and decay (the rows idx - H).
    cs, x = _load_rows(DG_IN, CS_LAST, idx, c >= 0, offs, m, PN)
    cs_prev, g_prev = _load_rows(G_IN, CS_LAST, idx - H, c >= 1, offs, m, PN)
    for i0 in range(0, nc, K):
        c = nc - 1 - i0 - rows
        # The next tile's loads go out before this tile's scan, as in the forward.
        cs_next, x_next = _load_rows(DG_IN, CS_LAST, idx - K * H, c >= K, offs, m, PN)
        cs_prev_next, g_prev_next = _load_rows(G_IN, CS_LAST, idx - (K + 1) * H, c >= K + 1, offs, m, PN)
        A, B = _compose(cs, x)
        dsc = A * ds[None, :] + B  # (K, BLOCK): dG_{c-1}
        prev = c >= 1
        tl.store(DLOCAL + (idx - H)[:, None] * PN + offs[None, :], dsc.to(DLOCAL.dtype.element_ty),
                 mask=prev[:, None] & m[None, :])
        tl.store(DCSL_PART + (idx - H) * nblk + blk, tl.sum(dsc * g_prev.to(tl.float32), axis=1) * tl.exp(cs_prev), mask=prev)
        ds = _last_row(dsc, rows, K)
        idx, cs, x, cs_prev, g_prev = idx - K * H, cs_next, x_next, cs_prev_next, g_prev_next
    tl.store(DG0 + bh * PN + offs, ds, mask=m)


def launch_config(bh: int, pn: int, itemsize: int, block: int | None = None) -> tuple[int, int]:
    """(BLOCK, num_warps) for bh = B*H scans of pn channels stored itemsize bytes each: 1024-channel blocks unless
    that leaves fewer than MIN_PROGRAMS programs, then down to 256. Each thread takes 16 bytes of each row (one
    vector load) and all K rows: a warp per 512 bytes of a row, so that the scan over rows stays in registers
    (more warps would split the rows between warps, and the scan would go through shared memory)."""
    if block is None:
        block = min(1024, triton.next_power_of_2(pn))
        while block > 256 and bh * triton.cdiv(pn, block) < MIN_PROGRAMS:
            block //= 2
    return block, max(1, min(8, block * itemsize // 512))


def state_passing_fwd(local: torch.Tensor, cs_last: torch.Tensor, g0: torch.Tensor,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Entering states of every chunk and the final state.

    local (B, nc, H, *state) chunk states from zero, in their storage type; cs_last (B, nc, H) fp32 log-decay
    of each chunk (-inf: a document starts there); g0 (B, H, *state) fp32. Returns g_in like local (the state
    entering each chunk) and g_final (B, H, *state) fp32. ``block`` overrides the channel block (tests).
    """
    Bsz, nc, H = local.shape[:3]
    local, cs_last, g0 = local.contiguous(), cs_last.contiguous(), g0.contiguous()
    PN = local[0, 0, 0].numel()
    g_in, g_final = torch.empty_like(local), torch.empty_like(g0)
    BLOCK, warps = launch_config(Bsz * H, PN, local.element_size(), block)
    direct(_state_passing_fwd_k)[(Bsz * H, triton.cdiv(PN, BLOCK))](local, cs_last, g0, g_in, g_final, H, nc, PN,
                                                                    K=K_FWD, BLOCK=BLOCK, num_warps=warps)
    return g_in, g_final


def state_passing_bwd(dg_in: torch.Tensor, g_in: torch.Tensor, cs_last: torch.Tensor, dg_final: torch.Tensor,
                      block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward of ``state_passing_fwd`` (with dg_in the gradient of its g_in, g_in its output).

    Returns dlocal like dg_in, dcsl (B, nc, H) fp32 (d cs_last) and dg0 like dg_final (B, H, *state) fp32.
    """
    Bsz, nc, H = dg_in.shape[:3]
    dg_in, g_in, cs_last, dg_final = dg_in.contiguous(), g_in.contiguous(), cs_last.contiguous(), dg_final.contiguous()
    PN = dg_in[0, 0, 0].numel()
    BLOCK, warps = launch_config(Bsz * H, PN, dg_in.element_size(), block)
    nblk = triton.cdiv(PN, BLOCK)
    dlocal, dg0 = torch.empty_like(dg_in), torch.empty_like(dg_final)
    dcsl_part = torch.empty(Bsz, nc, H, nblk, device=dg_in.device, dtype=torch.float32)  # per channel block
    direct(_state_passing_bwd_k)[(Bsz * H, nblk)](dg_in, g_in, cs_last, dg_final, dlocal, dcsl_part, dg0, H, nc, PN, nblk,
                                                  K=K_BWD, BLOCK=BLOCK, num_warps=warps)
    return dlocal, dcsl_part.sum(-1), dg0
