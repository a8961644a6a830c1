"""Mamba-3 SISO scan on the GPU: Triton kernels vs the PyTorch reference vs SDPA attention of the same width.

    python benchmarks/mamba3_scan.py --out report.json

Shapes follow docs/gpu-baselines.md (H=32, P=64, N=128, 1 group, 32 angles; attention 16 heads x 64).
Times are medians of triton.testing.do_bench (ms); every ratio compares two rows of this same run.
Also: a correctness line per shape (relative error of the bf16 Triton output against the fp32 reference).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from hybrid.kernels.mamba3 import Mamba3State, mamba3_step
from hybrid.kernels.mamba3.siso import mamba3_siso_chunk, mamba3_siso_reference
from hybrid.kernels.mamba3.triton_siso import mamba3_siso_chunk_fwd, mamba3_siso_step_
from triton.testing import do_bench

H, P, N, S, G = 32, 64, 128, 32, 1
OFFICIAL_FWD = {(8, 4096): 1.48, (2, 16384): 3.57, (1, 65536): 13.47}  # gpu-baselines.md, H100, ms
OFFICIAL_FB = {(8, 4096): 4.41, (2, 16384): 7.78, (1, 65536): 28.68}
OFFICIAL_STEP_US = {1: 89.5, 64: 91.3, 256: 250.8}


def inputs(B: int, T: int, dtype=torch.bfloat16, requires_grad=False):
    dev = "cuda"
    dt = (0.001 + 0.1 * torch.rand(B, T, H, device=dev))
    x = dict(q=torch.randn(B, T, G, N, device=dev, dtype=dtype), k=torch.randn(B, T, G, N, device=dev, dtype=dtype),
             v=torch.randn(B, T, H, P, device=dev, dtype=dtype), log_decay=-dt * (0.5 + torch.rand(B, T, H, device=dev)),
             dt=dt, lam=torch.rand(B, T, H, device=dev), omega=math.pi * torch.tanh(torch.randn(B, T, S, device=dev)),
             q_bias=torch.ones(H, N, device=dev), k_bias=torch.ones(H, N, device=dev), D=torch.ones(H, device=dev))
    if requires_grad:
        for key in ("q", "k", "v", "log_decay", "dt", "lam", "omega"):
            x[key].requires_grad_(True)
    return x


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def fwd_bytes(B: int, T: int) -> int:
    """Fewest bytes a forward must move: q, k, v, y in bf16; log_decay, dt, lam, omega in fp32."""
    return B * T * (2 * G * N * 2 + 2 * H * P * 2 + 3 * H * 4 + S * 4)


def prefill_rows(shapes: list[tuple[int, int]]) -> list[dict]:
    rows = []
    for B, T in shapes:
        rows.append(prefill_row(B, T))
        torch.cuda.empty_cache()
    return rows


def prefill_row(B: int, T: int) -> dict:
    x = inputs(B, T)
    row: dict = {"batch": B, "seqlen": T}
    # correctness against the fp32 reference on the same inputs
    ref_in = {k: (v.float() if v.dtype == torch.bfloat16 else v) for k, v in x.items()}
    y, _ = mamba3_siso_chunk_fwd(**x, chunk_size=64)
    with torch.no_grad():
        y_ref, _ = mamba3_siso_reference(**ref_in, chunk_size=64)
    row["rel_err_vs_fp32_ref"] = float((y.float() - y_ref).norm() / y_ref.norm())
    row["finite"] = bool(torch.isfinite(y).all())
    del y_ref
    row["triton_fwd_ms"] = bench(lambda: mamba3_siso_chunk_fwd(**x, chunk_size=64))
    with torch.no_grad():
        row["torch_ref_fwd_ms"] = bench(lambda: mamba3_siso_reference(**x, chunk_size=64))
    xg = inputs(B, T, requires_grad=True)
    dy = torch.randn(B, T, H, P, device="cuda", dtype=torch.bfloat16)

    def fb_triton():
        y, _ = mamba3_siso_chunk(**xg, chunk_size=64)
        y.backward(dy)

    def fb_ref():
        y, _ = mamba3_siso_reference(**xg, chunk_size=64)
        y.backward(dy)

    row["triton_fb_ms"] = bench(fb_triton)
    row["torch_ref_fb_ms"] = bench(fb_ref)
    q = torch.randn(B, 16, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = torch.randn_like(q, requires_grad=True), torch.randn_like(q, requires_grad=True)
    with torch.no_grad():
        row["sdpa_fwd_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    row["sdpa_fb_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(torch.ones_like(q)))
    row["official_fwd_ms_baseline_doc"] = OFFICIAL_FWD.get((B, T))
    row["official_fb_ms_baseline_doc"] = OFFICIAL_FB.get((B, T))
    row["fwd_min_bytes_GB"] = fwd_bytes(B, T) / 1e9
    row["triton_fwd_GBps_of_min_bytes"] = fwd_bytes(B, T) / row["triton_fwd_ms"] / 1e6
    row["speedup_fwd_vs_torch_ref"] = row["torch_ref_fwd_ms"] / row["triton_fwd_ms"]
    row["speedup_fwd_vs_sdpa"] = row["sdpa_fwd_ms"] / row["triton_fwd_ms"]
    if row["official_fwd_ms_baseline_doc"]:
        row["speedup_fwd_vs_official_doc"] = row["official_fwd_ms_baseline_doc"] / row["triton_fwd_ms"]
    return row


def decode_rows(batches: list[int]) -> list[dict]:
    return [decode_row(B) for B in batches]


def decode_row(B: int) -> dict:
    x = inputs(B, 1)
    one = {k: (v[:, 0] if k in ("q", "k", "v", "log_decay", "dt", "lam", "omega") else v) for k, v in x.items()}
    one = {k: v.contiguous() for k, v in one.items()}

    def fresh():
        return Mamba3State(torch.rand(B, H, S, device="cuda"), torch.randn(B, H, P, N, device="cuda"),
                           torch.randn(B, 1, H, N, device="cuda", dtype=torch.bfloat16),
                           torch.randn(B, H, P, device="cuda", dtype=torch.bfloat16))

    state = fresh()
    y = torch.empty_like(one["v"])
    row: dict = {"batch": B}
    # correctness of one step against the reference step
    s0 = fresh()
    dtheta = one["dt"][..., None] * one["omega"][:, None, :]
    y_ref, _ = mamba3_step(one["q"][:, None].float(), one["k"][:, None].float(), one["v"].float(), one["log_decay"],
                           one["dt"], one["lam"], Mamba3State(*(t.float() for t in s0)), dtheta,
                           one["q_bias"][:, None], one["k_bias"][:, None], one["D"])
    s1 = Mamba3State(*(t.clone() for t in s0))
    got = mamba3_siso_step_(**{k: one[k] for k in ("q", "k", "v", "log_decay", "dt", "lam")}, state=s1, omega=one["omega"],
                            q_bias=one["q_bias"], k_bias=one["k_bias"], D=one["D"])
    row["rel_err_vs_fp32_ref"] = float((got.float() - y_ref[:, 0]).norm() / y_ref.norm())

    def step():
        mamba3_siso_step_(**{k: one[k] for k in ("q", "k", "v", "log_decay", "dt", "lam")}, state=state,
                          omega=one["omega"], q_bias=one["q_bias"], k_bias=one["k_bias"], D=one["D"], out=y)

    row["triton_step_us"] = 1000 * bench(step)
    graph = torch.cuda.CUDAGraph()
    step()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        for _ in range(10):
            step()
    row["triton_step_graph_us"] = 1000 * bench(graph.replay) / 10
    row["torch_ref_step_us"] = 1000 * bench(lambda: mamba3_step(
        one["q"][:, None], one["k"][:, None], one["v"], one["log_decay"], one["dt"], one["lam"], state, dtheta,
        one["q_bias"][:, None], one["k_bias"][:, None], one["D"]))
    state_bytes = B * H * (P * N * 4 * 2 + S * 4 * 2 + N * 2 * 2 + P * 2 * 2)  # read + write
    row["state_MB"] = B * H * P * N * 4 / 1e6
    row["graph_GBps"] = state_bytes / row["triton_step_graph_us"] / 1e3
    row["official_step_us_baseline_doc"] = OFFICIAL_STEP_US.get(B)
    return row


def kernel_breakdown(B: int, T: int) -> list[dict]:
    """Per-kernel device time of one Triton forward + backward (torch.profiler), to see where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    x = inputs(B, T, requires_grad=True)
    dy = torch.randn(B, T, H, P, device="cuda", dtype=torch.bfloat16)

    def fb():
        y, _ = mamba3_siso_chunk(**x, chunk_size=64)
        y.backward(dy)

    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fb()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:60], "ms_per_call": e.device_time_total / 5 / 1000, "calls": e.count // 5}
            for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r["ms_per_call"])
    print(f"\nkernel breakdown of one forward + backward at {B} x {T}:")
    for r in rows[:16]:
        print(f"  {r['ms_per_call']:8.3f} ms  x{r['calls']:<3d} {r['kernel']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="mamba3_scan.json")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    shapes = [(8, 4096)] if args.quick else [(8, 4096), (2, 16384), (1, 65536)]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "prefill": prefill_rows(shapes), "decode": decode_rows([1, 64, 256]),
              "breakdown": {f"{B}x{T}": kernel_breakdown(B, T) for B, T in shapes}}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\n{report['device']}")
    print("B x T       triton fwd  ref fwd  sdpa fwd  official(doc)  x ref  x sdpa  "
          "|        triton f+b  ref f+b  sdpa f+b  official f+b(doc)  rel err")
    for r in report["prefill"]:
        print(f"{r['batch']} x {r['seqlen']:<6} {r['triton_fwd_ms']:9.3f} {r['torch_ref_fwd_ms']:8.2f} "
              f"{r['sdpa_fwd_ms']:8.2f} "
              f"{r['official_fwd_ms_baseline_doc'] or 0:12.2f} {r['speedup_fwd_vs_torch_ref']:6.1f} {r['speedup_fwd_vs_sdpa']:6.1f}"
              f"  | {r['triton_fb_ms']:17.2f} {r['torch_ref_fb_ms']:8.2f} {r['sdpa_fb_ms']:8.2f} "
              f"{r['official_fb_ms_baseline_doc'] or 0:17.2f}  "
              f"{r['rel_err_vs_fp32_ref']:.1e}")
    print("batch  step us  graph us  ref us  official(doc)  GB/s(graph)  rel err")
    for r in report["decode"]:
        print(f"{r['batch']:5d} {r['triton_step_us']:8.1f} {r['triton_step_graph_us']:9.1f} {r['torch_ref_step_us']:7.1f} "
              f"{r['official_step_us_baseline_doc'] or 0:13.1f} {r['graph_GBps']:11.0f}  {r['rel_err_vs_fp32_ref']:.1e}")


if __name__ == "__main__":
    main()
