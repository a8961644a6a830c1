"""Attention backends compute one function; the mixer's cache path equals its parallel path."""

import pytest
import torch
from hybrid.kernels.attention import allowed_mask, attention_naive, attention_sdpa
from hybrid.layers.attention import Attention, AttentionConfig

from hybrid.registry import ConfigError


def _qkv(B=2, H=4, Hkv=2, T=37, D=16, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, T, D, generator=g, dtype=dtype)
    return q, k, v


@pytest.mark.parametrize("window", [None, 1, 5, 64])
@pytest.mark.parametrize("docs", [False, True])
def test_sdpa_matches_naive(window, docs):
    q, k, v = _qkv()
    pos = torch.arange(q.shape[2])
    seq_idx = (torch.arange(q.shape[2]) // 10).expand(2, -1) if docs else None
    mask = allowed_mask(pos, pos, window, seq_idx, seq_idx)
    ref = attention_naive(q, k, v, mask)
    out = attention_sdpa(q, k, v, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    if window is None and not docs:
        torch.testing.assert_close(attention_sdpa(q, k, v, None, is_causal=True), ref, rtol=1e-10, atol=1e-10)


def test_window_semantics():
    """A window of W keys: query i sees keys i-W+1 .. i, itself included."""
    pos = torch.arange(6)
    m = allowed_mask(pos, pos, window=3)[0, 0]
    assert m[5].tolist() == [False, False, False, True, True, True]
    assert m[0].tolist() == [True, False, False, False, False, False]


@pytest.mark.parametrize("cfg", [
    dict(num_heads=4), dict(num_heads=4, num_kv_heads=1), dict(num_heads=2, window=4), dict(num_heads=4, position="none"),
])
def test_backends_agree_in_layer(cfg):
    torch.manual_seed(0)
    x = torch.randn(2, 19, 32, dtype=torch.float64)
    outs = []
    for backend in ("naive", "sdpa", "auto"):
        layer = Attention(32, AttentionConfig(**cfg, backend=backend)).double()
        torch.manual_seed(1)
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        outs.append(layer(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("window", [None, 3])
def test_chunked_prefill_with_cache(window):
    """Prefill in uneven pieces through the cache == one parallel pass."""
    torch.manual_seed(0)
    layer = Attention(32, AttentionConfig(num_heads=4, num_kv_heads=2, window=window)).double()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    full = layer(x)
    cache = layer.allocate_cache(2, 16)
    parts = [layer(x[:, a:b], cache=cache) for a, b in [(0, 5), (5, 6), (6, 13)]]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)
    assert cache.pos == 13
    with pytest.raises(ValueError, match="cache holds 16 tokens"):
        layer(torch.randn(2, 4, 32, dtype=torch.float64), cache=cache)


def test_config_errors():
    with pytest.raises(ConfigError, match="num_kv_heads \\(3\\) must divide num_heads \\(4\\)"):
        AttentionConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ConfigError, match="d_model \\(30\\) is not divisible by attention num_heads \\(4\\)"):
        Attention.validate(30, AttentionConfig(num_heads=4))
    with pytest.raises(ConfigError, match="window must be >= 1"):
        AttentionConfig(window=0)


def test_footprint():
    fp = Attention.footprint(64, AttentionConfig(num_heads=4, num_kv_heads=2), dtype_bytes=2)
    assert fp.kv_bytes_per_token == 2 * 2 * 16 * 2 and fp.kv_max_tokens is None
    assert Attention.footprint(64, AttentionConfig(window=8)).bytes_at(100) == 8 * fp.kv_bytes_per_token * 2


@pytest.mark.gpu
def test_flash_matches_sdpa_on_gpu():
    from hybrid.kernels.attention import attention_flash, flash_available

    q, k, v = (t.cuda().bfloat16() for t in _qkv(T=300, D=64, dtype=torch.float32))
    if not flash_available(q):
        pytest.skip("flash-attn not installed")
    pos = torch.arange(300, device="cuda")
    for window in (None, 17):
        ref = attention_sdpa(q.float(), k.float(), v.float(), allowed_mask(pos, pos, window)).bfloat16()
        torch.testing.assert_close(attention_flash(q, k, v, window), ref, rtol=2e-2, atol=2e-2)


def test_rotation_frequencies_stay_float32_when_the_model_is_cast():
    """A bf16 cast of the model must not round RoPE's frequencies (angles at 1e5 tokens would turn by ~100 rad),
    for attention and for Mamba-3's fixed-rate rotation; device moves still apply."""
    from hybrid.layers.mamba3 import Mamba3, Mamba3Config

    for layer, name in ((Attention(64, AttentionConfig(num_heads=4)), "inv_freq"),
                        (Mamba3(64, Mamba3Config(d_state=32, headdim=16, rotation="data_independent")), "rope_freq")):
        want = getattr(layer, name).clone()
        layer = layer.to(torch.bfloat16)
        assert next(layer.parameters()).dtype == torch.bfloat16
        assert getattr(layer, name).dtype == torch.float32 and torch.equal(getattr(layer, name), want), name
        layer.half().float()
        assert torch.equal(getattr(layer, name), want), name
        y = layer.to(torch.bfloat16)(torch.randn(2, 5, 64, dtype=torch.bfloat16))
        assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_rope_compiles_whole_and_matches_eager():
    """The RoPE function the layer compiles on CUDA traces as one graph (no breaks) and equals its eager self,
    values and gradients, on strided (transposed) bf16 q / k as the layer passes them (CPU compiler here)."""
    from hybrid.layers.attention import rope_qk

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 4, 16, generator=g).bfloat16().transpose(1, 2).requires_grad_()  # (B, H, T, D) view
    k = torch.randn(2, 7, 2, 16, generator=g).bfloat16().transpose(1, 2).requires_grad_()
    angles = torch.arange(7.0)[:, None] * torch.rand(8, generator=g)
    cos, sin = angles.cos(), angles.sin()
    eager, fused = rope_qk(q, k, cos, sin), torch.compile(rope_qk, fullgraph=True)(q, k, cos, sin)
    for a, b in zip(eager, fused):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.float(), rtol=8e-3, atol=8e-3)
    dq = torch.randn(q.shape, generator=g).bfloat16()
    grads = [torch.autograd.grad((o[0].float() * dq).sum() + o[1].float().sum(), [q, k]) for o in (eager, fused)]
    for a, b in zip(*grads):
        torch.testing.assert_close(b.float(), a.float(), rtol=8e-3, atol=8e-3)


@pytest.mark.gpu
def test_gpu_fused_rope_matches_eager(matches_eager):
    """On CUDA the layer rotates q and k through torch.compile; outputs and every parameter gradient equal the
    eager layer's (bf16 autocast, as in training)."""
    torch.manual_seed(0)
    fused = Attention(256, AttentionConfig(num_heads=4, fused_elementwise=True)).cuda()
    eager = Attention(256, AttentionConfig(num_heads=4, fused_elementwise=False)).cuda()
    matches_eager(fused, eager, torch.randn(2, 300, 256, device="cuda"))
