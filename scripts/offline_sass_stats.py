"""Compile the Mamba-3 SISO chunk kernels for an H100 (sm_90) without a GPU and print what ptxas made of them:
registers, stack bytes, SASS instructions and spill instructions (LDL / STL, static counts; for a kernel without
loops that is what each program executes). A cheap filter before spending device time on register-shaping
rewrites (docs/perf-notes.md, ninth session): the compiler's schedule, not the source, decides what is live.

    python scripts/offline_sass_stats.py [--warps 4] [--mma-sync dx,dk] [--set HPP=4 ...]

Runs on the CPU build of torch with the pip ``triton`` (it bundles ptxas and cuobjdump). For the device's version
(3.6, which allocates registers differently from 3.9 on these kernels), install that wheel apart and put it first:

    pip download triton==3.6.0 --no-deps -d /tmp/t36w && pip install --no-deps --target /tmp/t36 /tmp/t36w/triton-3.6.0-*.whl
    PYTHONPATH=/tmp/t36 python scripts/offline_sass_stats.py

By default each kernel is compiled with the argument types and the specialisation the GPU launcher would give it
(``--capture``): one forward and backward of the benchmark's inputs (B x 128 tokens, 32 heads) runs under Triton's
interpreter with every chunk kernel's launch recorded, and integer arguments equal to 1 or divisible by 16, and
16-byte aligned pointers, are specialised as Triton does (without it, no load is vectorised and address arithmetic
is overcounted). ``--lines`` prints the instructions per source line (nvdisasm's line table).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
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


TUNED = {"fwd": (triton_siso, "_chunk_scan_fwd_tuned"), "state": (triton_siso, "_chunk_state_fwd_tuned"),
         "dq": (triton_siso_bwd, "_chunk_scan_bwd_dq_tuned"), "dx": (triton_siso_bwd, "_chunk_scan_bwd_dx_tuned"),
         "dk": (triton_siso_bwd, "_chunk_scan_bwd_dk_tuned")}


def capture_launches(T: int = 128) -> dict:
    """{kernel name: {argument: description}} of one forward + backward at the benchmark's head shape, run in a
    child process under Triton's interpreter (it must be set before the kernels are defined)."""
    import json
    import sys

    # The interpreter of the installed Triton runs the kernels (a wheel put first on PYTHONPATH only compiles).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, __file__, "--record", str(T)], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"recording the launches failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.splitlines()[-1])


def record_launches(T: int) -> None:
    """(Child process, TRITON_INTERPRET=1.) Print, as one JSON line, each chunk kernel's arguments described by
    what Triton's launcher specialises on: tensor dtype and 16-byte alignment, integer values."""
    import json

    import torch
    from hybrid.kernels.mamba3.siso import mamba3_siso_chunk

    H, P, N, S, G, B = 32, 64, 128, 32, 1, 1
    seen = {}

    def describe(v):
        if isinstance(v, torch.Tensor):
            return ["tensor", str(v.dtype).removeprefix("torch."), v.data_ptr() % 16 == 0]
        if isinstance(v, bool) or v is None:
            return ["const", v]
        if isinstance(v, int):
            return ["int", v]
        if isinstance(v, float):
            return ["float", v]
        return ["const", getattr(v, "value", str(v))]

    for name, (module, attr) in TUNED.items():
        kernel = getattr(module, attr)

        class Recorder:
            def __init__(self, name=name, kernel=kernel):
                self.name, self.kernel = name, kernel

            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    named = dict(zip(self.kernel.arg_names, args)) | kwargs
                    seen[self.name] = {k: describe(v) for k, v in named.items()}
                    return self.kernel[grid](*args, **kwargs)
                return launch
        setattr(module, attr, Recorder())
    torch.manual_seed(0)
    dt = 0.001 + 0.1 * torch.rand(B, T, H)
    x = dict(q=torch.randn(B, T, G, N, dtype=torch.bfloat16), k=torch.randn(B, T, G, N, dtype=torch.bfloat16),
             v=torch.randn(B, T, H, P, dtype=torch.bfloat16), log_decay=-dt * (0.5 + torch.rand(B, T, H)), dt=dt,
             lam=torch.rand(B, T, H), omega=math.pi * torch.tanh(torch.randn(B, T, S)), q_bias=torch.ones(H, N),
             k_bias=torch.ones(H, N), D=torch.ones(H))
    for key in ("q", "k", "v", "log_decay", "dt", "lam", "omega"):
        x[key].requires_grad_(True)
    y, _ = mamba3_siso_chunk(**x, chunk_size=64)
    y.float().sum().backward()
    print(json.dumps(seen))


def specialised(fn, described: dict) -> tuple[dict, dict, dict]:
    """Signature, constexprs and divisibility attributes as Triton's launcher derives them from the values."""
    types = {"bfloat16": "*bf16", "float16": "*fp16", "float32": "*fp32", "int64": "*i64", "int32": "*i32",
             "uint8": "*u8", "bool": "*i1"}
    sig, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in described and p.is_constexpr:  # a flag with a default, not passed at the launch: its default
            described = {**described, p.name: ["const", p.default]}  # (--set overrides it like any constexpr)
        kind, *rest = described[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", rest[0]
        elif kind == "tensor":
            sig[p.name] = types[rest[0]]
            if rest[1]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "int" and rest[0] == 1:  # Triton makes an integer 1 a constant
            sig[p.name], constexprs[p.name] = "constexpr", 1
        elif kind == "int":
            sig[p.name] = "i32" if -2**31 <= rest[0] < 2**31 else "i64"
            if rest[0] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif kind == "float":
            sig[p.name] = "fp32"
        else:
            sig[p.name], constexprs[p.name] = "constexpr", rest[0]
    return sig, constexprs, attrs


def line_table(cubin: bytes, rows: int = 30) -> str:
    """Instructions (and spill instructions) per source line, the largest first."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([tool, "-c", "-g", path], capture_output=True, text=True).stdout
    where, counts, spills, ops = None, collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    for line in text.splitlines():
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            where = (m.group(1), int(m.group(2)))
            continue
        m = re.match(r"\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if m and where:
            counts[where] += 1
            ops[where][m.group(1)] += 1
            spills[where] += m.group(1) in ("LDL", "STL")
    out = []
    for (path, ln), n in counts.most_common(rows):
        code = ""
        if os.path.exists(path):
            code = open(path).read().splitlines()[ln - 1].strip()[:80]
        top = " ".join(f"{k}:{v}" for k, v in ops[(path, ln)].most_common(3))
        out.append(f"  {n:5d} spill {spills[(path, ln)]:3d}  {os.path.basename(path)}:{ln:<5d} {top:32s} {code}")
    return "\n".join(out)


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
    loads = collections.Counter(re.findall(r"LDG\.E(\.\d+)?", sass))
    stores = collections.Counter(re.findall(r"STG\.E(\.\d+)?", sass))
    widths = " ".join(f"{(w or '.32')[1:]}b:{n}" for w, n in sorted(loads.items()))
    st_widths = " ".join(f"{(w or '.32')[1:]}b:{n}" for w, n in sorted(stores.items()))
    return (f"regs {regs.group(1) if regs else '?'} stack {stack.group(1) if stack else '?'} instr {instr} "
            f"LDL {sass.count('LDL')} STL {sass.count('STL')} LDG {widths} STG {st_widths}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=1)
    ap.add_argument("--maxnreg", type=int, default=0, help="register cap per thread (as a tuned config's maxnreg)")
    ap.add_argument("--kernels", default="fwd,state,dq,dx,dk")
    ap.add_argument("--mma-sync", default="dx,dk", help="kernels compiled without wgmma, as the tuned ones are")
    ap.add_argument("--set", nargs="*", default=[], help="extra constexpr flags, NAME=INT")
    ap.add_argument("--int", nargs="*", default=[], help="integer arguments as launched, NAME=INT (e.g. x's token stride "
                    "s_xt when x is a column slice of the in_proj output); overrides the captured value")
    ap.add_argument("--no-capture", action="store_true", help="type arguments by name, unspecialised (the old way)")
    ap.add_argument("--lines", type=int, default=0, help="print the N source lines with the most instructions")
    args = ap.parse_args()
    overrides = {k: int(v) for k, v in (kv.split("=") for kv in args.set)}
    flags = dict(FLAGS, **overrides)
    launches = {} if args.no_capture else capture_launches()
    for name in args.kernels.split(","):
        module, kernel = KERNELS[name]
        fn = getattr(module, kernel)
        attrs = {}
        if launches:
            ints = {k: ["int", int(v)] for k, v in (kv.split("=") for kv in args.int)}
            sig, constexprs, attrs = specialised(fn, launches[name] | {k: v for k, v in ints.items() if k in launches[name]})
            constexprs.update({k: v for k, v in overrides.items() if k in constexprs})  # --set wins over the launch
        else:  # a constexpr this table does not know (a flag added on a branch) compiles as 1; --set overrides it
            sig, constexprs = signature(fn, {**{p.name: 1 for p in fn.params if p.is_constexpr}, **flags})
        with triton_siso.mma_sync_compile() if name in args.mma_sync.split(",") else contextlib.nullcontext():
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": args.warps, "num_stages": args.stages,
                                               **({"maxnreg": args.maxnreg} if args.maxnreg else {})})
        print(f"{name:6s} {sass_stats(compiled.asm['cubin'])} smem {compiled.metadata.shared}", flush=True)
        if args.lines:
            print(line_table(compiled.asm["cubin"], args.lines), flush=True)


if __name__ == "__main__":
    import sys

    if len(sys.argv) == 3 and sys.argv[1] == "--record":
        record_launches(int(sys.argv[2]))
    else:
        main()
