"""Sparse attention plans: one function, several backends; block top-k selection; ring-buffer decode."""

import warnings

import pytest
import torch
from hybrid.kernels.sparse_attention import (
    SparsePlan,
    attention_flex,
    block_means,
    dense_mask,
    doc_starts,
    key_blocks,
    pair_counts,
    select_blocks,
    sparse_attention,
    tile_maps,
    window_plan,
)
from hybrid.layers.attention import Attention, AttentionConfig
from hybrid.layers.block_topk import BlockTopk, BlockTopkConfig

from hybrid.registry import ConfigError


def _qkv(B=2, H=4, Hkv=2, T=45, D=8, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (H, Hkv, Hkv))
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)


def _docs(T, B=2, device="cpu"):
    cut = T // 3
    return torch.tensor([[0] * cut + [1] * (T - cut), [0] * T], device=device)[:B]


def _topk_plan(q, k, block=4, topk=2, window=None, seq_idx=None, closed_frac=0.0, seed=0):
    """A block top-k plan (per-token selection) with optional documents and closed rows."""
    B, _, T, _ = q.shape
    docs = doc_starts(seq_idx, T, q.device).expand(B, T)
    blocks = key_blocks(T, block, docs)
    pos = torch.arange(T, device=q.device)[None].expand(B, T)
    own = docs + (pos - docs) // block * block
    sel = select_blocks(q, block_means(k, blocks), blocks, own, docs, topk)
    lo = own if window is None else torch.minimum(own, pos - window + 1)
    plan = SparsePlan(pos, torch.maximum(lo, docs), docs, T, sel, blocks)
    if closed_frac:
        g = torch.Generator().manual_seed(seed)
        plan = plan.close((torch.rand(B, T, generator=g) < closed_frac).to(q.device))
    return plan


def _plans(q, k):
    B, _, T, _ = q.shape
    pos = torch.arange(T)[None]
    seq_idx = _docs(T, B)
    return {
        "window": window_plan(pos, T, 7, doc_starts(None, T, q.device)),
        "window_docs": window_plan(pos, T, 7, doc_starts(seq_idx, T, q.device)),
        "topk": _topk_plan(q, k),
        "topk_window_docs_closed": _topk_plan(q, k, block=3, topk=2, window=5, seq_idx=seq_idx, closed_frac=0.3),
    }


@pytest.mark.parametrize("name", ["window", "window_docs", "topk", "topk_window_docs_closed"])
def test_sdpa_matches_naive_forward_and_backward(name):
    q, k, v = _qkv()
    plan = _plans(q, k)[name]
    outs, grads = [], []
    for backend in ("naive", "sdpa"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = sparse_attention(qq, kk, vv, plan, backend)
        out.square().sum().backward()
        outs.append(out)
        grads.append([t.grad for t in (qq, kk, vv)])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["window", "window_docs", "topk", "topk_window_docs_closed"])
def test_flex_forward_matches_sdpa_on_cpu(name):
    """FlexAttention runs forward only on the CPU (no CPU backward): enough to pin its mask to SDPA's."""
    q, k, v = _qkv(dtype=torch.float32)
    plan = _plans(q, k)[name]
    ref = sparse_attention(q, k, v, plan, "sdpa")
    with warnings.catch_warnings():  # eager FlexAttention on the CPU warns that it is unoptimised
        warnings.simplefilter("ignore")
        out = attention_flex(q, k, v, plan, tile=16)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["window", "window_docs", "topk", "topk_window_docs_closed"])
@pytest.mark.parametrize("tile", [4, 8, 16])
def test_tile_maps_bound_the_mask(name, tile):
    """FlexAttention skips tiles marked empty and skips mask evaluation in tiles marked full: the first
    must hold no allowed pair, the second only allowed pairs."""
    q, k, _ = _qkv()
    plan = _plans(q, k)[name]
    H, T = q.shape[1], q.shape[2]
    mask = dense_mask(plan, H).expand(plan.batch, H, T, T)
    maps = tile_maps(plan, tile)
    n = maps.any.shape[-1]
    pad = n * tile - T
    padded = torch.nn.functional.pad(mask, (0, pad, 0, pad)).view(plan.batch, H, n, tile, n, tile)
    # Padding query rows are don't-care for "full"; padding keys are not (a full tile must hold real keys).
    rows_free = torch.nn.functional.pad(torch.nn.functional.pad(mask, (0, pad)), (0, 0, 0, pad), value=True)
    true_any, true_all = padded.any(3).any(-1), rows_free.view(plan.batch, H, n, tile, n, tile).all(3).all(-1)
    heads = H // maps.any.shape[1]
    got_any, got_full = maps.any.repeat_interleave(heads, 1), maps.full.repeat_interleave(heads, 1)
    assert bool((got_any >= true_any).all()), "a tile with allowed pairs is marked empty"
    assert bool((true_all >= got_full).all()), "a tile marked full has masked pairs"
    assert int(got_any.sum()) == int(true_any.sum())  # and the maps are tight (no wasted tiles)


def test_pair_counts_match_mask():
    q, k, _ = _qkv()
    for plan in _plans(q, k).values():
        allowed, causal = pair_counts(plan)
        mask = dense_mask(plan, q.shape[1]).expand(plan.batch, q.shape[1], -1, -1)
        assert allowed == pytest.approx(float(mask.sum()) / q.shape[1])
        assert 0 < allowed / causal <= 1


def test_window_semantics_match_dense_attention_mask():
    """A window of W keys, the query included (flash-attn's window_size=(W-1, 0))."""
    plan = window_plan(torch.arange(6)[None], 6, 3, doc_starts(None, 6, torch.device("cpu")))
    m = dense_mask(plan, 1)[0, 0]
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True, False, False, False, False, False]


def test_select_blocks_by_brute_force():
    """Top-k over complete past blocks of the query's document, scored q . mean(K) summed over a GQA group."""
    q, k, _ = _qkv(T=23)
    B, H, T, _ = q.shape
    block, topk = 4, 2
    seq_idx = _docs(T, B)
    plan = _topk_plan(q, k, block=block, topk=topk, seq_idx=seq_idx)
    for b in range(B):
        doc = seq_idx[b]
        for hk in range(k.shape[1]):
            qs = q[b, 2 * hk:2 * hk + 2].sum(0)  # (T, D): the two query heads of this KV head
            for i in range(T):
                start = int((doc == doc[i]).nonzero()[0])
                own = start + (i - start) // block * block
                cands = [(float(qs[i] @ k[b, hk, j:j + block].mean(0)), j) for j in range(start, own - block + 1, block)]
                want = {j for _, j in sorted(cands, reverse=True)[:topk]}
                got = {int(plan.blocks.start[b, g]) for g in plan.sel[b, hk, i].tolist() if g >= 0}
                assert got == want, (b, hk, i)


def test_select_blocks_respects_max_past():
    q, k, _ = _qkv(T=40)
    B, _, T, _ = q.shape
    docs = doc_starts(None, T, q.device).expand(B, T)
    blocks = key_blocks(T, 4, docs)
    pos = torch.arange(T)[None].expand(B, T)
    own = pos // 4 * 4
    sel = select_blocks(q, block_means(k, blocks), blocks, own, docs, topk=2, max_past=3)
    start = blocks.start.expand(B, -1).gather(1, sel.clamp(min=0).flatten(1)).view_as(sel)
    ok = (sel < 0) | ((start < own[:, None, :, None]) & (start >= own[:, None, :, None] - 3 * 4))
    assert bool(ok.all())


# ---------------------------------------------------------------------------------------------- layers


def _init(layer, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    return layer


@pytest.mark.parametrize("cfg", [dict(block_size=4, topk=2), dict(block_size=3, topk=1, window=4, select="token"),
                                 dict(block_size=4, topk=3, num_kv_heads=1, max_past_blocks=3)])
def test_block_topk_layer_backends_agree(cfg):
    x = torch.randn(2, 29, 32, dtype=torch.float64)
    outs = [_init(BlockTopk(32, BlockTopkConfig(num_heads=4, backend=b, **cfg)).double())(x) for b in ("naive", "sdpa", "auto")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", [dict(block_size=4, topk=2), dict(block_size=5, topk=3, num_kv_heads=2)])
def test_block_topk_gather_backend_matches_naive(cfg):
    """MoBA's gathered layout (dense attention per query block over its selected blocks) = the plan."""
    x = torch.randn(2, 27, 32, dtype=torch.float64)
    naive = _init(BlockTopk(32, BlockTopkConfig(num_heads=4, backend="naive", **cfg)).double())
    gather = _init(BlockTopk(32, BlockTopkConfig(num_heads=4, backend="gather", **cfg)).double())
    torch.testing.assert_close(gather(x), naive(x), rtol=1e-10, atol=1e-10)
    grads = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for m in (naive, gather)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    seq_idx = _docs(27)  # documents fall back to the plan backends
    torch.testing.assert_close(gather(x, seq_idx=seq_idx), naive(x, seq_idx=seq_idx), rtol=1e-10, atol=1e-10)


def test_block_topk_is_sparse_and_full_topk_is_dense():
    x = torch.randn(1, 64, 32, dtype=torch.float64)
    sparse = _init(BlockTopk(32, BlockTopkConfig(num_heads=2, block_size=8, topk=1)).double())
    sparse(x)
    assert sparse.stats["pair_density"] < 0.5
    dense = _init(BlockTopk(32, BlockTopkConfig(num_heads=2, block_size=8, topk=8)).double())
    full = _init(Attention(32, AttentionConfig(num_heads=2)).double())
    torch.testing.assert_close(dense(x), full(x), rtol=1e-10, atol=1e-10)  # top-k over every past block = causal
    assert dense.stats["pair_density"] == pytest.approx(1.0)


@pytest.mark.parametrize("select", ["block", "token"])
def test_block_topk_chunked_prefill(select):
    layer = _init(BlockTopk(32, BlockTopkConfig(num_heads=4, num_kv_heads=2, block_size=4, topk=2, select=select)).double())
    x = torch.randn(2, 23, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.allocate_cache(2, 23)
    parts = [layer(x[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 13), (13, 14), (14, 23)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pieces", [[(0, 13)], [(0, 2), (2, 9), (9, 10), (10, 13)], [(0, 1)] + [(t, t + 1) for t in range(1, 13)]])
def test_ring_buffer_decode(pieces):
    """A window-W layer keeps W cache slots and still equals its parallel pass, prefilled in any pieces."""
    layer = _init(Attention(32, AttentionConfig(num_heads=4, num_kv_heads=2, window=4)).double())
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.allocate_cache(2, 64)
    assert cache.k.shape[2] == 4 and cache.ring
    out = torch.cat([layer(x[:, a:b], cache=cache) for a, b in pieces], 1)
    torch.testing.assert_close(out, full, rtol=1e-10, atol=1e-10)
    assert layer.stats["kv_kept"] == 4


def test_config_errors():
    with pytest.raises(ConfigError, match="window must be >= 1"):
        BlockTopkConfig(window=0)
    with pytest.raises(ConfigError, match="block_size must be >= 1"):
        BlockTopkConfig(block_size=0)
    with pytest.raises(ConfigError, match=r"topk \(8\) is larger than the number of past blocks allowed"):
        BlockTopkConfig(topk=8, max_past_blocks=4)
    with pytest.raises(ConfigError, match="no flash-attn path"):
        BlockTopkConfig(backend="flash")
    with pytest.raises(ConfigError, match="gather needs select=block and no window"):
        BlockTopkConfig(backend="gather", window=4)
    with pytest.raises(ConfigError, match="'gather' is for block_topk"):
        AttentionConfig(backend="gather")


# ---------------------------------------------------------------------------------------------- GPU


def _gpu_case(name, T=1000, dtype=torch.bfloat16):
    q, k, v = _qkv(B=2, H=4, Hkv=2, T=T, D=64, dtype=dtype, device="cuda")
    pos = torch.arange(T, device="cuda")[None]
    seq_idx = _docs(T, 2, "cuda")
    plans = {
        "window": lambda: window_plan(pos, T, 129, doc_starts(None, T, q.device)),
        "window_docs": lambda: window_plan(pos, T, 129, doc_starts(seq_idx, T, q.device)),
        "topk": lambda: _topk_plan(q, k, block=64, topk=3),
        "topk_docs_closed": lambda: _topk_plan(q, k, block=32, topk=2, window=40, seq_idx=seq_idx, closed_frac=0.3),
    }
    return q, k, v, plans[name]()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["window", "window_docs", "topk", "topk_docs_closed"])
@pytest.mark.parametrize("tile", [128])  # tiles of 64 need non-default backward kernel configs on sm90
def test_flex_matches_sdpa_on_gpu(name, tile):
    q, k, v, plan = _gpu_case(name)
    outs, grads = [], []
    for backend in ("sdpa", "flex"):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = sparse_attention(qq, kk, vv, plan, backend) if backend == "sdpa" else attention_flex(qq, kk, vv, plan, tile=tile)
        out.float().square().sum().backward()
        outs.append(out.float())
        grads.append([t.grad.float() for t in (qq, kk, vv)])
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-2, atol=2e-2)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 64])
def test_attention_layer_gpu_backends_agree(window):
    torch.manual_seed(0)
    x = torch.randn(2, 700, 256, device="cuda", dtype=torch.bfloat16)
    seq_idx = _docs(700, 2, "cuda")
    ref_layer = Attention(256, AttentionConfig(num_heads=4, window=window, backend="sdpa")).cuda().bfloat16()
    for backend in ("auto", "flex"):
        layer = Attention(256, AttentionConfig(num_heads=4, window=window, backend=backend)).cuda().bfloat16()
        layer.load_state_dict(ref_layer.state_dict())
        for docs in (None, seq_idx):
            torch.testing.assert_close(layer(x, seq_idx=docs).float(), ref_layer(x, seq_idx=docs).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["flex", "gather", "triton", "auto"])
def test_block_topk_layer_gpu_backends_match_sdpa(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 1000, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = BlockTopk(256, BlockTopkConfig(num_heads=4, num_kv_heads=2, block_size=64, topk=3, backend="sdpa")).cuda().bfloat16()
    layer = BlockTopk(256, BlockTopkConfig(num_heads=4, num_kv_heads=2, block_size=64, topk=3, backend=backend)).cuda().bfloat16()
    layer.load_state_dict(ref.state_dict())
    want, got = ref(x), layer(x)
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2)
    g_want = torch.autograd.grad(want.float().square().sum(), x)[0]
    g_got = torch.autograd.grad(got.float().square().sum(), x)[0]
    torch.testing.assert_close(g_got, g_want, rtol=5e-2, atol=5e-2)
