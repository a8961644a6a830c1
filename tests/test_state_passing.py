"""K-chunks-a-step state passing (``triton_state_passing.py``) against a float64 PyTorch loop.

On the CPU the kernels run under TRITON_INTERPRET=1 (set in conftest). Float32 storage is checked tightly; bf16
storage (the interpreter's fp32 -> bf16 casts truncate, unlike the GPU's) within a few bf16 steps. Shapes are
tiny but ragged: nc = 1, nc not a multiple of K, channel counts not a multiple of the block, several blocks, and
documents starting in some chunks (cs_last = -inf).
"""

import pytest
import torch

triton = pytest.importorskip("triton")

from hybrid.kernels.mamba3.triton_state_passing import K_BWD, K_FWD, launch_config, state_passing_bwd, state_passing_fwd  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (B, nc, H, PN, block): block None lets the wrapper choose (one block here, PN padded up to a power of two).
# K_FWD = 8 and K_BWD = 4 chunks a step.
SHAPES = [
    (1, 1, 1, 48, None),  # a single chunk, a ragged block
    (2, K_BWD + 1, 3, 96, 64),  # nc < K_FWD, two backward tiles; two channel blocks, the second half masked
    (1, 2 * K_FWD + 3, 2, 64, 32),  # nc a multiple of neither K: a masked last tile
    (1, 2 * K_FWD, 1, 40, None),  # nc a multiple of both
]


def make(B, nc, H, PN, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cs = -0.5 * torch.rand(B, nc, H, generator=g)
    cs[torch.rand(B, nc, H, generator=g) < 0.25] = float("-inf")  # documents start in about a quarter of the chunks
    local, dg_in, g_in = (torch.randn(B, nc, H, PN, generator=g) for _ in range(3))
    g0, dg_final = torch.randn(B, H, PN, generator=g), torch.randn(B, H, PN, generator=g)
    return (cs.to(DEV), local.to(DEV, dtype), g0.to(DEV), dg_in.to(DEV, dtype), g_in.to(DEV, dtype), dg_final.to(DEV))


def ref_fwd(local, cs, g0):
    a, g = cs.double().exp(), g0.double()
    g_in = []
    for c in range(local.shape[1]):
        g_in.append(g)
        g = a[:, c, :, None] * g + local[:, c].double()
    return torch.stack(g_in, 1), g


def ref_bwd(dg_in, g_in, cs, dg_final):
    a, ds = cs.double().exp(), dg_final.double()
    dlocal, dcsl = torch.empty_like(dg_in, dtype=torch.float64), torch.empty_like(cs, dtype=torch.float64)
    for c in reversed(range(dg_in.shape[1])):
        dlocal[:, c] = ds
        dcsl[:, c] = (ds * g_in[:, c].double()).sum(-1) * a[:, c]
        ds = a[:, c, :, None] * ds + dg_in[:, c].double()
    return dlocal, dcsl, ds


@pytest.mark.parametrize("B,nc,H,PN,block", SHAPES)
def test_state_passing_matches_reference(B, nc, H, PN, block):
    cs, local, g0, dg_in, g_in, dg_final = make(B, nc, H, PN, seed=nc * 7 + PN)
    assert torch.isinf(cs).any() and torch.isfinite(cs).any() or nc == 1
    tol = dict(rtol=1e-5, atol=1e-5)

    new = state_passing_fwd(local, cs, g0, block=block)
    assert [t.dtype for t in new] == [local.dtype, torch.float32]
    for got, want in zip(new, ref_fwd(local, cs, g0)):
        torch.testing.assert_close(got.double(), want, **tol)

    new = state_passing_bwd(dg_in, g_in, cs, dg_final, block=block)
    assert [t.dtype for t in new] == [dg_in.dtype, torch.float32, torch.float32]
    assert new[1].shape == cs.shape
    for got, want in zip(new, ref_bwd(dg_in, g_in, cs, dg_final)):
        torch.testing.assert_close(got.double(), want, **tol)


def test_state_passing_keeps_state_shape():
    """The layer's chunk states are (B, nc, H, P, N): the wrappers take any trailing state shape."""
    cs, local, g0, dg_in, g_in, dg_final = make(1, 3, 2, 64, seed=1)
    g_in5, g_final = state_passing_fwd(local.view(1, 3, 2, 8, 8), cs, g0.view(1, 2, 8, 8))
    assert g_in5.shape == (1, 3, 2, 8, 8) and g_final.shape == (1, 2, 8, 8)
    torch.testing.assert_close(g_in5.view_as(local), state_passing_fwd(local, cs, g0)[0])
    dlocal, dcsl, dg0 = state_passing_bwd(dg_in.view(1, 3, 2, 8, 8), g_in.view(1, 3, 2, 8, 8), cs, dg_final.view(1, 2, 8, 8))
    assert dlocal.shape == (1, 3, 2, 8, 8) and dcsl.shape == (1, 3, 2) and dg0.shape == (1, 2, 8, 8)


def test_state_passing_bf16_storage():
    """16-bit chunk states (the layer's with bf16 activations): outputs keep the storage type and stay within a few
    bf16 rounding steps of the float64 loop on the same (rounded) inputs; the sums themselves run in float32."""
    B, nc, H, PN, block = 2, K_FWD + 3, 2, 64, 32
    cs, local, g0, dg_in, g_in, dg_final = make(B, nc, H, PN, seed=5, dtype=torch.bfloat16)
    pairs = list(zip(state_passing_fwd(local, cs, g0, block=block), ref_fwd(local, cs, g0)))
    pairs += zip(state_passing_bwd(dg_in, g_in, cs, dg_final, block=block), ref_bwd(dg_in, g_in, cs, dg_final))
    assert [got.dtype for got, _ in pairs] == [torch.bfloat16, torch.float32, torch.bfloat16, torch.float32, torch.float32]
    for got, want in pairs:
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_launch_config():
    bf16, fp32 = 2, 4
    assert launch_config(8 * 32, 8192, bf16) == (1024, 4)  # 8 x 4k tokens, 32 heads: 2048 programs of 1024 channels
    assert launch_config(8 * 32, 8192, fp32) == (1024, 8)
    assert launch_config(32, 8192, bf16) == (256, 1)  # one sequence: 1024 programs of 256 channels
    assert launch_config(2 * 32, 8192, bf16)[0] == 512
    assert launch_config(1, 48, fp32) == (64, 1)
