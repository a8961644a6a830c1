"""One measurement point each: a training step, a prefill, a run of decode steps, cache sizes.

Each function measures one (pattern, length[, batch]) point and returns a JSON-able row; out-of-memory
is left to propagate so ``run`` can record it and move on. ``prefill`` is a module-level function so
tests can replace it (e.g. to simulate an OOM at one length).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F

from hybrid.bench.timing import median_seconds, peak_bytes, pipelined_median_seconds
from hybrid.decode_graph import GraphDecoder, cache_tensors, compile_mode, unsupported_mixers
from hybrid.model import HybridLM


def random_tokens(model: HybridLM, batch: int, length: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (batch, length), device=device)  # (B, T)


def cache_bytes(cache) -> dict[str, int]:
    """Bytes per sequence of an allocated InferenceCache, split into KV (attention keys/values) and the rest (state).

    Each storage is counted once (views of one buffer are not double-counted).
    """
    seen: set[int] = set()
    totals = {"kv_bytes": 0, "state_bytes": 0}
    for t, kind in cache_tensors(cache.layers):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            totals["kv_bytes" if kind == "kv" else "state_bytes"] += t.untyped_storage().nbytes()
    return {k: v // cache.batch_size for k, v in totals.items()}


def train_throughput(model: HybridLM, batch: int, context: int, device: torch.device, warmup: int, repeats: int,
                     peak_tflops: float) -> dict:
    """Tokens/s of forward + backward (no optimizer step) and MFU; bf16 autocast on CUDA, fp32 on the CPU.

    Steps are timed back to back (``pipelined_median_seconds``), as training runs them: that is the throughput.
    ``seconds_per_step_synced`` is one step after a sync (an idle queue), which also counts the host's ramp at the
    step's start; a model whose forward issues many small launches pays that there on a slow host.

    FLOPs per step = 6 * params * tokens + 12 * n_attn_layers * d_model * T * tokens (the attention
    scores and weighted sum, forward and backward). Sliding-window and routed attention do less; the
    formula still counts them as dense, so their MFU is an upper bound.
    """
    model.train()
    tokens = random_tokens(model, batch, context, device)  # (B, T)
    targets = random_tokens(model, batch, context, device)  # (B, T)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step() -> None:
        model.zero_grad(set_to_none=True)
        with amp:
            logits = model(tokens)  # (B, T, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
            aux = model.aux_loss()
            if aux is not None:
                loss = loss + aux
        loss.backward()

    seconds = pipelined_median_seconds(step, device, warmup, repeats)
    synced = median_seconds(step, device, 0, repeats)  # already warm
    model.zero_grad(set_to_none=True)
    n_tokens = batch * context
    flops = 6 * model.num_params() * n_tokens + 12 * model.pattern.n_attention_layers * model.cfg.d_model * context * n_tokens
    mfu = flops / seconds / (peak_tflops * 1e12) if device.type == "cuda" else None
    return {"batch": batch, "context": context, "seconds_per_step": seconds, "tokens_per_s": n_tokens / seconds,
            "seconds_per_step_synced": synced, "flops_per_step": flops, "mfu": mfu}


@torch.no_grad()
def prefill(model: HybridLM, tokens: torch.Tensor) -> torch.Tensor:
    """One full-sequence forward without a cache, as a prompt's prefill: only the last position's logits
    (B, 1, vocab) are computed, so the LM head does not dominate memory at long contexts."""
    return model(tokens, last_only=True)


def prefill_point(model: HybridLM, length: int, batch: int, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median prefill latency at one length, then its peak memory above the weights (one more, untimed pass)."""
    from hybrid.bench import measure  # late lookup: a monkeypatched ``measure.prefill`` is the one called

    tokens = random_tokens(model, batch, length, device)  # (B, L)
    seconds = median_seconds(lambda: measure.prefill(model, tokens), device, warmup, repeats)
    peak, how = peak_bytes(lambda: measure.prefill(model, tokens), device)
    return {"length": length, "batch": batch, "seconds": seconds, "tokens_per_s": batch * length / seconds,
            "peak_bytes": peak, "peak_source": how}


@torch.no_grad()
def decode_point(model: HybridLM, length: int, batch: int, n_tokens: int, device: torch.device, warmup: int,
                 cuda_graph: bool = True, compile: bool | str = False) -> dict:
    """Per-token decode latency with the cache pre-filled to ``length`` tokens.

    allocate_cache(batch, length + warmup + n) -> prefill ``length`` tokens -> ``warmup`` untimed steps ->
    ``n_tokens`` timed single-token steps; the median step time is the latency. On CUDA each step is a
    replay of a captured graph when every mixer allows it (as a serving stack would run it), optionally of
    the torch.compile'd step; the row says which.
    """
    from hybrid.bench import measure

    graph = cuda_graph and device.type == "cuda" and not unsupported_mixers(model)
    mode = compile_mode(compile) if graph else None
    cache = model.allocate_cache(batch, length + warmup + n_tokens)
    measure.prefill_cached(model, random_tokens(model, batch, length, device), cache)
    step_tokens = random_tokens(model, batch, 1, device)  # (B, 1)
    if graph:
        decoder = GraphDecoder(model, cache, compile=mode or False)
        seconds = median_seconds(lambda: decoder.step(step_tokens), device, warmup, n_tokens)
    else:
        seconds = median_seconds(lambda: model(step_tokens, cache=cache), device, warmup, n_tokens)
    return {"length": length, "batch": batch, "seconds_per_token": seconds, "tokens_per_s": batch / seconds,
            "cuda_graph": graph, "compiled": mode is not None, **({"compile_mode": mode} if mode else {}),
            "cache": cache_bytes(cache)}


@torch.no_grad()
def prefill_cached(model: HybridLM, tokens: torch.Tensor, cache, chunk: int = 16384) -> None:
    """Fill ``cache`` with ``tokens`` (B, L) in pieces of ``chunk`` tokens (the prompt of a decode measurement).

    Chunked prefill, as serving stacks do: the activations of one piece, not of the whole batch x length,
    bound the memory, so a decode point fails only when its cache does not fit."""
    for start in range(0, tokens.shape[1], chunk):
        model(tokens[:, start:start + chunk], cache=cache, last_only=True)


def backends(model: HybridLM, device: torch.device) -> dict[str, str]:
    """Which implementation each kind of mixer runs on ``device`` (timings mean little without it)."""
    from hybrid.kernels.attention import flash_available, split_decode_available
    from hybrid.layers.attention import Attention
    from hybrid.layers.block_topk import BlockTopk
    from hybrid.layers.mamba3 import Mamba3

    probe = torch.zeros(1, 1, 1, 1, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    out: dict[str, str] = {}
    for module in model.modules():  # routers and fusion blocks nest their SSM and attention: walk everything
        name, cfg = type(module).__name__, getattr(module, "cfg", None)
        if isinstance(module, Mamba3):  # Triton kernels or the PyTorch reference
            if module.cfg.mimo:
                scan = "triton" if module._use_triton(probe, None) else "torch"
                step = "triton" if module._use_triton_mimo_step(probe) else "torch"
                out[name] = f"{scan} scan, {step} decode step"
            else:
                out[name] = "triton" if module._use_triton(probe, None) else "torch"
        elif cfg is not None and isinstance(getattr(cfg, "backend", None), str):
            backend = cfg.backend
            if backend == "auto" and isinstance(module, BlockTopk):
                backend = "auto (triton kernel where it applies)" if device.type == "cuda" else "auto (sdpa)"
            elif backend == "auto":
                backend = "auto (flash-attn)" if flash_available(probe) else "auto (sdpa/flex)"
            if type(module) is Attention:  # its single-query decode steps take their own path (not block top-k's)
                backend += ", decode: " + ("triton split-key" if split_decode_available(probe) else "torch matmuls")
            out[name] = backend
    return out
