"""Diagnostics for the Gluon key-side kernel (not a test): runs it beside the Triton kernel on the same buffers inside
real backward passes and prints, per output, the relative difference and where it sits (rows of the chunk, column
blocks), plus a check of Gluon's row scan in the layout the kernel uses.

    python scripts/debug_gluon_bwd.py [--shapes 2x1000x8,8x4096x32] [--modes store,atomic] [--nb 16,32] [--rot 1,0]
    python scripts/debug_gluon_bwd.py --scan                      # Gluon's row scan against torch.cumsum
    python scripts/debug_gluon_bwd.py --sanitize 32:atomic:2x1000x8  # compute-sanitizer over one backward

What the first build showed (eighteenth session): it faulted or gave non-finite values in this script's comparison
(not on every run) yet ran clean under compute-sanitizer; the row scan checked exact. Feeding the a1t product's
MMA from shared memory instead of registers made every comparison exact.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, "tests")


def check_scan(nb: int) -> None:
    from hybrid.kernels.mamba3 import gluon_siso_bwd as m
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    @gluon.jit
    def scan_kernel(X, Y, C: gl.constexpr, NB: gl.constexpr, num_warps: gl.constexpr):
        SC: gl.constexpr = m._scan_layout(NB, num_warps)
        r = gl.arange(0, C, layout=gl.SliceLayout(1, SC))
        cc = gl.arange(0, NB, layout=gl.SliceLayout(0, SC))
        x = gl.load(X + r[:, None] * NB + cc[None, :])
        gl.store(Y + r[:, None] * NB + cc[None, :], gl.associative_scan(x, 0, m._add))

    x = torch.randn(64, nb, device="cuda")
    y = torch.empty_like(x)
    scan_kernel[(1,)](x, y, C=64, NB=nb, num_warps=4)
    err = (y - x.cumsum(0)).abs().max().item()
    print(f"scan NB={nb}: max abs error {err:.2e}", "OK" if err < 1e-4 else "WRONG", flush=True)


def compare_in_backward(B: int, T: int, H: int, mode: str, nb: int, rot: bool) -> None:
    from hybrid.kernels.mamba3 import gluon_common
    from hybrid.kernels.mamba3 import gluon_siso_bwd as m
    from hybrid.kernels.mamba3.siso import mamba3_siso_chunk
    from hybrid.kernels.mamba3.triton_siso_bwd import _chunk_scan_bwd_dk_tuned
    from test_mamba3_triton import make

    os.environ["HYBRID_SCAN_DK"] = "gluon"
    os.environ["HYBRID_SCAN_GROUP_SUM"] = mode
    gluon_common.COL_BLOCK = nb
    orig = m.chunk_scan_bwd_dk
    outs = {"DSCALE": 14, "DTHETA": 15, "DKH": 16, "DKB_PART": 17, "DA": 18, "DTHETA_TOT": 19}

    def both(grid, *args, flags, n_angles, HAS_QB, HAS_KB, GROUP_SUM):
        saved = {n: args[i].clone() for n, i in outs.items()}
        orig(grid, *args, flags=flags, n_angles=n_angles, HAS_QB=HAS_QB, HAS_KB=HAS_KB, GROUP_SUM=GROUP_SUM)
        torch.cuda.synchronize()
        got = {n: args[i].clone() for n, i in outs.items()}
        for n, i in outs.items():
            args[i].copy_(saved[n])
        targs = [*args[:10], args[4], *args[10:20], *args[20:38], 0]  # SEQ (unread) and its stride
        _chunk_scan_bwd_dk_tuned[grid](*targs, HAS_QB=HAS_QB, HAS_KB=HAS_KB, GROUP_SUM=GROUP_SUM, **flags)
        torch.cuda.synchronize()
        for n, i in outs.items():
            want, g = args[i].float(), got[n].float()
            rel = ((g - want).norm() / want.norm().clamp(min=1e-30)).item()
            line = f"  {n:10s} rel {rel:.2e} nan {int(torch.isnan(g).sum())}"
            if n == "DKH" and rel > 1e-3:
                d = (g - want).abs()
                Tn = d.shape[1]
                C = flags["C"]
                pad = (-Tn) % C
                rows = torch.nn.functional.pad(d, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, C)).amax(dim=(0, 1, 3, 4))
                cols = d.amax(dim=(0, 1, 2)).view(2, -1, 16).amax(-1)
                line += f"\n    max |diff| by row of chunk: {[round(v, 2) for v in rows.tolist()]}"
                line += f"\n    by 16-pair block [even; odd]: {[[round(v, 2) for v in r] for r in cols.tolist()]}"
                line += f"\n    max |want| {want.abs().max().item():.2f}"
            print(line, flush=True)

    m.chunk_scan_bwd_dk = both
    try:
        inp, st = make(B=B, T=T, G=1, H=H, N=128, P=64, S=32, rot=rot, dtype=torch.float32, device="cuda")
        leaves = {k: (v.to(torch.bfloat16) if k in ("q", "k", "v") else v).detach().clone().requires_grad_(True)
                  for k, v in inp.items() if v is not None}
        print(f"B={B} T={T} H={H} mode={mode} NB={nb} rot={rot}", flush=True)
        y, _ = mamba3_siso_chunk(**leaves, initial_state=st, chunk_size=64)
        y.float().sum().backward()
        torch.cuda.synchronize()
    finally:
        m.chunk_scan_bwd_dk = orig


TINY = """
import torch, sys
sys.path.insert(0, "tests")
from test_mamba3_triton import make
from hybrid.kernels.mamba3.siso import mamba3_siso_chunk
inp, st = make(B=BB, T=TT, G=1, H=HH, N=128, P=64, S=32, rot=ROT, dtype=torch.float32, device="cuda")
leaves = {k: (v.to(torch.bfloat16) if k in ("q", "k", "v") else v).detach().clone().requires_grad_(True)
          for k, v in inp.items() if v is not None}
y, _ = mamba3_siso_chunk(**leaves, initial_state=st, chunk_size=64)
y.float().sum().backward()
torch.cuda.synchronize()
print("ok")
"""


def tiny(rot: str, shape: str = "1x128x4") -> str:
    B, T, H = shape.split("x")
    return TINY.replace("ROT", rot).replace("BB", B).replace("TT", T).replace("HH", H)


def sanitize(cases: str) -> None:
    """compute-sanitizer over one backward per case NB:mode:shape (e.g. 16:store:1x128x4)."""
    import subprocess

    for case in cases.split(","):
        nb, mode, shape = case.split(":")
        env = dict(os.environ, HYBRID_SCAN_DK="gluon", HYBRID_SCAN_GROUP_SUM=mode, HYBRID_SCAN_GLUON_NB=nb,
                   HYBRID_TRITON_TUNE="fixed")
        r = subprocess.run(["/usr/local/cuda/bin/compute-sanitizer", "--print-limit", "3", sys.executable, "-c",
                            tiny("True", shape)], env=env, capture_output=True, text=True)
        lines = [x for x in (r.stdout + r.stderr).splitlines() if "warn" not in x.lower()]
        print(f"== {case}: rc {r.returncode}", flush=True)
        print("\n".join(lines[:40]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="2x1000x8,1x128x4")
    ap.add_argument("--modes", default="store,atomic")
    ap.add_argument("--nb", default="16,32")
    ap.add_argument("--rot", default="1,0")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--sanitize", default="")
    args = ap.parse_args()
    if args.sanitize:
        sanitize(args.sanitize)
        return
    if args.scan:
        for nb in (16, 32):
            check_scan(nb)
        return
    for shape in args.shapes.split(","):
        B, T, H = (int(v) for v in shape.split("x"))
        for mode in args.modes.split(","):
            for nb in args.nb.split(","):
                for rot in args.rot.split(","):
                    compare_in_backward(B, T, H, mode, int(nb), rot == "1")


if __name__ == "__main__":
    main()
