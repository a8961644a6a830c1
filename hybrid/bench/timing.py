"""Timing, peak memory and out-of-memory detection, one implementation for CUDA and one for the CPU.

CUDA kernels run asynchronously, so wall-clock time around a launch measures the launch, not the
work: on CUDA we time with events after warm-up. On the CPU ``perf_counter`` is exact. Both report
the median over repeats, which ignores the occasional slow outlier (allocator growth, a GC pause).
"""

from __future__ import annotations

import gc
import statistics
import time
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory, also when a library re-raises it as a plain RuntimeError."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    """Drop the tensors of a failed step and hand cached blocks back, so the next point starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` calls after ``warmup`` untimed ones."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            sync(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3  # ms -> s
        else:
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return statistics.median(times)


def pipelined_median_seconds(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> float:
    """Median time per call of ``fn()`` issued back to back, as a training loop issues its steps: the host queues
    call i + 1 while the GPU still runs call i, so a call costs the GPU's time on it plus whatever idle time is left
    when the host falls behind in that steady state, not the ramp from an idle queue that a call after a sync pays
    (``median_seconds``, the latency of one call). CUDA events between consecutive calls, one sync at the end,
    after one untimed call so that the first timed one is already queued behind work. The CPU runs calls in order
    anyway: there it is ``median_seconds``."""
    if device.type != "cuda":
        return median_seconds(fn, device, warmup, repeats)
    for _ in range(warmup):
        fn()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(repeats + 1)]
    sync(device)
    fn()
    events[0].record()
    for i in range(repeats):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return statistics.median(a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:]))  # ms -> s


class _LiveBytes(TorchDispatchMode):
    """CPU stand-in for ``torch.cuda.max_memory_allocated``: peak bytes of tensor storages created by ATen ops.

    Counts each storage once (views share it) and forgets it when the last tensor created on it dies.
    Buffers internal to one kernel (e.g. inside a fused attention op) are invisible, so this is a lower
    bound; it is labelled approximate in the report and the GPU number is the one to trust.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.refs: dict[int, list[int]] = {}  # storage pointer -> [n live tensors, bytes]

    def _drop(self, ptr: int) -> None:
        entry = self.refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            self.live -= entry[1]
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat = [*args, *(kwargs or {}).values()]
        inputs = {a.untyped_storage().data_ptr() for a in flat if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr in inputs and ptr not in self.refs:
                continue  # a view of / in-place write to memory allocated before we started (weights, inputs)
            entry = self.refs.setdefault(ptr, [0, storage.nbytes()])
            if entry[0] == 0:
                self.live += entry[1]
                self.peak = max(self.peak, self.live)
            entry[0] += 1
            weakref.finalize(t, self._drop, ptr)
        return out


def peak_bytes(fn: Callable[[], Any], device: torch.device) -> tuple[int, str]:
    """Peak bytes allocated above what was live before ``fn()`` ran, and how it was measured."""
    if device.type == "cuda":
        free_memory(device)
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated"
    mode = _LiveBytes()
    with mode:
        fn()
    return mode.peak, "dispatch tracker (cpu, approximate)"
