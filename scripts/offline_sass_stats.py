"""Compile the Mamba-3 SISO chunk kernels for an H100 (sm_90) without a GPU and print what ptxas made of them:
registers, stack bytes, SASS instructions and spill instructions (LDL / STL, static counts; for a kernel without
loops that is what each program executes). A cheap filter before spending device time on register-shaping
rewrites (docs/perf-notes.md, ninth session): the compiler's schedule, not the source, decides what is live.

    python scripts/offline_sass_stats.py [--warps 4] [--mma-sync dx,dk] [--set HPP=4 ...]

Runs on the CPU build of torch with the pip ``triton`` (it bundles ptxas and cuobjdump). For the device's version
(3.6, which allocates registers differently from 3.9 on these kernels), install that wheel apart and put it first:

    pip download triton==3.6.0 --no-deps -d /tmp/t36w && pip install --no-deps --target /tmp/t36 /tmp/t36w/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/t36 python scripts/offline_sass_stats.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile

import triton
from hybrid.kernels.mamba3 import triton_siso, triton_siso_bwd
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# Pointer arguments stored in 16 bits at the benchmark's shapes (bf16 activations and chunk states).
BF16 = {"Q", "K", "X", "DY", "DQH", "DKH", "DX", "G_IN", "DG_IN", "DLOCAL", "LOCAL", "Y"}
INTS = {"T", "H", "S"}
KERNELS = {"fwd": (triton_siso, "_chunk_scan_fwd"), "state": (triton_siso, "_chunk_state_fwd"),
           "dq": (triton_siso_bwd, "_chunk_scan_bwd_dq"), "dx": (triton_siso_bwd, "_chunk_scan_bwd_dx"),
           "dk": (triton_siso_bwd, "_chunk_scan_bwd_dk")}
# The flags of the benchmark's shape (d_state 128, headdim 64, chunk 64, 32 of 64 pairs rotated).
FLAGS = dict(C=64, N2=64, NB=32, P=64, ROT_BLOCKS=1, ANGLE_DT=True, HAS_SEQ=False, HEADS_FIRST=False, HAS_QB=True,
             HAS_KB=True, HAS_D=True)


def signature(fn, flags: dict) -> tuple[dict, dict]:
    """Argument types by the kernels' naming convention: capitals are pointers (T, H, S are sizes), the rest ints."""
    sig, constexprs = {}, {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", flags[p.name]
        elif p.name[0].isupper() and p.name not in INTS:
            sig[p.name] = "*bf16" if p.name in BF16 else ("*i64" if p.name == "SEQ" else "*fp32")
        else:
            sig[p.name] = "i32"
    return sig, constexprs


def sass_stats(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    instr = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, flags=re.M))
    return (f"regs {regs.group(1) if regs else '?'} stack {stack.group(1) if stack else '?'} instr {instr} "
            f"LDL {sass.count('LDL')} STL {sass.count('STL')}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--kernels", default="fwd,state,dq,dx,dk")
    ap.add_argument("--mma-sync", default="dx,dk", help="kernels compiled without wgmma, as the tuned ones are")
    ap.add_argument("--set", nargs="*", default=[], help="extra constexpr flags, NAME=INT")
    args = ap.parse_args()
    flags = dict(FLAGS, **{k: int(v) for k, v in (kv.split("=") for kv in args.set)})
    for name in args.kernels.split(","):
        module, kernel = KERNELS[name]
        fn = getattr(module, kernel)
        # A constexpr this table does not know (a flag added on a branch) compiles as 1; --set overrides it.
        sig, constexprs = signature(fn, {**{p.name: 1 for p in fn.params if p.is_constexpr}, **flags})
        with triton_siso.mma_sync_compile() if name in args.mma_sync.split(",") else contextlib.nullcontext():
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": args.warps, "num_stages": args.stages})
        print(f"{name:6s} {sass_stats(compiled.asm['cubin'])}", flush=True)


if __name__ == "__main__":
    main()
