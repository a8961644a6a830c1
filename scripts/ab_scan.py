"""Quick A/B of the Triton Mamba-3 SISO scan (a diagnostic for kernel changes, not the benchmark of record).

    python scripts/ab_scan.py --tag NAME [--shapes 8x4096,1x65536] [--chunk 64] [--proxy prerotated] [--out F.json]

For each shape: forward and forward+backward wall time (medians of do_bench), the CPU time to issue one forward
(host-bound when it reaches the GPU time), and the self CUDA time of every kernel of one profiled f+b. Run it
once per variant in the same call (same machine), and compare the lines.

``--proxy prerotated`` times a stand-in for inputs rotated and biased ahead of the scan
(docs/notes/issue4-scan-next.md): each call first copies the group-shared q and k out per head, (B, T, G, N) ->
(B, T, H, N), as a pass writing rotated inputs would, and its backward sums their gradients over heads, as the pass
undoing the rotation would; the kernels get no rotation and no biases. It computes another function, with the
same kernel work less the rotation and the biases and with per-head q / k traffic; it leaves out the rotation math
in those two passes and the angle gradients, so it bounds what the layout could gain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

sys.path.insert(0, "benchmarks")
from hybrid.kernels.mamba3.siso import mamba3_siso_chunk  # noqa: E402
from mamba3_scan import bench, inputs  # noqa: E402


def kernel_times(fb) -> dict[str, float]:
    """Self CUDA ms per kernel name over one f+b."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fb()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0:
            times[ev.key[:60]] = round(ev.self_device_time_total / 1e3, 4)
    return dict(sorted(times.items(), key=lambda kv: -kv[1]))


def prerotated_proxy(x: dict):
    """A per-call function giving the scan's inputs as if rotated and biased ahead of it: q, k copied out per head
    (their gradients summed back over heads by autograd), no angles, no biases."""
    H = x["v"].shape[2]

    def call_inputs() -> dict:
        per_head = {key: x[key].expand(*x[key].shape[:2], H, x[key].shape[-1]).contiguous() for key in ("q", "k")}
        return {**x, **per_head, "omega": None, "q_bias": None, "k_bias": None}
    return call_inputs


def measure(B: int, T: int, chunk: int, proxy: str | None = None) -> dict:
    x = inputs(B, T, requires_grad=True)
    call_inputs = prerotated_proxy(x) if proxy == "prerotated" else (lambda: x)
    dy = torch.randn_like(x["v"])

    def fwd():
        return mamba3_siso_chunk(**call_inputs(), chunk_size=chunk)[0]

    def fb():
        fwd().backward(dy)

    fb()
    leaves = [t for t in x.values() if torch.is_tensor(t) and t.requires_grad]
    # fb_ms keeps the benchmark of record's method (leaf gradients accumulate across repeats, as in
    # benchmarks/mamba3_scan.py); fb_fresh_ms clears them before each repeat, so no accumulation kernel runs.
    # Their difference is what the accumulation costs, which a model (whose q / k / v are not leaves) never pays.
    fresh = do_bench(fb, warmup=25, rep=200, grad_to_none=leaves, return_mode="median")
    return {"fwd_ms": round(bench(fwd), 4), "fb_ms": round(bench(fb), 4), "fb_fresh_ms": round(fresh, 4),
            "host_fwd_ms": round(host_ms(fwd), 4), "kernels_ms": kernel_times(fb)}


def chosen_configs() -> dict[str, str]:
    """The launch config the autotuner last chose for each SISO chunk kernel (read right after a shape ran)."""
    from hybrid.kernels.mamba3 import triton_siso, triton_siso_bwd

    out = {}
    for module in (triton_siso, triton_siso_bwd):
        for name in dir(module):
            best = getattr(getattr(module, name), "best_config", None)
            if best is not None:
                out[name.removesuffix("_tuned")] = f"w{best.num_warps} s{best.num_stages} r{best.maxnreg}"
    return out


def host_ms(fn, n: int = 50) -> float:
    """CPU time to issue one call (n calls queued without a sync, after a sync). At or above the GPU time, the
    call is host-bound: its wall time then says more about the CPU than about the kernels."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return issued / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", required=True)
    ap.add_argument("--shapes", default="8x4096,2x16384,1x65536")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--proxy", choices=["prerotated"], help="time a stand-in for another input layout (see above)")
    ap.add_argument("--out")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        B, T = (int(v) for v in shape.split("x"))
        row = measure(B, T, args.chunk, args.proxy)
        rows.append({"tag": args.tag, "shape": shape, **row, "chosen_configs": chosen_configs()})
        top = ", ".join(f"{k.split('(')[0]} {v}" for k, v in list(row["kernels_ms"].items())[:7])
        print(f"[{args.tag}] {shape}: fwd {row['fwd_ms']:.3f} ms (host {row['host_fwd_ms']:.3f}), f+b {row['fb_ms']:.3f} ms"
              f" (fresh grads {row['fb_fresh_ms']:.3f})"
              f" | {top}", flush=True)
        print(f"[{args.tag}] {shape} configs: " + "; ".join(f"{k} {v}" for k, v in rows[-1]["chosen_configs"].items()),
              flush=True)
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
