"""Where a training step's host time goes, module by module (diagnostic, GPU only)

    python scripts/host_profile_step.py [--seq T] [--top N] [--inclusive] [PATTERN ...]

``host_vs_gpu_train.py`` says whether the GPU waits on the host; this says on what. The GPU is first held busy
(``torch.cuda._sleep``) so that no launch waits on it, then one forward's host time is split by module (hooks on
every block's norm, mixer and FFN, by class name), the backward's host time is taken whole, and cProfile lists the
functions with the most own host time over one forward and one backward. Same step as ``host_vs_gpu_train.py``
(32768 tokens, d_model 768, bf16 autocast).

``--inclusive`` also times (without cProfile's inflation) every function and tuned Triton kernel of the Mamba-3
kernel modules, inclusive of what each calls, over one forward and one backward.
"""

from __future__ import annotations

import cProfile
import functools
import importlib
import inspect
import io
import pstats
import sys
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

import hybrid

BUSY_CYCLES = 4_000_000_000  # ~2 s of GPU sleep: longer than any forward or backward takes to issue


WRAPPED_MODULES = tuple("hybrid.kernels.mamba3." + name for name in (
    "siso_mixer", "triton_siso", "triton_siso_bwd", "triton_ssm_inputs", "triton_gate", "triton_state_passing",
    "triton_angles", "common"))


@functools.cache  # once per process: a second wrapping would time the timers
def wrap_for_inclusive_times() -> dict[str, list[float]]:
    """Replace every module-level function (and tuned kernel launcher) of the Mamba-3 kernel modules, in every
    module that refers to it, by a timer of its host time (ms, inclusive of what it calls). Returns the times,
    one list per function, shared by every later call."""
    spent: dict[str, list[float]] = defaultdict(list)
    modules = [importlib.import_module(name) for name in WRAPPED_MODULES]
    originals = {}
    for module in modules:
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module.__name__ and not name.startswith("__"):
                originals[id(obj)] = (f"{module.__name__.rsplit('.', 1)[1]}.{name}", obj)
            elif type(obj).__name__ in ("ChosenConfig", "MmaSync"):
                originals[id(obj)] = (f"{module.__name__.rsplit('.', 1)[1]}.{name}[grid]", obj)

    def timed(label, fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label].append((time.perf_counter() - start) * 1e3)
        return run

    class TimedLauncher:
        def __init__(self, label, launcher):
            self.label, self.launcher = label, launcher

        def __getitem__(self, grid):
            return timed(self.label, self.launcher[grid])

        def __getattr__(self, name):
            return getattr(self.launcher, name)

    replacements = {}
    for key, (label, obj) in originals.items():
        replacements[key] = TimedLauncher(label, obj) if not inspect.isfunction(obj) else timed(label, obj)
    for module in modules:
        for name, obj in list(vars(module).items()):
            if id(obj) in replacements:
                setattr(module, name, replacements[id(obj)])
    return spent


def loss_of(model, tokens):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return F.cross_entropy(model(tokens).float().flatten(0, 1), tokens.flatten())


def time_modules(model) -> tuple[dict[str, list[float]], list]:
    """Hooks that add each module's forward host time (ms) under '<block kind>.<part> <class>'."""
    spent: dict[str, list[float]] = defaultdict(list)
    handles = []
    for block in model.blocks:
        kind = type(block.mixer).__name__ if block.mixer is not None else "ffn-only"
        for part in ("mixer_norm", "mixer", "ffn_norm", "ffn"):
            module = getattr(block, part)
            if module is None:
                continue
            key = f"{kind:>10}.{part:<10} {type(module).__name__}"
            start = {}
            handles.append(module.register_forward_pre_hook(lambda m, a, s=start: s.__setitem__(0, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda m, a, o, s=start, k=key: spent[k].append((time.perf_counter() - s[0]) * 1e3)))
    return spent, handles


def issue_phase(model, tokens, phase: str, before=None, after=None) -> float:
    """Host ms to issue one forward or one backward with the GPU held busy (nothing waits on it); ``before`` /
    ``after`` run just around the timed part (a profiler's enable / disable)."""
    model.zero_grad(set_to_none=True)
    loss = loss_of(model, tokens) if phase == "backward" else None
    torch.cuda.synchronize()
    torch.cuda._sleep(BUSY_CYCLES)
    if before is not None:
        before()
    start = time.perf_counter()
    if phase == "forward":
        loss_of(model, tokens)
    else:
        loss.backward()
    elapsed = (time.perf_counter() - start) * 1e3
    if after is not None:
        after()
    torch.cuda.synchronize()
    return elapsed


def print_times(spent: dict[str, list[float]]) -> None:
    for key, values in sorted(spent.items(), key=lambda kv: -sum(kv[1])):
        print(f"  {key:<48} {sum(values):7.2f} ms in {len(values):3d} calls, {sum(values) / len(values) * 1e3:6.0f} us each")


def profile(pattern: str, seq_len: int, top: int, inclusive: bool = False) -> None:
    model = hybrid.build_model(pattern, d_model=768, vocab_size=50304).cuda().train()
    tokens = torch.randint(0, 50304, (32768 // seq_len, seq_len), device="cuda")
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        loss_of(model, tokens).backward()
    torch.cuda.synchronize()

    spent, handles = time_modules(model)
    forward_ms = issue_phase(model, tokens, "forward")
    for h in handles:
        h.remove()
    backward_ms = issue_phase(model, tokens, "backward")
    print(f"{pattern} @ {32768 // seq_len}x{seq_len}: host forward {forward_ms:.1f} ms, backward {backward_ms:.1f} ms "
          f"(GPU held busy)")
    print_times(spent)

    stats = io.StringIO()
    for phase in ("forward", "backward"):
        prof = cProfile.Profile()
        issue_phase(model, tokens, phase, prof.enable, prof.disable)
        stats.write(f"--- {phase}: functions by own host time (cProfile inflates pure-Python calls)\n")
        pstats.Stats(prof, stream=stats).sort_stats("tottime").print_stats(top)
    print("\n".join(line for line in stats.getvalue().splitlines() if line.strip()))
    if inclusive:
        spent = wrap_for_inclusive_times()
        for phase in ("forward", "backward"):
            total = issue_phase(model, tokens, phase, spent.clear)
            print(f"--- {phase}: {total:.1f} ms of host; inclusive host time of the Mamba-3 kernel modules' functions")
            print_times(spent)


def main() -> None:
    args = sys.argv[1:]
    seq_len, top, inclusive = 4096, 30, False
    while args[:1] and args[0].startswith("--"):
        if args[0] == "--seq":
            seq_len, args = int(args[1]), args[2:]
        elif args[0] == "--top":
            top, args = int(args[1]), args[2:]
        elif args[0] == "--inclusive":
            inclusive, args = True, args[1:]
        else:
            raise SystemExit(f"unknown option {args[0]}; options: --seq T, --top N, --inclusive")
    for pattern in args or ["MMMAx3"]:
        profile(pattern, seq_len, top, inclusive)


if __name__ == "__main__":
    main()
