"""Split-key decode attention (Triton) against the float64 oracle and the eager decode path: ragged key counts,
several key ranges, GQA, per-sequence and shared validity masks, strided caches. On the CPU through Triton's
interpreter (tiny shapes); in bf16 at a long cache on a GPU."""

from __future__ import annotations

import pytest
import torch
from hybrid.kernels.attention import attention_decode, attention_decode_torch, attention_naive

triton = pytest.importorskip("triton")
from hybrid.kernels import decode_attention_triton as dat  # noqa: E402


def oracle(q, k, v, valid):
    """attention_naive over the visible keys, in float64 (a query that sees nothing gets zeros)."""
    B, S = q.shape[0], k.shape[2]
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool) if valid is None else valid.expand(B, S)[:, None, None, :]
    return attention_naive(q.double(), k.double(), v.double(), mask)


@pytest.mark.parametrize("B,H,Hkv,S,D,valid_kind", [
    (1, 2, 2, 1, 16, None),  # a single key
    (2, 4, 2, 70, 24, "shared"),  # ragged: 70 keys in blocks of 32, D not a power of two, GQA
    (2, 4, 4, 97, 16, "per_sequence"),
    (3, 2, 1, 200, 8, "per_sequence"),  # one sequence sees no key at all
    (1, 2, 2, 50, 320, None),  # a head wider than 256: fewer keys per step
])
def test_split_decode_matches_oracle(B, H, Hkv, S, D, valid_kind, monkeypatch):
    monkeypatch.setattr(dat, "TARGET_PROGRAMS", 16)  # several key ranges per head even at these sizes
    gen = torch.Generator().manual_seed(S)
    q = torch.randn(B, 1, H, D, generator=gen).transpose(1, 2)  # (B, H, 1, D), strided as the layer's
    cache_k = torch.randn(B, Hkv, S + 9, D, generator=gen)
    cache_v = torch.randn(B, Hkv, S + 9, D, generator=gen)
    k, v = cache_k[:, :, :S], cache_v[:, :, :S]  # a view into a longer buffer
    valid = None
    if valid_kind == "shared":
        valid = torch.arange(S) <= S - 5
    elif valid_kind == "per_sequence":
        valid = torch.rand(B, S, generator=gen) < 0.6
        valid[0, :3] = True
        if B == 3:
            valid[1] = False
    out = dat.attention_decode_triton(q, k, v, valid)
    assert dat.num_splits(B * H, S) > 1 or S <= dat.BLOCK_S
    assert out.shape == (B, H, 1, D) and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), oracle(q, k, v, valid), rtol=1e-5, atol=1e-5)
    if valid_kind != "per_sequence" or B != 3:  # the eager path gives NaN where nothing is visible
        torch.testing.assert_close(out, attention_decode_torch(q, k, v, valid), rtol=1e-5, atol=1e-5)


def test_split_decode_rejects_bad_input():
    q = torch.randn(1, 3, 1, 8)
    k = v = torch.randn(1, 2, 10, 8)
    with pytest.raises(ValueError, match="cannot share"):
        dat.attention_decode_triton(q, k, v, None)
    with pytest.raises(ValueError, match="one query"):
        dat.attention_decode_triton(torch.randn(1, 2, 2, 8), k, v, None)
    with pytest.raises(ValueError, match="valid must be"):
        dat.attention_decode_triton(torch.randn(1, 2, 1, 8), k, v, torch.ones(9, dtype=torch.bool))


def test_cpu_dispatch_uses_the_eager_path():
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    assert torch.equal(attention_decode(q, k, v, None), attention_decode_torch(q, k, v, None))


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1000, 102400])
def test_gpu_split_decode_bf16(S):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 4, 1, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(1, 4, S + 40, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(1, 4, S + 40, 192, device="cuda", dtype=torch.bfloat16, generator=gen)
    valid = torch.arange(S + 40, device="cuda") < S  # a static cache: the slots past the position are unwritten
    out = dat.attention_decode_triton(q, k, v, valid)
    ref = oracle(q.float().cpu(), k.float().cpu(), v.float().cpu(), valid.cpu())
    torch.testing.assert_close(out.double().cpu(), ref, rtol=2e-2, atol=2e-2 / S ** 0.5 + 4e-3)
    again = dat.attention_decode_triton(q, k, v, valid)
    dispatched = attention_decode(q, k, v, valid)  # the layer's path on CUDA
    assert torch.equal(dispatched, out)
    assert torch.equal(out, again)  # no atomics: the same bits every run


@pytest.mark.parametrize("end,window", [(45, None), (45, 20), (1, None), (130, 7)])
def test_key_bound_skips_only_invalid_slots(end, window, monkeypatch):
    """A static cache's bound (key_end, window): the slots it excludes are not read, and the result equals the
    unbounded one. Slots past the bound hold NaN here, so reading one would show."""
    monkeypatch.setattr(dat, "TARGET_PROGRAMS", 16)
    gen = torch.Generator().manual_seed(end)
    S = 130
    q = torch.randn(2, 4, 1, 24, generator=gen)
    k, v = torch.randn(2, 2, S, 24, generator=gen), torch.randn(2, 2, S, 24, generator=gen)
    s = torch.arange(S)
    valid = s < end
    if window is not None:
        valid &= s >= end - window
    k[:, :, ~valid], v[:, :, ~valid] = float("nan"), float("nan")
    out = dat.attention_decode_triton(q, k, v, valid, torch.tensor([end]), window)
    assert torch.isfinite(out).all()
    kc, vc = k.nan_to_num(0.0), v.nan_to_num(0.0)
    torch.testing.assert_close(out, dat.attention_decode_triton(q, kc, vc, valid), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.double(), oracle(q, kc, vc, valid), rtol=1e-5, atol=1e-5)
