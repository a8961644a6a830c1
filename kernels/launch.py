"""Launching a compiled Triton kernel again without the JIT's per-call work.

Every ``kernel[grid](...)`` goes through ``JITFunction.run``: it binds the arguments, specialises each one, turns
the specialisation and the options into a string key, checks the globals the kernel read, and only then calls the
compiled launcher. On the H100 machines this costs ~100-160 us of host time per launch for the scan's ~35-argument
kernels (``scripts/host_profile_step.py --inclusive``), and a Mamba-3 block makes ~16 launches per training step:
enough that its forward waited on Python on machines with slower hosts. A relaunch here costs ~50-100 us
(docs/perf-notes.md, fifteenth session).

``DirectLaunch`` keeps the compiled kernel the JIT returned for a call and launches it straight through its
launcher the next time a call has the same specialisation. Its key refines Triton's (``launch_key``): a tensor's
dtype and 16-byte alignment, a runtime int's value class (1, a multiple of 16, 32-bit range), and anything else by
value (constexprs, floats, None, options such as num_warps), so two calls Triton would compile differently never
share an entry. Under the interpreter, with a callable grid, with pre-run hooks on the kernel, or with
``HYBRID_TRITON_DIRECT=0`` every call takes the JIT's path. Not rechecked on a relaunch: the module globals the
kernel read (the JIT raises if one changed; ours are constants).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from triton.runtime import driver

ENABLED = os.environ.get("HYBRID_TRITON_DIRECT", "1") != "0"
MAX_ENTRIES = 64  # keys by value (floats, constexprs) could grow without bound; past this, calls take the JIT's path


def launch_key(args: tuple, kwargs: dict, constexpr: tuple[bool, ...]) -> tuple:
    """What Triton specialises a launch on, as one hashable tuple (finer than Triton's own key, never coarser).
    ``constexpr[i]``: whether positional parameter i is a constexpr (keyed by value, as every keyword argument)."""
    key = [tuple(kwargs)]
    for a, by_value in zip(args, constexpr):
        key.append(_spec(a) if not by_value or isinstance(a, torch.Tensor) else (type(a), a))
    for a in kwargs.values():
        key.append(_spec(a) if isinstance(a, torch.Tensor) else (type(a), a))
    return tuple(key)


def _spec(a) -> tuple:
    """A runtime argument's specialisation class: a tensor's dtype and 16-byte alignment, an int's (1, a multiple of
    16, 32-bit range); anything else by value (floats, None, bools)."""
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() % 16 == 0)
    if type(a) is int:  # bool is not int here: it is keyed by value below
        return (a == 1, a % 16 == 0, -0x80000000 <= a <= 0x7FFFFFFF)
    return (type(a), a)


class DirectLaunch:
    """A ``@triton.jit`` kernel, indexed by a grid as the kernel is, that relaunches what the JIT compiled for a
    call's specialisation without the JIT. Other attributes are the kernel's."""

    def __init__(self, fn):
        self.fn = fn
        self.compiled: dict[tuple, tuple] = {}
        self.constexpr = tuple(bool(p.is_constexpr) for p in fn.params)

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            return self.launch(grid, args, kwargs)
        return run

    def launch(self, grid, args: tuple, kwargs: dict):
        if callable(grid) or self.fn.pre_run_hooks:  # hooks registered on the kernel run in the JIT's path only
            return self.fn.run(*args, grid=grid, warmup=False, **kwargs)
        device = driver.active.get_current_device()
        key = (device, launch_key(args, kwargs, self.constexpr))
        hit = self.compiled.get(key)
        if hit is None:
            kernel = self.fn.run(*args, grid=grid, warmup=False, **kwargs)
            if len(self.compiled) < MAX_ENTRIES and hasattr(kernel, "packed_metadata"):
                self.compiled[key] = (kernel, self._tail(len(args)))
            return kernel
        kernel, tail = hit
        # The launcher takes every parameter in signature order, constexprs included (it skips those).
        params = (*args, *(kwargs[name] if name in kwargs else default for name, default in tail))
        stream = driver.active.get_current_stream(device)
        grid = (*grid, 1, 1)
        knobs = triton.knobs.runtime
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *params), knobs.launch_enter_hook, knobs.launch_exit_hook, *params)
        return kernel

    def _tail(self, n_positional: int) -> list[tuple[str, object]]:
        """The parameters after the positional ones, each with its default (used where a call does not pass it)."""
        return [(p.name, p.default) for p in self.fn.params[n_positional:]]

    def __getattr__(self, name):
        return getattr(self.fn, name)


@functools.cache
def direct(fn):
    """``fn`` (a ``@triton.jit`` kernel) as a ``DirectLaunch``, one per kernel (``direct(kernel)[grid](...)`` at a call
    site); unchanged under the interpreter or when disabled."""
    if not ENABLED or os.environ.get("TRITON_INTERPRET") == "1" or not isinstance(fn, triton.runtime.JITFunction):
        return fn
    return DirectLaunch(fn)
