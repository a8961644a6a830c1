"""DirectLaunch: a second launch with the same specialisation skips the JIT; any change Triton would compile
differently for goes back through it. The JIT and the driver are stand-ins (no GPU); on a GPU every Triton test of
the scan runs through the real one."""

import inspect

import pytest
import torch
from hybrid.kernels import launch


class Param:
    def __init__(self, name, default=inspect.Parameter.empty, is_constexpr=False):
        self.name, self.default, self.is_constexpr = name, default, is_constexpr


class Compiled:
    packed_metadata, function = "packed", "function"

    def __init__(self, launched):
        self.launched = launched

    def launch_metadata(self, grid, stream, *params):
        return None

    def run(self, g0, g1, g2, stream, function, packed, metadata, enter, exit_, *params):
        self.launched.append(((g0, g1, g2), stream, params))


class Jit:
    pre_run_hooks = []
    params = [Param("X"), Param("n"), Param("BLOCK", is_constexpr=True), Param("FLAG", default=False, is_constexpr=True)]

    def __init__(self):
        self.calls, self.launched = [], []

    def run(self, *args, grid, warmup, **kwargs):
        self.calls.append((grid, args, kwargs))
        return Compiled(self.launched)


@pytest.fixture
def kernel(monkeypatch):
    class Active:
        get_current_device = staticmethod(lambda: 0)
        get_current_stream = staticmethod(lambda device: 1234)

    class Driver:
        active = Active

    monkeypatch.setattr(launch, "driver", Driver)
    return Jit()


def test_same_specialisation_launches_directly(kernel):
    wrapped = launch.DirectLaunch(kernel)
    x = torch.zeros(64)
    wrapped[(4,)](x, 32, BLOCK=16)
    wrapped[(5, 2)](x, 48, BLOCK=16)  # 48: like 32, a multiple of 16 in 32-bit range
    wrapped[(6,)](x, 64, 16)  # the constexpr by position: keyed apart from the keyword form, then direct too
    wrapped[(6,)](x, 64, 16)
    assert len(kernel.calls) == 2
    assert kernel.launched == [((5, 2, 1), 1234, (x, 48, 16, False)),  # every parameter, defaults included
                               ((6, 1, 1), 1234, (x, 64, 16, False))]


@pytest.mark.parametrize("args, kwargs", [
    ((torch.zeros(64)[1:], 32), {"BLOCK": 16}),  # a 4-byte offset: not 16-byte aligned
    ((torch.zeros(64, dtype=torch.float64), 32), {"BLOCK": 16}),  # another dtype
    ((torch.zeros(64), 33), {"BLOCK": 16}),  # not a multiple of 16
    ((torch.zeros(64), 1), {"BLOCK": 16}),  # Triton specialises 1
    ((torch.zeros(64), 2**33), {"BLOCK": 16}),  # 64-bit
    ((torch.zeros(64), 32), {"BLOCK": 32}),  # another constexpr
    ((torch.zeros(64), 32, 32), {}),  # another constexpr, passed by position
    ((torch.zeros(64), 32), {"BLOCK": 16, "FLAG": True}),  # a default overridden
    ((torch.zeros(64), 32), {"BLOCK": 16, "num_warps": 8}),  # another option
])
def test_a_change_triton_compiles_for_goes_through_the_jit(kernel, args, kwargs):
    wrapped = launch.DirectLaunch(kernel)
    wrapped[(1,)](torch.zeros(64), 32, BLOCK=16)
    wrapped[(1,)](*args, **kwargs)
    assert len(kernel.calls) == 2 and not kernel.launched


def test_callable_grid_and_a_full_cache_take_the_jit(kernel, monkeypatch):
    wrapped = launch.DirectLaunch(kernel)
    x = torch.zeros(64)
    for _ in range(2):
        wrapped[lambda meta: (1,)](x, 32, BLOCK=16)
    monkeypatch.setattr(launch, "MAX_ENTRIES", 0)
    fresh = launch.DirectLaunch(kernel)
    for _ in range(2):
        fresh[(1,)](x, 32, BLOCK=16)
    assert len(kernel.calls) == 4 and not kernel.launched


def test_direct_leaves_non_jit_objects_alone():
    fake = object()
    assert launch.direct(fake) is fake


@pytest.mark.gpu
def test_gpu_direct_relaunch_matches_the_jit_and_torch():
    """On a GPU, the gate kernel's second launch goes through the cached binary, its third (z no longer 16-byte
    aligned) through the JIT again; every output equals the JIT's and PyTorch's y * silu(z)."""
    from hybrid.kernels.mamba3 import triton_gate

    if not launch.ENABLED:
        pytest.skip("HYBRID_TRITON_DIRECT=0")
    torch.manual_seed(0)
    y = torch.randn(2, 37, 96, device="cuda", dtype=torch.bfloat16)
    proj = torch.randn(2, 37, 300, device="cuda", dtype=torch.bfloat16)
    wrapped = launch.direct(triton_gate._gate_fwd)
    wrapped.compiled.clear()
    outs = []
    for z in (proj[..., 8:104], proj[..., 16:112], proj[..., 9:105]):  # aligned, aligned, 2 bytes off
        out = triton_gate.gate_forward(y, z)
        jit = torch.empty_like(y)
        triton_gate._gate_fwd[(2 * 37, 1)](y, z, jit, 96, 300, BLOCK=triton_gate.GATE_BLOCK, num_warps=4)
        torch.testing.assert_close(out, jit, rtol=0, atol=0)
        torch.testing.assert_close(out.float(), (y.float() * torch.nn.functional.silu(z.float())), rtol=1e-2, atol=1e-2)
        outs.append(len(wrapped.compiled))
    assert outs == [1, 1, 2]  # the second launch reused the first entry; the misaligned z compiled its own
