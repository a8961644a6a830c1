"""One forward + backward of the Triton Mamba-3 SISO scan, for a hardware profiler (diagnostics, not a benchmark).

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... python scripts/profile_scan.py 8 4096

Warms up first (autotuning runs every config), then brackets one f+b with cudaProfilerStart/Stop so the
profiler sees each kernel once, at its tuned config. Also prints each Triton kernel's registers, spills
and shared memory at the config the tuner chose, and a torch.profiler kernel split of the same f+b.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from hybrid.kernels.mamba3 import triton_siso, triton_siso_bwd  # noqa: E402
from hybrid.kernels.mamba3.siso import mamba3_siso_chunk  # noqa: E402
from mamba3_scan import inputs  # noqa: E402


def compiled_stats() -> None:
    """Registers / spills / shared memory of every compiled variant of the chunk kernels."""
    for module in (triton_siso, triton_siso_bwd):
        for name in dir(module):
            fn = getattr(module, name)
            jit = getattr(fn, "fn", fn)  # an Autotuner wraps the JITFunction
            caches = getattr(jit, "device_caches", None)
            if not caches:
                continue
            best = getattr(fn, "best_config", None)
            for dev_cache in caches.values():
                for kernel in dev_cache[0].values():
                    meta = getattr(kernel, "metadata", None)
                    print(f"{name}: regs={getattr(kernel, 'n_regs', '?')} spills={getattr(kernel, 'n_spills', '?')} "
                          f"shared={getattr(meta, 'shared', '?')} warps={getattr(meta, 'num_warps', '?')} "
                          f"stages={getattr(meta, 'num_stages', '?')} best={best}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("batch", type=int)
    parser.add_argument("seqlen", type=int)
    args = parser.parse_args()
    x = inputs(args.batch, args.seqlen, requires_grad=True)
    dy = torch.randn_like(x["v"])

    def fb():
        y, _ = mamba3_siso_chunk(**x, chunk_size=64)
        y.backward(dy)

    for _ in range(3):
        fb()
    torch.cuda.synchronize()
    compiled_stats()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    torch.cuda.cudart().cudaProfilerStart()
    fb()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
