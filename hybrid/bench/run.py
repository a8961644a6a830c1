"""The bench loop: every pattern, every length, every decode batch, into one JSON-able report.

An out-of-memory point is recorded as ``{"oom": true}``; longer lengths of the same series are then
recorded as skipped OOMs (they need at least as much memory) and the run moves on, so one pattern that
does not fit never costs the measurements of the others.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Callable

import torch

from hybrid.bench import measure
from hybrid.bench.compare import against_baseline
from hybrid.bench.config import BenchConfig
from hybrid.bench.fit import fit_range, loglog_slope
from hybrid.bench.timing import free_memory, is_oom
from hybrid.model import HybridLM

log = logging.getLogger("hybrid.bench")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def guarded(fn: Callable[[], dict], device: torch.device, what: str) -> dict:
    """``fn()``, or ``{"oom": true}`` when it runs out of memory (memory is freed after the traceback is gone)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - only OOM is swallowed; everything else re-raises
        if not is_oom(exc):
            raise
        log.warning("%s: out of memory", what)
    free_memory(device)  # outside the except block, so the failed frames' tensors are already released
    return {"oom": True}


def series(lengths: list[int], point: Callable[[int], dict], device: torch.device, what: str) -> list[dict]:
    """One row per length; after the first OOM the longer lengths are recorded as skipped OOMs."""
    rows, oom = [], False
    for n in lengths:
        if oom:
            rows.append({"length": n, "oom": True, "skipped": True})
            continue
        row = guarded(lambda n=n: point(n), device, f"{what} at length {n}")
        oom = bool(row.get("oom"))
        rows.append({"length": n, **row})
    return rows


def bench_pattern(bc: BenchConfig, pattern, device: torch.device) -> dict:
    """Build one model and measure every series of it."""
    torch.manual_seed(bc.seed)
    mcfg = bc.model_cfg(pattern)
    model = HybridLM(mcfg).to(device)
    infer_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lengths, w, r = bc.lengths, bc.warmup, bc.repeats
    name = model.pattern.canonical
    out: dict = {"pattern": pattern if isinstance(pattern, str) else name, "canonical": name,
                 "n_params": model.num_params(), "n_attention_layers": model.pattern.n_attention_layers}
    log.info("%s: %.2fM parameters", name, out["n_params"] / 1e6)
    out["backends"] = measure.backends(model, device)
    out["train"] = [{"context": c, **guarded(lambda c=c: measure.train_throughput(model, bc.train_batch(c), c, device, w, r,
                                                                               bc.peak_tflops), device, f"{name} train at {c}")}
                    for c in bc.train_contexts]
    model.to(infer_dtype).eval()
    summary = model.pattern.summary(bc.d_model, dtype_bytes=torch.finfo(infer_dtype).bits // 8)
    probe = measure.cache_bytes(model.allocate_cache(1, bc.min_len))
    out["memory"] = {"summary": {k: summary[k] for k in ("recurrent_state_bytes", "kv_bytes_per_token", "n_kv_cache_layers")},
                     "measured": {"state_bytes": probe["state_bytes"], "kv_bytes_per_token": probe["kv_bytes"] / bc.min_len,
                                  "at_length": bc.min_len}}
    out["prefill"] = series(lengths, lambda n: measure.prefill_point(model, n, bc.prefill_batch, device, w, r),
                            device, f"{name} prefill")
    out["decode"] = {str(b): series(lengths, lambda n, b=b: measure.decode_point(model, n, b, bc.decode_tokens, device, w,
                                                                                    bc.decode_graph, bc.decode_compile),
                                    device, f"{name} decode batch {b}") for b in bc.decode_batches}
    out["fits"] = fits(out, fit_range(lengths, bc.fit_min_len))
    return out  # the model goes out of scope here; run_bench frees its memory


def fits(out: dict, min_len: int) -> dict:
    """Log-log slopes over lengths >= min_len: ~1 linear, ~2 quadratic, ~0 constant."""
    ok = [p for p in out["prefill"] if not p.get("oom")]
    b1 = [p for p in out["decode"][min(out["decode"], key=int)] if not p.get("oom")]
    return {"fit_min_len": min_len,
            "prefill_time_slope": loglog_slope([(p["length"], p["seconds"]) for p in ok], min_len),
            "prefill_memory_slope": loglog_slope([(p["length"], p["peak_bytes"]) for p in ok], min_len),
            "decode_latency_slope": loglog_slope([(p["length"], p["seconds_per_token"]) for p in b1], min_len)}


def run_bench(bc: BenchConfig) -> dict:
    """Measure every pattern of ``bc``; returns the report (device, settings, one entry per pattern)."""
    device = resolve_device(bc.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    report = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "note": None if device.type == "cuda" else "CPU timings: a smoke test of the harness, not GPU performance",
        "torch": torch.__version__,
        "dtype": {"train": "bf16 autocast" if device.type == "cuda" else "fp32",
                  "inference": "bf16" if device.type == "cuda" else "fp32"},
        "timing": f"median of {bc.repeats} after {bc.warmup} warm-up ({'CUDA events' if device.type == 'cuda' else 'perf_counter'})"
                  f"; training steps back to back (seconds_per_step_synced: after a sync each); prefill after a sync"
                  f" each; decode: median of {bc.decode_tokens} single-token steps",
        "lengths": bc.lengths,
        "config": dataclasses.asdict(bc),
        "patterns": [],
    }
    for pattern in bc.patterns:
        # Each model compiles its torch.compile'd helpers afresh, as it would in a process of its own. Shared, the
        # first model's change of length (4k -> 16k) would leave every later model with the dynamic-shape kernels
        # the recompile makes, at every length, and the first with static ones at its first length.
        torch._dynamo.reset()
        # a model whose weights or training step alone do not fit is one OOM entry, not a crash
        entry = guarded(lambda pattern=pattern: bench_pattern(bc, pattern, device), device, f"{pattern}")
        report["patterns"].append(entry if not entry.get("oom") else {"pattern": pattern, "canonical": str(pattern), **entry})
        free_memory(device)
    report["versus_baseline"] = against_baseline(report, bc.baseline)
    return report
