"""Feed-forward blocks: the SwiGLU activation's compiled path against its eager one."""

import pytest
import torch
import torch.nn.functional as F
from hybrid.layers.mlp import SwiGLU, SwiGLUConfig, swiglu

import hybrid


def test_swiglu_is_silu_gate_times_up():
    torch.manual_seed(0)
    ffn = SwiGLU(32, SwiGLUConfig(hidden=48))
    x = torch.randn(2, 5, 32)
    gate, up = x @ ffn.w13.weight[:48].T, x @ ffn.w13.weight[48:].T
    torch.testing.assert_close(ffn(x), (F.silu(gate) * up) @ ffn.w2.weight.T)
    assert swiglu(torch.cat([gate, up], -1)).shape == (2, 5, 48)


def test_fused_flag_is_a_config_field_and_stays_eager_on_the_cpu():
    """``fused_elementwise`` (default on) reaches the layer from a pattern's FFN config; on the CPU the layer runs
    eagerly."""
    assert SwiGLUConfig().fused_elementwise
    model = hybrid.build_model("MA", d_model=32, vocab_size=64, ffn={"type": "swiglu", "fused_elementwise": False})
    assert not any(block.ffn.cfg.fused_elementwise for block in model.blocks)
    model = hybrid.build_model("MA", d_model=32, vocab_size=64)
    assert all(block.ffn.cfg.fused_elementwise for block in model.blocks)
    assert model(torch.randint(0, 64, (1, 9))).shape == (1, 9, 64)


@pytest.mark.gpu
def test_gpu_fused_swiglu_matches_eager(matches_eager):
    """On CUDA the activation runs through torch.compile (one kernel each way, the gradient of the w13 output
    written whole); output and both weight gradients equal the eager layer's under bf16 autocast."""
    torch.manual_seed(0)
    fused = SwiGLU(768, SwiGLUConfig(fused_elementwise=True)).cuda()
    eager = SwiGLU(768, SwiGLUConfig(fused_elementwise=False)).cuda()
    matches_eager(fused, eager, torch.randn(2, 1000, 768, device="cuda"))
