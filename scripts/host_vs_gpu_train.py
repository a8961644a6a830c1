"""Is a training step bound by the host or by the GPU? (diagnostic, GPU only)

    python scripts/host_vs_gpu_train.py [PATTERN ...]

Per pattern at 8 x 4096, d_model 768, bf16 autocast (as ``hybrid-bench`` trains): the step's wall time (synchronised),
the host time to issue it (no sync), and the sum of its kernels' times (one profiled step). Host issue near the wall
time means launch-bound; kernels near the wall time means GPU-bound, and wall - kernels is the GPU's idle gaps.

Where those gaps come from: over the timed steps, the caching allocator's device allocations, frees and
free-and-retry events (each cudaMalloc / cudaFree synchronises the device), and in the profiled step the largest
gaps between consecutive kernels with the CPU op that launched the kernel after each. Run once as is and once
with ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` to see whether the allocator is the cause.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hybrid


def train_step(model, tokens) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())
    loss.backward()


ALLOC_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def kernel_events(prof) -> list:
    """The profile's device kernels, in start order."""
    kernels = [ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CUDA]
    return sorted(kernels, key=lambda e: e.time_range.start)


def idle_gaps(prof, top: int = 5) -> list[tuple[float, str]]:
    """The ``top`` largest gaps (ms) between consecutive kernels of a profile, each with the name of the CPU op that
    launched the kernel after it (through the launch's correlation id; the kernel's own name if that is missing)."""
    cpu_ops = {ev.id: ev for ev in prof.events() if ev.device_type == torch.autograd.DeviceType.CPU}

    def launcher(kernel) -> str:
        op = cpu_ops.get(getattr(kernel, "linked_correlation_id", 0))
        while op is not None and op.name.startswith("cuda") and op.cpu_parent is not None:  # runtime call -> its op
            op = op.cpu_parent
        return op.name if op is not None else kernel.name[:60]

    kernels = kernel_events(prof)
    gaps = [(after.time_range.start - before.time_range.end, after) for before, after in zip(kernels, kernels[1:])]
    gaps = sorted((g for g in gaps if g[0] > 0), key=lambda g: -g[0])[:top]
    return [(us / 1e3, launcher(kernel)) for us, kernel in gaps]


def measure(pattern: str, repeats: int = 5) -> dict:
    model = hybrid.build_model(pattern, d_model=768, vocab_size=50304).cuda().train()
    tokens = torch.randint(0, 50304, (8, 4096), device="cuda")
    for _ in range(3):
        train_step(model, tokens)
    walls, issues = [], []
    before = torch.cuda.memory_stats()
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, tokens)
        issued = time.perf_counter()
        torch.cuda.synchronize()
        issues.append((issued - start) * 1e3)
        walls.append((time.perf_counter() - start) * 1e3)
    after = torch.cuda.memory_stats()
    alloc = {name: (after.get(name, 0) - before.get(name, 0)) / repeats for name in ALLOC_COUNTERS}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, tokens)
        torch.cuda.synchronize()
    kernels = sum(e.time_range.elapsed_us() for e in kernel_events(prof)) / 1e3
    return {"wall_ms": statistics.median(walls), "host_issue_ms": statistics.median(issues), "kernels_ms": kernels,
            "alloc_per_step": alloc, "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "gaps": idle_gaps(prof)}


def main() -> None:
    for pattern in sys.argv[1:] or ["MMMAx3", "Ax12", "Mx12"]:
        r = measure(pattern)
        print(f"{pattern}: wall {r['wall_ms']:.1f} ms, host issue {r['host_issue_ms']:.1f} ms, "
              f"kernels {r['kernels_ms']:.1f} ms", flush=True)
        print("  per step: " + ", ".join(f"{k} {v:g}" for k, v in r["alloc_per_step"].items())
              + f"; peak allocated {r['peak_gb']:.1f} GB", flush=True)
        print("  largest idle gaps: " + "; ".join(f"{ms:.2f} ms before {op}" for ms, op in r["gaps"]), flush=True)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
