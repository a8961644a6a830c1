"""Routed mixers (fusion, token_router, chunk_gate): what they compute, their gradients, errors and metrics.

Decode == forward, causality and document masking for every config are in test_mixer_contract.py.
"""

import math

import pytest
import torch
from hybrid.kernels.attention import allowed_mask, attention_naive
from hybrid.kernels.sparse_attention import dense_mask
from hybrid.layers.block_topk import block_topk_plan
from hybrid.layers.chunk_gate import ChunkGate, ChunkGateConfig
from hybrid.layers.fusion import Fusion, FusionConfig
from hybrid.layers.route_metrics import routing_metrics
from hybrid.layers.router import TokenRouter, TokenRouterConfig
from hybrid.layers.routing import rms

from hybrid.model import build_model
from hybrid.registry import ConfigError

SSM = {"d_state": 16, "headdim": 16, "chunk_size": 4}
D = 32


def _layer(cls, cfg_cls, seed=0, **kw):
    torch.manual_seed(seed)
    layer = cls(D, cfg_cls(ssm=SSM, **kw)).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer


def _x(B=2, T=24, seed=1):
    return torch.randn(B, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _reference_attention(attn, x, mask):
    """Explicit-softmax attention of ``attn``'s projections under a (B, 1, T, T) mask; rows with no key -> 0."""
    pos = torch.arange(x.shape[1])
    q, k, v = attn.qkv(x, pos)
    y = attention_naive(q, k, v, mask)
    return attn.project_out(y)


# ---------------------------------------------------------------------------------------------- token_router


@pytest.mark.parametrize("attend,window", [("compact", None), ("compact", 5), ("query_only", None), ("query_only", 5)])
def test_token_router_computes_masked_attention(attend, window):
    layer = _layer(TokenRouter, TokenRouterConfig, attn={"num_heads": 2, "window": window}, capacity=0.4, attend=attend).eval()
    x = _x()
    y = layer(x)
    route = layer.last_route
    assert 0 < route.float().mean() < 1
    s = layer.ssm(x)
    pos = torch.arange(x.shape[1])
    mask = allowed_mask(pos, pos, window) & route[:, None, :, None]  # routed queries only
    if attend == "compact":
        mask = mask & route[:, None, None, :]  # ... and routed keys only
    ref = s + route[..., None] * _reference_attention(layer.attn, x, mask)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y[~route], s[~route], rtol=0, atol=0)  # unrouted tokens: SSM only


def test_threshold_router_gradients_and_budget():
    layer = _layer(TokenRouter, TokenRouterConfig, attn={"num_heads": 2}, capacity=0.25, budget_weight=2.0).train()
    x = _x()
    y = layer(x)
    frac = layer.last_route.float().mean()
    assert layer.aux_loss.item() == pytest.approx(2.0 * (frac.item() - 0.25) ** 2)
    assert layer.stats["frac_routed"] == pytest.approx(frac.item())
    (y.square().sum() + layer.aux_loss).backward()
    assert layer.gate.proj.weight.grad.abs().sum() > 0  # the hard gate passes gradients straight through
    assert layer.attn.q_proj.weight.grad.abs().sum() > 0


def test_router_gate_init_opens_about_capacity():
    torch.manual_seed(0)
    for c in (0.1, 0.5, 0.9):
        layer = TokenRouter(64, TokenRouterConfig(ssm=SSM, attn={"num_heads": 2}, capacity=c))
        layer(torch.randn(4, 256, 64))
        assert abs(layer.stats["frac_routed"] - c) < 0.1


def test_mod_topk_routing_train_vs_eval():
    layer = _layer(TokenRouter, TokenRouterConfig, attn={"num_heads": 2}, capacity=0.25, routing="topk").train()
    x = _x(T=20)
    layer(x)
    assert layer.last_route.sum(1).tolist() == [math.ceil(0.25 * 20)] * 2  # exact capacity per row in training
    assert layer.aux_loss is not None and layer.aux_loss > 0  # predictor BCE
    assert {"predictor_acc", "frac_threshold"} <= set(layer.stats)
    layer.eval()
    layer(x)
    pred = layer.predictor(layer.ssm(x)) > 0
    assert torch.equal(layer.last_route, pred)  # causal: the predictor decides
    layer.cfg.eval_routing = "topk"
    layer(x)
    assert layer.last_route.sum(1).tolist() == [5, 5]


def test_router_decode_reports_realised_capacity():
    layer = _layer(TokenRouter, TokenRouterConfig, attn={"num_heads": 2}, capacity=0.5).eval()
    x = _x(T=10)
    cache = layer.allocate_cache(2, 10)
    layer(x[:, :4], cache=cache)
    routed = layer.last_route.sum()
    for t in range(4, 10):
        layer(x[:, t:t + 1], cache=cache)
        routed += layer.last_route.sum()
    assert layer.stats["cache_frac_routed"] == pytest.approx(float(routed) / 20)
    assert layer.stats["kv_kept"] == pytest.approx(float(cache.count.float().mean()))  # compact keeps routed keys only


# ---------------------------------------------------------------------------------------------- chunk_gate


def test_chunk_gate_computes_gated_block_topk():
    layer = _layer(ChunkGate, ChunkGateConfig, attn={"num_heads": 2}, chunk_size=4, block_size=2, topk=2, capacity=0.5).eval()
    x = _x(T=32)
    y = layer(x)
    route = layer.last_route  # (B, T): token in an open chunk
    chunks = route.view(2, 8, 4)
    assert torch.equal(chunks, chunks[..., :1].expand_as(chunks))  # one decision per chunk
    assert 0 < route.float().mean() < 1
    s = layer.ssm(x)
    # The gate of chunk j reads the SSM output at the last token of chunk j-1 (zeros for chunk 0).
    g_in = torch.cat([torch.zeros_like(s[:, :1]), s[:, 3:-1:4]], 1)  # (B, 8, d)
    assert torch.equal(chunks[..., 0], layer.gate(g_in) > 0)
    pos = torch.arange(32)
    q, k, v = layer.attn.qkv(x, pos)
    plan = block_topk_plan(q, k, pos, layer.cfg.attn_cfg, None, chunk=4)
    mask = dense_mask(plan, 2) & route[:, None, :, None]
    assert (dense_mask(plan, 2).long().sum(-1) >= 1).all()
    ref = s + route[..., None] * layer.attn.project_out(attention_naive(q, k, v, mask))
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    assert layer.stats["pair_density"] < 1 and 0 <= layer.stats["frac_chunks_open"] <= 1


def test_chunk_gate_gradients_reach_the_gate():
    layer = _layer(ChunkGate, ChunkGateConfig, attn={"num_heads": 2}, chunk_size=4, topk=1, capacity=0.5).train()
    y = layer(_x(T=32))
    (y.square().sum() + layer.aux_loss).backward()
    assert layer.gate.proj.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("token_gate", [False, True])
def test_fusion_mixes_normalised_branches(token_gate):
    layer = _layer(Fusion, FusionConfig, attn={"num_heads": 2, "window": 6}, token_gate=token_gate)
    x = _x()
    y = layer(x)
    a, s = layer.attn(x), layer.ssm(x)
    g = torch.sigmoid(layer.gate(x)) if token_gate else 1.0
    torch.testing.assert_close(y, layer.beta_attn * rms(a) * g + layer.beta_ssm * rms(s), rtol=1e-10, atol=1e-10)
    assert layer.stats["beta_ratio"] == pytest.approx(float(layer.beta_attn.detach().norm() / layer.beta_ssm.detach().norm()))


# ---------------------------------------------------------------------------------------------- errors and metrics


@pytest.mark.parametrize("cls", [TokenRouterConfig, ChunkGateConfig, FusionConfig])
def test_routed_mixer_needs_an_ssm_backbone(cls):
    with pytest.raises(ConfigError, match="SSM backbone, but ssm is null"):
        cls(ssm=None)


def test_routed_pattern_without_backbone_fails_at_build():
    with pytest.raises(ConfigError, match="ssm is null"):
        build_model("MR", d_model=32, symbols={"R": {"mixer": "token_router", "ssm": None}})


@pytest.mark.parametrize("cls", [TokenRouterConfig, ChunkGateConfig])
@pytest.mark.parametrize("capacity", [0.0, -0.1, 1.5])
def test_capacity_range(cls, capacity):
    with pytest.raises(ConfigError, match=r"capacity must be in \(0, 1\]"):
        cls(capacity=capacity)


def test_chunk_gate_errors():
    with pytest.raises(ConfigError, match=r"block_size \(3\) must divide chunk_size \(8\)"):
        ChunkGateConfig(chunk_size=8, block_size=3)
    with pytest.raises(ConfigError, match=r"topk \(4\) is larger than the number of past blocks allowed"):
        ChunkGateConfig(topk=4, max_past_blocks=2)
    with pytest.raises(ConfigError, match="window must be >= 1"):
        ChunkGateConfig(attn={"window": 0})
    with pytest.raises(ConfigError, match="set block_size on chunk_gate itself"):
        ChunkGateConfig(attn={"block_size": 4})
    with pytest.raises(ConfigError, match="unknown field 'd_stat'"):
        TokenRouterConfig(ssm={"d_stat": 4})


def test_routing_metrics_split_query_and_filler():
    model = build_model("MR", d_model=32, vocab_size=50,
                        symbols={"R": {"mixer": "token_router", "ssm": SSM, "attn": {"num_heads": 2}, "capacity": 0.5}})
    tokens = torch.randint(0, 50, (2, 16))
    labels = torch.full((2, 16), -100)
    labels[:, ::4] = 1
    model(tokens)
    route = model.blocks[1].mixer.last_route
    m = routing_metrics(model, labels)
    assert m["route/layer1/frac_at_query"] == pytest.approx(float(route[:, ::4].float().mean()))
    assert m["route/layer1/frac_at_filler"] == pytest.approx(float(route[labels == -100].float().mean()))
    assert "route/layer1/frac_routed" in m and not any(k.startswith("route/layer0/frac") for k in m)
