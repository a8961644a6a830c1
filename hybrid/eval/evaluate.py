"""Score a model on a task's test set: exact metrics over the whole set, perplexity by position.

Batches are generated lazily (``Task.test_batches``) and only the scored positions of each row are
kept (compacted to the left, row identity preserved), so a 128k-token evaluation holds one batch of
logits at a time. The task's own ``score`` then runs once over everything, so sliced accuracies
(by distance bucket, depth, length, ...) are exact rather than averages of per-batch averages.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from hybrid.data.base import IGNORE, Task
from hybrid.model import HybridLM

POSITION_BINS = 16


def _compact(batch: dict[str, torch.Tensor], pred: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep the scored positions of each row, left-aligned: (B, T, ...) -> (B, K, ...), K = most scored in a row."""
    scored = batch["labels"] != IGNORE  # (B, T)
    K = max(int(scored.sum(1).max().item()), 1)
    order = torch.argsort((~scored).to(torch.int8), dim=1, stable=True)[:, :K]  # scored positions first, in order
    keep = torch.gather(scored, 1, order)
    out = {}
    for key, value in {**batch, "pred": pred}.items():
        if value.ndim < 2 or value.shape[:2] != scored.shape:
            continue
        idx = order.view(*order.shape, *([1] * (value.ndim - 2))).expand(-1, -1, *value.shape[2:])
        out[key] = torch.gather(value, 1, idx)
    out["labels"] = torch.where(keep, out["labels"], torch.full_like(out["labels"], IGNORE))
    return out


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    K = max(p["labels"].shape[1] for p in parts)
    out = {}
    for key in parts[0]:
        padded = []
        for p in parts:
            v = p[key]
            fill = IGNORE if key == "labels" else -1
            if v.shape[1] < K:
                v = torch.cat([v, torch.full((v.shape[0], K - v.shape[1], *v.shape[2:]), fill, dtype=v.dtype)], dim=1)
            padded.append(v)
        out[key] = torch.cat(padded)
    return out


@torch.no_grad()
def evaluate(model: HybridLM, task: Task, batch_size: int, device: str | torch.device = "cpu",
             max_examples: int | None = None) -> dict[str, Any]:
    """Metrics of ``model`` on ``task``'s test set: the task's metrics (exact), ``nll`` and ``ppl`` over
    the scored positions, ``ppl_pos/<start>`` (perplexity by position, 16 bins) and timing."""
    model.eval()
    parts, n_rows = [], 0
    nll_sum = nll_count = None
    t0 = time.perf_counter()
    for batch in task.test_batches(batch_size):
        if max_examples is not None and n_rows >= max_examples:
            break
        if max_examples is not None:
            batch = {k: v[: max_examples - n_rows] for k, v in batch.items()}
        dev = {k: v.to(device) for k, v in batch.items()}
        logits = model(dev["inputs"], seq_idx=dev.get("seq_idx"))  # (B, T, V)
        labels = dev["labels"]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), labels.clamp(min=0).flatten(), reduction="none").view_as(labels)
        scored = labels != IGNORE
        if nll_sum is None:
            nll_sum = torch.zeros(labels.shape[1], dtype=torch.float64)
            nll_count = torch.zeros(labels.shape[1], dtype=torch.float64)
        nll_sum += (nll * scored).sum(0).double().cpu()
        nll_count += scored.sum(0).double().cpu()
        parts.append(_compact(batch, logits.argmax(-1).cpu()))
        n_rows += len(batch["inputs"])
    seconds = time.perf_counter() - t0
    if not parts:
        raise ValueError(f"{type(task).__name__} produced no test examples")
    allb = _cat(parts)
    pred = allb.pop("pred")
    metrics = {k: float(v) for k, v in task.score(pred, allb).items()}
    total = float(nll_count.sum())
    metrics["nll"] = float(nll_sum.sum()) / max(total, 1.0)
    metrics["ppl"] = math.exp(min(metrics["nll"], 50.0))
    T = len(nll_sum)
    width = max(1, math.ceil(T / POSITION_BINS))
    for start in range(0, T, width):
        c = float(nll_count[start:start + width].sum())
        if c > 0:
            metrics[f"ppl_pos/{start}"] = math.exp(min(float(nll_sum[start:start + width].sum()) / c, 50.0))
    metrics.update(n_examples=float(n_rows), seq_len=float(T), seconds=seconds, tokens_per_s=n_rows * T / max(seconds, 1e-9))
    return metrics
