"""Softmax attention backends that compute one function: causal (optionally windowed,
optionally document-masked) attention with grouped-query heads.

The allowed set for query i (absolute position ``q_pos[i]``) and key j (``k_pos[j]``) is

    k_pos[j] <= q_pos[i]  and  q_pos[i] - k_pos[j] < window  and  doc[i] == doc[j]

``attention_naive`` is the oracle. ``attention_sdpa`` runs anywhere; ``attention_flash`` needs
flash-attn on CUDA and handles the common no-document case. Note flash-attn's window is inclusive
on both ends, so a window of W keys is ``window_size=(W - 1, 0)``.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

try:  # optional fast path
    from flash_attn import flash_attn_func as _flash_attn_func
except ImportError:  # pragma: no cover - depends on the machine
    _flash_attn_func = None

try:  # split-key decoding; Triton is a core dependency, but a CPU-only install may lack it
    from hybrid.kernels.decode_attention_triton import attention_decode_triton as _decode_triton
except ImportError:  # pragma: no cover - depends on the machine
    _decode_triton = None
if os.environ.get("HYBRID_DECODE_ATTENTION", "auto") == "torch":  # A/B runs: the eager path on CUDA too
    _decode_triton = None


def flash_available(t: torch.Tensor) -> bool:
    return _flash_attn_func is not None and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def split_decode_available(t: torch.Tensor) -> bool:
    """Whether ``attention_decode`` runs the split-key Triton kernel for queries like ``t`` (it computes in fp32, so
    float64 keeps the eager path)."""
    return t.is_cuda and _decode_triton is not None and t.dtype in (torch.float16, torch.bfloat16, torch.float32)


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None,
                 q_doc: torch.Tensor | None = None, k_doc: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk): True where query i may attend to key j."""
    diff = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
    mask = diff >= 0
    if window is not None:
        mask = mask & (diff < window)
    mask = mask[None, None]  # (1, 1, Tq, Tk)
    if q_doc is not None:
        mask = mask & (q_doc[:, None, :, None] == k_doc[:, None, None, :])  # (B, 1, Tq, Tk)
    return mask


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """Reference: q (B, H, Tq, D), k/v (B, Hkv, Tk, D), mask broadcastable to (B, H, Tq, Tk)."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, Tk, D)
    v = v.repeat_interleave(groups, dim=1)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)  # at least fp32, float64 stays float64
    scores = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * scale  # (B, H, Tq, Tk)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no allowed key outputs zeros
    return (probs @ v.to(acc)).to(q.dtype)


def attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool = False) -> torch.Tensor:
    """PyTorch SDPA; ``mask=None, is_causal=True`` lets it pick its fused causal kernels."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None,
                     key_end: torch.Tensor | None = None, window: int | None = None) -> torch.Tensor:
    """One query per sequence: q (B, H, 1, D), k/v (B, Hkv, S, D), ``valid`` (S,) or (B, S) keys it may see.
    ``key_end`` / ``window``: a bound on the valid slots (``attention_decode_triton``) that lets the kernel skip
    the rest; the result is the same without it.

    On CUDA the keys are split over many programs (``decode_attention_triton``): a single query parallelises
    over batch x heads only, which at batch 1 leaves the GPU idle while it reads a long cache. Elsewhere, or
    without Triton, ``attention_decode_torch``."""
    if split_decode_available(q):
        return _decode_triton(q, k, v, valid, key_end, window)
    return attention_decode_torch(q, k, v, valid)


def attention_decode_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           valid: torch.Tensor | None) -> torch.Tensor:
    """The reference of ``attention_decode``: two matmuls and a softmax that read the keys and values once.
    (Not SDPA: its dispatcher picks cuDNN for single-query shapes on Hopper and spends milliseconds of CPU time
    per call.)"""
    B, H, _, D = q.shape
    Hkv = k.shape[1]
    qg = q.view(B, Hkv, H // Hkv, D)  # the query heads of one KV head share its keys (GQA)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in at least fp32; float64 stays float64
    scores = (qg @ k.transpose(-1, -2)).to(acc) * (1.0 / math.sqrt(D))  # (B, Hkv, G, S)
    if valid is not None:
        scores = scores.masked_fill(~(valid if valid.ndim == 1 else valid[:, None, None, :]), float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return (probs @ v).view(B, H, 1, D)


def attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """flash-attn with bottom-right causal alignment (keys may extend before the queries)."""
    window_size = (-1, -1) if window is None else (window - 1, 0)
    out = _flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                           window_size=window_size)
    return out.transpose(1, 2)
