"""Training callbacks: throughput and memory logging, sequence-length warm-up."""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class ThroughputMonitor(L.Callback):
    """Logs tokens/s, step time and peak memory, averaged over ``log_every`` optimizer steps."""

    def __init__(self, log_every: int = 10):
        self.log_every = log_every
        self._t0: float | None = None
        self._tokens = 0
        self._steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch["inputs"].numel() * trainer.world_size
        self._steps += 1
        if self._steps < self.log_every:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        dt = time.perf_counter() - self._t0
        pl_module.log_dict({
            "perf/tokens_per_s": self._tokens / dt,
            "perf/step_time_ms": 1000 * dt / self._steps,
            "perf/peak_memory_mb": peak_memory_mb(pl_module.device),
        }, rank_zero_only=True)
        self._t0, self._tokens, self._steps = time.perf_counter(), 0, 0


class SeqLenWarmup(L.Callback):
    """Sequence-length warm-up: for the first ``steps`` steps, training batches are cut into shorter
    pieces (tokens per batch unchanged), growing linearly from ``start`` to the full length in
    multiples of ``multiple_of``. Long-context SSM training is commonly staged this way."""

    def __init__(self, start: int = 64, steps: int = 1000, multiple_of: int = 64):
        self.start, self.steps, self.multiple_of = start, steps, multiple_of

    def length_at(self, step: int, full: int) -> int:
        if step >= self.steps:
            return full
        length = self.start + (full - self.start) * step / self.steps
        length = max(self.multiple_of, int(length) // self.multiple_of * self.multiple_of)
        return min(full, length)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        full = batch["inputs"].shape[1]
        length = self.length_at(trainer.global_step, full)
        if length < full:
            for key in ("inputs", "labels", "seq_idx"):
                if key in batch:
                    batch[key] = _fold(batch[key], length)
        pl_module.log("train/seq_len", float(length), rank_zero_only=True)


def _fold(t: torch.Tensor, length: int) -> torch.Tensor:
    """(B, T) -> (B * (T // length), length), dropping the ragged tail."""
    B, T = t.shape
    n = T // length
    return t[:, : n * length].reshape(B * n, length)
