"""Per block: host time to issue its forward / backward against the GPU time they take (diagnostic, GPU only).

    python scripts/host_vs_gpu_block.py [PATTERN] [--profile N]

``host_vs_gpu_train.py`` shows where a training step idles; this finds which block's host path causes it. For
the first block of each mixer type in PATTERN (default ``MMMA``) at 8 x 4096, d_model 768, bf16 autocast:

- host: time to issue the forward (then the backward) with the GPU idle, so no call waits on the device;
- gpu: the same calls issued behind a ~50 ms device sleep, so every kernel is queued before the first one runs
  and the CUDA-event span is the kernels' time plus the device's own per-launch gaps, with no host stalls.

A block whose host time exceeds its GPU time starves the device in a training step. ``--profile N`` then runs
cProfile over N forward + backward passes of the first non-attention block and prints the functions with the most
host time (own and cumulative).
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import sys
import time

import torch

import hybrid

SLEEP_CYCLES = 100_000_000  # ~50 ms at H100 clocks: longer than any block's host issue time


def timed(block, x, grad, repeats: int = 7) -> dict:
    host_f, host_b, gpu_f, gpu_b = [], [], [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        y.backward(grad)
        t3 = time.perf_counter()
        torch.cuda.synchronize()
        host_f.append((t1 - t0) * 1e3)
        host_b.append((t3 - t2) * 1e3)

        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        torch.cuda._sleep(SLEEP_CYCLES)
        events[0].record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = block(x)
        events[1].record()
        y.backward(grad)
        events[2].record()
        torch.cuda.synchronize()
        gpu_f.append(events[0].elapsed_time(events[1]))
        gpu_b.append(events[1].elapsed_time(events[2]))
    med = statistics.median
    return {"host_fwd": med(host_f), "gpu_fwd": med(gpu_f), "host_bwd": med(host_b), "gpu_bwd": med(gpu_b)}


def main() -> None:
    args = sys.argv[1:]
    profile_steps = 0
    if "--profile" in args:
        i = args.index("--profile")
        profile_steps, args = int(args[i + 1]), args[:i] + args[i + 2:]
    pattern = args[0] if args else "MMMA"
    model = hybrid.build_model(pattern, d_model=768, vocab_size=50304).cuda().train()
    x = torch.randn(8, 4096, 768, device="cuda", requires_grad=True)  # the fp32 residual stream, as in the model
    grad = torch.randn_like(x)
    seen = {}
    for block in model.blocks:
        seen.setdefault(type(block.mixer).__name__, block)
    for name, block in seen.items():
        for _ in range(3):  # compile / tune
            with torch.autocast("cuda", dtype=torch.bfloat16):
                block(x).backward(grad)
        r = timed(block, x, grad)
        print(f"{name}: forward host {r['host_fwd']:.2f} ms / gpu {r['gpu_fwd']:.2f} ms; "
              f"backward host {r['host_bwd']:.2f} ms / gpu {r['gpu_bwd']:.2f} ms", flush=True)
    if profile_steps:
        block = next(b for n, b in seen.items() if "Attention" not in n)
        profiler = cProfile.Profile()
        torch.cuda.synchronize()
        profiler.enable()
        for _ in range(profile_steps):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = block(x)
            y.backward(grad)
            torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler).strip_dirs()
        print(f"cProfile, {profile_steps} forward + backward passes of {type(block.mixer).__name__}, by own time:")
        stats.sort_stats("tottime").print_stats(45)
        print("by cumulative time:")
        stats.sort_stats("cumulative").print_stats(60)


if __name__ == "__main__":
    main()
