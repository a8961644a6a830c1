"""Per-layer routing metrics for logging: each mixer's ``stats`` plus routing rates at scored positions.

On recall tasks the scored positions (labels != ignore) are where the model must retrieve, so a
useful router routes there more often than elsewhere: ``frac_at_query`` vs ``frac_at_filler`` (every
other position, the context included).
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE = -100


@torch.no_grad()
def routing_metrics(model: nn.Module, labels: torch.Tensor | None = None, ignore: int = IGNORE) -> dict[str, float]:
    """``{"route/layer{i}/<key>": value}`` for every block whose mixer reports stats or routing decisions."""
    out: dict[str, float] = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        mixer = getattr(block, "mixer", None)
        if mixer is None:
            continue
        for key, value in getattr(mixer, "stats", {}).items():
            out[f"route/layer{i}/{key}"] = float(value)
        route = getattr(mixer, "last_route", None)
        if route is None or labels is None or route.shape != labels.shape:
            continue
        scored = labels != ignore
        if scored.any():
            out[f"route/layer{i}/frac_at_query"] = float(route[scored].float().mean())
        if (~scored).any():
            out[f"route/layer{i}/frac_at_filler"] = float(route[~scored].float().mean())
    return out
