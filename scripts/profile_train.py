"""Where one training step's time goes on the GPU (diagnostics, not a benchmark).

    python scripts/profile_train.py Mx12 Ax12 --batch 8 --length 4096

Per pattern: forward + backward under bf16 autocast (as ``hybrid-bench`` measures training throughput),
CPU vs CUDA time, and the top kernels by CUDA time grouped by name.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hybrid


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("patterns", nargs="+")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    for pattern in args.patterns:
        model = hybrid.build_model(pattern, d_model=args.d_model, vocab_size=50304).cuda().train()
        tokens = torch.randint(0, 50304, (args.batch, args.length), device="cuda")

        def step(model=model, tokens=tokens):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())
            loss.backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in events) / 1e3
        cuda = sum(e.self_device_time_total for e in events) / 1e3
        print(f"--- {pattern} train step {args.batch} x {args.length}: CPU {cpu:.1f} ms, CUDA {cuda:.1f} ms")
        print(events.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=70))
        model = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
