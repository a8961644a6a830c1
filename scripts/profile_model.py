"""Where a whole model's prefill and decode time goes on the GPU (diagnostics, not a benchmark).

    python scripts/profile_model.py Ax12 Mx12 --d-model 768 --length 4096

Per pattern: CPU vs CUDA time of one decode step and one prefill (launch-bound when CPU >> CUDA), the top
operators by CPU time and the top kernels by CUDA time, and the prefill peak memory under SDPA's default
backend choice and with flash attention forced.
"""

from __future__ import annotations

import argparse

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import hybrid


def peak_gb(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def show(prof, label: str, rows: int) -> None:
    events = prof.key_averages()
    cpu = sum(e.self_cpu_time_total for e in events) / 1e3
    cuda = sum(e.self_device_time_total for e in events) / 1e3
    print(f"--- {label}: CPU {cpu:.2f} ms, CUDA {cuda:.2f} ms, {sum(e.count for e in events)} op calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("patterns", nargs="+")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=12)
    args = ap.parse_args()
    for pattern in args.patterns:
        model = hybrid.build_model(pattern, d_model=args.d_model, vocab_size=50304).cuda().to(torch.bfloat16).eval()
        L = args.length
        tokens = torch.randint(0, 50304, (1, L), device="cuda")
        cache = model.allocate_cache(1, L + 64)
        model(tokens, cache=cache, last_only=True)
        step = tokens[:, :1]
        for _ in range(5):
            model(step, cache=cache)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(step, cache=cache)
            torch.cuda.synchronize()
        show(prof, f"{pattern} decode step at {L}", args.rows)
        for _ in range(2):
            model(tokens, last_only=True)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            model(tokens, last_only=True)
            torch.cuda.synchronize()
        show(prof, f"{pattern} prefill of {L}", args.rows)
        for n in (8192, 16384):
            t = torch.randint(0, 50304, (1, n), device="cuda")
            default = peak_gb(lambda m=model, t=t: m(t, last_only=True))
            try:
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    flash = f"{peak_gb(lambda m=model, t=t: m(t, last_only=True)):.2f}"
            except RuntimeError as exc:
                flash = f"error: {str(exc)[:200]}"
            print(f"{pattern} prefill peak at {n}: default {default:.2f} GB, flash forced {flash} GB")
        model = cache = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
