"""The block top-k Triton kernel against a dense masked oracle: outputs and all input gradients, ragged
lengths, GQA, per-head selections. On the CPU through Triton's interpreter (tiny shapes); in bf16 on a GPU."""

from __future__ import annotations

import pytest
import torch
from hybrid.kernels.attention import attention_naive

triton = pytest.importorskip("triton")
from hybrid.kernels.block_topk_triton import _inverted_index, block_topk_attention  # noqa: E402


def oracle(q, k, v, sel, block):
    """Dense attention under the mask "own block causally + the selected blocks" (float64)."""
    B, H, T, D = q.shape
    pos = torch.arange(T, device=q.device)
    own = (pos[:, None] // block == pos[None, :] // block) & (pos[None, :] <= pos[:, None])  # (T, T)
    kblk = pos // block
    chosen = (sel[..., None] == kblk).any(-2)  # (B, Hkv, G, T): key position in a selected block
    picked = chosen.repeat_interleave(block, dim=2)[:, :, :T]  # (B, Hkv, T, T)
    mask = (own | picked).repeat_interleave(H // k.shape[1], dim=1)
    return attention_naive(q, k, v, mask)


def random_selection(B: int, Hkv: int, G: int, kk: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct complete past blocks per query block, -1 where fewer than kk exist (or at random)."""
    sel = torch.full((B, Hkv, G, kk), -1, dtype=torch.long)
    for b in range(B):
        for h in range(Hkv):
            for g in range(G):
                n = min(g, kk) - int(torch.randint(0, 2, (1,), generator=gen))  # sometimes one slot empty
                if n > 0:
                    sel[b, h, g, :n] = torch.randperm(g, generator=gen)[:n]
    return sel


@pytest.mark.parametrize("T, H, Hkv, block, kk", [(64, 2, 2, 16, 2), (80, 4, 2, 16, 3), (45, 2, 1, 16, 2)])
def test_matches_gathered_oracle(T, H, Hkv, block, kk):
    gen = torch.Generator().manual_seed(T + H)
    B, D = 2, 16
    G = -(-T // block)
    q, k, v = (torch.randn(B, n, T, D, generator=gen, dtype=torch.float32) for n in (H, Hkv, Hkv))
    sel = random_selection(B, Hkv, G, kk, gen)
    grad = torch.randn(B, H, T, D, generator=gen)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = block_topk_attention(*ins, sel, block)
    out.backward(grad)
    ref_ins = [t.double().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_ins, sel, block)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(ins, ref_ins):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-5)


def test_inverted_index_lists_every_selection():
    sel = torch.tensor([[[[-1, -1], [0, -1], [1, 0], [2, 0]]]])  # (1, 1, G=4, 2)
    qlist, start = _inverted_index(sel, 4)
    assert start.tolist() == [0, 3, 4, 5, 5]  # block 0 chosen by query blocks 1, 2, 3; block 1 by 2; block 2 by 3
    assert qlist.tolist() == [1, 2, 3, 2, 3]


@pytest.mark.gpu
def test_gpu_bf16_matches_fp32_oracle():
    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, T, D, block, kk = 2, 8, 4, 4000, 64, 64, 8
    G = -(-T // block)
    q, k, v = (torch.randn(B, n, T, D, generator=gen).cuda() for n in (H, Hkv, Hkv))
    sel = random_selection(B, Hkv, G, kk, gen).cuda()
    grad = torch.randn(B, H, T, D, generator=gen).cuda()
    ins = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    out = block_topk_attention(*ins, sel, block)
    out.backward(grad.bfloat16())
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = oracle(*ref_ins, sel, block)
    ref.backward(grad)
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    assert rel(out, ref) < 1e-2
    for got, want in zip(ins, ref_ins):
        assert rel(got.grad, want.grad) < 2e-2
    again = block_topk_attention(*[t.detach() for t in ins], sel, block)
    assert torch.equal(again, out.detach())  # deterministic: no atomics


def test_layer_triton_backend_matches_naive():
    """The block_topk layer through the kernel (Triton's interpreter) = its naive plan execution, with grads."""
    from hybrid.layers.block_topk import BlockTopk, BlockTopkConfig

    torch.manual_seed(0)
    cfg = dict(num_heads=4, num_kv_heads=2, head_dim=16, block_size=16, topk=2)
    naive = BlockTopk(32, BlockTopkConfig(backend="naive", **cfg))
    kernel = BlockTopk(32, BlockTopkConfig(backend="triton", **cfg))
    kernel.load_state_dict(naive.state_dict())
    x = torch.randn(2, 70, 32)
    torch.testing.assert_close(kernel(x), naive(x), rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(m(x).square().sum(), list(m.parameters())) for m in (naive, kernel)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
