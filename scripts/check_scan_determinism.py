"""Every launch config of the Mamba-3 SISO chunk kernels, checked for finite and bit-identical results
(a GPU diagnostic for kernel changes; it found the dk/dx miscompile logged in docs/perf-notes.md, v7).

    python scripts/check_scan_determinism.py [--packed] [--kernel NAME] [--config WARPS,STAGES[,MAXNREG]]

``--kernel`` / ``--config`` check one kernel / one config (the others then run at one fixed config each when
HYBRID_TRITON_TUNE=fixed): a crash (illegal address) ends the process, so a driver can run each in its own.

For each chunk kernel and each (num_warps, num_stages, maxnreg) its autotuner may pick, runs
forward + backward four times on the same bf16 inputs (with ``--packed``: several documents per row, the
``seq_idx`` kernels). Before each run, freed memory is filled with NaN
so that a read of stale memory shows up. Prints the count of non-finite values and whether all runs agree.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch

# Bit-identical runs are asked of the deterministic mode (per-head dq / dk summed after the kernels, not by atomics).
os.environ.setdefault("HYBRID_DETERMINISTIC", "1")
sys.path.insert(0, "tests")
from hybrid.kernels.mamba3 import triton_siso as fw  # noqa: E402
from hybrid.kernels.mamba3 import triton_siso_bwd as bw  # noqa: E402
from test_mamba3_triton import make  # noqa: E402

# The configs checked here are the Triton kernels'; their Gluon versions (one config each) are checked against them,
# run twice, by tests/test_mamba3_gluon.py. The switches are read at each launch.
for _kernel in fw.GLUON_DEFAULT:
    os.environ.setdefault(f"HYBRID_SCAN_{_kernel.upper()}", "triton")

CONFIGS = [(w, s) for w in (4, 8) for s in (1, 2, 3)]


class Fixed:
    """Stands in for an autotuned kernel: launches the plain kernel at one config."""

    def __init__(self, kernel, num_warps: int, num_stages: int, maxnreg: int | None = None, mma_sync: bool = False):
        self.kernel, self.num_warps, self.num_stages, self.maxnreg = kernel, num_warps, num_stages, maxnreg
        self.mma_sync = mma_sync  # compiled as the tuned kernel is (fw.MmaSync: without wgmma)

    def __getitem__(self, grid):
        cap = {} if self.maxnreg is None else {"maxnreg": self.maxnreg}

        def run(*a, **k):
            with fw.mma_sync_compile() if self.mma_sync else contextlib.nullcontext():
                self.kernel[grid](*a, **k, num_warps=self.num_warps, num_stages=self.num_stages, **cap)
        return run


def _option(name: str) -> str | None:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else None


def main() -> None:
    packed = "--packed" in sys.argv[1:]
    only, config = _option("--kernel"), _option("--config")
    forced = [tuple(int(v) for v in config.split(","))] if config else None
    seq = None
    if packed:  # documents of 130, 1, 301, 64, 504 and 64, 192, 700, 44 tokens
        seq = torch.cat([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))[None]
                         for lens in ([130, 1, 301, 64, 504], [64, 192, 700, 44])]).cuda()
    inp, st = make(B=2, T=1000, G=1, H=8, N=128, P=64, S=32, dtype=torch.float32, device="cuda")
    x = {k: (v.to(torch.bfloat16) if k in ("q", "k", "v") else v) for k, v in inp.items()}
    dy = torch.randn(2, 1000, 8, 64, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0)).bfloat16()
    kernels = (("_chunk_state_fwd", fw), ("_chunk_scan_fwd", fw), ("_chunk_scan_bwd_dq", bw),
               ("_chunk_scan_bwd_dx", bw), ("_chunk_scan_bwd_dk", bw))
    for name, module in kernels:
        if only and name != only:
            continue
        tuned = getattr(module, name + "_tuned")
        # By default the configs the kernel's autotuner may pick; --config forces one.
        # (Under HYBRID_TRITON_TUNE=fixed the tuner holds one config: check the full set then.)
        tuner_configs = [] if os.environ.get("HYBRID_TRITON_TUNE") == "fixed" else getattr(tuned, "configs", [])
        configs = forced or [(c.num_warps, c.num_stages, c.maxnreg) for c in tuner_configs] or CONFIGS
        for warps, stages, *cap in configs:
            maxnreg = cap[0] if cap else None
            setattr(module, name + "_tuned", Fixed(getattr(module, name), warps, stages, maxnreg, isinstance(tuned, fw.MmaSync)))
            runs = []
            for _ in range(4):
                torch.cuda.empty_cache()
                torch.full((64 << 20,), float("nan"), device="cuda")  # freed at once: poisons the allocator's blocks
                y, _, ctx = fw.chunk_forward(x["q"], x["k"], x["v"], x["log_decay"], x["dt"], x["lam"], x["omega"], True,
                                             x["q_bias"], x["k_bias"], x["D"], st, 64, seq)
                grads = bw.mamba3_siso_chunk_bwd(ctx, dy, None, None, None)
                runs.append({"y": y, **{k: v for k, v in grads.items() if v is not None}})
            bad = sum(int((~torch.isfinite(v)).sum()) for run in runs for v in run.values())
            same = all(torch.equal(runs[0][k], run[k]) for run in runs[1:] for k in runs[0])
            print(f"{name} warps {warps} stages {stages} maxnreg {maxnreg}: non-finite {bad}, identical {same}", flush=True)
        setattr(module, name + "_tuned", tuned)


if __name__ == "__main__":
    main()
