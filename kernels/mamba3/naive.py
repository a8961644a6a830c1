"""Mamba-3 recurrence, one token at a time: the oracle every other Mamba-3 kernel is tested against.

It implements the exponential-trapezoidal update literally (no carried-state rewriting):

    theta_t = theta_{t-1} + dtheta_t                                   (mod 2pi)
    k_t, q_t = rot(k + k_bias, theta_t), rot(q + q_bias, theta_t)       per rank r
    H_t = alpha_t H_{t-1} + beta_t sum_r x_{t-1,r} k_{t-1,r}^T + gamma_t sum_r x_{t,r} k_{t,r}^T
    y_{t,r} = H_t q_{t,r} + D x_{t,r}

with alpha = exp(a), beta = (1 - lam) dt alpha, gamma = lam dt. Shapes and conventions: ``common.py``.
"""

from __future__ import annotations

import torch
from hybrid.kernels.mamba3.common import (
    TWO_PI,
    Mamba3State,
    check_inputs,
    compute_dtype,
    expand_rank,
    rotate,
    to_heads,
    zero_state,
)


def mamba3_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, dt: torch.Tensor,
                lam: torch.Tensor, state: Mamba3State, dtheta: torch.Tensor | None = None,
                q_bias: torch.Tensor | None = None, k_bias: torch.Tensor | None = None, D: torch.Tensor | None = None,
                v_rank: torch.Tensor | None = None, pairing: str = "interleaved",
                ) -> tuple[torch.Tensor, Mamba3State]:
    """One token. q, k (B, R, G, N); v (B, H, P); log_decay, dt, lam (B, H); dtheta (B, H, S) or None.

    Returns y (B, R, H, P) and the new state; ``state`` is not modified.
    """
    R, H = q.shape[1], v.shape[1]
    cdt = compute_dtype(v)
    a, dt, lam = log_decay.to(cdt), dt.to(cdt), lam.to(cdt)  # (B, H)
    theta = state.angle.to(cdt)
    if dtheta is not None:
        theta = torch.remainder(theta + dtheta.to(cdt), TWO_PI)  # (B, H, S)
    cos, sin = theta.cos().unsqueeze(1), theta.sin().unsqueeze(1)  # (B, 1, H, S), shared by ranks
    pairs = dict(cos=cos, sin=sin, pairing=pairing)
    qr = rotate(to_heads(q.to(cdt), q_bias, H), **pairs)  # (B, R, H, N)
    kr = rotate(to_heads(k.to(cdt), k_bias, H), **pairs)
    x = expand_rank(v.to(cdt), v_rank, R)  # (B, R, H, P)
    x_prev = expand_rank(state.v.to(cdt), v_rank, R)

    alpha = a.exp()
    beta = (1 - lam) * dt * alpha
    gamma = lam * dt
    prev = torch.einsum("brhp,brhn->bhpn", x_prev, state.k.to(cdt))  # (B, H, P, N), rank-summed outer products
    new = torch.einsum("brhp,brhn->bhpn", x, kr)
    ssm = alpha[..., None, None] * state.ssm.to(cdt) + beta[..., None, None] * prev + gamma[..., None, None] * new
    y = torch.einsum("bhpn,brhn->brhp", ssm, qr)  # (B, R, H, P)
    if D is not None:
        y = y + D.to(cdt)[:, None] * x
    return y, Mamba3State(theta, ssm, kr, v)


def mamba3_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, dt: torch.Tensor,
                     lam: torch.Tensor, dtheta: torch.Tensor | None = None, q_bias: torch.Tensor | None = None,
                     k_bias: torch.Tensor | None = None, D: torch.Tensor | None = None,
                     v_rank: torch.Tensor | None = None, initial_state: Mamba3State | None = None,
                     seq_idx: torch.Tensor | None = None, pairing: str = "interleaved",
                     ) -> tuple[torch.Tensor, Mamba3State]:
    """Loop ``mamba3_step`` over T tokens. Returns y (B, T, R, H, P) and the final state.

    ``seq_idx`` (B, T): where the id changes the state is zeroed first, so documents never interact;
    ``initial_state`` belongs to the first document of each row.
    """
    check_inputs(q, k, v, log_decay, dt, lam, dtheta, q_bias, k_bias, D, v_rank, initial_state, seq_idx, pairing)
    Bsz, T, R, _, N = q.shape
    H, P = v.shape[2:]
    S = 0 if dtheta is None else dtheta.shape[-1]
    state = initial_state
    if state is None:
        state = zero_state(Bsz, H, P, N, S, R, device=v.device, dtype=compute_dtype(v))
    ys = []
    for t in range(T):
        if seq_idx is not None and t > 0:
            keep = (seq_idx[:, t] == seq_idx[:, t - 1]).to(compute_dtype(v))  # (B,)
            state = Mamba3State(*(s * keep.view(-1, *([1] * (s.ndim - 1))).to(s.dtype) for s in state))
        y, state = mamba3_step(q[:, t], k[:, t], v[:, t], log_decay[:, t], dt[:, t], lam[:, t], state,
                               None if dtheta is None else dtheta[:, t], q_bias, k_bias, D, v_rank, pairing)
        ys.append(y)
    return torch.stack(ys, dim=1), state
