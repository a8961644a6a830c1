"""Is a training step bound by the host or by the GPU? (diagnostic, GPU only)

    python scripts/host_vs_gpu_train.py [--seq T] [--ffn-eager] [PATTERN ...]

Per pattern at 32768 tokens per step (8 x 4096 by default; ``--seq 16384`` gives 2 x 16384), d_model 768, bf16
autocast (as ``hybrid-bench`` trains): the step's wall time (synchronised), its time back to back (steps queued
behind each other, as ``hybrid-bench`` now times training), the host time to issue it (no sync), and the sum of its
kernels' times (one profiled step). Host issue near the wall time means launch-bound; kernels
near the wall time means GPU-bound, and wall - kernels is the GPU's idle gaps.

Where those gaps come from: over the timed steps, the caching allocator's device allocations, frees and
free-and-retry events (each cudaMalloc / cudaFree synchronises the device); in the profiled step the kernel count,
the idle time in short gaps (the per-kernel cost even when the host is ahead) and in long ones (the host behind,
inflated somewhat by the profiler's own host overhead), with the kernels that wait longest; and the kernels that
take the most time, by name.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hybrid
from hybrid.bench.timing import pipelined_median_seconds


def train_step(model, tokens) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())
    loss.backward()


ALLOC_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


TOP_KERNELS = 40
PROFILER_EVENTS = ("Activity Buffer Request",)  # the profiler's own device-side records, not the model's work


def kernel_events(prof) -> list:
    """The profile's device kernels (and memsets / copies), in start order."""
    kernels = [ev for ev in prof.events()
               if ev.device_type == torch.autograd.DeviceType.CUDA and ev.name not in PROFILER_EVENTS]
    return sorted(kernels, key=lambda e: e.time_range.start)


def idle_gaps(prof, top: int = 6) -> dict:
    """Where the GPU idles between consecutive kernels of a profile: the kernel count, the idle time split into short
    gaps (< 5 us: the device's own launch-to-launch cost, paid per kernel even when the host is ahead) and longer ones
    (the host fell behind), and the ``top`` kernels (by name) with the most long-gap idle time before them."""
    kernels = kernel_events(prof)
    gaps = [(after.time_range.start - before.time_range.end, after.name) for before, after in zip(kernels, kernels[1:])]
    short = sum(us for us, _ in gaps if 0 < us < 5)
    long_by_name: dict[str, list[float]] = {}
    for us, name in gaps:
        if us >= 5:
            long_by_name.setdefault(name[:70], []).append(us)
    ranked = sorted(long_by_name.items(), key=lambda item: -sum(item[1]))[:top]
    return {"kernels": len(kernels), "short_ms": short / 1e3,
            "long_ms": sum(sum(v) for v in long_by_name.values()) / 1e3,
            "long_count": sum(len(v) for v in long_by_name.values()),
            "top": [(name, sum(v) / 1e3, len(v)) for name, v in ranked]}


def measure(pattern: str, seq_len: int = 4096, repeats: int = 5, ffn: dict | None = None) -> dict:
    extra = {} if ffn is None else {"ffn": ffn}
    model = hybrid.build_model(pattern, d_model=768, vocab_size=50304, **extra).cuda().train()
    tokens = torch.randint(0, 50304, (32768 // seq_len, seq_len), device="cuda")
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
    piped = pipelined_median_seconds(lambda: train_step(model, tokens), torch.device("cuda"), 0, repeats) * 1e3
    alloc = {name: (after.get(name, 0) - before.get(name, 0)) / repeats for name in ALLOC_COUNTERS}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(model, tokens)
        torch.cuda.synchronize()
    events = kernel_events(prof)
    kernels = sum(e.time_range.elapsed_us() for e in events) / 1e3
    by_name: dict[str, list[float]] = {}
    for ev in events:
        by_name.setdefault(ev.name[:80], []).append(ev.time_range.elapsed_us() / 1e3)
    heaviest = sorted(((sum(v), len(v), name) for name, v in by_name.items()), reverse=True)
    runtime: dict[str, list[float]] = {}  # host time in CUDA runtime / driver calls: launches, syncs, copies
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU and ev.name.startswith(("cuda", "cu")):
            runtime.setdefault(ev.name, []).append(ev.time_range.elapsed_us() / 1e3)
    runtime_calls = sorted(((sum(v), len(v), name) for name, v in runtime.items()), reverse=True)
    return {"wall_ms": statistics.median(walls), "pipelined_ms": piped, "host_issue_ms": statistics.median(issues),
            "kernels_ms": kernels,
            "alloc_per_step": alloc, "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "gaps": idle_gaps(prof),
            "heaviest": heaviest, "runtime": runtime_calls}


def main() -> None:
    args = sys.argv[1:]
    seq_len = 4096
    ffn = None
    while args[:1] and args[0].startswith("--"):
        if args[0] == "--seq":
            seq_len, args = int(args[1]), args[2:]
        elif args[0] == "--ffn-eager":  # the SwiGLU activation without torch.compile (SwiGLUConfig.fused_elementwise)
            ffn, args = {"type": "swiglu", "fused_elementwise": False}, args[1:]
        else:
            raise SystemExit(f"unknown option {args[0]}; options: --seq T, --ffn-eager")
    for pattern in args or ["MMMAx3", "Ax12", "Mx12"]:
        r = measure(pattern, seq_len, ffn=ffn)
        print(f"{pattern} @ {32768 // seq_len}x{seq_len}: wall {r['wall_ms']:.1f} ms, back to back {r['pipelined_ms']:.1f} ms, "
              f"host issue {r['host_issue_ms']:.1f} ms, "
              f"kernels {r['kernels_ms']:.1f} ms", flush=True)
        print("  per step: " + ", ".join(f"{k} {v:g}" for k, v in r["alloc_per_step"].items())
              + f"; peak allocated {r['peak_gb']:.1f} GB", flush=True)
        g = r["gaps"]
        print(f"  {g['kernels']} kernels; idle {g['short_ms']:.1f} ms in gaps < 5 us, {g['long_ms']:.1f} ms in "
              f"{g['long_count']} longer gaps, most before: "
              + "; ".join(f"{name} {ms:.2f} ms / {n}" for name, ms, n in g["top"]), flush=True)
        print("  host in runtime calls: " + "; ".join(f"{name} {ms:.1f} ms / {n}" for ms, n, name in r["runtime"][:8]),
              flush=True)
        for ms, n, name in r["heaviest"][:TOP_KERNELS]:
            print(f"    {ms:8.2f} ms {n:5d}x  {name}", flush=True)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
