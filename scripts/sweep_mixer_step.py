"""Launch configs of the fused mixer decode step, and where a whole step's time goes (GPU only).

    python scripts/sweep_mixer_step.py --out sweep.json

For each case of ``benchmarks/mamba3_mixer_decode.py`` it times, each inside a CUDA graph of 20 launches
(so launch gaps are the graph's, as in a real decode step): the fused kernel alone at every (rows per block,
warps, programs per head) config, the two projections alone, and the whole layer step with the default config.
The picks feed ``triton_mixer_step.launch_config``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from hybrid.kernels.mamba3 import triton_mixer_step
from hybrid.layers.mamba3 import Mamba3, Mamba3Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mamba3_mixer_decode import graphed, median_ms  # noqa: E402  (the benchmark's graph timing)

CASES = [  # (name, d_model, batch, MIMO rank, cache state dtype)
    ("d1024_b1", 1024, 1, 1, "float32"),
    ("d1024_b1_mimo4", 1024, 1, 4, "float32"),
    ("table6_b128_fp32", 2048, 128, 1, "float32"),
    ("table6_b128_bf16", 2048, 128, 1, "model"),
    ("table6_b128_mimo4_fp32", 2048, 128, 4, "float32"),
    ("table6_b128_mimo4_bf16", 2048, 128, 4, "model"),
    ("d1024_b1_mimo4_bf16", 1024, 1, 4, "model"),  # few programs: does the tensor-core path pay there too?
    ("d1024_b16_mimo4_bf16", 1024, 16, 4, "model"),
]
REPEAT = 20


def graph_us(fn) -> float:
    """Median microseconds per call of ``fn``, replayed REPEAT times per CUDA graph."""
    return median_ms(graphed(fn, REPEAT), reps=50) * 1000 / REPEAT


@torch.no_grad()
def case(name: str, d_model: int, batch: int, rank: int, state: str) -> dict:
    layer = Mamba3(d_model, Mamba3Config(d_state=128, headdim=64, expand=2, mimo_rank=rank, state_dtype=state))
    layer = layer.cuda().to(torch.bfloat16).eval()
    cache = layer.allocate_cache(batch, 16)
    x = torch.randn(batch, 1, d_model, device="cuda", dtype=torch.bfloat16)
    proj = layer.in_proj(x)[:, 0].contiguous()
    gated = torch.empty(batch, layer.d_inner, device="cuda", dtype=torch.bfloat16)
    row = {"name": name, "d_model": d_model, "batch": batch, "rank": rank, "state_dtype": str(cache.ssm.dtype),
           "default_config": list(triton_mixer_step.launch_config(batch * layer.H, layer.P, rank))}
    row["in_proj_us"] = graph_us(lambda: layer.in_proj(x))
    row["out_proj_us"] = graph_us(lambda: layer.out_proj(gated))
    if batch == 1:  # other GEMV routes for the batch-1 projections (cuBLAS picks per layout)
        w_in, w_out = layer.in_proj.weight, layer.out_proj.weight
        w_in_t, w_out_t = w_in.t().contiguous(), w_out.t().contiguous()
        row["in_proj_mv_us"] = graph_us(lambda: torch.mv(w_in, x[0, 0]))
        row["in_proj_transposed_us"] = graph_us(lambda: x[0] @ w_in_t)
        row["out_proj_mv_us"] = graph_us(lambda: torch.mv(w_out, gated[0]))
        row["out_proj_transposed_us"] = graph_us(lambda: gated @ w_out_t)
    row["layer_step_us"] = graph_us(lambda: layer(x, cache=cache))
    kernel = {}
    splits = (1, 2, 4, 8) if batch * layer.H < 512 else (1,)  # programs per head: only worth it with few heads
    # MIMO with a 16-bit state: also the tensor-core path (dot16; blocks of 16 rows at least)
    dots = (False, True) if rank > 1 and cache.ssm.dtype != torch.float32 else (False,)
    for split, bp, warps, dot in itertools.product(splits, (8, 16, 32, 64), (1, 2, 4, 8), dots):
        if bp > layer.P // split or dot and bp < 16:
            continue

        def step(bp=bp, warps=warps, split=split, dot=dot):
            return triton_mixer_step.mamba3_mixer_step_(
                proj, cache.state(), d_inner=layer.d_inner, heads=layer.H, groups=layer.G, d_state=layer.N,
                headdim=layer.P, n_angles=layer.S, dt_bias=layer.dt_bias, D=layer.D,
                B_norm_weight=layer.B_norm_weight, C_norm_weight=layer.C_norm_weight, B_bias=layer.B_bias,
                C_bias=layer.C_bias, rope_freq=None, eps=layer.cfg.norm_eps, A_floor=layer.cfg.A_floor,
                a_activation=layer.cfg.a_activation, trapezoid=layer.cfg.trapezoid, rotation=layer.cfg.rotation,
                rank=layer.R, mimo_x=getattr(layer, "mimo_x", None), mimo_z=getattr(layer, "mimo_z", None),
                mimo_o=getattr(layer, "mimo_o", None), pairing=layer.pairing, out=gated, readers=cache.readers,
                block_rows=bp, num_warps=warps, row_split=split, dot16=dot)
        name = f"s{split}_bp{bp}_w{warps}" + ("_dot16" if dot else "")
        try:
            kernel[name] = graph_us(step)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile (registers) is skipped
            kernel[name] = f"{type(exc).__name__}"
    row["kernel_us"] = kernel
    timed = {k: v for k, v in kernel.items() if isinstance(v, float)}
    row["best"] = min(timed, key=timed.get)
    row["best_kernel_us"] = timed[row["best"]]
    plain = {k: v for k, v in timed.items() if not k.endswith("_dot16")}
    if len(plain) < len(timed):  # the best of each path, for the A/B
        row["best_plain"], row["best_dot16"] = min(plain, key=plain.get), min(set(timed) - set(plain), key=timed.get)
    state_bytes = cache.ssm.numel() * cache.ssm.element_size()
    row["state_GBps_at_best"] = 2 * state_bytes / (row["best_kernel_us"] * 1e3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="mixer_step_sweep.json")
    ap.add_argument("--cases", help="comma-separated substrings of the case names to run (default: all)")
    args = ap.parse_args()
    rows = []
    for c in CASES:
        if args.cases and not any(part in c[0] for part in args.cases.split(",")):
            continue
        row = case(*c)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kernel_us"}), flush=True)
        print("  ", " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row["kernel_us"].items()),
              flush=True)
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
