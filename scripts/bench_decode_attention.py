"""Single-query decode attention on the GPU: the eager path, the split-key Triton kernel, and a sweep of the
kernel's launch settings (diagnostics; the model-level figures come from hybrid-bench / profile_decode.py).

    python scripts/bench_decode_attention.py [--prev .prev/decode_attention_v1.py]
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools

import torch
import triton
from hybrid.kernels import decode_attention_triton as dat
from hybrid.kernels.attention import attention_decode_torch

SHAPES = ((1, 102400), (1, 1024), (16, 102400))  # (batch, cached keys); 4 heads of 192 as the 125M preset


def settings(mod, cfg):
    mod.BLOCK_S, mod.NUM_WARPS, mod.NUM_STAGES, mod.TARGET_PROGRAMS = cfg


def time_shape(B: int, S: int, prev, default: tuple, grid: list) -> list:
    """Print the eager path, the earlier kernel and this one at (B, S); return ``grid``'s settings by time."""
    q = torch.randn(B, 4, 1, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, 4, S + 40, 192, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    valid = torch.arange(S + 40, device="cuda") < S
    gb = 2 * k.numel() * 2 / 1e9

    def us(fn) -> float:
        return triton.testing.do_bench(lambda: fn(q, k, v, valid), warmup=10, rep=60) * 1e3

    line = [f"B={B} S={S} ({gb * 1e3:.0f} MB):", f"torch {us(attention_decode_torch):.1f} us"]
    if prev is not None:
        line.append(f"prev {us(prev.attention_decode_triton):.1f} us")
    settings(dat, default)
    t = us(dat.attention_decode_triton)
    line.append(f"split {t:.1f} us ({gb / t * 1e3:.2f} TB/s)")
    print("  ".join(line), flush=True)
    rows = []
    for cfg in grid:
        settings(dat, cfg)
        try:
            rows.append((us(dat.attention_decode_triton), cfg))
        except Exception as exc:  # noqa: BLE001 - a setting that does not compile is skipped
            print("   fails:", cfg, type(exc).__name__, flush=True)
    rows.sort()
    for t, cfg in rows[:5]:
        print(f"   BLOCK_S, warps, stages, programs = {cfg}: {t:.1f} us ({gb / t * 1e3:.2f} TB/s)", flush=True)
    settings(dat, default)
    return [cfg for _, cfg in rows]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prev", help="an earlier version of the kernel module, timed beside this one")
    args = ap.parse_args()
    prev = None
    if args.prev:
        spec = importlib.util.spec_from_file_location("prev_kernel", args.prev)
        prev = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(prev)
    default = (dat.BLOCK_S, dat.NUM_WARPS, dat.NUM_STAGES, dat.TARGET_PROGRAMS)
    grid = list(itertools.product((16, 32, 64), (1, 2, 4), (1, 2), (512, 1024, 2048)))
    for B, S in SHAPES:  # the full sweep at the first shape; later shapes time its best five
        grid = time_shape(B, S, prev, default, grid)[:5]
    q = torch.randn(1, 4, 1, 192, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 4, 1000, 192, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(dat.attention_decode_triton)
    try:
        compiled(q, k, k, torch.ones(1000, device="cuda", dtype=torch.bool))
        print("inside torch.compile: ok", flush=True)
    except Exception as exc:  # noqa: BLE001 - print the end of the message, which names the failure
        print("inside torch.compile: FAILS:", str(exc)[-3000:], flush=True)


if __name__ == "__main__":
    main()
