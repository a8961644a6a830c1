"""Whole-model decode steps replayed from a captured CUDA graph.

An eager decode step of a 12-layer model launches about a thousand small kernels, so at small batch it
costs the host's launch time (~10 ms), not the GPU's. Capturing the step once and replaying it removes
that. A step can be captured when no mixer reads a Python-side value: SSM steps update their cache
tensors in place, and attention caches switch to static mode (the position lives on the device and
advances inside the graph; keys are masked, not sliced). Mixers declare this with ``graph_decode``.

    decoder = GraphDecoder(model, cache)        # after the prompt's prefill
    logits = decoder.step(tokens)               # (B, 1) -> (B, vocab), one replay

With ``capture=False`` (the default off CUDA) the same static step runs eagerly: that is how the CPU
tests check it against ordinary decoding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from hybrid.layers.sliding import KVCache


def unsupported_mixers(model) -> list[str]:
    """Names of the mixers whose decode step cannot be captured (empty: the model can use a graph)."""
    return sorted({type(b.mixer).__name__ for b in model.blocks if b.mixer is not None and not b.mixer.graph_decode})


def cache_tensors(obj: Any, kind: str = "state") -> Iterator[tuple[torch.Tensor, str]]:
    """Every tensor of a decode cache with its kind: "kv" for attention keys/values, else "state". Fields marked
    metadata={"scratch": True} (working buffers that are zero between steps) are neither and are skipped."""
    if isinstance(obj, torch.Tensor):
        yield obj, kind
    elif isinstance(obj, KVCache):
        yield obj.k, "kv"
        yield obj.v, "kv"
        if obj.device_pos is not None:
            yield obj.device_pos, "state"
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):  # a field marked metadata={"kv": True} holds attention keys/values
            if f.metadata.get("scratch"):
                continue
            yield from cache_tensors(getattr(obj, f.name), "kv" if f.metadata.get("kv") else kind)
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from cache_tensors(x, kind)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from cache_tensors(x, kind)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # not torch.compile's own CUDA-graph modes: we capture


def compile_mode(compile: bool | str) -> str | None:
    """torch.compile's mode for a ``compile`` setting (False / True / a mode name), or None for no compile."""
    if compile is False or compile is None:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"decode compile must be false, true or one of {', '.join(COMPILE_MODES)}; got {compile!r}")
    return compile


class GraphDecoder:
    """One-token decode steps of ``model`` on ``cache`` (already holding the prompt), as graph replays."""

    def __init__(self, model, cache, capture: bool | None = None, warmup: int | None = None, compile: bool | str = False):
        missing = unsupported_mixers(model)
        if missing:
            raise ValueError(f"decode steps of {', '.join(missing)} cannot be captured in a CUDA graph "
                             f"(their caches keep host-side state); decode eagerly instead")
        if cache.seqlen >= cache.max_seqlen:
            raise ValueError(f"cache was allocated for {cache.max_seqlen} tokens; all are used")
        self.model, self.cache = model, cache
        device = next(model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        self.kv = [c for c in cache.layers if isinstance(c, KVCache)]
        for c in self.kv:
            c.make_static()
        self.tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=device)  # (B, 1) static input
        # A graph removes launch gaps but not the kernels: an eager step still runs ~50 small ones per layer.
        # torch.compile fuses the elementwise ones (norms, RoPE, gates) before the graph is captured.
        # ``compile``: True (torch.compile's default mode) or a mode that leaves graph capture to this class;
        # "max-autotune-no-cudagraphs" lets Inductor pick Triton matmul templates that take in neighbouring
        # elementwise work, where the default calls cuBLAS for every M = 1 GEMM.
        mode = compile_mode(compile)
        if mode:  # one code object serves every model and cache size: allow more than dynamo's 8 variants
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self._forward = torch.compile(model.logits, mode=mode) if mode else model.logits
        self.graph = self.logits = None
        if self.capture:
            self._capture(warmup if warmup is not None else (3 if mode else 2))

    def _snapshot(self, steps: int):
        """Everything ``steps`` warm-up steps change: the state tensors, the host counters, and the KV slots they
        write. Those slots matter in a ring buffer: the slot after the next one still holds a visible key."""
        state = [t for t, kind in cache_tensors(self.cache.layers) if kind == "state"]
        slots = []
        for c in self.kv:
            idx = (c.pos + torch.arange(steps, device=c.k.device)) % c.k.shape[2]
            slots.append((c, idx, c.k.index_select(2, idx), c.v.index_select(2, idx)))
        return state, [t.clone() for t in state], self.cache.seqlen, [c.pos for c in self.kv], slots

    def _restore(self, snap) -> None:
        state, saved, seqlen, pos, slots = snap
        for t, s in zip(state, saved):
            t.copy_(s)
        self.cache.seqlen = seqlen
        for c, p in zip(self.kv, pos):
            c.pos = p
        for c, idx, k, v in slots:
            c.k.index_copy_(2, idx, k)
            c.v.index_copy_(2, idx, v)

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        # warm-up steps write cache slots past the current position: never more than the cache has left
        steps = max(1, min(warmup, self.cache.max_seqlen - self.cache.seqlen))
        snap = self._snapshot(steps)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # lazy initialisation (cuBLAS handles, Triton compiles) outside capture
            for _ in range(steps):
                self._forward(self.tokens, self.cache)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(snap)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward(self.tokens, self.cache)  # (B, 1, vocab), a static output buffer

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Consume ``tokens`` (B, 1); returns the next-token logits (B, vocab). With a graph they are a view of
        its output buffer, which the next step overwrites."""
        cache = self.cache
        if cache.seqlen + 1 > cache.max_seqlen:
            raise ValueError(f"cache was allocated for {cache.max_seqlen} tokens; all are used")
        self.tokens.copy_(tokens)
        if self.graph is None:
            logits = self._forward(self.tokens, cache)  # the static step, eagerly
        else:
            self.graph.replay()
            logits = self.logits
        cache.seqlen += 1
        for c in self.kv:
            c.pos += 1
        return logits[:, -1]

    def close(self) -> None:
        """Back to ordinary decoding: the caches leave static mode (their positions are in step)."""
        for c in self.kv:
            c.device_pos = None
