"""Short causal depthwise convolution (Mamba-2's xBC conv) with a decode state and document masking."""

from __future__ import annotations

import torch


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  conv_state: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """y_t = bias + sum_j weight[:, j] * x_{t - (K-1) + j} per channel, with x before the call from ``conv_state``.

    x (B, T, C); weight (C, K); bias (C,) or None; conv_state (B, C, K) the last K inputs seen (zeros
    for a fresh sequence), or None. ``seq_idx`` (B, T) drops taps that reach into another document.
    Returns y (B, T, C) and the new conv state (B, C, K): the last K inputs including this call's.
    """
    Bsz, T, Cdim = x.shape
    if T == 0:
        raise ValueError("causal_conv1d needs at least one token")
    K = weight.shape[-1]
    if weight.shape != (Cdim, K):
        raise ValueError(f"weight must be (C, K) with C = {Cdim}, got {tuple(weight.shape)}")
    if conv_state is None:
        past = x.new_zeros(Bsz, K - 1, Cdim)
    else:
        past = conv_state[..., 1:].transpose(1, 2).to(x.dtype)  # (B, K-1, C)
    xp = torch.cat([past, x], dim=1)  # (B, K-1+T, C)
    y = x.new_zeros(Bsz, T, Cdim) if bias is None else bias.to(x.dtype).expand(Bsz, T, Cdim)
    for j in range(K):
        back = K - 1 - j  # how many tokens this tap looks back
        tap = xp[:, j:j + T] * weight[:, j].to(x.dtype)
        if seq_idx is not None and back > 0:
            same = torch.zeros_like(seq_idx, dtype=torch.bool)
            same[:, back:] = seq_idx[:, back:] == seq_idx[:, :-back]
            tap = tap * same[..., None].to(x.dtype)
        y = y + tap
    return y, xp[:, -K:].transpose(1, 2)
