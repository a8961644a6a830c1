"""Where one whole-model decode step's GPU time goes, kernel by kernel (GPU diagnostics, not a benchmark).

    python scripts/profile_decode.py MMMAx3 Ax12 --length 1024 102400 --compile

Per pattern and cache length: the step exactly as ``hybrid-bench`` runs it (``GraphDecoder``, optionally
torch.compile'd), profiled uncaptured for a few steps so each kernel shows with its own time (a kernel takes
the same time inside a graph; only the gaps between kernels differ), then the captured step's median time
per token for reference. Prints kernels per step, their summed time, and the largest kernels grouped by name.
"""

from __future__ import annotations

import argparse
import collections
import json

import torch
from torch.profiler import ProfilerActivity, profile

import hybrid
from hybrid.bench.measure import decode_point, prefill_cached, random_tokens
from hybrid.decode_graph import GraphDecoder

STEPS = 5


@torch.no_grad()
def kernel_table(model, length: int, batch: int, compile: bool) -> dict:
    dev = next(model.parameters()).device
    cache = model.allocate_cache(batch, length + 16)
    prefill_cached(model, random_tokens(model, batch, length, dev), cache)
    tokens = random_tokens(model, batch, 1, dev)
    decoder = GraphDecoder(model, cache, capture=False, compile=compile)
    for _ in range(3):
        decoder.step(tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as prof:
        for _ in range(STEPS):
            decoder.step(tokens)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0:
            groups[e.name[:90]].append(e.device_time_total)  # us
    rows = sorted(((name, len(t) / STEPS, sum(t) / STEPS) for name, t in groups.items()), key=lambda r: -r[2])
    return {"kernels_per_step": sum(r[1] for r in rows), "kernel_us_per_step": sum(r[2] for r in rows),
            "top": [{"name": n, "per_step": c, "us_per_step": round(us, 2)} for n, c, us in rows[:25]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("patterns", nargs="+")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--length", type=int, nargs="+", default=[1024])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the code path (no kernel table)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    report = []
    for pattern in args.patterns:
        model = hybrid.build_model(pattern, d_model=args.d_model, vocab_size=50304).to(dev, torch.bfloat16).eval()
        for length in args.length:
            row = {"pattern": pattern, "length": length, "batch": args.batch, "compiled": args.compile}
            row.update(kernel_table(model, length, args.batch, args.compile))
            torch.cuda.empty_cache()
            graphed = decode_point(model, length, args.batch, 32, dev, 3, cuda_graph=True, compile=args.compile)
            row["graph_ms_per_token"] = graphed["seconds_per_token"] * 1e3
            torch.cuda.empty_cache()
            print(f"== {pattern} L={length} b={args.batch} compiled={args.compile}: graph {row['graph_ms_per_token']:.3f} ms"
                  f"/token, {row['kernels_per_step']:.0f} kernels, {row['kernel_us_per_step']:.1f} us of kernels", flush=True)
            for r in row["top"]:
                print(f"   {r['us_per_step']:8.2f} us  x{r['per_step']:5.1f}  {r['name']}", flush=True)
            report.append(row)
        model = None
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "rows": report}, f, indent=2)


if __name__ == "__main__":
    main()
