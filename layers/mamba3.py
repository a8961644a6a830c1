"""Mamba-3 mixer (SISO and MIMO): data-dependent rotation, exponential-trapezoidal discretisation, BCNorm.

Per token, ``in_proj`` yields (in this order) z, x (H, P), B, C (R, G, N), u_dt, u_A, u_lam (H) and
u_theta (S, shared by all heads). Then

    dt = softplus(u_dt + dt_bias)       A = min(-phi(u_A), -A_floor)     lam = sigmoid(u_lam)
    k = RMSNorm_N(B) w_B + b_B          q = RMSNorm_N(C) w_C + b_C       (biases per head and rank)
    theta_t = theta_{t-1} + dt_t pi tanh(u_theta)                        (rotates q_t and k_t)
    H_t = e^{A dt} H_{t-1} + (1 - lam) dt e^{A dt} x_{t-1} k_{t-1}^T + lam dt x_t k_t^T
    y_t = H_t q_t + D x_t,     out = out_proj(y_t * silu(z_t))

MIMO (``mimo_rank`` R > 1, or ``is_mimo=True``) gives every token R keys and queries and expands x and z
per rank with learned (H, R, P) scales; the R gated outputs are contracted with a third such scale.
SISO pairs state channels (2i, 2i+1) for the rotation, MIMO pairs (i, i + N/2) (as published; the two
are a fixed channel permutation apart). There is no short convolution. Numbers, equations and inits
follow docs/mamba3-spec.md; the kernels live in ``hybrid.kernels.mamba3``.

Backends: with ``backend`` auto (on CUDA) or triton, the chunked scan runs the Triton kernels, forward and
backward (SISO: ``siso.py``; MIMO: ``mimo.py``, chunk_size * R rows per chunk), and decode steps run a
fused Triton step kernel; packed batches (``seq_idx``) included. Shapes the kernels do not support (d_state a
power of two >= 32, headdim a power of two >= 16, rows per chunk a power of two >= 16) use the PyTorch
reference under auto and raise under triton.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from hybrid.kernels.mamba3 import Mamba3State, mamba3_chunk, mamba3_step
from hybrid.layers.base import Mixer, check_seq_idx, compiled, triton_runnable
from torch import nn

from hybrid.registry import ConfigError, Footprint, register_mixer

# How the SISO layer's elementwise work around the scan runs on CUDA in training and prefill without a cache (an A/B
# switch for diagnostics; docs/perf-notes.md, fourteenth session):
#   mixer    one autograd function from the in_proj output to the gated output (kernels/mamba3/siso_mixer.py), the
#            default: the fastest training step measured (H100), and the only path without the split's concatenation
#   compile  ssm_inputs and the gate through torch.compile, the scan as its own autograd function; also what the
#            mixer falls back to for what it does not cover (MIMO, no BCNorm, the per-head output norm, a cache)
#   triton   as compile, but ssm_inputs through its hand-written Triton pair (kernels/mamba3/triton_ssm_inputs.py)
FUSION = os.environ.get("HYBRID_MAMBA3_FUSION", "mixer")
if FUSION not in ("compile", "triton", "mixer"):
    raise ValueError(f"HYBRID_MAMBA3_FUSION must be one of compile, triton, mixer; got {FUSION!r}")

_CHOICES = {
    "rotation": ("data_dependent", "data_independent", "none"),
    "trapezoid": ("learned", "half", "euler"),
    "a_activation": ("heavy_tail", "softplus"),
    "backend": ("auto", "triton", "torch"),
    "state_dtype": ("float32", "model"),
}


@dataclass
class Mamba3Config:
    d_state: int = 128  # N, state size per head
    expand: float = 2.0  # d_inner = int(expand * d_model)
    headdim: int = 64  # P
    ngroups: int = 1  # G distinct B/C projections shared by H/G heads each
    rope_fraction: float = 0.5  # rotated share of the state: S = N/4 angle pairs at 0.5, N/2 at 1.0
    mimo_rank: int = 1  # R; MIMO is on when R > 1 (the published MIMO setting is R = 4)
    is_mimo: bool | None = None  # None = (mimo_rank > 1); True with R = 1 gives MIMO's pairing and scales
    dt_min: float = 1e-3
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    A_floor: float = 1e-4  # A <= -A_floor keeps every head forgetting
    rotation: Literal["data_dependent", "data_independent", "none"] = "data_dependent"
    rope_base: float = 10000.0  # frequencies of rotation="data_independent" (fixed RoPE, not scaled by dt)
    trapezoid: Literal["learned", "half", "euler"] = "learned"  # lam = sigmoid(u), 1/2, or 1 (Mamba-2's rule)
    bc_bias: bool = True
    bc_bias_init: float = 1.0
    bc_norm: bool = True
    a_activation: Literal["heavy_tail", "softplus"] = "heavy_tail"  # softplus = the first public release
    outproj_norm: bool = False  # per-head RMSNorm of y before the gate
    norm_eps: float = 1e-5
    chunk_size: int | None = None  # power of two; None = 64 // R rounded down to a power of two
    # auto = Triton kernels on CUDA where they apply (supported shapes), else the PyTorch reference
    backend: Literal["auto", "triton", "torch"] = "auto"
    # On CUDA, run the elementwise work before the scan (B/C norms, dt, decay, trapezoid gate, angle rate) and
    # after it (norm, gate) through torch.compile: a few fused kernels instead of ~60 small launches per layer.
    # Its GPU equivalence test passes on an H100; it saves 3-7 ms of a 125M model's 200 ms training step.
    fused_elementwise: bool = True
    # Storage of the SSM state in the decode cache: float32, or the model dtype (bf16 in a bf16 model: half the
    # memory and the traffic of a decode step, as the official inference caches; every step then rounds the state).
    state_dtype: Literal["float32", "model"] = "float32"
    # Decode steps (on CUDA) as one Triton kernel between in_proj and out_proj (``triton_mixer_step.py``).
    # Its GPU tests pass on an H100; d_model 1024 at batch 1 steps in 21 us instead of 27 (docs/perf-notes.md).
    fused_decode_step: bool = True

    def __post_init__(self):
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"mamba3 {name} must be one of {', '.join(map(repr, choices))}, got {getattr(self, name)!r}")
        if self.rope_fraction not in (0.5, 1.0):
            raise ConfigError(f"mamba3 rope_fraction must be 0.5 or 1.0, got {self.rope_fraction}")
        if self.d_state < 1:
            raise ConfigError(f"mamba3 d_state must be >= 1, got {self.d_state}")
        if self.rotation != "none" and (self.d_state % 2 or self.num_angles < 1):
            raise ConfigError(f"mamba3 d_state must be even and give at least one rotation pair "
                              f"(d_state * rope_fraction >= 2), got d_state={self.d_state}, rope_fraction={self.rope_fraction}")
        if self.mimo_rank < 1:
            raise ConfigError(f"mamba3 mimo_rank must be >= 1, got {self.mimo_rank}")
        if self.is_mimo is False and self.mimo_rank > 1:
            raise ConfigError(f"mamba3 is_mimo=false contradicts mimo_rank={self.mimo_rank}; set mimo_rank=1 or is_mimo=true")
        if self.chunk_size is not None and (self.chunk_size < 1 or self.chunk_size & (self.chunk_size - 1)):
            raise ConfigError(f"mamba3 chunk_size must be a power of two (or null for 64 // mimo_rank), got {self.chunk_size}")
        if self.expand <= 0 or self.headdim < 1 or self.ngroups < 1:
            raise ConfigError(f"mamba3 expand, headdim and ngroups must be positive, got "
                              f"{self.expand}, {self.headdim}, {self.ngroups}")
        if not 0 < self.dt_min <= self.dt_max or self.dt_init_floor < 0:
            raise ConfigError(f"mamba3 needs 0 < dt_min <= dt_max and dt_init_floor >= 0, got "
                              f"{self.dt_min}, {self.dt_max}, {self.dt_init_floor}")
        if self.A_floor <= 0 or self.norm_eps <= 0:
            raise ConfigError(f"mamba3 A_floor and norm_eps must be > 0, got {self.A_floor}, {self.norm_eps}")

    @property
    def mimo(self) -> bool:
        return self.mimo_rank > 1 if self.is_mimo is None else self.is_mimo

    @property
    def num_angles(self) -> int:
        """S, the number of rotated channel pairs (0 without rotation)."""
        if self.rotation == "none":
            return 0
        return (int(self.d_state * self.rope_fraction) // 2 * 2) // 2

    @property
    def resolved_chunk_size(self) -> int:
        if self.chunk_size is not None:
            return self.chunk_size
        return 1 << max(0, (64 // self.mimo_rank).bit_length() - 1)

    def d_inner(self, d_model: int) -> int:
        return int(self.expand * d_model)


@dataclass
class Mamba3Cache:
    angle: torch.Tensor  # (B, H, S) float32 cumulative angle of the last token
    ssm: torch.Tensor  # (B, H, P, N) state: float32, or the model dtype with state_dtype="model"
    k: torch.Tensor  # (B, R, H, N) last token's biased, rotated key (model dtype)
    v: torch.Tensor  # (B, H, P) last token's raw x (model dtype)
    # (B, H) int32, zero between steps: lets several programs of the fused decode step share a head
    # (``triton_mixer_step.py``). Scratch, not state: cache walkers skip it.
    readers: torch.Tensor | None = field(default=None, metadata={"scratch": True})

    def state(self) -> Mamba3State:
        return Mamba3State(self.angle, self.ssm, self.k, self.v)

    def update(self, state: Mamba3State) -> None:
        for dst, src in zip((self.angle, self.ssm, self.k, self.v), state):
            dst.copy_(src)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, computed in at least float32, returned in x's dtype."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        xf = xf * weight.to(xf.dtype)
    return xf.to(x.dtype)


def heavy_tail(u: torch.Tensor) -> torch.Tensor:
    """phi(u) = 1 + u for u >= 0, 1 / (1 - u) below: positive, C^1, and only polynomially small for u << 0."""
    return torch.where(u >= 0, 1 + u, 1 / (1 - u.clamp(max=0)))


def ssm_inputs(Bm: torch.Tensor, Cm: torch.Tensor, u_dt: torch.Tensor, u_A: torch.Tensor, u_lam: torch.Tensor,
               u_th: torch.Tensor, dt_bias: torch.Tensor, B_norm_weight: torch.Tensor | None,
               C_norm_weight: torch.Tensor | None, eps: float, a_activation: str, A_floor: float, trapezoid: str,
               rotation: str, cdt: torch.dtype):
    """Everything between ``in_proj`` and the scan, elementwise and written as one function so that torch.compile
    can fuse it (forward and backward) on the GPU.

    Returns B and C after BCNorm (R, G, N last axes), dt, log_decay, lam (B, T, H) in ``cdt``, and the angle
    rate omega = pi tanh(u_theta) (B, T, S) for data-dependent rotation, else None.
    """
    if B_norm_weight is not None:  # in the model dtype, as published
        Bm = _rms_norm(Bm, B_norm_weight, eps)
        Cm = _rms_norm(Cm, C_norm_weight, eps)
    dt = F.softplus(u_dt.to(cdt) + dt_bias.to(cdt))
    u_A = u_A.to(cdt)
    A = -(heavy_tail(u_A) if a_activation == "heavy_tail" else F.softplus(u_A))
    log_decay = A.clamp(max=-A_floor) * dt
    if trapezoid == "learned":
        lam = torch.sigmoid(u_lam.to(cdt))
    else:
        lam = torch.full_like(dt, 0.5 if trapezoid == "half" else 1.0)
    omega = math.pi * torch.tanh(u_th.to(cdt)) if rotation == "data_dependent" else None
    return Bm, Cm, dt, log_decay, lam, omega


def gate_output(y: torch.Tensor, z: torch.Tensor, out_norm_weight: torch.Tensor | None, eps: float,
                mimo_z: torch.Tensor | None, mimo_o: torch.Tensor | None) -> torch.Tensor:
    """(B, T, R, H, P) SSM output and (B, T, H, P) gate -> (B, T, H, P): [per-head norm], SiLU gate, MIMO contraction."""
    if out_norm_weight is not None:
        y = _rms_norm(y, out_norm_weight.view(y.shape[-2], y.shape[-1]), eps)
    z = z.to(y.dtype).unsqueeze(2)  # (B, T, 1, H, P)
    if mimo_z is None:
        return (y * F.silu(z)).squeeze(2)
    o = y * F.silu(z * mimo_z.transpose(0, 1).to(y.dtype))  # (B, T, R, H, P)
    return (o * mimo_o.transpose(0, 1).to(y.dtype)).sum(2)


@register_mixer("mamba3", Mamba3Config)
class Mamba3(Mixer):
    """Mamba-3 SSM (SISO / MIMO) with data-dependent rotation and trapezoidal discretisation."""

    graph_decode = True  # the step updates its cache tensors in place
    float32_buffers = ("rope_freq",)

    def __init__(self, d_model: int, cfg: Mamba3Config, layer_idx: int = 0):
        super().__init__(d_model, cfg, layer_idx)
        self.validate(d_model, cfg)
        self.d_inner = d_in = cfg.d_inner(d_model)
        self.P, self.N, self.G, self.R = cfg.headdim, cfg.d_state, cfg.ngroups, cfg.mimo_rank
        self.H = H = d_in // cfg.headdim
        self.S = cfg.num_angles
        self.pairing = "half" if cfg.mimo else "interleaved"
        # Split order z, x, B, C, dt, A, trapezoid, angles; ablations drop the slices they do not read.
        bc = self.N * self.G * self.R
        self.split = [d_in, d_in, bc, bc, H, H, H if cfg.trapezoid == "learned" else 0,
                      self.S if cfg.rotation == "data_dependent" else 0]
        self.in_proj = nn.Linear(d_model, sum(self.split), bias=False)
        self.out_proj = nn.Linear(d_in, d_model, bias=False)
        self.out_proj._is_residual_out = True

        self.dt_bias = nn.Parameter(torch.empty(H))
        self.D = nn.Parameter(torch.empty(H))
        self.dt_bias._no_weight_decay = True
        self.D._no_weight_decay = True
        if cfg.bc_norm:  # one (N,) gain each for B and C, shared across ranks and groups
            self.B_norm_weight = nn.Parameter(torch.empty(self.N))
            self.C_norm_weight = nn.Parameter(torch.empty(self.N))
        if cfg.bc_bias:
            self.B_bias = nn.Parameter(torch.empty(H, self.R, self.N))
            self.C_bias = nn.Parameter(torch.empty(H, self.R, self.N))
        if cfg.mimo:
            self.mimo_x = nn.Parameter(torch.empty(H, self.R, self.P))
            self.mimo_z = nn.Parameter(torch.empty(H, self.R, self.P))
            self.mimo_o = nn.Parameter(torch.empty(H, self.R, self.P))
        if cfg.outproj_norm:
            self.out_norm_weight = nn.Parameter(torch.empty(d_in))
        if cfg.rotation == "data_independent":
            freq = cfg.rope_base ** (-torch.arange(self.S, dtype=torch.float32) / self.S)  # (S,)
            self.register_buffer("rope_freq", freq, persistent=False)
        self.reset_parameters_special()

    @classmethod
    def validate(cls, d_model: int, cfg: Mamba3Config) -> None:
        d_in = cfg.d_inner(d_model)
        if d_in < 1 or d_in % cfg.headdim:
            raise ConfigError(f"mamba3 headdim ({cfg.headdim}) must divide the inner width expand * d_model = "
                              f"{cfg.expand} * {d_model} = {d_in}")
        heads = d_in // cfg.headdim
        if heads % cfg.ngroups:
            raise ConfigError(f"mamba3 ngroups ({cfg.ngroups}) must divide the number of heads ({heads} = {d_in} / {cfg.headdim})")

    @classmethod
    def footprint(cls, d_model: int, cfg: Mamba3Config, dtype_bytes: int = 2) -> Footprint:
        H, P, N = cfg.d_inner(d_model) // cfg.headdim, cfg.headdim, cfg.d_state
        wide = max(4, dtype_bytes)  # angles are float32 (or the model dtype if wider); the SSM state too by default
        ssm = wide if cfg.state_dtype == "float32" else dtype_bytes
        state = wide * H * cfg.num_angles + ssm * H * P * N + dtype_bytes * cfg.mimo_rank * H * N + dtype_bytes * H * P
        return Footprint(state_bytes=state)

    def allocate_cache(self, batch_size: int, max_seqlen: int, device=None, dtype=None) -> Mamba3Cache:
        device = device or self.out_proj.weight.device
        dtype = dtype or self.out_proj.weight.dtype
        wide = torch.promote_types(dtype, torch.float32)
        ssm = wide if self.cfg.state_dtype == "float32" else dtype
        return Mamba3Cache(torch.zeros(batch_size, self.H, self.S, device=device, dtype=wide),
                           torch.zeros(batch_size, self.H, self.P, self.N, device=device, dtype=ssm),
                           torch.zeros(batch_size, self.R, self.H, self.N, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.H, self.P, device=device, dtype=dtype),
                           torch.zeros(batch_size, self.H, device=device, dtype=torch.int32))

    @torch.no_grad()
    def reset_parameters_special(self) -> None:
        cfg = self.cfg
        # dt_bias = softplus^{-1}(dt0) with dt0 log-uniform in [dt_min, dt_max], so initial steps span time scales.
        lo, hi = math.log(cfg.dt_min), math.log(cfg.dt_max)
        dt0 = torch.exp(torch.rand(self.H, device=self.dt_bias.device) * (hi - lo) + lo).clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt0 + torch.log(-torch.expm1(-dt0)))
        self.D.fill_(1.0)
        if cfg.bc_norm:
            self.B_norm_weight.fill_(1.0)
            self.C_norm_weight.fill_(1.0)
        if cfg.bc_bias:
            self.B_bias.fill_(cfg.bc_bias_init)
            self.C_bias.fill_(cfg.bc_bias_init)
        if cfg.mimo:  # at init the output is the mean of the R gated per-rank outputs
            self.mimo_x.fill_(1.0 / self.R)
            self.mimo_z.fill_(1.0)
            self.mimo_o.fill_(1.0 / self.R)
        if cfg.outproj_norm:
            self.out_norm_weight.fill_(1.0)

    def forward(self, x: torch.Tensor, cache: Mamba3Cache | None = None,
                seq_idx: torch.Tensor | None = None) -> torch.Tensor:
        check_seq_idx(seq_idx, x, cache)
        cfg = self.cfg
        Bsz, T, _ = x.shape
        H, P, N, G, R = self.H, self.P, self.N, self.G, self.R
        cdt = torch.promote_types(x.dtype, torch.float32)
        proj = self.in_proj(x)  # (B, T, D_proj)
        if cache is not None and T == 1 and self._use_fused_step(x, seq_idx):
            return self.out_proj(self._fused_step(proj[:, 0], cache).view(Bsz, 1, self.d_inner).to(x.dtype))
        if cache is None and self._use_mixer_function(proj, seq_idx, cdt):
            return self.out_proj(self._mixer_function(proj, seq_idx).to(self._out_dtype(x)))
        z, xs, Bm, Cm, u_dt, u_A, u_lam, u_th = proj.split(self.split, dim=-1)
        z, xs = z.view(Bsz, T, H, P), xs.view(Bsz, T, H, P)
        Bm, Cm = Bm.view(Bsz, T, R, G, N), Cm.view(Bsz, T, R, G, N)  # rank-major, then group, then state
        fused = cfg.fused_elementwise and x.is_cuda and T > 1  # decode steps stay eager (graph-captured)
        Bw, Cw = getattr(self, "B_norm_weight", None), getattr(self, "C_norm_weight", None)
        prepare = self._ssm_inputs_fn(fused, Bm, Cm, u_dt, u_A, u_lam, u_th, Bw, cdt)
        Bm, Cm, dt, log_decay, lam, omega = prepare(
            Bm, Cm, u_dt, u_A, u_lam, u_th, self.dt_bias, Bw, Cw, cfg.norm_eps, cfg.a_activation, cfg.A_floor,
            cfg.trapezoid, cfg.rotation, cdt)

        if cache is not None and T == 1 and self._use_triton_mimo_step(x):
            y = self._triton_mimo_step(Cm, Bm, xs, log_decay, dt, lam, omega, cache)  # (B, 1, R, H, P)
            return self._output(y, z, fused, x)
        if self._use_triton(x, seq_idx):
            scan = self._triton_mimo_scan if cfg.mimo else self._triton_scan
            y = scan(Cm, Bm, xs, log_decay, dt, lam, omega, cache, seq_idx)  # (B, T, R, H, P)
            return self._output(y, z, fused, x)
        dtheta = None  # (B, T, H, S) angle increments, for the PyTorch reference
        if cfg.rotation == "data_dependent":
            dtheta = dt[..., None] * omega[:, :, None, :]
        elif cfg.rotation == "data_independent":
            dtheta = self.rope_freq.to(cdt).expand(Bsz, T, H, self.S)
        params = dict(q_bias=getattr(self, "C_bias", None), k_bias=getattr(self, "B_bias", None), D=self.D,
                      v_rank=getattr(self, "mimo_x", None), pairing=self.pairing)
        if cache is not None and T == 1:
            y, state = mamba3_step(Cm[:, 0], Bm[:, 0], xs[:, 0], log_decay[:, 0], dt[:, 0], lam[:, 0], cache.state(),
                                   None if dtheta is None else dtheta[:, 0], **params)
            y = y.unsqueeze(1)  # (B, 1, R, H, P)
        else:
            y, state = mamba3_chunk(Cm, Bm, xs, log_decay, dt, lam, dtheta, **params,
                                    initial_state=None if cache is None else cache.state(), seq_idx=seq_idx,
                                    chunk_size=cfg.resolved_chunk_size)  # (B, T, R, H, P)
        if cache is not None:
            cache.update(state)
        return self._output(y, z, fused, x)

    @staticmethod
    def _ssm_inputs_fn(fused: bool, Bm, Cm, u_dt, u_A, u_lam, u_th, B_norm_weight, cdt):
        """``ssm_inputs`` eager, through torch.compile (``fused``), or with ``HYBRID_MAMBA3_FUSION=triton`` through its
        hand-written Triton pair where that applies."""
        if not fused:
            return ssm_inputs
        if FUSION == "triton":
            from hybrid.kernels.mamba3.triton_ssm_inputs import ssm_inputs_triton, unsupported_reason

            if unsupported_reason(Bm, Cm, u_dt, u_A, u_lam, u_th, B_norm_weight, cdt) is None:
                return ssm_inputs_triton
        return compiled(ssm_inputs)

    def _output(self, y: torch.Tensor, z: torch.Tensor, fused: bool, x: torch.Tensor) -> torch.Tensor:
        """(B, T, R, H, P) SSM output, gated and projected to (B, T, d_model).

        The gated output goes to out_proj in the dtype out_proj computes in. Under autocast x is float32 (the norm
        before the block runs in fp32), so a cast to x's dtype would widen the 16-bit (B, T, d_inner) tensor only
        for autocast to narrow it again: two extra passes forward and two backward."""
        Bsz, T = y.shape[:2]
        return self.out_proj(self._gate(y, z, fused).reshape(Bsz, T, self.d_inner).to(self._out_dtype(x)))

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype out_proj computes in: autocast's when it is on, else its weight's."""
        dev = x.device.type
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.out_proj.weight.dtype

    def _use_mixer_function(self, proj: torch.Tensor, seq_idx: torch.Tensor | None, cdt: torch.dtype) -> bool:
        """Whether a training / prefill call without a cache goes through ``siso_mixer.py`` (``FUSION``, default)."""
        cfg = self.cfg
        if FUSION != "mixer" or not (cfg.fused_elementwise and proj.is_cuda and proj.shape[1] > 1) or cdt != torch.float32:
            return False
        from hybrid.kernels.mamba3.siso_mixer import unsupported_reason

        if unsupported_reason(proj, cfg.mimo, cfg.bc_norm, cfg.outproj_norm) is not None:
            return False
        return self._use_triton(proj, seq_idx)

    def _mixer_function(self, proj: torch.Tensor, seq_idx: torch.Tensor | None) -> torch.Tensor:
        """(B, T, D_proj) in_proj output -> (B, T, d_inner) gated output through one autograd function."""
        from hybrid.kernels.mamba3.siso_mixer import mamba3_siso_mixer

        cfg = self.cfg
        return mamba3_siso_mixer(
            proj, self.split, self.dt_bias, self.B_norm_weight, self.C_norm_weight,
            self.C_bias.squeeze(1) if cfg.bc_bias else None, self.B_bias.squeeze(1) if cfg.bc_bias else None, self.D,
            getattr(self, "rope_freq", None), heads=self.H, headdim=self.P, groups=self.G, d_state=self.N,
            eps=cfg.norm_eps, a_activation=cfg.a_activation, A_floor=cfg.A_floor, trapezoid=cfg.trapezoid,
            rotation=cfg.rotation, chunk_size=cfg.resolved_chunk_size, seq_idx=seq_idx)

    def _use_triton(self, x: torch.Tensor, seq_idx: torch.Tensor | None) -> bool:
        """Whether the chunked scan (training, prefill; SISO also its decode step) runs the Triton kernels."""
        backend = self.cfg.backend
        if backend == "torch":
            return False
        usable = triton_runnable(x, backend)  # "auto" never picks the CPU interpreter
        if backend == "triton" and not usable:
            raise RuntimeError("mamba3 backend 'triton' needs triton and a CUDA device; "
                               "use backend 'auto' to fall back to the PyTorch reference")
        if usable:
            from hybrid.kernels.mamba3.triton_siso import unsupported_reason

            # MIMO chunks hold chunk_size * R rows (time-major), the tile side the kernels need to be a power of two.
            rows = self.cfg.resolved_chunk_size * (self.R if self.cfg.mimo else 1)
            reason = unsupported_reason(self.N, self.P, rows)
            if reason is not None and self.cfg.mimo and reason.startswith("chunk_size"):
                reason = (f"MIMO rows per chunk (chunk_size {self.cfg.resolved_chunk_size} x mimo_rank {self.R} = {rows}) "
                          "must be a power of two >= 16")
            if reason is not None and backend == "triton":
                raise RuntimeError(f"mamba3 backend 'triton': {reason}; use backend 'auto' or 'torch'")
            usable = reason is None
        return usable

    def _use_fused_step(self, x: torch.Tensor, seq_idx: torch.Tensor | None) -> bool:
        """Whether a SISO decode step runs as one kernel from the in_proj row to the gated output
        (``triton_mixer_step.py``); else the step goes through ``ssm_inputs`` and the step kernel."""
        cfg = self.cfg
        if not cfg.fused_decode_step or not self._use_triton(x, seq_idx):
            return False
        from hybrid.kernels.mamba3.triton_mixer_step import unsupported_reason

        return unsupported_reason(self.N, self.P, self.R, cfg.outproj_norm) is None

    def _fused_step(self, proj: torch.Tensor, cache: Mamba3Cache) -> torch.Tensor:
        """(B, D_proj) in_proj row -> (B, H * P) gated output, the cache updated in place."""
        from hybrid.kernels.mamba3.triton_mixer_step import mamba3_mixer_step_

        cfg = self.cfg
        return mamba3_mixer_step_(
            proj, cache.state(), d_inner=self.d_inner, heads=self.H, groups=self.G, d_state=self.N, headdim=self.P,
            n_angles=self.S, dt_bias=self.dt_bias, D=self.D, B_norm_weight=getattr(self, "B_norm_weight", None),
            C_norm_weight=getattr(self, "C_norm_weight", None),
            B_bias=getattr(self, "B_bias", None), C_bias=getattr(self, "C_bias", None),
            rope_freq=getattr(self, "rope_freq", None), eps=cfg.norm_eps, A_floor=cfg.A_floor,
            a_activation=cfg.a_activation, trapezoid=cfg.trapezoid, rotation=cfg.rotation, rank=self.R,
            mimo_x=getattr(self, "mimo_x", None), mimo_z=getattr(self, "mimo_z", None),
            mimo_o=getattr(self, "mimo_o", None), pairing=self.pairing, readers=cache.readers)

    def _use_triton_mimo_step(self, x: torch.Tensor) -> bool:
        """Whether MIMO decode steps run the fused Triton step kernel (the chunked scan: ``_use_triton``)."""
        backend = self.cfg.backend
        if backend == "torch" or not self.cfg.mimo:
            return False
        if not triton_runnable(x, backend):
            return False
        from hybrid.kernels.mamba3.triton_mimo_step import unsupported_reason

        reason = unsupported_reason(self.R, self.N, self.P)
        if reason is not None and backend == "triton":
            raise RuntimeError(f"mamba3 backend 'triton': {reason}; use backend 'auto' or 'torch'")
        return reason is None

    def _rotation_rate(self, omega: torch.Tensor | None, batch: int, T: int) -> tuple[torch.Tensor | None, bool]:
        """The kernels' angle input: (omega (B, T, S) or None, whether the kernels scale it by dt)."""
        if self.cfg.rotation == "data_independent":
            return self.rope_freq.expand(batch, T, self.S), False
        return omega, True  # data-dependent: pi tanh(u_theta); no rotation: None

    def _triton_mimo_step(self, Cm, Bm, xs, log_decay, dt, lam, omega, cache):
        from hybrid.kernels.mamba3.triton_mimo_step import mamba3_mimo_step_

        omega, angle_dt = self._rotation_rate(omega, xs.shape[0], 1)
        y = mamba3_mimo_step_(Cm[:, 0], Bm[:, 0], xs[:, 0].contiguous(), log_decay[:, 0].contiguous(),
                              dt[:, 0].contiguous(), lam[:, 0].contiguous(), cache.state(),
                              None if omega is None else omega[:, 0].contiguous(), angle_dt,
                              getattr(self, "C_bias", None), getattr(self, "B_bias", None),
                              getattr(self, "mimo_x", None), self.D, self.pairing)
        return y[:, None]  # (B, 1, R, H, P)

    def _triton_mimo_scan(self, Cm, Bm, xs, log_decay, dt, lam, omega, cache, seq_idx=None):
        """MIMO chunked scan (training, prefill) through the Triton kernels, "half" pairing; reads and
        updates the cache when given (decode steps go through ``_triton_mimo_step`` or the reference)."""
        from hybrid.kernels.mamba3.mimo import mamba3_mimo_chunk

        omega, angle_dt = self._rotation_rate(omega, xs.shape[0], xs.shape[1])
        y, state = mamba3_mimo_chunk(Cm, Bm, xs, log_decay, dt, lam, omega, angle_dt, getattr(self, "C_bias", None),
                                     getattr(self, "B_bias", None), self.D, self.mimo_x,
                                     initial_state=None if cache is None else cache.state(),
                                     chunk_size=self.cfg.resolved_chunk_size, seq_idx=seq_idx)
        if cache is not None:
            cache.update(state)
        return y  # (B, T, R, H, P)

    def _triton_scan(self, Cm, Bm, xs, log_decay, dt, lam, omega, cache, seq_idx=None):
        """SISO scan through the Triton kernels: chunked forward (prefill/training) or fused decode step."""
        from hybrid.kernels.mamba3.siso import mamba3_siso_chunk
        from hybrid.kernels.mamba3.triton_siso import mamba3_siso_step_

        cfg, T = self.cfg, xs.shape[1]
        omega, angle_dt = self._rotation_rate(omega, xs.shape[0], T)
        # squeeze, not [:, :, 0] (R = 1 here): its backward is a view, where select's writes zeros and copies.
        q_bias = self.C_bias.squeeze(1) if cfg.bc_bias else None  # (H, N)
        k_bias = self.B_bias.squeeze(1) if cfg.bc_bias else None
        q, k = Cm.squeeze(2), Bm.squeeze(2)  # (B, T, G, N)
        if cache is not None and T == 1:
            y = mamba3_siso_step_(q[:, 0].contiguous(), k[:, 0].contiguous(), xs[:, 0].contiguous(),
                                  log_decay[:, 0].contiguous(), dt[:, 0].contiguous(), lam[:, 0].contiguous(), cache.state(),
                                  None if omega is None else omega[:, 0].contiguous(),
                                  angle_dt, q_bias, k_bias, self.D)
            return y[:, None, None]  # (B, 1, 1, H, P)
        y, state = mamba3_siso_chunk(q, k, xs, log_decay, dt, lam, omega, angle_dt, q_bias, k_bias, self.D,
                                     initial_state=None if cache is None else cache.state(),
                                     chunk_size=cfg.resolved_chunk_size, seq_idx=seq_idx, need_state=cache is not None)
        if cache is not None:
            cache.update(state)
        return y[:, :, None]  # (B, T, 1, H, P)

    def _gate(self, y: torch.Tensor, z: torch.Tensor, fused: bool) -> torch.Tensor:
        """(B, T, R, H, P) SSM output and (B, T, H, P) gate -> (B, T, H, P) (``gate_output``)."""
        return (compiled(gate_output) if fused else gate_output)(
            y, z, getattr(self, "out_norm_weight", None), self.cfg.norm_eps, getattr(self, "mimo_z", None),
            getattr(self, "mimo_o", None))
