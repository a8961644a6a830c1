"""Mamba-3 layer: parameter counts, inits, cache paths, document masking, MIMO/SISO agreement, config errors."""

import math
import resource
import time

import pytest
import torch
from hybrid.layers.mamba3 import Mamba3, Mamba3Config

from hybrid.registry import MIXERS, ConfigError

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-10)


def layer(d_model=32, seed=0, **kw):
    """A float64 layer with every parameter perturbed (fresh ones, zeros and equal biases hide bugs)."""
    torch.manual_seed(seed)
    kw = {"d_state": 16, "headdim": 8, "chunk_size": 4, **kw}
    m = Mamba3(d_model, Mamba3Config(**kw)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def n_params(d_model, **kw):
    with torch.device("meta"):
        return sum(p.numel() for p in Mamba3(d_model, Mamba3Config(**kw)).parameters())


@pytest.mark.parametrize("d_model,d_state,siso,mimo", [
    (256, 64, 437_392, 544_912), (768, 128, 3_821_872, 4_448_560), (2048, 128, 26_165_632, 27_836_800)])
def test_parameter_count_matches_spec_table(d_model, d_state, siso, mimo):
    assert n_params(d_model, d_state=d_state) == siso
    assert n_params(d_model, d_state=d_state, mimo_rank=4) == mimo


def test_parameter_count_formula_options():
    """Spec §1.6 formula with G > 1, rope 1.0 and the outproj norm."""
    D_m, N, G, R = 128, 32, 2, 2
    d_in, H = 256, 256 // 32
    S = N // 2
    expected = (D_m * (2 * d_in + 2 * N * G * R + 3 * H + S) + d_in * D_m + 2 * H + 2 * H * R * N + 2 * N
                + 3 * R * d_in + d_in)
    assert n_params(D_m, d_state=N, headdim=32, ngroups=G, mimo_rank=R, rope_fraction=1.0, outproj_norm=True) == expected


def test_footprint_matches_cache_and_spec():
    cfg = Mamba3Config()  # spec §2.6 example: D_m 2048, H 64, P 64, N 128, S 32, bf16
    assert Mamba3.footprint(2048, cfg).state_bytes == 2_129_920
    assert Mamba3.footprint(2048, Mamba3Config(mimo_rank=4)).state_bytes == 2_179_072
    assert Mamba3.footprint(2048, Mamba3Config(d_state=64)).state_bytes == 1_069_056
    for kw in ({}, {"mimo_rank": 2}, {"rotation": "none"}):
        m = Mamba3(64, Mamba3Config(d_state=16, headdim=16, **kw))
        cache = m.allocate_cache(1, 10, device="meta", dtype=torch.bfloat16)
        used = sum(t.numel() * t.element_size() for t in (cache.angle, cache.ssm, cache.k, cache.v))
        assert used == Mamba3.footprint(64, m.cfg, dtype_bytes=2).state_bytes
        assert cache.angle.dtype == cache.ssm.dtype == torch.float32 and cache.k.dtype == torch.bfloat16
        assert Mamba3.footprint(64, m.cfg).kv_bytes_per_token == 0


@pytest.mark.parametrize("mimo_rank", [1, 4])
def test_special_inits_and_flags(mimo_rank):
    m = Mamba3(64, Mamba3Config(d_state=16, headdim=16, mimo_rank=mimo_rank))
    for lin in (m.in_proj, m.out_proj):  # what the model does before calling the hook
        torch.nn.init.normal_(lin.weight, std=0.02)
    m.reset_parameters_special()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((dt >= 1e-3 - 1e-7) & (dt <= 0.1 + 1e-7)).all()
    assert torch.equal(m.D, torch.ones_like(m.D))
    assert torch.equal(m.B_bias, torch.ones_like(m.B_bias)) and m.C_bias.shape == (8, mimo_rank, 16)
    assert torch.equal(m.B_norm_weight, torch.ones(16))
    assert m.dt_bias._no_weight_decay and m.D._no_weight_decay and m.out_proj._is_residual_out
    assert m.cfg.resolved_chunk_size == 64 // mimo_rank
    if mimo_rank > 1:
        assert torch.allclose(m.mimo_x, torch.full_like(m.mimo_x, 1 / mimo_rank))
        assert torch.equal(m.mimo_z, torch.ones_like(m.mimo_z))
        assert torch.allclose(m.mimo_o, torch.full_like(m.mimo_o, 1 / mimo_rank))


VARIANTS = {
    "siso": {},
    "mimo2": {"mimo_rank": 2},
    "mimo4-gqa-outnorm": {"mimo_rank": 4, "ngroups": 2, "outproj_norm": True, "chunk_size": 2},
    "siso-rope1-gqa": {"rope_fraction": 1.0, "ngroups": 4},
    "no-rot-euler-plain": {"rotation": "none", "trapezoid": "euler", "bc_bias": False, "bc_norm": False},
    "fixed-rope-half-softplus": {"rotation": "data_independent", "trapezoid": "half", "a_activation": "softplus"},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_then_decode_equals_forward(variant):
    m = layer(**VARIANTS[variant])
    x = torch.randn(2, 13, 32, dtype=F64, generator=torch.Generator().manual_seed(1))
    full = m(x)
    cache = m.allocate_cache(2, 13)
    outs = [m(x[:, :6], cache=cache)]  # chunked prefill (ragged: 6 = 4 + 2)
    outs += [m(x[:, t:t + 1], cache=cache) for t in range(6, 10)]  # recurrent steps
    outs.append(m(x[:, 10:], cache=cache))  # chunked again, continuing from a decoded state
    torch.testing.assert_close(torch.cat(outs, 1), full, **TOL)


def test_documents_are_independent():
    for kw in ({}, {"mimo_rank": 2, "ngroups": 2}):
        m = layer(**kw)
        g = torch.Generator().manual_seed(2)
        docs = [torch.randn(1, n, 32, dtype=F64, generator=g) for n in (5, 1, 7)]
        seq_idx = torch.tensor([[0] * 5 + [1] + [2] * 7])
        packed = m(torch.cat(docs, 1), seq_idx=seq_idx)
        torch.testing.assert_close(packed, torch.cat([m(d) for d in docs], 1), **TOL)
    with pytest.raises(ValueError, match="seq_idx"):
        m(docs[0], cache=m.allocate_cache(1, 5), seq_idx=torch.zeros(1, 5, dtype=torch.long))


def test_mimo_rank1_equals_siso_up_to_pairing():
    """MIMO with R = 1 and unit scales is SISO with the state channels permuted: interleaved pair (2i, 2i+1)
    becomes half-split pair (i, i + N/2)."""
    siso = layer(d_state=16, chunk_size=8)
    mimo = Mamba3(32, Mamba3Config(d_state=16, headdim=8, chunk_size=8, is_mimo=True)).double()
    N, S = 16, siso.S
    perm = list(range(N))  # mimo channel c holds siso channel perm[c]
    for i in range(S):
        perm[i], perm[N // 2 + i] = 2 * i, 2 * i + 1
    rest = sorted(set(range(N)) - set(perm[:S]) - set(perm[N // 2:N // 2 + S]))
    perm[S:N // 2] = rest[:N // 2 - S]
    perm[N // 2 + S:] = rest[N // 2 - S:]
    assert sorted(perm) == list(range(N))
    with torch.no_grad():
        w = siso.in_proj.weight.clone()
        d_in = siso.d_inner
        for start in (2 * d_in, 2 * d_in + N):  # B rows, then C rows (G = R = 1)
            w[start:start + N] = w[start:start + N][perm]
        mimo.in_proj.weight.copy_(w)
        mimo.out_proj.weight.copy_(siso.out_proj.weight)
        for name in ("dt_bias", "D"):
            getattr(mimo, name).copy_(getattr(siso, name))
        for name in ("B_norm_weight", "C_norm_weight", "B_bias", "C_bias"):
            getattr(mimo, name).copy_(getattr(siso, name)[..., perm])
        for name in ("mimo_x", "mimo_z", "mimo_o"):
            assert torch.equal(getattr(mimo, name), torch.ones_like(getattr(mimo, name)))
    x = torch.randn(2, 11, 32, dtype=F64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(mimo(x), siso(x), **TOL)


def test_gradients_reach_every_parameter():
    for kw in ({"outproj_norm": True}, {"mimo_rank": 2}):
        m = layer(**kw)
        m(torch.randn(2, 9, 32, dtype=F64)).square().sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bfloat16_forward_and_cache_dtypes():
    m = Mamba3(32, Mamba3Config(d_state=16, headdim=8, chunk_size=4)).to(torch.bfloat16)
    x = torch.randn(2, 7, 32, dtype=torch.bfloat16)
    cache = m.allocate_cache(2, 8)
    y = m(x, cache=cache)
    y_step = m(x[:, :1], cache=cache)
    assert y.dtype == y_step.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert cache.ssm.dtype == cache.angle.dtype == torch.float32 and cache.k.dtype == torch.bfloat16
    ref = m.float()(x.float())
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("kwargs,match", [
    ({"rope_fraction": 0.75}, "rope_fraction must be 0.5 or 1.0"),
    ({"mimo_rank": 0}, "mimo_rank must be >= 1"),
    ({"chunk_size": 48}, "chunk_size must be a power of two"),
    ({"is_mimo": False, "mimo_rank": 2}, "contradicts"),
    ({"d_state": 2}, "d_state must be even"),
    ({"rotation": "learned"}, "rotation.*must be one of"),
    ({"trapezoid": "simpson"}, "trapezoid.*must be one of"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MIXERS.get("mamba3").make_config(kwargs)


def test_width_errors():
    with pytest.raises(ConfigError, match=r"headdim \(48\) must divide the inner width"):
        Mamba3.validate(32, Mamba3Config(headdim=48))
    with pytest.raises(ConfigError, match=r"ngroups \(3\) must divide the number of heads \(4"):
        Mamba3(32, Mamba3Config(d_state=16, headdim=16, ngroups=3))


def test_train_size_forward_backward():
    """batch 4 x 2048 tokens at d_model 256 with published defaults (N 128, P 64, H 8): fp32 forward + backward."""
    torch.manual_seed(0)
    m = Mamba3(256, Mamba3Config())
    x = torch.randn(4, 2048, 256, requires_grad=True)
    start = time.perf_counter()
    m(x).square().mean().backward()
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"mamba3 4x2048x256 fwd+bwd: {elapsed:.2f} s, process peak RSS {peak_mb:.0f} MB")
    assert all(torch.isfinite(p.grad).all() for p in m.parameters()) and torch.isfinite(x.grad).all()
    assert math.isfinite(elapsed)


@pytest.mark.parametrize("variant", [dict(), dict(mimo_rank=2, outproj_norm=True, trapezoid="half", rotation="none")])
def test_fused_elementwise_compiles_whole_and_matches_eager(variant):
    """The functions the layer compiles on CUDA (pre-scan inputs, output gate) trace as one graph each
    (fullgraph: no breaks) and equal their eager selves, values and gradients (here through the CPU compiler)."""
    from hybrid.layers.mamba3 import gate_output, ssm_inputs

    torch.manual_seed(0)
    layer = Mamba3(32, Mamba3Config(d_state=16, headdim=8, **variant))
    x = torch.randn(2, 5, 32)
    z, xs, Bm, Cm, u_dt, u_A, u_lam, u_th = layer.in_proj(x).split(layer.split, dim=-1)
    Bm, Cm = Bm.view(2, 5, layer.R, layer.G, layer.N), Cm.view(2, 5, layer.R, layer.G, layer.N)
    cfg = layer.cfg
    args = (Bm, Cm, u_dt, u_A, u_lam, u_th, layer.dt_bias, layer.B_norm_weight, layer.C_norm_weight, cfg.norm_eps,
            cfg.a_activation, cfg.A_floor, cfg.trapezoid, cfg.rotation, torch.float32)
    eager, compiled = ssm_inputs(*args), torch.compile(ssm_inputs, fullgraph=True)(*args)
    for a, b in zip(eager, compiled):
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    y = torch.randn(2, 5, layer.R, layer.H, layer.P, requires_grad=True)
    zh = z.view(2, 5, layer.H, layer.P)
    gargs = (getattr(layer, "out_norm_weight", None), cfg.norm_eps, getattr(layer, "mimo_z", None),
             getattr(layer, "mimo_o", None))
    out_e = gate_output(y, zh, *gargs)
    out_c = torch.compile(gate_output, fullgraph=True)(y, zh, *gargs)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    g_e = torch.autograd.grad(out_e.square().sum() + eager[2].sum(), [y, layer.dt_bias])
    g_c = torch.autograd.grad(out_c.square().sum() + compiled[2].sum(), [y, layer.dt_bias])
    for a, b in zip(g_e, g_c):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_gpu_fused_elementwise_matches_eager():
    """On CUDA the layer runs its elementwise work through torch.compile; outputs and every parameter gradient
    equal the eager layer's."""
    torch.manual_seed(0)
    # The PyTorch scan on both sides: the Triton kernels' fp32 matmuls run in TF32, which would turn last-bit
    # differences of the fused elementwise code into larger ones.
    fused = Mamba3(256, Mamba3Config(fused_elementwise=True, backend="torch")).cuda()
    eager = Mamba3(256, Mamba3Config(fused_elementwise=False, backend="torch")).cuda()
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 300, 256, device="cuda")
    out_f, out_e = fused(x), eager(x)
    torch.testing.assert_close(out_f, out_e, rtol=1e-4, atol=1e-5)
    out_f.square().mean().backward()
    out_e.square().mean().backward()
    for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
        torch.testing.assert_close(pf.grad, pe.grad, rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_model_dtype_decode_state(backend):
    """state_dtype="model" keeps the decode cache's SSM state in bf16 in a bf16 model (half the bytes, in the
    footprint too); decoding stays close to the float32-state cache's."""
    torch.manual_seed(0)
    kw = dict(d_state=32, headdim=16, chunk_size=16, backend=backend)
    wide = Mamba3(64, Mamba3Config(**kw)).to(torch.bfloat16)
    narrow = Mamba3(64, Mamba3Config(**kw, state_dtype="model")).to(torch.bfloat16)
    narrow.load_state_dict(wide.state_dict())
    x = torch.randn(2, 24, 64, dtype=torch.bfloat16)
    outs = []
    for m in (wide, narrow):
        cache = m.allocate_cache(2, 24)
        with torch.no_grad():
            m(x[:, :1], cache=cache)  # decode every token: the rounding of the state accumulates
            outs.append(torch.cat([m(x[:, t:t + 1], cache=cache) for t in range(1, 24)], 1).float())
    assert cache.ssm.dtype == torch.bfloat16 and cache.angle.dtype == torch.float32
    assert float((outs[1] - outs[0]).norm() / outs[0].norm()) < 3e-2
    fp_wide = Mamba3.footprint(64, Mamba3Config(**kw)).state_bytes
    fp_narrow = Mamba3.footprint(64, Mamba3Config(**kw, state_dtype="model")).state_bytes
    assert fp_wide - fp_narrow == 2 * narrow.H * narrow.P * narrow.N


def test_packed_batch_through_the_triton_kernels():
    """SISO and MIMO layers with backend "triton" (the interpreter on the CPU) run packed documents (seq_idx)
    through the Triton kernels: outputs and parameter gradients equal backend "torch"."""
    pytest.importorskip("triton")
    x = torch.randn(2, 37, 32, generator=torch.Generator().manual_seed(1))
    seq_idx = torch.tensor([[0] * 10 + [1] * 16 + [2] * 11, [0] * 3 + [1] + [2] * 33])
    for kw in (dict(chunk_size=16), dict(chunk_size=8, mimo_rank=2)):
        torch.manual_seed(0)
        ref = Mamba3(32, Mamba3Config(d_state=32, headdim=16, **kw, backend="torch"))
        fast = Mamba3(32, Mamba3Config(d_state=32, headdim=16, **kw, backend="triton"))
        fast.load_state_dict(ref.state_dict())
        out_ref, out_fast = ref(x, seq_idx=seq_idx), fast(x, seq_idx=seq_idx)
        torch.testing.assert_close(out_fast, out_ref, rtol=1e-4, atol=1e-4)
        out_ref.square().mean().backward()
        out_fast.square().mean().backward()
        for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
            torch.testing.assert_close(p_fast.grad, p_ref.grad, rtol=1e-3, atol=1e-5, msg=name)
