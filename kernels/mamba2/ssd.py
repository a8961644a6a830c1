"""Mamba-2 state-space duality (SSD) in PyTorch: the chunked training form and the recurrent oracle.

Exponential-Euler recurrence per head, with a data-independent A < 0 and state H (P x N):

    H_t = exp(A dt_t) H_{t-1} + dt_t x_t B_t^T,    y_t = H_t C_t + D x_t

Shapes: x (B, T, H, P); dt (B, T, H) after softplus; A (H,); B, C (B, T, G, N) with heads
``[g*H/G, (g+1)*H/G)`` sharing group g; D (H,) or None; state (B, H, P, N). ``seq_idx`` (B, T) zeroes
the state where the document id changes. Computation runs in float32, or float64 for float64 x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    groups = t.shape[-2]
    return t.repeat_interleave(heads // groups, dim=-2) if groups != heads else t


def _check(x, dt, A, B, C, D, state, seq_idx) -> None:
    if x.ndim != 4:
        raise ValueError(f"x must be (B, T, H, P), got {tuple(x.shape)}")
    Bsz, T, H, P = x.shape
    if dt.shape != (Bsz, T, H):
        raise ValueError(f"dt must be (B, T, H) = {(Bsz, T, H)}, got {tuple(dt.shape)}")
    if A.shape != (H,) or (D is not None and D.shape != (H,)):
        raise ValueError(f"A and D must be (H,) = ({H},)")
    if B.ndim != 4 or B.shape != C.shape or B.shape[:2] != (Bsz, T) or H % B.shape[2]:
        raise ValueError(f"B and C must be (B, T, G, N) with G dividing H={H}; got {tuple(B.shape)}, {tuple(C.shape)}")
    if state is not None and state.shape != (Bsz, H, P, B.shape[-1]):
        raise ValueError(f"state must be (B, H, P, N) = {(Bsz, H, P, B.shape[-1])}, got {tuple(state.shape)}")
    if seq_idx is not None and seq_idx.shape != (Bsz, T):
        raise ValueError(f"seq_idx must be (B, T) = {(Bsz, T)}, got {tuple(seq_idx.shape)}")


def ssd_step(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             state: torch.Tensor, D: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token: x (B, H, P), dt (B, H), B/C (B, G, N), state (B, H, P, N). Returns y (B, H, P) and the new state."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    H = x.shape[1]
    x, dt = x.to(cdt), dt.to(cdt)
    Bh, Ch = _heads(B.to(cdt), H), _heads(C.to(cdt), H)  # (B, H, N)
    decay = (A.to(cdt) * dt).exp()  # (B, H)
    state = decay[..., None, None] * state.to(cdt) + (dt[..., None] * x)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", state, Ch)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x
    return y, state


def ssd_recurrent(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                  D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
                  seq_idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Loop ``ssd_step`` over T tokens. Returns y (B, T, H, P) and the final state (B, H, P, N)."""
    _check(x, dt, A, B, C, D, initial_state, seq_idx)
    Bsz, T, H, P = x.shape
    cdt = torch.promote_types(x.dtype, torch.float32)
    state = initial_state
    if state is None:
        state = torch.zeros(Bsz, H, P, B.shape[-1], dtype=cdt, device=x.device)
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            state = state * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
        y, state = ssd_step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state, D)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def ssd_chunk(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
              D: torch.Tensor | None = None, initial_state: torch.Tensor | None = None,
              seq_idx: torch.Tensor | None = None, chunk_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD: masked (C x C) matmuls inside chunks, a state scan across them. Same result as ``ssd_recurrent``.

    Token j of a chunk reads key i <= j with weight exp(cs_j - cs_i) dt_i (cs = cumulative A dt in the
    chunk) and the entering state with exp(cs_j); documents mask both.
    """
    _check(x, dt, A, B, C, D, initial_state, seq_idx)
    Bsz, T, H, P = x.shape
    N = B.shape[-1]
    if T == 0:
        raise ValueError("ssd_chunk needs at least one token")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    cdt = torch.promote_types(x.dtype, torch.float32)
    L = chunk_size
    nc = -(-T // L)
    pad = nc * L - T

    def chunked(t: torch.Tensor) -> torch.Tensor:  # (B, T, ...) -> (B, nc, L, ...); padding has dt = 0
        if pad:
            t = F.pad(t, (0, 0) * (t.ndim - 2) + (0, pad))
        return t.reshape(Bsz, nc, L, *t.shape[2:])

    dt = dt.to(cdt)
    xc = chunked(x.to(cdt)).transpose(2, 3)  # (B, nc, H, L, P)
    Bc = chunked(_heads(B.to(cdt), H)).transpose(2, 3)  # (B, nc, H, L, N)
    Cc = chunked(_heads(C.to(cdt), H)).transpose(2, 3)
    dtc = chunked(dt).transpose(2, 3)  # (B, nc, H, L)
    cs = (dtc * A.to(cdt)[:, None]).cumsum(-1)  # (B, nc, H, L)

    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    if seq_idx is None:
        mask, to_end, from_start = causal, torch.ones_like(cs), torch.ones_like(cs)
    else:
        seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(Bsz, pad)], 1).reshape(Bsz, nc, L)
        seq_prev = torch.cat([seq[:, :1, 0], seq[:, :-1, -1]], dim=1)  # (B, nc) document before each chunk
        mask = causal & (seq[..., :, None] == seq[..., None, :]).unsqueeze(2)  # (B, nc, 1, L, L)
        to_end = (seq == seq[..., -1:]).to(cdt).unsqueeze(2)  # (B, nc, 1, L)
        from_start = (seq == seq_prev[..., None]).to(cdt).unsqueeze(2)
    W = (cs[..., :, None] - cs[..., None, :]).masked_fill(~mask, float("-inf")).exp() * dtc[..., None, :]
    y = ((Cc @ Bc.transpose(-1, -2)) * W) @ xc  # (B, nc, H, L, P)

    w_end = (cs[..., -1:] - cs).exp() * dtc * to_end  # (B, nc, H, L)
    local = xc.transpose(-1, -2) @ (Bc * w_end[..., None])  # (B, nc, H, P, N)
    through = cs[..., -1].exp() * from_start[..., -1]  # (B, nc, H)
    g = torch.zeros(Bsz, H, P, N, dtype=cdt, device=x.device) if initial_state is None else initial_state.to(cdt)
    entering = []
    for through_c, local_c in zip(through.unbind(1), local.unbind(1)):  # unbind keeps the backward linear in nc
        entering.append(g)
        g = through_c[..., None, None] * g + local_c
    g_in = torch.stack(entering, dim=1)  # (B, nc, H, P, N)
    y = y + (Cc @ g_in.transpose(-1, -2)) * (cs.exp() * from_start)[..., None]
    if D is not None:
        y = y + D.to(cdt)[:, None, None] * xc
    return y.transpose(2, 3).reshape(Bsz, nc * L, H, P)[:, :T], g
