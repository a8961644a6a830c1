import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")
torch.set_num_threads(min(2, torch.get_num_threads()))
# Without a GPU, Triton kernels run in its interpreter (numpy on the CPU): set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ.setdefault("HYBRID_TRITON_TUNE", "fixed")  # compile one launch config per kernel, not six
    # Kernels with an atomic fast path run their bit-reproducible one in tests (tests of the fast path ask for it).
    os.environ.setdefault("HYBRID_DETERMINISTIC", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run scripts/gpu_suite.sh on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def matches_eager():
    """``check(fused, eager, x)``: a layer whose elementwise work runs through torch.compile on CUDA against its eager
    twin (given the fused one's weights) under bf16 autocast, as in training: the output, then every parameter
    gradient of a mean-square loss."""
    def check(fused: torch.nn.Module, eager: torch.nn.Module, x: torch.Tensor) -> None:
        eager.load_state_dict(fused.state_dict())
        with torch.autocast("cuda", torch.bfloat16):
            out_f, out_e = fused(x), eager(x)
        torch.testing.assert_close(out_f.float(), out_e.float(), rtol=2e-2, atol=2e-3)
        out_f.float().square().mean().backward()
        out_e.float().square().mean().backward()
        for (name, pf), pe in zip(fused.named_parameters(), eager.parameters()):
            torch.testing.assert_close(pf.grad, pe.grad, rtol=2e-2, atol=1e-4, msg=name)
    return check
