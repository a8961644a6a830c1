"""Compile the Gluon chunk kernels of the Mamba-3 SISO scan for an H100 (sm_90) without a GPU and print registers,
shared memory, SASS instructions and spill instructions (the Gluon counterpart of ``offline_sass_stats.py``; see its
notes). Needs the device's Triton (3.6) first on the path:

    PYTHONPATH=/tmp/t36 python scripts/offline_gluon_stats.py [--kernels fwd_state,fwd_scan,dq,dx,dk] [--nb 32]
        [--maxnreg 168] [--set COALESCE=0 ...] [--store]

Arguments are typed as the benchmark's launch gives them (bf16 activations and states, 32 heads of 64, d_state 128,
32 of 64 pairs rotated, chunk 64), integers divisible by 16 and aligned pointers specialised as Triton does.
``--store`` compiles dq / dk with per-head bf16 stores (deterministic mode) instead of fp32 group-sum atomics.
"""

from __future__ import annotations

import argparse

import triton
from hybrid.kernels.mamba3 import gluon_common
from hybrid.kernels.mamba3.gluon_common import launch_flags
from hybrid.kernels.mamba3.triton_siso import kernel_flags
from offline_sass_stats import sass_stats
from triton.backends.compiler import GPUTarget
from triton.experimental.gluon._runtime import GluonASTSource

BF16 = {"Q", "K", "X", "Y", "DY", "G_IN", "DG_IN", "LOCAL", "DLOCAL", "DX", "DTHETA"}
DIV16 = {"T", "H", "nc", "s_kb", "s_kt", "s_xb8", "s_xt8", "s_yb", "s_yt", "s_xh", "s_ab", "s_at", "s_ob", "s_ot",
         "s_db8", "s_dt8"}
CONST = {"s_ah": 1, "s_kg": 128}  # head stride 1 of (B, T, H) coefficients; one group of 128 channels


def kernels():
    from hybrid.kernels.mamba3 import gluon_siso, gluon_siso_bwd

    return {"fwd_state": gluon_siso._chunk_state_fwd_gluon, "fwd_scan": gluon_siso._chunk_scan_fwd_gluon,
            "dq": gluon_siso_bwd._chunk_scan_bwd_dq_gluon, "dx": gluon_siso_bwd._chunk_scan_bwd_dx_gluon,
            "dk": gluon_siso_bwd._chunk_scan_bwd_dk_gluon}


def compile_one(fn, flags: dict, store: bool, maxnreg: int):
    bf16 = BF16 | ({"DQH", "DKH"} if store else set())
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name in flags:
            sig[p.name], constexprs[p.name] = "constexpr", flags[p.name]
        elif p.name in CONST:
            sig[p.name], constexprs[p.name] = "constexpr", CONST[p.name]
        elif p.name[0].isupper() and p.name not in ("T", "H", "S"):
            sig[p.name] = "*bf16" if p.name in bf16 else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "i32"
            if p.name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": 4, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=options)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="fwd_state,fwd_scan,dq,dx,dk")
    ap.add_argument("--nb", type=int, default=32)
    ap.add_argument("--maxnreg", type=int, default=0)
    ap.add_argument("--set", nargs="*", default=[], help="constexpr overrides, NAME=int")
    ap.add_argument("--store", action="store_true")
    args = ap.parse_args()
    gluon_common.COL_BLOCK = args.nb
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.set)}
    table = kernels()
    for name in args.kernels.split(","):
        fn = table[name]
        names = {p.name for p in fn.params}
        flags = dict(launch_flags(kernel_flags(64, 128, 64, 32, True), 32), HAS_QB=True, HAS_KB=True, HAS_D=True,
                     GROUP_SUM=not args.store)
        flags = {k: v for k, v in {**flags, **overrides}.items() if k in names}
        compiled = compile_one(fn, flags, args.store, args.maxnreg)
        print(f"{name:9s} {sass_stats(compiled.asm['cubin'])} smem {compiled.metadata.shared}", flush=True)


if __name__ == "__main__":
    main()
