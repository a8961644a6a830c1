"""Mamba-3 MIMO chunked scan on the GPU: Triton kernels against the SISO kernels and the PyTorch reference.

    python benchmarks/mamba3_mimo_scan.py --out report.json

Shapes follow docs/gpu-baselines.md (H=32, P=64, N=128, 1 group, 32 angles; 8 x 4096, 2 x 16384, 1 x 65536).
MIMO runs ranks 2 and 4 with the layer's default chunk (64 // R tokens, so 64 rows per chunk); SISO runs
chunk 64. At the same state size a MIMO step does R times the FLOPs of SISO's for the same state traffic,
so the ratio MIMO / SISO is the figure to watch. Times are medians of triton.testing.do_bench (ms); every
ratio compares two rows of this same run. A correctness line per rank: relative error of the bf16
Triton output and gradients against the fp32 reference at 2 x 1000.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from hybrid.kernels.mamba3.mimo import mamba3_mimo_chunk, mamba3_mimo_reference
from hybrid.kernels.mamba3.siso import mamba3_siso_chunk
from triton.testing import do_bench

H, P, N, S, G = 32, 64, 128, 32, 1
RANKS = (2, 4)


def inputs(B: int, T: int, R: int, requires_grad: bool = False, dtype=torch.bfloat16) -> dict:
    """MIMO inputs (q, k with a rank axis; v_rank) or, for R = 0, the SISO kernel's (no rank axis)."""
    dev = "cuda"
    dt = 0.001 + 0.1 * torch.rand(B, T, H, device=dev)
    qk_shape = (B, T, G, N) if R == 0 else (B, T, R, G, N)
    bias_shape = (H, N) if R == 0 else (H, R, N)
    x = dict(q=torch.randn(qk_shape, device=dev, dtype=dtype), k=torch.randn(qk_shape, device=dev, dtype=dtype),
             v=torch.randn(B, T, H, P, device=dev, dtype=dtype), log_decay=-dt * (0.5 + torch.rand(B, T, H, device=dev)),
             dt=dt, lam=torch.rand(B, T, H, device=dev), omega=math.pi * torch.tanh(torch.randn(B, T, S, device=dev)),
             q_bias=torch.ones(bias_shape, device=dev), k_bias=torch.ones(bias_shape, device=dev),
             D=torch.ones(H, device=dev))
    if R:
        x["v_rank"] = torch.full((H, R, P), 1.0 / R, device=dev)
    if requires_grad:
        for key in ("q", "k", "v", "log_decay", "dt", "lam", "omega"):
            x[key].requires_grad_(True)
    return x


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def timings(B: int, T: int, R: int) -> dict:
    """Forward and forward + backward of one scan; R = 0 is the SISO kernel."""
    scan = mamba3_siso_chunk if R == 0 else mamba3_mimo_chunk
    chunk = 64 if R == 0 else 64 // R
    x = inputs(B, T, R)
    with torch.no_grad():
        fwd = bench(lambda: scan(**x, chunk_size=chunk))
    xg = inputs(B, T, R, requires_grad=True)
    y, _ = scan(**xg, chunk_size=chunk)
    dy = torch.randn_like(y)

    def fb():
        out, _ = scan(**xg, chunk_size=chunk)
        out.backward(dy)

    return {"fwd_ms": fwd, "fb_ms": bench(fb)}


def correctness(R: int) -> dict:
    """bf16 Triton output and input gradients against the fp32 reference (relative Frobenius errors)."""
    x = inputs(2, 1000, R, requires_grad=False, dtype=torch.float32)
    names = ["q", "k", "v", "log_decay", "dt", "lam", "omega"]

    def run(fn, cast):
        leaves = {k: (v.bfloat16() if cast and k in ("q", "k", "v") else v).detach().clone() for k, v in x.items()}
        for k in names:
            leaves[k].requires_grad_(True)
        y, _ = fn(**leaves, chunk_size=64 // R)
        gen = torch.Generator(device="cuda").manual_seed(1)
        (y.float() * torch.randn(y.shape, generator=gen, device="cuda")).sum().backward()
        return y.float(), [leaves[k].grad.float() for k in names]

    y, got = run(mamba3_mimo_chunk, True)
    y_ref, want = run(mamba3_mimo_reference, False)
    row = {"y": float((y - y_ref).norm() / y_ref.norm()), "finite": bool(torch.isfinite(y).all())}
    row.update({f"d_{k}": float((a - b).norm() / b.norm()) for k, a, b in zip(names, got, want)})
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="mamba3_mimo_scan.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [(8, 4096)] if args.quick else [(8, 4096), (2, 16384), (1, 65536)]
    rows = []
    for B, T in shapes:
        row: dict = {"batch": B, "seqlen": T, "siso": timings(B, T, 0)}
        for R in RANKS:
            row[f"mimo{R}"] = timings(B, T, R)
            for kind in ("fwd_ms", "fb_ms"):
                row[f"mimo{R}_over_siso_{kind[:-3]}"] = row[f"mimo{R}"][kind] / row["siso"][kind]
        if (B, T) == shapes[0]:
            x = inputs(B, T, 4)
            with torch.no_grad():
                row["mimo4_torch_ref_fwd_ms"] = bench(lambda x=x: mamba3_mimo_reference(**x, chunk_size=16))
        rows.append(row)
        torch.cuda.empty_cache()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "prefill": rows,
              "correctness_bf16_vs_fp32": {f"mimo{R}": correctness(R) for R in RANKS}}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['device']}")
    print("B x T       SISO fwd  MIMO2 fwd  MIMO4 fwd  |  SISO f+b  MIMO2 f+b  MIMO4 f+b  |  MIMO4/SISO fwd, f+b")
    for r in rows:
        print(f"{r['batch']} x {r['seqlen']:<6} {r['siso']['fwd_ms']:8.2f} {r['mimo2']['fwd_ms']:10.2f} "
              f"{r['mimo4']['fwd_ms']:10.2f}  | {r['siso']['fb_ms']:9.2f} {r['mimo2']['fb_ms']:10.2f} "
              f"{r['mimo4']['fb_ms']:10.2f}  |  {r['mimo4_over_siso_fwd']:.2f}x, {r['mimo4_over_siso_fb']:.2f}x")
    for name, c in report["correctness_bf16_vs_fp32"].items():
        print(name, " ".join(f"{k}={v:.1e}" if isinstance(v, float) else f"{k}={v}" for k, v in c.items()))


if __name__ == "__main__":
    main()
