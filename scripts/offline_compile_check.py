"""Compile the small Mamba-3 kernels for an H100 (sm_90) without a GPU: what the CPU interpreter cannot check.

    python scripts/offline_compile_check.py [--stats]

The interpreter that runs the CPU tests accepts code the compiler rejects (a jitted function reading a plain Python
global did, in the thirteenth session: the GPU call then failed at its first launch). This compiles each kernel at
the argument types and flags the layer launches it with, for every flag combination; ``--stats`` adds registers,
stack and spill instructions per kernel (the heavy chunk kernels have their own ``offline_sass_stats.py``). Runs with
the pip ``triton`` on the CPU build of torch (it bundles ptxas); must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import itertools
import os

import triton
from hybrid.kernels.mamba3 import triton_angles, triton_gate, triton_ssm_inputs
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

F32, BF16, F64 = "*fp32", "*bf16", "*fp64"


def compile_sm90(fn, types: dict[str, str], constexprs: dict, warps: int = 4):
    """``fn`` compiled for sm_90; arguments not in ``types`` are int32 sizes / strides."""
    sig = {p.name: "constexpr" if p.is_constexpr else types.get(p.name, "i32") for p in fn.params}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps})


def cases():
    """(name, kernel, argument types, constexpr flags), as the launchers pass them."""
    ta, tg, ts = triton_angles, triton_gate, triton_ssm_inputs
    for angle_dt in (True, False):
        yield f"angle_totals dt={angle_dt}", ta._angle_chunk_totals, {"DT": F32, "OM": F32, "INC": F64}, \
            dict(C=64, BH=32, BS=32, TB=4, ANGLE_DT=angle_dt)
    for has_start in (True, False):
        yield f"angle_prefix start={has_start}", ta._angle_prefix, \
            {"INC": F64, "START": F32 if has_start else F64, "OFF": F32, "FINAL": F64}, dict(CB=64, BLK=32, HAS_START=has_start)
    yield "gate_fwd", tg._gate_fwd, {"Y": BF16, "Z": BF16, "OUT": BF16}, dict(BLOCK=tg.GATE_BLOCK)
    yield "gate_bwd", tg._gate_bwd, {"DOUT": BF16, "Y": BF16, "Z": BF16, "DY": BF16, "DZ": BF16}, dict(BLOCK=tg.GATE_BLOCK)
    inputs = {k: BF16 for k in ("BM", "CM", "UDT", "UA", "ULAM", "UTH")} | {"DTB": F32, "BW": F32, "CW": F32,
                                                                           "eps": "fp32", "A_floor": "fp32"}
    fwd = inputs | {"BN_OUT": BF16, "CN_OUT": BF16, "DT": F32, "LD": F32, "LAM": F32, "OM": F32}
    bwd = inputs | {"DBN": BF16, "DCN": BF16, "DDT": F32, "DLD": F32, "DLAM": F32, "DOM": F32, "DBM": BF16, "DCM": BF16,
                    "DUDT": BF16, "DUA": BF16, "DULAM": BF16, "DUTH": BF16, "PART": F32}
    for heavy, trapezoid, rot in itertools.product((True, False), (0, 1, 2), (True, False)):
        flags = dict(N=128, BN=128, BH=32, BS=32, BT=ts.ROWS_PER_PROGRAM, HEAVY_TAIL=heavy, TRAPEZOID=trapezoid, ROT=rot)
        tag = f"heavy={heavy} trapezoid={trapezoid} rot={rot}"
        yield f"ssm_inputs_fwd {tag}", ts._ssm_inputs_fwd, fwd, flags
        yield f"ssm_inputs_bwd {tag}", ts._ssm_inputs_bwd, bwd, flags


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stats", action="store_true")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run without TRITON_INTERPRET=1: under the interpreter the kernels are not compilable objects")
    for name, fn, types, flags in cases():
        compiled = compile_sm90(fn, types, flags)
        if args.stats:
            from offline_sass_stats import sass_stats  # scripts/ is on the path when this runs as a script

        print(f"{name:48s} ok" + (f"  {sass_stats(compiled.asm['cubin'])}" if args.stats else ""), flush=True)


if __name__ == "__main__":
    main()
