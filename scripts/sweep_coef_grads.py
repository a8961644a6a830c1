"""Time the backward's coefficient-glue kernel (``_coef_grads``) alone at the benchmark's shapes over token blocks
and warps, to choose ``COEF_BLOCK`` / ``COEF_WARPS`` (GPU only; docs/perf-notes.md, twelfth session).

    python scripts/sweep_coef_grads.py
"""

from __future__ import annotations

import functools

import torch
import triton
from hybrid.kernels.mamba3 import triton_siso_bwd as bwd
from triton.testing import do_bench

H, S, C = 32, 32, 64  # benchmarks/mamba3_scan.py


def launch(t: dict[str, torch.Tensor], bt: int, warps: int) -> None:
    B, T = t["dt"].shape[:2]
    rows = B * T
    bwd._coef_grads[(triton.cdiv(rows, bt),)](
        t["dscale"], t["dgamma"], t["dt"], t["lam"], t["dt"], t["dinc"], t["later"], t["om"], t["d_dt"], t["d_lam"],
        t["d_om"], rows, T, H, S, C, T // C, t["om"].stride(0), t["om"].stride(1), BT=bt, BH=H, BS=S, HAS_SEQ=False,
        HAS_ROT=True, ANGLE_DT=True, LATER_ROWS=1, num_warps=warps)


def sweep(B: int, T: int) -> None:
    dev = "cuda"
    t = {name: torch.randn(B, T, H, device=dev) for name in ("dscale", "dgamma", "dt", "lam", "d_dt", "d_lam")}
    t.update(dinc=torch.randn(B, T, H, S, device=dev, dtype=torch.bfloat16), om=torch.randn(B, T, S, device=dev),
             d_om=torch.empty(B, T, S, device=dev), later=torch.randn(B, T // C, H, S, device=dev))
    useful = t["dinc"].numel() * 2 + t["dt"].numel() * 4 * 7 + t["om"].numel() * 8  # bytes every config must move
    for bt in (8, 16, 32):
        for warps in (2, 4, 8):
            ms = do_bench(functools.partial(launch, t, bt, warps), warmup=10, rep=50, return_mode="median")
            print(f"{B}x{T} BT {bt} warps {warps}: {ms * 1e3:.1f} us ({useful / ms / 1e6:.0f} GB/s)", flush=True)
    default = functools.partial(bwd.coef_grads, t["dscale"], t["dgamma"], t["dt"], t["lam"], None, t["dinc"], t["later"],
                                t["om"], True, C)
    ms = do_bench(default, return_mode="median")
    print(f"{B}x{T} default (COEF_BLOCK {bwd.COEF_BLOCK}, {bwd.COEF_WARPS} warps): {ms * 1e3:.1f} us", flush=True)


if __name__ == "__main__":
    sweep(8, 4096)
    sweep(1, 65536)
