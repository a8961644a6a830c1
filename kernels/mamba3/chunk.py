"""Chunked (SSD-style) Mamba-3 in PyTorch: the training and prefill path, and the reference for fast kernels.

The trapezoid update is rewritten as a plain decaying recurrence on a carried state (spec §2.5):

    G_t = alpha_t G_{t-1} + scale_t sum_r x_{t,r} k_{t,r}^T,   scale_t = gamma_t + beta'_{t+1},
    beta'_{t+1} = dt_{t+1} (1 - lam_{t+1})   (0 at the last token and before a document start),

so with cumulative log-decay cs, token t reads token s < t with weight exp(cs_t - cs_s) scale_s and
itself with gamma_t (the beta' part of token t only enters H at t + 1). Per chunk of C tokens:

    intra:  y_j += sum_{i <= j} W[j, i] (q_j . k_i) x_i      W = masked decay * scale, gamma on the diagonal
    inter:  y_j += exp(cs_j) G_in q_j                        G_in = carried state entering the chunk
    pass:   G_out = exp(cs_last) G_in + sum_i exp(cs_last - cs_i) scale_i x_i k_i^T

MIMO flattens (time, rank) into C*R rows, time-major; all R x R pairs of two tokens share the time
weight (kron with a ones block), including the diagonal block. Memory is O(T C) — no T x T matrix.
Document resets (``seq_idx``) mask the decay between tokens of different documents, cut beta' at a
document's last token and restart the cumulative angle. Shapes and conventions: ``common.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hybrid.kernels.mamba3.common import (
    TWO_PI,
    Mamba3State,
    check_inputs,
    compute_dtype,
    expand_rank,
    rotate,
    to_heads,
)


def mamba3_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, dt: torch.Tensor,
                 lam: torch.Tensor, dtheta: torch.Tensor | None = None, q_bias: torch.Tensor | None = None,
                 k_bias: torch.Tensor | None = None, D: torch.Tensor | None = None, v_rank: torch.Tensor | None = None,
                 initial_state: Mamba3State | None = None, seq_idx: torch.Tensor | None = None,
                 chunk_size: int = 64, pairing: str = "interleaved") -> tuple[torch.Tensor, Mamba3State]:
    """Chunked Mamba-3 over T >= 1 tokens. Returns y (B, T, R, H, P) and the final ``Mamba3State``.

    Same arguments and result as ``mamba3_recurrent`` (plus ``chunk_size``, any value >= 1); differentiable
    in every float input, the initial state included.
    """
    check_inputs(q, k, v, log_decay, dt, lam, dtheta, q_bias, k_bias, D, v_rank, initial_state, seq_idx, pairing)
    Bsz, T, R, _, N = q.shape
    H, P = v.shape[2:]
    if T == 0:
        raise ValueError("mamba3_chunk needs at least one token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cdt = compute_dtype(v)
    C = chunk_size
    nc = -(-T // C)
    pad = nc * C - T

    a, dt, lam = log_decay.to(cdt), dt.to(cdt), lam.to(cdt)  # (B, T, H)
    gamma = lam * dt
    beta_next = dt * (1 - lam)  # beta' that token t - 1 borrows from token t
    bp = beta_next[:, 1:]  # (B, T-1, H)
    if seq_idx is not None:
        bp = bp * (seq_idx[:, 1:] == seq_idx[:, :-1]).to(cdt)[..., None]
    scale = gamma + F.pad(bp, (0, 0, 0, 1))  # (B, T, H)

    # Padding tokens have zero decay, step and value: they leave the carried state untouched.
    def chunked(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, nc, C, ...)
        if pad:
            t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
        return t.reshape(Bsz, nc, C, *t.shape[2:])

    seq = seq_prev = None
    if seq_idx is not None:
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(Bsz, pad)], 1).reshape(Bsz, nc, C)
        # Document of the token before each chunk; the initial state belongs to the first token's document.
        seq_prev = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)  # (B, nc)

    theta = _cumulative_angles(dtheta, initial_state, seq, seq_prev, chunked, (Bsz, T, H), cdt, v.device)  # (B, T, H, S)
    qh = to_heads(q.to(cdt), q_bias, H)  # (B, T, R, H, N)
    kh = to_heads(k.to(cdt), k_bias, H)
    if theta.shape[-1]:
        cos, sin = theta.cos().unsqueeze(2), theta.sin().unsqueeze(2)  # (B, T, 1, H, S), shared by ranks
        qh, kh = rotate(qh, cos, sin, pairing), rotate(kh, cos, sin, pairing)
    x = expand_rank(v.to(cdt), v_rank, R)  # (B, T, R, H, P)

    # Chunk tensors, heads first and (time, rank) flattened to rows: (B, nc, H, C*R, ·).
    def rows(t: torch.Tensor) -> torch.Tensor:
        return chunked(t).permute(0, 1, 4, 2, 3, 5).reshape(Bsz, nc, H, C * R, t.shape[-1])

    qc, kc, xc = rows(qh), rows(kh), rows(x)
    a_c, scale_c, gamma_c = (chunked(t).transpose(2, 3) for t in (a, scale, gamma))  # (B, nc, H, C)
    cs = a_c.cumsum(-1)  # (B, nc, H, C) inclusive cumulative log-decay within the chunk

    causal = torch.ones(C, C, dtype=torch.bool, device=v.device).tril(-1)  # strictly lower: the diagonal is gamma
    if seq is None:
        mask = causal
        to_end = torch.ones_like(cs)  # 1 where token i's document is still open at the chunk's end
        from_start = to_end  # 1 where the carried state reaches token j
    else:
        mask = causal & (seq[..., :, None] == seq[..., None, :]).unsqueeze(2)  # (B, nc, 1, C, C)
        to_end = (seq == seq[..., -1:]).to(cdt).unsqueeze(2)  # (B, nc, 1, C)
        from_start = (seq == seq_prev[..., None]).to(cdt).unsqueeze(2)
    diff = cs[..., :, None] - cs[..., None, :]  # (B, nc, H, C, C): log-decay from key i to query j
    W = diff.masked_fill(~mask, float("-inf")).exp() * scale_c[..., None, :] + torch.diag_embed(gamma_c)
    if R > 1:
        W = W.repeat_interleave(R, dim=-1).repeat_interleave(R, dim=-2)  # kron(W, ones(R, R))
    y = ((qc @ kc.transpose(-1, -2)) * W) @ xc  # (B, nc, H, CR, P)

    # Local state of each chunk (as if it started from zero) and how the entering state decays across it.
    w_end = (cs[..., -1:] - cs).exp() * scale_c * to_end  # (B, nc, H, C)
    if R > 1:
        w_end = w_end.repeat_interleave(R, dim=-1)
    local = xc.transpose(-1, -2) @ (kc * w_end[..., None])  # (B, nc, H, P, N)
    through = cs[..., -1].exp() * from_start[..., -1]  # (B, nc, H); 0 when a document starts inside the chunk

    g = torch.zeros(Bsz, H, P, N, dtype=cdt, device=v.device)
    if initial_state is not None:
        # G_{-1} = H_{-1} + beta'_0 x_{-1} k_{-1}^T: the previous token's trapezoid half not yet in H.
        x_prev = expand_rank(initial_state.v.to(cdt), v_rank, R)  # (B, R, H, P)
        prev = torch.einsum("brhp,brhn->bhpn", x_prev, initial_state.k.to(cdt))
        g = initial_state.ssm.to(cdt) + beta_next[:, 0, :, None, None] * prev
    entering = []
    # Sequential over chunks only. unbind (not indexing) keeps the backward linear in nc.
    for through_c, local_c in zip(through.unbind(1), local.unbind(1)):
        entering.append(g)
        g = through_c[..., None, None] * g + local_c
    g_in = torch.stack(entering, dim=1)  # (B, nc, H, P, N)

    w_in = cs.exp() * from_start  # (B, nc, H, C)
    if R > 1:
        w_in = w_in.repeat_interleave(R, dim=-1)
    y = y + (qc @ g_in.transpose(-1, -2)) * w_in[..., None]
    if D is not None:
        y = y + D.to(cdt)[:, None, None] * xc

    y = y.reshape(Bsz, nc, H, C, R, P).permute(0, 1, 3, 4, 2, 5).reshape(Bsz, nc * C, R, H, P)[:, :T]
    return y, Mamba3State(theta[:, T - 1], g, kh[:, T - 1], v[:, T - 1])


def _cumulative_angles(dtheta, initial_state, seq, seq_prev, chunked, shape, cdt, device) -> torch.Tensor:
    """theta_t = theta_{-1} + sum_{s <= t} dtheta_s (restarting at document starts), reduced mod 2pi per chunk."""
    Bsz, T, H = shape
    if dtheta is None:
        return torch.zeros(Bsz, T, H, 0, dtype=cdt, device=device)
    S = dtheta.shape[-1]
    d = chunked(dtheta.to(cdt))  # (B, nc, C, H, S)
    phi = d.cumsum(2)
    if seq is None:
        carried = None
    else:
        # Subtract the cumulative sum up to the last document start at or before j (position 0 if none).
        C = seq.shape[-1]
        starts = torch.cat([seq_prev[..., None], seq[..., :-1]], dim=-1) != seq  # (B, nc, C)
        pos = torch.arange(C, device=seq.device).expand_as(starts)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=-1).values  # (B, nc, C)
        base = (phi - d).gather(2, first[..., None, None].expand(-1, -1, -1, H, S))
        phi = phi - base
        carried = (seq == seq_prev[..., None]).to(cdt)[..., None, None]  # (B, nc, C, 1, 1)
    carry = torch.zeros(Bsz, H, S, dtype=cdt, device=device)
    if initial_state is not None:
        carry = initial_state.angle.to(cdt)
    out = []
    carried = [None] * d.shape[1] if carried is None else carried.unbind(1)
    for phi_c, carried_c in zip(phi.unbind(1), carried):
        add = carry[:, None] if carried_c is None else carry[:, None] * carried_c
        theta = torch.remainder(add + phi_c, TWO_PI)  # (B, C, H, S)
        out.append(theta)
        carry = theta[:, -1]  # padding adds no angle, so the last row is the last real token's angle
    return torch.cat(out, dim=1)[:, :T]
