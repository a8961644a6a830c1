"""The Gluon (Hopper) chunk kernels (``gluon_siso.py``: the forward's two; ``gluon_siso_bwd.py``: query side dq, key
side dk) against the Triton ones they replace on an H100.

Gluon has no interpreter: the comparison runs only on an sm_90 GPU (``gpu`` mark). The Triton kernel is the one
tested against the float64 reference on the CPU, so matching it at real shapes in bf16 is the check here.
"""

import pytest
import torch

pytest.importorskip("triton")

from test_mamba3_triton import _rel, make  # noqa: E402

NAMES = ["q", "k", "v", "log_decay", "dt", "lam", "omega", "q_bias", "k_bias", "D"]
CASES = {
    "rope-half-ragged": dict(B=2, T=1000, G=1, H=8, N=128, P=64, S=32),
    "gqa-full-rope": dict(B=1, T=333, G=2, H=4, N=64, P=32, S=32),
    "no-rot-no-bias": dict(B=2, T=130, G=1, H=4, N=128, P=64, S=32, rot=False, bias=False),
    "fixed-freq": dict(B=1, T=257, G=1, H=4, N=128, P=128, S=16, angle_dt=False),
}


@pytest.mark.parametrize("kernel", ["state", "fwd", "dq", "dx", "dk"])
def test_gluon_selection_and_a_bad_value(monkeypatch, kernel):
    from hybrid.kernels.mamba3.triton_siso import in_gluon, kernel_flags

    flags = kernel_flags(64, 128, 64, 32, True)
    v = torch.zeros(1, 64, 2, 64, dtype=torch.bfloat16)
    name = f"HYBRID_SCAN_{kernel.upper()}"
    for mode in ("auto", "gluon", "triton"):  # never on the CPU: the Triton kernels run there
        monkeypatch.setenv(name, mode)
        assert not in_gluon(kernel, v, flags)
    monkeypatch.setenv(name, "cuda")
    with pytest.raises(ValueError, match=f"{name} must be auto, triton or gluon"):
        in_gluon(kernel, v, flags)


def test_gluon_launch_flags_count_blocks_at_the_gluon_width(monkeypatch):
    from hybrid.kernels.mamba3 import gluon_common
    from hybrid.kernels.mamba3.triton_siso import kernel_flags

    flags = kernel_flags(64, 128, 64, 32, True)  # chunk 64, d_state 128, head 64, 32 of 64 pairs rotated
    assert gluon_common.launch_flags(flags, 32) == dict(C=64, N2=64, NB=32, P=64, ROT_BLOCKS=1, ANGLE_DT=True,
                                                        HEADS_FIRST=False, COALESCE=gluon_common.COALESCE,
                                                        num_warps=4)
    monkeypatch.setattr(gluon_common, "COL_BLOCK", 16)
    assert gluon_common.launch_flags(flags, 32)["ROT_BLOCKS"] == 2
    assert gluon_common.launch_flags(flags, 20)["ROT_BLOCKS"] == 2  # a partly rotated block counts
    assert gluon_common.launch_flags(flags, 0)["ROT_BLOCKS"] == 0
    narrow = kernel_flags(64, 32, 64, 16, False)  # 16 pairs: one block at most that wide
    assert gluon_common.launch_flags(narrow, 16)["NB"] == 16 and gluon_common.launch_flags(narrow, 16)["ROT_BLOCKS"] == 1


def test_gluon_asked_for_under_another_triton_names_the_release(monkeypatch):
    """``gluon`` under a Triton release the kernels were not written for fails with the reason; ``auto`` falls back."""
    from hybrid.kernels.mamba3 import triton_siso
    from hybrid.kernels.mamba3.triton_siso import in_gluon, kernel_flags

    class FakeCuda:  # stands in for a CUDA tensor: in_gluon looks at is_cuda before anything else
        is_cuda = True

    flags = kernel_flags(64, 128, 64, 32, True)
    monkeypatch.setattr(triton_siso.triton, "__version__", "9.9.0")
    monkeypatch.setenv("HYBRID_SCAN_DK", "auto")
    assert not in_gluon("dk", FakeCuda(), flags)
    monkeypatch.setenv("HYBRID_SCAN_DK", "gluon")
    with pytest.raises(RuntimeError, match="needs Triton 3.6.x"):
        in_gluon("dk", FakeCuda(), flags)


def _grads(monkeypatch, inp, st, which: str, kernel: str, angle_dt: bool):
    """Output and gradients with the ``which`` kernel (state, fwd, dq, dx or dk) run as ``kernel`` (gluon or triton),
    the others as Triton's."""
    from hybrid.kernels.mamba3.siso import mamba3_siso_chunk
    from hybrid.kernels.mamba3.triton_siso import GLUON_DEFAULT

    for name in GLUON_DEFAULT:
        monkeypatch.setenv(f"HYBRID_SCAN_{name.upper()}", kernel if name == which else "triton")
    leaves = {k: (v.to(torch.bfloat16) if k in ("q", "k", "v") else v).detach().clone().requires_grad_(True)
              for k, v in inp.items() if v is not None}
    y, _ = mamba3_siso_chunk(**leaves, angle_dt=angle_dt, initial_state=st, chunk_size=64)
    gen = torch.Generator(device="cuda").manual_seed(1)
    (y.float() * torch.randn(y.shape, generator=gen, device="cuda")).sum().backward()
    grads = {k: leaves[k].grad.float() for k in NAMES if k in leaves and leaves[k].grad is not None}
    return {"y": y.detach().float(), **grads}


# Every kernel at every case in both group-sum modes with the default 32-pair column blocks; on the ragged case also
# 16-pair blocks and programs numbered heads first (the order the kernels take above 128 chunks, forced here at 16)
# (the forward and dx write no dq / dk, so one mode is enough for them).
KERNELS = ("state", "fwd", "dq", "dx", "dk")
ONE_MODE = ("state", "fwd", "dx")
GPU_PARAMS = [(w, case, gs, 32, False) for w in KERNELS for case in CASES
              for gs in (("store",) if w in ONE_MODE else ("store", "atomic"))]
GPU_PARAMS += [(w, "rope-half-ragged", "store", 16, False) for w in KERNELS]
GPU_PARAMS += [(w, "rope-half-ragged", "store" if w in ONE_MODE else "atomic", 32, True) for w in KERNELS]


@pytest.mark.gpu
@pytest.mark.parametrize("which,case,group_sum,col_block,heads_first", GPU_PARAMS)
def test_gpu_gluon_kernel_matches_triton_kernel(monkeypatch, which, case, group_sum, col_block, heads_first):
    """The Gluon chunk-state, chunk-output, dq, dx or dk kernel against the Triton kernel: the output and every input
    gradient."""
    from hybrid.kernels.mamba3 import gluon_common, triton_siso

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon kernels are written for sm_90")
    kw = dict(CASES[case])
    if which in ("state", "fwd", "dq") and kw["P"] % 64:
        pytest.skip("this Gluon kernel takes head sizes that are multiples of 64")
    monkeypatch.setattr(gluon_common, "COL_BLOCK", col_block)
    if heads_first:
        monkeypatch.setattr(triton_siso, "HEADS_FIRST_CHUNKS", 4)
    monkeypatch.setenv("HYBRID_SCAN_GROUP_SUM", group_sum)
    angle_dt = kw.get("angle_dt", True)
    inp, st = make(**kw, dtype=torch.float32, device="cuda")
    got = _grads(monkeypatch, inp, st, which, "gluon", angle_dt)
    want = _grads(monkeypatch, inp, st, which, "triton", angle_dt)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.isfinite(got[name]).all(), name
        assert _rel(got[name], want[name]) < 1e-2, (name, _rel(got[name], want[name]))
    if group_sum == "store":  # no atomics: the same bits every run
        again = _grads(monkeypatch, inp, st, which, "gluon", angle_dt)
        assert all(torch.equal(got[n], again[n]) for n in got)
        # and when relaunched by DirectLaunch (the first call compiles through the JIT, the second skips it)
        monkeypatch.setattr(gluon_common, "DIRECT", True)
        for _ in range(2):
            direct_run = _grads(monkeypatch, inp, st, which, "gluon", angle_dt)
            assert all(torch.equal(got[n], direct_run[n]) for n in got)
