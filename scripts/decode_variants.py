"""Decode latency per token of whole models: eager vs CUDA graph vs torch.compile + graph (GPU diagnostics).

    python scripts/decode_variants.py Ax12 MMMAx3 Mx12 --length 102400 --batch 1 [--autotune]

``--autotune`` adds a fourth variant: the step compiled with mode max-autotune-no-cudagraphs (Inductor may pick
Triton matmul templates with the neighbouring elementwise work fused in) before the graph is captured.
"""

from __future__ import annotations

import argparse
import time

import torch

import hybrid
from hybrid.bench.measure import decode_point


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("patterns", nargs="+")
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--length", type=int, nargs="+", default=[102400])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--autotune", action="store_true", help="also the max-autotune-no-cudagraphs compile")
    args = ap.parse_args()
    variants = [("eager", False, False), ("graph", True, False), ("compile+graph", True, True)]
    if args.autotune:
        variants.append(("autotune+graph", True, "max-autotune-no-cudagraphs"))
    dev = torch.device("cuda")
    for pattern in args.patterns:
        model = hybrid.build_model(pattern, d_model=args.d_model, vocab_size=50304).to(dev, torch.bfloat16).eval()
        for L in args.length:
            for b in args.batch:
                row = {}
                for name, graph, comp in variants:
                    t = time.perf_counter()
                    try:
                        r = decode_point(model, L, b, 32, dev, 3, cuda_graph=graph, compile=comp)
                        row[name] = f"{r['seconds_per_token'] * 1e3:.3f} ms"
                    except Exception as exc:  # noqa: BLE001 - report and go on
                        row[name] = f"{type(exc).__name__}: {str(exc)[:150]}"
                    row[name] += f" ({time.perf_counter() - t:.0f} s)"
                    torch.cuda.empty_cache()
                print(pattern, L, b, row, flush=True)
        model = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
