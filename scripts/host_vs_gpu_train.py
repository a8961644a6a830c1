"""Is a training step bound by the host or by the GPU? (diagnostic, GPU only)

    python scripts/host_vs_gpu_train.py [PATTERN ...]

Per pattern at 8 x 4096, d_model 768, bf16 autocast (as ``hybrid-bench`` trains): the step's wall time (synchronised),
the host time to issue it (no sync), and the sum of its kernels' times (one profiled step). Host issue near the wall
time means launch-bound; kernels near the wall time means GPU-bound, and wall - kernels is the GPU's idle gaps.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import hybrid


def train_step(model, tokens) -> None:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())
    loss.backward()


def measure(pattern: str, repeats: int = 5) -> dict[str, float]:
    model = hybrid.build_model(pattern, d_model=768, vocab_size=50304).cuda().train()
    tokens = torch.randint(0, 50304, (8, 4096), device="cuda")
    for _ in range(3):
        train_step(model, tokens)
    walls, issues = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, tokens)
        issued = time.perf_counter()
        torch.cuda.synchronize()
        issues.append((issued - start) * 1e3)
        walls.append((time.perf_counter() - start) * 1e3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_step(model, tokens)
        torch.cuda.synchronize()
    kernels = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    return {"wall_ms": statistics.median(walls), "host_issue_ms": statistics.median(issues), "kernels_ms": kernels}


def main() -> None:
    for pattern in sys.argv[1:] or ["MMMAx3", "Ax12", "Mx12"]:
        r = measure(pattern)
        print(f"{pattern}: wall {r['wall_ms']:.1f} ms, host issue {r['host_issue_ms']:.1f} ms, "
              f"kernels {r['kernels_ms']:.1f} ms", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
