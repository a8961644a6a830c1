"""Sparse softmax attention described once as a plan, executed by interchangeable backends.

Every sparse block here (sliding window, block top-k, chunk-gated attention) lets query row i see

    keys j in the local range  lo[i] <= j <= q_pos[i]           (own block / window, causal)
    plus every key of the selected key blocks  sel[i, :]         (complete past blocks only)

Keys are always the positions 0 .. Tk-1 of the sequence (or of the decode cache). Document masking
is folded into the plan: ``lo`` never reaches before the query's document start and only blocks of
the query's own document are selectable. A row with ``lo > q_pos`` and no selection attends to
nothing and outputs zeros (a closed gate).

Routing and top-k decisions are made once, here, in plain PyTorch (``select_blocks``); the backends
only execute the plan, so they compute the same function:

* ``naive``: explicit softmax over a dense mask (the oracle);
* ``sdpa``:  PyTorch SDPA with the same dense mask (CPU training; FlexAttention has no CPU backward);
* ``flex``:  FlexAttention with a BlockMask built directly from the plan (tile lists, no T x T pass),
  so skipped tiles cost nothing. Needs the plain training layout (Tq == Tk, q_pos = 0 .. T-1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from hybrid.kernels.attention import attention_naive, attention_sdpa

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    BlockMask = flex_attention = None

_compiled_flex: dict[str, object] = {}  # compile mode -> compiled flex_attention
_SCORE_CHUNK = 1 << 24  # elements of one (B, Hkv, rows, blocks) score slab: caps top-k memory at long T


def flex_available(t: torch.Tensor) -> bool:
    return flex_attention is not None and t.is_cuda


# ----------------------------------------------------------------------------------------------
# documents and key blocks


def doc_starts(seq_idx: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor:
    """(B or 1, T) position of the first token of each token's document (0 without packing)."""
    if seq_idx is None:
        return torch.zeros(1, T, dtype=torch.long, device=device)
    pos = torch.arange(T, device=device).expand_as(seq_idx)
    first = torch.ones_like(seq_idx, dtype=torch.bool)
    first[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return torch.where(first, pos, torch.zeros_like(pos)).cummax(dim=1).values


@dataclass
class KeyBlocks:
    """Keys grouped in blocks of ``size`` counted from each document's start (so a packed document
    gets the blocks it would get alone)."""

    block_id: torch.Tensor  # (B, Tk) block of each key
    start: torch.Tensor  # (B, G) first position of each block; padding blocks start past the end
    size: int

    @property
    def count(self) -> int:
        return self.start.shape[1]


def key_blocks(Tk: int, size: int, doc_start: torch.Tensor) -> KeyBlocks:
    pos = torch.arange(Tk, device=doc_start.device)
    local = pos - doc_start  # (B, Tk) position inside the document
    block_id = torch.cumsum((local % size == 0).long(), dim=1) - 1  # (B, Tk)
    G = int(block_id.max()) + 1
    start = torch.full((block_id.shape[0], G), Tk + size, dtype=torch.long, device=pos.device)
    start.scatter_reduce_(1, block_id, pos.expand_as(block_id), reduce="amin")
    return KeyBlocks(block_id, start, size)


def block_means(k: torch.Tensor, blocks: KeyBlocks) -> torch.Tensor:
    """(B, Hkv, Tk, D) keys -> (B, Hkv, G, D) float32 mean key of each block (MoBA's block summary)."""
    B, Hkv, Tk, D = k.shape
    bid = blocks.block_id.expand(B, Tk)
    sums = torch.zeros(B, Hkv, blocks.count, D, device=k.device, dtype=torch.float32)
    sums.scatter_add_(2, bid[:, None, :, None].expand(B, Hkv, Tk, D), k.float())
    counts = torch.zeros(B, blocks.count, device=k.device, dtype=torch.float32)
    counts.scatter_add_(1, bid, torch.ones_like(bid, dtype=torch.float32))
    return sums / counts.clamp(min=1)[:, None, :, None]


@torch.no_grad()
def select_blocks(q: torch.Tensor, means: torch.Tensor, blocks: KeyBlocks, own_start: torch.Tensor,
                  doc_start: torch.Tensor, topk: int, max_past: int | None = None) -> torch.Tensor:
    """Top-k complete past key blocks per query row, scored q . mean(K_block) (summed over a GQA group).

    q (B, H, Tq, D); own_start / doc_start (B or 1, Tq): a block is a candidate when it lies in the
    query's document and ends before ``own_start`` (the start of the query's own block or chunk), and
    at most ``max_past`` blocks back. Returns (B, Hkv, Tq, min(topk, G)) block ids, -1 where a row has
    fewer candidates. Decisions are not differentiable (as in MoBA / NSA selection).
    """
    B, H, Tq, D = q.shape
    Hkv, G, size = means.shape[1], blocks.count, blocks.size
    qs = q.float().view(B, Hkv, H // Hkv, Tq, D).sum(2)  # one selection per KV head (NSA's GQA rule)
    start = blocks.start[:, None, :]  # (B, 1, G)
    own, docs = own_start.expand(B, Tq)[:, :, None], doc_start.expand(B, Tq)[:, :, None]
    cand = (start >= docs) & (start + size <= own)  # (B, Tq, G)
    if max_past is not None:
        cand &= start >= own - max_past * size
    k = min(topk, G)
    out = torch.full((B, Hkv, Tq, k), -1, dtype=torch.long, device=q.device)
    if k == 0:
        return out
    rows = max(1, _SCORE_CHUNK // max(1, B * Hkv * G))
    for a in range(0, Tq, rows):
        scores = qs[:, :, a:a + rows] @ means.transpose(-1, -2)  # (B, Hkv, rows, G)
        scores.masked_fill_(~cand[:, None, a:a + rows], float("-inf"))
        val, idx = scores.topk(k, dim=-1)
        out[:, :, a:a + rows] = idx.masked_fill(val == float("-inf"), -1)
    return out


# ----------------------------------------------------------------------------------------------
# the plan


@dataclass
class SparsePlan:
    """Allowed keys of each query row (see the module docstring)."""

    q_pos: torch.Tensor  # (B, Tq) absolute position of each query row
    lo: torch.Tensor  # (B, Tq) first key of the local range [lo, q_pos]; lo > q_pos = no local keys
    doc_start: torch.Tensor  # (B, Tq) the query's document start (the causal baseline for densities)
    num_keys: int  # Tk
    sel: torch.Tensor | None = None  # (B, Hkv, Tq, k) selected key blocks, -1 = none
    blocks: KeyBlocks | None = None

    @property
    def batch(self) -> int:
        return self.q_pos.shape[0]

    def rows(self, idx: torch.Tensor) -> SparsePlan:
        """The plan of query rows ``idx`` (B, n) only (e.g. the queries of open chunks)."""
        sel = None if self.sel is None else self.sel.gather(2, idx[:, None, :, None].expand(-1, self.sel.shape[1], -1,
                                                                                              self.sel.shape[3]))
        return replace(self, q_pos=self.q_pos.gather(1, idx), lo=self.lo.gather(1, idx),
                       doc_start=self.doc_start.gather(1, idx), sel=sel)

    def close(self, closed: torch.Tensor) -> SparsePlan:
        """Rows where ``closed`` (B, Tq) is True attend to nothing."""
        sel = None if self.sel is None else self.sel.masked_fill(closed[:, None, :, None], -1)
        return replace(self, lo=torch.where(closed, self.q_pos + 1, self.lo), sel=sel)


def window_plan(q_pos: torch.Tensor, num_keys: int, window: int | None, doc_start: torch.Tensor) -> SparsePlan:
    """Causal attention, optionally limited to a window of ``window`` keys (the query included)."""
    lo = doc_start if window is None else torch.maximum(doc_start, q_pos - window + 1)
    lo = lo.expand(max(lo.shape[0], q_pos.shape[0]), -1)
    return SparsePlan(q_pos.expand_as(lo), lo, doc_start.expand_as(lo), num_keys)


# ----------------------------------------------------------------------------------------------
# dense execution (reference and SDPA)


def dense_mask(plan: SparsePlan, n_heads: int) -> torch.Tensor:
    """Boolean (B, H or 1, Tq, Tk) mask of the plan."""
    kpos = torch.arange(plan.num_keys, device=plan.q_pos.device)
    mask = (kpos <= plan.q_pos[:, :, None]) & (kpos >= plan.lo[:, :, None])  # (B, Tq, Tk)
    mask = mask[:, None]
    if plan.sel is not None and plan.sel.shape[-1] > 0:
        B, Hkv, Tq, _ = plan.sel.shape
        chosen = torch.zeros(B, Hkv, Tq, plan.blocks.count + 1, dtype=torch.bool, device=mask.device)
        chosen.scatter_(3, plan.sel + 1, True)  # column 0 collects the -1 fillers
        bid = plan.blocks.block_id.expand(B, -1)[:, None, None, :].expand(B, Hkv, Tq, -1)
        mask = mask | chosen[..., 1:].gather(3, bid)  # (B, Hkv, Tq, Tk)
        mask = mask.repeat_interleave(n_heads // Hkv, dim=1)
    return mask


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan,
                     backend: str = "auto", tile: int = 128) -> torch.Tensor:
    """q (B, H, Tq, D), k/v (B, Hkv, Tk, D) -> (B, H, Tq, D) under ``plan``; empty rows give zeros.
    ``tile`` is the FlexAttention BlockMask tile."""
    if backend == "flex" or (backend == "auto" and flex_available(q) and plan_is_square(plan)):
        return attention_flex(q, k, v, plan, tile)
    mask = dense_mask(plan, q.shape[1])
    # A row with no allowed key would be all -inf (NaN on some SDPA kernels, also in backward). Let
    # it see key 0 and zero its output: same result, finite gradients on every backend.
    empty = ~mask.any(-1, keepdim=True)  # (B, H|1, Tq, 1)
    mask = mask | (empty & (torch.arange(plan.num_keys, device=q.device) == 0))
    out = attention_naive(q, k, v, mask) if backend == "naive" else attention_sdpa(q, k, v, mask)
    return out.masked_fill(empty, 0.0)


def plan_is_square(plan: SparsePlan) -> bool:
    """Training layout: one query row per key position, in order (what BlockMask tiles assume)."""
    return plan.q_pos.shape[1] == plan.num_keys


# ----------------------------------------------------------------------------------------------
# densities (logged: the fraction of attention actually computed)


@torch.no_grad()
def pair_counts(plan: SparsePlan) -> tuple[float, float]:
    """(allowed (query, key) pairs, document-causal pairs), averaged over KV heads."""
    q, lo = plan.q_pos, plan.lo
    local = (q - lo + 1).clamp(min=0).float()  # (B, Tq)
    allowed = local.sum()
    if plan.sel is not None and plan.sel.shape[-1] > 0:
        B = plan.sel.shape[0]
        valid = plan.sel >= 0
        start = plan.blocks.start.expand(B, -1).gather(1, plan.sel.clamp(min=0).flatten(1)).view_as(plan.sel)  # (B, Hkv, Tq, k)
        end = start + plan.blocks.size - 1
        overlap = (torch.minimum(end, q[:, None, :, None]) - torch.maximum(start, lo[:, None, :, None]) + 1).clamp(min=0)
        extra = ((plan.blocks.size - overlap) * valid).float().sum() / plan.sel.shape[1]
        allowed = allowed + extra
    causal = (q - plan.doc_start + 1).clamp(min=1).float().sum()
    return float(allowed), float(causal)


# ----------------------------------------------------------------------------------------------
# FlexAttention


@dataclass
class TileMaps:
    """Which (query tile, key tile) pairs hold allowed pairs (``any``) and which hold only allowed
    pairs (``full``: no mask evaluation needed). (B, Hkv or 1, n_tiles, n_tiles) booleans."""

    any: torch.Tensor
    full: torch.Tensor
    tile: int


@torch.no_grad()
def tile_maps(plan: SparsePlan, tile: int) -> TileMaps:
    """Tile-level structure of a square plan, computed from ranges (never from a T x T mask)."""
    B, T = plan.q_pos.shape
    n = math.ceil(T / tile)
    pad = n * tile - T
    dev = plan.q_pos.device
    q = torch.arange(n * tile, device=dev)
    lo = torch.nn.functional.pad(plan.lo, (0, pad), value=0)
    valid_row = (q < T)[None].expand(B, -1)
    nonempty = (lo <= q) & valid_row  # rows with local keys
    lo_t, q_t = lo.view(B, n, tile), q.view(n, tile)
    ne_t, valid_t = nonempty.view(B, n, tile), valid_row.view(B, n, tile)
    big = n * tile + 1
    min_lo = torch.where(ne_t, lo_t, big).amin(-1)  # (B, n)
    max_lo = torch.where(ne_t, lo_t, -1).amax(-1)
    max_q = torch.where(ne_t, q_t, -1).amax(-1)
    kt = torch.arange(n, device=dev)
    k_first, k_last = kt * tile, torch.clamp(kt * tile + tile - 1, max=T - 1)
    any_local = (k_last[None, None, :] >= min_lo[:, :, None]) & (k_first[None, None, :] <= max_q[:, :, None])
    all_rows_local = (ne_t == valid_t).all(-1)  # every real row of the tile has local keys
    full_local = (all_rows_local[:, :, None] & (k_first[None, None, :] >= max_lo[:, :, None])
                  & ((kt * tile + tile - 1)[None, None, :] <= (kt * tile)[None, :, None]))  # key tile wholly before
    full_local &= (kt * tile + tile - 1 < T)[None, None, :]
    any_map, full_map = any_local[:, None], full_local[:, None]  # (B, 1, n, n)
    if plan.sel is not None and plan.sel.shape[-1] > 0:
        sel_any, sel_full = _selected_tiles(plan, tile, n)
        any_map = any_map | sel_any
        full_map = full_map | sel_full
    return TileMaps(any_map, full_map & any_map, tile)


def _selected_tiles(plan: SparsePlan, tile: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hkv, T, k = plan.sel.shape
    size = plan.blocks.size
    valid = plan.sel >= 0
    start = plan.blocks.start.expand(B, -1).gather(1, plan.sel.clamp(min=0).flatten(1)).view_as(plan.sel)  # (B, Hkv, T, k)
    qt = (torch.arange(T, device=start.device) // tile)[None, None, :, None].expand_as(start)
    flat_q = (qt * n)  # row offset of the (query tile, key tile) map
    any_map = torch.zeros(B, Hkv, n * n, dtype=torch.uint8, device=start.device)
    span = (size + tile - 2) // tile + 1  # key tiles one block can touch
    for o in range(span):
        kt = start // tile + o
        hit = valid & (kt * tile <= start + size - 1) & (kt < n)
        idx = (flat_q + kt.clamp(max=n - 1)).masked_fill(~hit, 0).flatten(2)
        any_map.scatter_reduce_(2, idx, hit.to(torch.uint8).flatten(2), reduce="amax")
    # Full: every row of the query tile selected a block that covers the whole key tile.
    count = torch.zeros(B, Hkv, n * n, dtype=torch.long, device=start.device)
    first_full = (start + tile - 1) // tile  # first key tile wholly inside the block
    for o in range(max(0, size // tile)):
        kt = first_full + o
        cover = valid & ((kt + 1) * tile - 1 <= start + size - 1) & (kt < n)
        idx = (flat_q + kt.clamp(max=n - 1)).masked_fill(~cover, 0).flatten(2)
        count.scatter_add_(2, idx, cover.long().flatten(2))
    rows = torch.bincount(torch.arange(T, device=start.device) // tile, minlength=n)  # real rows per query tile
    full = count.view(B, Hkv, n, n) == rows[None, None, :, None]
    return any_map.view(B, Hkv, n, n) > 0, full


def _kv_lists(m: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hkv, n, n) bool -> BlockMask's (num_blocks, indices), expanded to the query heads."""
    m = m.repeat_interleave(n_heads // m.shape[1], dim=1) if m.shape[1] > 1 else m
    num = m.sum(-1).to(torch.int32)
    idx = torch.argsort((~m).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return num.contiguous(), idx.contiguous()


def plan_block_mask(plan: SparsePlan, n_heads: int, tile: int = 128):
    """A FlexAttention BlockMask executing ``plan`` exactly (mask_mod) while skipping empty tiles."""
    if not plan_is_square(plan):
        raise ValueError("FlexAttention plans need one query row per key position (training layout)")
    maps = tile_maps(plan, tile)
    partial = maps.any & ~maps.full
    kv_num, kv_idx = _kv_lists(partial, n_heads)
    full_num, full_idx = _kv_lists(maps.full, n_heads)
    B, T = plan.q_pos.shape
    n = maps.any.shape[-1]
    pad = n * tile - T
    # Captured tensors are padded to whole tiles: the kernel may evaluate mask_mod on padded indices.
    lo = torch.nn.functional.pad(plan.lo, (0, pad), value=n * tile + 1)
    if plan.sel is not None and plan.sel.shape[-1] > 0:
        sel = torch.nn.functional.pad(plan.sel, (0, 0, 0, pad), value=-1)
        bid = torch.nn.functional.pad(plan.blocks.block_id.expand(B, -1), (0, pad), value=-2)
        groups = n_heads // sel.shape[1]
        mask_mod = _topk_mask_mod(lo.expand(sel.shape[0], -1), sel, bid.expand(sel.shape[0], -1), groups)
    else:
        mask_mod = _local_mask_mod(lo)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=tile, mask_mod=mask_mod,
                                    seq_lengths=(T, T))


def _local_mask_mod(lo):
    if lo.shape[0] == 1:  # one plan for the whole batch (no documents): do not index by batch
        def mask_mod(b, h, q, kv):
            return (kv <= q) & (kv >= lo[0, q])
    else:
        def mask_mod(b, h, q, kv):
            return (kv <= q) & (kv >= lo[b, q])

    return mask_mod


def _topk_mask_mod(lo, sel, bid, groups):
    k = sel.shape[-1]

    def mask_mod(b, h, q, kv):
        allowed = (kv <= q) & (kv >= lo[b, q])
        blk, hk = bid[b, kv], h // groups
        for s in range(k):  # unrolled: k is small (top-k)
            allowed = allowed | (sel[b, hk, q, s] == blk)
        return allowed

    return mask_mod


def attention_flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SparsePlan, tile: int = 128,
                   block_mask=None) -> torch.Tensor:
    """FlexAttention (compiled on CUDA, eager elsewhere: forward only on CPU)."""
    if flex_attention is None:
        raise RuntimeError("FlexAttention needs torch >= 2.5")
    if block_mask is None:
        block_mask = plan_block_mask(plan, q.shape[1], tile)
    fn = flex_attention
    if q.is_cuda:
        # Tiles under 128: Flex's default sm90 backward config needs 128-row sparse blocks and would skip
        # every choice, so those compile with autotuning, whose search space holds 32- and 64-row configs.
        mode = "max-autotune-no-cudagraphs" if min(block_mask.BLOCK_SIZE) < 128 else "default"
        if mode not in _compiled_flex:
            # Each new sequence length is a recompile (static shapes keep Flex fastest). Past dynamo's
            # default limit of 8 it would silently run flex_attention eagerly, which materialises the whole
            # (T, T) score matrix: a length sweep (a bench, a length warm-up) then runs out of memory.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            _compiled_flex[mode] = torch.compile(flex_attention, dynamic=False, mode=mode)
        fn = _compiled_flex[mode]
    return fn(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])


# ----------------------------------------------------------------------------------------------
# gathered blocks (MoBA's layout): dense attention per query group over its gathered key blocks


def attention_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sel: torch.Tensor, block: int,
                       group: int) -> torch.Tensor:
    """Block top-k where every query group of ``group`` rows shares one selection, without documents or
    a window: each group attends to [its selected key blocks ; its own keys, causally] as one small
    dense attention (MoBA's gathered layout), so the work is exactly the selected pairs.

    q (B, H, T, D), k/v (B, Hkv, T, D), sel (B, Hkv, G, k) block ids per group (-1 = none; a group's
    count of valid slots is the same for every head), ``block`` divides ``group``.
    """
    B, H, T, D = q.shape
    Hkv, G, kk = k.shape[1], sel.shape[2], sel.shape[3]
    pad = G * group - T
    if pad:  # padded keys sit after every real query of the last group: the causal part hides them
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    # torch.gather + one masked SDPA: on the H200, 18.8 ms vs 27.7 ms for advanced indexing + a lower-right causal bias
    idx = (sel.clamp(min=0) * block)[..., None] + torch.arange(block, device=q.device)  # (B, Hkv, G, k, block)
    idx = idx.flatten(2)[..., None].expand(-1, -1, -1, D)  # (B, Hkv, G * k * block, D)
    L = kk * block

    def keys(t):  # (B, Hkv, T, D) -> (B * G, H, L + group, D): gathered blocks, then the group's own keys
        picked = t.gather(2, idx).view(B, Hkv, G, L, D)
        own = t.view(B, Hkv, G, group, D)
        both = torch.cat([picked, own], dim=3).transpose(1, 2).reshape(B * G, Hkv, L + group, D)
        return both.repeat_interleave(H // Hkv, dim=1) if H > Hkv else both

    qg = q.view(B, H, G, group, D).transpose(1, 2).reshape(B * G, H, group, D)
    valid = (sel[:, 0] >= 0).repeat_interleave(block, dim=-1)  # (B, G, L) same for every head
    causal = torch.ones(group, group, dtype=torch.bool, device=q.device).tril()
    mask = torch.cat([valid[:, :, None, :].expand(B, G, group, L), causal.expand(B, G, group, group)], dim=-1)
    out = attention_sdpa(qg, keys(k), keys(v), mask.reshape(B * G, 1, group, L + group))  # (B * G, H, group, D)
    return out.view(B, G, H, group, D).transpose(1, 2).reshape(B, H, G * group, D)[:, :, :T]
