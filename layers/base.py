"""The contract every mixer implements, so any stack of them can train, prefill and decode.

A mixer maps ``(B, T, d_model) -> (B, T, d_model)``. Inference goes through one method:
``forward(x, cache=cache)`` consumes the T tokens as a continuation of whatever ``cache`` holds and
updates ``cache`` in place. A prompt is one call with T = prompt length (prefill); decoding is a
call per token with T = 1. ``cache=None`` is the ordinary training forward from an empty state.

Packed batches pass ``seq_idx`` (B, T), a non-decreasing document id per token: no information may
flow between tokens with different ids (document masking).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any

import torch
from torch import nn

from hybrid.registry import Footprint


class Mixer(nn.Module):
    """Base class of registered sequence mixers (attention, SSMs, routers)."""

    # True when a one-token decode step depends on no Python-side value (every position and state lives in
    # device tensors updated in place), so the whole model step can be captured in a CUDA graph.
    graph_decode: bool = False
    # Buffers that stay float32 when the module is cast to 16 bits (``.to(torch.bfloat16)``, ``.half()``): rotation
    # frequencies rounded to bf16 would turn angles at position 1e5 by up to ~180 rad, and a model trained
    # under autocast (float32 buffers) would decode with other angles than it was trained with.
    float32_buffers: tuple[str, ...] = ()

    def __init__(self, d_model: int, cfg: Any, layer_idx: int = 0):
        super().__init__()
        self.d_model = d_model
        self.cfg = cfg
        self.layer_idx = layer_idx
        # Mixers with auxiliary objectives (routers) set this during forward; the model adds it
        # to the loss. Metrics for logging go in ``self.stats``.
        self.aux_loss: torch.Tensor | None = None
        self.stats: dict[str, float] = {}

    def forward(self, x: torch.Tensor, cache: Any = None, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError  # abstract: every registered mixer overrides it

    def _apply(self, fn, recurse=True):
        kept = {name: getattr(self, name, None) for name in self.float32_buffers}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name, None)
            if old is not None and new is not None and new.is_floating_point() and torch.finfo(new.dtype).bits < 32:
                setattr(self, name, old.to(device=new.device))  # a cast to 16 bits: move, do not round
        return out

    def allocate_cache(self, batch_size: int, max_seqlen: int, device: torch.device | None = None,
                       dtype: torch.dtype | None = None) -> Any:
        """An empty decode cache for ``batch_size`` sequences of up to ``max_seqlen`` tokens."""
        raise NotImplementedError  # abstract: every registered mixer overrides it

    @classmethod
    def footprint(cls, d_model: int, cfg: Any, dtype_bytes: int = 2) -> Footprint:
        """Bytes of decode cache per sequence (constant part and per-token KV part)."""
        raise NotImplementedError  # abstract: every registered mixer overrides it

    @classmethod
    def validate(cls, d_model: int, cfg: Any) -> None:
        """Raise ``ConfigError`` when ``cfg`` cannot work at this ``d_model`` (checked before training)."""


def check_seq_idx(seq_idx: torch.Tensor | None, x: torch.Tensor, cache: Any) -> None:
    if seq_idx is None:
        return
    if cache is not None:
        raise ValueError("seq_idx (packed documents) is for training forwards; decode caches hold one sequence per row")
    if seq_idx.shape != x.shape[:2]:
        raise ValueError(f"seq_idx must have shape {tuple(x.shape[:2])} (batch, seqlen), got {tuple(seq_idx.shape)}")


def triton_runnable(t: torch.Tensor, backend: str) -> bool:
    """Whether Triton kernels can run on ``t``'s device for a layer asking for ``backend``: on CUDA, or on the
    CPU through Triton's interpreter (TRITON_INTERPRET=1) when the kernels are asked for by name (tests)."""
    device_ok = t.is_cuda or (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    return device_ok and importlib.util.find_spec("triton") is not None


@functools.cache
def compiled(fn):
    """``fn`` through torch.compile, made on first use (importing the compiler is slow) and shared by every
    layer: its guards are on shapes, dtypes and the string options, not on the module."""
    return torch.compile(fn)
