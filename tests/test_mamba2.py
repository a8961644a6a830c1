"""Mamba-2: chunked SSD equals its recurrence, the conv respects caches and documents, the layer's paths agree."""

import pytest
import torch
import torch.nn.functional as F
from hybrid.kernels.mamba2 import causal_conv1d, ssd_chunk, ssd_recurrent
from hybrid.layers.mamba2 import Mamba2, Mamba2Config

from hybrid.registry import MIXERS, ConfigError

F64 = torch.float64
TOL = dict(rtol=1e-12, atol=1e-12)


def ssd_inputs(B=2, T=37, H=4, G=2, N=8, P=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, T, H, P, generator=g, dtype=F64), dt=0.05 + torch.rand(B, T, H, generator=g, dtype=F64),
                A=-1 - 15 * torch.rand(H, generator=g, dtype=F64), B=torch.randn(B, T, G, N, generator=g, dtype=F64),
                C=torch.randn(B, T, G, N, generator=g, dtype=F64), D=torch.randn(H, generator=g, dtype=F64),
                initial_state=torch.randn(B, H, P, N, generator=g, dtype=F64),
                seq_idx=torch.sort(torch.randint(0, 5, (B, T), generator=g), dim=1).values)


@pytest.mark.parametrize("docs", [False, True])
@pytest.mark.parametrize("init", [False, True])
def test_ssd_chunk_matches_recurrent(docs, init):
    inp = ssd_inputs()
    inp["seq_idx"] = inp["seq_idx"] if docs else None
    inp["initial_state"] = inp["initial_state"] if init else None
    y_ref, s_ref = ssd_recurrent(**inp)
    for chunk in (1, 4, 16, 64):
        y, s = ssd_chunk(**inp, chunk_size=chunk)
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(s, s_ref, **TOL)


def test_ssd_gradcheck():
    inp = ssd_inputs(B=1, T=6, H=2, G=1, N=3, P=2, seed=1)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1]])
    names = ["x", "dt", "A", "B", "C", "D", "initial_state"]
    args = [inp[n].clone().requires_grad_(True) for n in names]
    assert torch.autograd.gradcheck(lambda *a: ssd_chunk(*a, seq_idx=seq_idx, chunk_size=4), args, eps=1e-6, atol=1e-7)


def test_causal_conv_matches_conv1d_and_continues():
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(2, 10, 6, generator=g, dtype=F64), torch.randn(6, 4, generator=g, dtype=F64),
               torch.randn(6, generator=g, dtype=F64))
    ref = F.conv1d(F.pad(x.transpose(1, 2), (3, 0)), w[:, None], b, groups=6).transpose(1, 2)
    y, state = causal_conv1d(x, w, b)
    torch.testing.assert_close(y, ref, **TOL)
    y1, s1 = causal_conv1d(x[:, :2], w, b)  # shorter than the kernel
    y2, s2 = causal_conv1d(x[:, 2:3], w, b, s1)  # one decode step
    y3, s3 = causal_conv1d(x[:, 3:], w, b, s2)
    torch.testing.assert_close(torch.cat([y1, y2, y3], 1), ref, **TOL)
    torch.testing.assert_close(s3, state, **TOL)
    seq_idx = torch.tensor([[0] * 3 + [1] * 7] * 2)
    y, _ = causal_conv1d(x, w, b, seq_idx=seq_idx)
    torch.testing.assert_close(y[:, 3:], causal_conv1d(x[:, 3:], w, b)[0], **TOL)


def layer(d_model=32, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"d_state": 16, "headdim": 8, "chunk_size": 4, **kw}
    m = Mamba2(d_model, Mamba2Config(**kw)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("kw", [{}, {"ngroups": 2, "d_conv": 2}])
def test_prefill_then_decode_equals_forward(kw):
    m = layer(**kw)
    x = torch.randn(2, 13, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    full = m(x)
    cache = m.allocate_cache(2, 13)
    outs = [m(x[:, :6], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(6, 10)]
    outs.append(m(x[:, 10:], cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)


def test_documents_are_independent():
    m = layer()
    g = torch.Generator().manual_seed(2)
    docs = [torch.randn(1, n, 32, dtype=F64, generator=g) for n in (5, 1, 7)]
    packed = m(torch.cat(docs, 1), seq_idx=torch.tensor([[0] * 5 + [1] + [2] * 7]))
    torch.testing.assert_close(packed, torch.cat([m(d) for d in docs], 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d_model,d_state,expected", [(256, 64, 431_768), (768, 128, 3_764_552), (2048, 128, 25_847_232)])
def test_parameter_count_matches_spec_table(d_model, d_state, expected):
    with torch.device("meta"):
        assert sum(p.numel() for p in Mamba2(d_model, Mamba2Config(d_state=d_state)).parameters()) == expected


def test_inits_and_footprint():
    m = Mamba2(64, Mamba2Config(d_state=16, headdim=16))
    A = -m.A_log.exp()
    assert ((A <= -1) & (A >= -16)).all() and m.A_log._no_weight_decay and m.out_proj._is_residual_out
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert Mamba2.footprint(2048, Mamba2Config()).state_bytes == 1_083_392  # spec §2.6
    cache = m.allocate_cache(3, 10, dtype=torch.bfloat16)
    assert 3 * Mamba2.footprint(64, m.cfg).state_bytes == sum(t.numel() * 2 for t in (cache.conv, cache.ssm))


@pytest.mark.parametrize("kwargs,match", [
    ({"chunk_size": 100}, "chunk_size must be a power of two"),
    ({"A_init_range": [16.0, 1.0]}, "A_init_range"),
    ({"d_conv": 0}, "must be positive"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MIXERS.get("mamba2").make_config(kwargs)


def test_width_errors():
    with pytest.raises(ConfigError, match="headdim"):
        Mamba2.validate(32, Mamba2Config(headdim=48))
    with pytest.raises(ConfigError, match="ngroups"):
        Mamba2.validate(32, Mamba2Config(headdim=16, ngroups=3))


def test_train_size_forward_backward():
    m = Mamba2(256, Mamba2Config())
    x = torch.randn(4, 2048, 256, requires_grad=True)
    m(x).square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
