"""The Mamba-3 layer's elementwise work between in_proj and the scan, forward and backward, one launch each.

Same math as ``hybrid.layers.mamba3.ssm_inputs`` (the oracle), for BCNorm on and float32 compute:

    B, C  (B, T, R, G, N)  RMSNorm over N with a weight, in float32, returned in the input's dtype
    dt    (B, T, H)        softplus(u_dt + dt_bias)
    log_decay              min(A, -A_floor) * dt,  A = -heavy_tail(u_A) or -softplus(u_A)
    lam                    sigmoid(u_lam) ("learned"), or 1/2 ("half"), or 1 ("euler")
    omega (B, T, S)        pi * tanh(u_theta) (data-dependent rotation), else None

Why a hand-written pair when torch.compile fuses the same function: in a training step the compiled call costs
~170-280 us of host time in each direction (guards, AOTAutograd's runtime wrappers), and a Mamba-3 block's
forward was host-bound (docs/perf-notes.md, thirteenth session); an autograd function over two Triton launches
costs a fraction of that. The inputs are the column slices of the in_proj output as they are (strided views).
The norm weights' and dt_bias's gradients are per-program partial sums, added up after the launch
(deterministic, no atomics).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from hybrid.kernels.launch import direct
from hybrid.kernels.mamba3.common import token_row_stride

_TRAPEZOID = {"learned": 0, "half": 1, "euler": 2}
ROWS_PER_PROGRAM = 8  # 8 token rows at 4 warps: no spills for sm_90 (32 rows spilled 704 bytes in the backward)


# Written with tl.exp / tl.log only (the interpreter that runs the CPU tests has no libdevice); the kernels are
# bandwidth-bound, so the few extra instructions cost nothing.
@triton.jit
def _log1p(y):
    u = 1.0 + y
    exact = u == 1.0
    return tl.where(exact, y, tl.log(u) * (y / tl.where(exact, 1.0, u - 1.0)))  # accurate also where y << 1


@triton.jit
def _softplus(x):
    return tl.where(x > 20.0, x, _log1p(tl.exp(x)))  # F.softplus: beta 1, threshold 20


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, 1.0 / (1.0 + tl.exp(-x)))


@triton.jit
def _norm_fwd(X, W, Y, r, rm, rg, s_row, RG, N, eps, BN: tl.constexpr):
    n = tl.arange(0, BN)
    m = rm[:, None] & (n[None, :] < N)
    x = tl.load(X + r[:, None] * s_row + rg * N + n[None, :], mask=m, other=0.0).to(tl.float32)  # (BT, BN)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
    tl.store(Y + (r[:, None] * RG + rg) * N + n[None, :], (x * rstd[:, None] * w[None, :]).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _norm_bwd(X, W, DY, DX, r, rm, rg, s_row, s_drow, RG, N, eps, BN: tl.constexpr):
    """dx = rstd (g - x rstd^2 mean(g x)), g = dy w; returns this tile's sum over rows of dy x rstd (for dw)."""
    n = tl.arange(0, BN)
    m = rm[:, None] & (n[None, :] < N)
    x = tl.load(X + r[:, None] * s_row + rg * N + n[None, :], mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + (r[:, None] * RG + rg) * N + n[None, :], mask=m, other=0.0).to(tl.float32)
    w = tl.load(W + n, mask=n < N, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
    g = dy * w[None, :]
    gx = tl.sum(g * x, axis=1) / N
    dx = rstd[:, None] * (g - x * (rstd * rstd * gx)[:, None])
    tl.store(DX + r[:, None] * s_drow + rg * N + n[None, :], dx.to(DX.dtype.element_ty), mask=m)
    return tl.sum(dy * x * rstd[:, None], axis=0)


@triton.jit
def _decay_parts(UDT, UA, DTB, off, m2, h, hm, A_floor, HEAVY_TAIL: tl.constexpr):
    """(softplus input s, dt, u_A, A) of a (rows, heads) tile."""
    s = tl.load(UDT + off, mask=m2, other=0.0).to(tl.float32) + tl.load(DTB + h, mask=hm, other=0.0).to(tl.float32)[None, :]
    dt = _softplus(s)
    ua = tl.load(UA + off, mask=m2, other=0.0).to(tl.float32)
    if HEAVY_TAIL:
        A = -tl.where(ua >= 0, 1.0 + ua, 1.0 / (1.0 - tl.minimum(ua, 0.0)))
    else:
        A = -_softplus(ua)
    return s, dt, ua, A


@triton.jit
def _ssm_inputs_fwd(BM, CM, UDT, UA, ULAM, UTH, DTB, BW, CW, BN_OUT, CN_OUT, DT, LD, LAM, OM,
                    rows, s_row, RG, H, S, eps, A_floor,
                    N: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
                    HEAVY_TAIL: tl.constexpr, TRAPEZOID: tl.constexpr, ROT: tl.constexpr):
    """BT token rows: BCNorm of every (rank, group) row of B and C, then dt, log_decay, lam and omega."""
    r = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    rm = r < rows
    for rg in range(RG):
        _norm_fwd(BM, BW, BN_OUT, r, rm, rg, s_row, RG, N, eps, BN)
        _norm_fwd(CM, CW, CN_OUT, r, rm, rg, s_row, RG, N, eps, BN)
    h = tl.arange(0, BH)
    hm = h < H
    m2 = rm[:, None] & hm[None, :]
    off = r[:, None] * s_row + h[None, :]
    out = r[:, None] * H + h[None, :]
    s, dt, ua, A = _decay_parts(UDT, UA, DTB, off, m2, h, hm, A_floor, HEAVY_TAIL)
    tl.store(DT + out, dt, mask=m2)
    tl.store(LD + out, tl.minimum(A, -A_floor) * dt, mask=m2)
    if TRAPEZOID == 0:
        lam = 1.0 / (1.0 + tl.exp(-tl.load(ULAM + off, mask=m2, other=0.0).to(tl.float32)))
    elif TRAPEZOID == 1:
        lam = tl.full((BT, BH), 0.5, tl.float32)
    else:
        lam = tl.full((BT, BH), 1.0, tl.float32)
    tl.store(LAM + out, lam, mask=m2)
    if ROT:
        sc = tl.arange(0, BS)
        ms = rm[:, None] & (sc[None, :] < S)
        u = tl.load(UTH + r[:, None] * s_row + sc[None, :], mask=ms, other=0.0).to(tl.float32)
        tl.store(OM + r[:, None] * S + sc[None, :], 3.141592653589793 * _tanh(u), mask=ms)


@triton.jit
def _ssm_inputs_bwd(BM, CM, UDT, UA, ULAM, UTH, DTB, BW, CW, DBN, DCN, DDT, DLD, DLAM, DOM,
                    DBM, DCM, DUDT, DUA, DULAM, DUTH, PART,
                    rows, s_row, s_drow, RG, H, S, eps, A_floor,
                    N: tl.constexpr, BN: tl.constexpr, BH: tl.constexpr, BS: tl.constexpr, BT: tl.constexpr,
                    HEAVY_TAIL: tl.constexpr, TRAPEZOID: tl.constexpr, ROT: tl.constexpr):
    """The chain rule of ``_ssm_inputs_fwd`` for BT token rows. This program's sums for the parameters' gradients go
    to row program_id of PART: d dt_bias in columns [0, BH), d B_norm_weight in [BH, BH + BN), d C_norm_weight after."""
    pid = tl.program_id(0)
    r = pid.to(tl.int64) * BT + tl.arange(0, BT)
    rm = r < rows
    n = tl.arange(0, BN)
    dbw = tl.zeros((BN,), dtype=tl.float32)
    dcw = tl.zeros((BN,), dtype=tl.float32)
    for rg in range(RG):
        dbw += _norm_bwd(BM, BW, DBN, DBM, r, rm, rg, s_row, s_drow, RG, N, eps, BN)
        dcw += _norm_bwd(CM, CW, DCN, DCM, r, rm, rg, s_row, s_drow, RG, N, eps, BN)
    part = PART + pid.to(tl.int64) * (BH + 2 * BN)
    tl.store(part + BH + n, dbw)
    tl.store(part + BH + BN + n, dcw)
    h = tl.arange(0, BH)
    hm = h < H
    m2 = rm[:, None] & hm[None, :]
    off = r[:, None] * s_row + h[None, :]
    doff = r[:, None] * s_drow + h[None, :]
    out = r[:, None] * H + h[None, :]
    s, dt, ua, A = _decay_parts(UDT, UA, DTB, off, m2, h, hm, A_floor, HEAVY_TAIL)
    dld = tl.load(DLD + out, mask=m2, other=0.0)
    keep = A <= -A_floor  # clamp(max=-A_floor) passes the gradient where A is not above the bound
    a_clamped = tl.minimum(A, -A_floor)
    ds = (tl.load(DDT + out, mask=m2, other=0.0) + dld * a_clamped) * _softplus_grad(s)
    tl.store(DUDT + doff, ds.to(DUDT.dtype.element_ty), mask=m2)
    tl.store(part + h, tl.sum(ds, axis=0))
    dA = tl.where(keep, dld * dt, 0.0)
    if HEAVY_TAIL:
        one_minus = 1.0 - tl.minimum(ua, 0.0)
        dua = -dA * tl.where(ua >= 0, 1.0, 1.0 / (one_minus * one_minus))
    else:
        dua = -dA * _softplus_grad(ua)
    tl.store(DUA + doff, dua.to(DUA.dtype.element_ty), mask=m2)
    if TRAPEZOID == 0:
        lam = 1.0 / (1.0 + tl.exp(-tl.load(ULAM + off, mask=m2, other=0.0).to(tl.float32)))
        dlam = tl.load(DLAM + out, mask=m2, other=0.0) * lam * (1.0 - lam)
        tl.store(DULAM + doff, dlam.to(DULAM.dtype.element_ty), mask=m2)
    if ROT:
        sc = tl.arange(0, BS)
        ms = rm[:, None] & (sc[None, :] < S)
        th = _tanh(tl.load(UTH + r[:, None] * s_row + sc[None, :], mask=ms, other=0.0).to(tl.float32))
        dom = tl.load(DOM + r[:, None] * S + sc[None, :], mask=ms, other=0.0)
        tl.store(DUTH + r[:, None] * s_drow + sc[None, :], (dom * 3.141592653589793 * (1.0 - th * th)).to(DUTH.dtype.element_ty),
                 mask=ms)


def _flags(N, H, S, a_activation, trapezoid, rotation):
    return dict(N=N, BN=triton.next_power_of_2(N), BH=triton.next_power_of_2(H), BS=triton.next_power_of_2(max(S, 1)),
                BT=ROWS_PER_PROGRAM, HEAVY_TAIL=a_activation == "heavy_tail", TRAPEZOID=_TRAPEZOID[trapezoid],
                ROT=rotation == "data_dependent")


def ssm_inputs_forward(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation, A_floor,
                       trapezoid, rotation, s_row):
    """The forward launch: (Bn, Cn, dt, log_decay, lam, omega or None), no autograd. The slices share the token
    stride ``s_row``; u_lam / u_th are read only for the learned trapezoid / data-dependent rotation."""
    Bsz, T, R, G, N = Bm.shape
    H = u_dt.shape[-1]
    rot = rotation == "data_dependent"
    S = u_th.shape[-1] if rot else 0
    rows = Bsz * T
    dev = Bm.device
    f32 = dict(device=dev, dtype=torch.float32)
    Bn, Cn = torch.empty(Bm.shape, device=dev, dtype=Bm.dtype), torch.empty(Cm.shape, device=dev, dtype=Cm.dtype)
    dt, log_decay, lam = (torch.empty(Bsz, T, H, **f32) for _ in range(3))
    omega = torch.empty(Bsz, T, S, **f32) if rot else None
    direct(_ssm_inputs_fwd)[(triton.cdiv(rows, ROWS_PER_PROGRAM),)](
        Bm, Cm, u_dt, u_A, u_lam if trapezoid == "learned" else u_dt, u_th if rot else u_dt, dt_bias, B_norm_weight,
        C_norm_weight, Bn, Cn, dt, log_decay, lam, omega if rot else dt, rows, s_row, R * G, H, S, eps, A_floor,
        **_flags(N, H, S, a_activation, trapezoid, rotation), num_warps=4)
    return Bn, Cn, dt, log_decay, lam, omega


def ssm_inputs_backward(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation, A_floor,
                        trapezoid, rotation, s_row, grads, outs):
    """The backward launch. ``grads``: the gradients of (Bn, Cn, dt, log_decay, lam, omega), None for an unused one;
    ``outs``: where the gradients of (Bm, Cm, u_dt, u_A, u_lam, u_th) go, views with one shared token stride (e.g.
    the column slices of one d(in_proj output)); u_lam's / u_th's are written only when read in the forward.
    Returns the gradients of (dt_bias, B_norm_weight, C_norm_weight)."""
    Bsz, T, R, G, N = Bm.shape
    H = u_dt.shape[-1]
    rot, learned = rotation == "data_dependent", trapezoid == "learned"
    S = u_th.shape[-1] if rot else 0
    rows = Bsz * T
    dev = Bm.device
    dBm, dCm, du_dt, du_A, du_lam, du_th = outs
    s_drow = token_row_stride(dBm.flatten(2), dCm.flatten(2), du_dt, du_A, du_lam, du_th)
    if s_drow is None:
        raise ValueError("ssm_inputs_backward: the gradient views must be rows of one (B, T, D) tensor")
    programs = triton.cdiv(rows, ROWS_PER_PROGRAM)
    flags = _flags(N, H, S, a_activation, trapezoid, rotation)
    BH, BN = flags["BH"], flags["BN"]
    parts = torch.empty(programs, BH + 2 * BN, device=dev, dtype=torch.float32)

    def grad(t, like):  # a gradient autograd left as None (its output unused) reads as zeros
        return t.contiguous() if t is not None else torch.zeros(like, device=dev, dtype=torch.float32)

    dBn, dCn, d_dt, d_log_decay, d_lam, d_omega = grads
    zeros = torch.zeros(1, device=dev, dtype=torch.float32)
    direct(_ssm_inputs_bwd)[(programs,)](
        Bm, Cm, u_dt, u_A, u_lam if learned else u_dt, u_th if rot else u_dt, dt_bias, B_norm_weight, C_norm_weight,
        grad(dBn, Bm.shape), grad(dCn, Cm.shape), grad(d_dt, (Bsz, T, H)), grad(d_log_decay, (Bsz, T, H)),
        grad(d_lam, (Bsz, T, H)) if learned else zeros, grad(d_omega, (Bsz, T, S)) if rot else zeros,
        dBm, dCm, du_dt, du_A, du_lam if learned else du_dt, du_th if rot else du_dt,
        parts, rows, s_row, s_drow, R * G, H, S, eps, A_floor, **flags, num_warps=4)
    sums = parts.sum(0)
    return (sums[:H].to(dt_bias.dtype), sums[BH:BH + N].to(B_norm_weight.dtype),
            sums[BH + BN:BH + BN + N].to(C_norm_weight.dtype))


class _SsmInputs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation, A_floor,
                trapezoid, rotation, s_row):
        out = ssm_inputs_forward(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation,
                                 A_floor, trapezoid, rotation, s_row)
        ctx.save_for_backward(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight)
        ctx.args = (eps, a_activation, A_floor, trapezoid, rotation, s_row)
        if trapezoid != "learned":
            ctx.mark_non_differentiable(out[4])  # lam is a constant
        return out

    @staticmethod
    def backward(ctx, *grads):
        Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, Bw, Cw = ctx.saved_tensors
        eps, a_activation, A_floor, trapezoid, rotation, s_row = ctx.args
        R, G, N = Bm.shape[2:]
        # One (B, T, D) gradient holding the six slices' columns; the split's backward then concatenates it with
        # the other slices' gradients as it would six separate ones.
        widths = [R * G * N, R * G * N, u_dt.shape[-1], u_A.shape[-1], u_lam.shape[-1], u_th.shape[-1]]
        d_all = torch.empty(*Bm.shape[:2], sum(widths), device=Bm.device, dtype=Bm.dtype)
        outs = d_all.split(widths, dim=-1)
        d_params = ssm_inputs_backward(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, Bw, Cw, eps, a_activation, A_floor,
                                       trapezoid, rotation, s_row, grads, outs)
        dBm, dCm, du_dt, du_A, du_lam, du_th = outs
        return (dBm.unflatten(-1, (R, G, N)), dCm.unflatten(-1, (R, G, N)), du_dt, du_A,
                du_lam if trapezoid == "learned" else None, du_th if rotation == "data_dependent" else None,
                *d_params, None, None, None, None, None, None)


def unsupported_reason(Bm: torch.Tensor, Cm: torch.Tensor, u_dt: torch.Tensor, u_A: torch.Tensor, u_lam: torch.Tensor,
                       u_th: torch.Tensor, B_norm_weight: torch.Tensor | None, cdt: torch.dtype) -> str | None:
    """Why ``ssm_inputs_triton`` cannot take these inputs (the caller then uses the compiled function), or None."""
    if B_norm_weight is None:
        return "BCNorm is off"
    if cdt != torch.float32:
        return f"compute dtype {cdt} (the kernels compute in float32)"
    if Bm.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"input dtype {Bm.dtype}"
    if token_row_stride(Bm.flatten(2), Cm.flatten(2), u_dt, u_A, u_lam, u_th) is None:
        return "the slices are not rows of one (B, T, D) tensor"
    return None


def ssm_inputs_triton(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation, A_floor,
                      trapezoid, rotation, cdt):
    """``ssm_inputs`` (same arguments and results) through the two kernels above; check ``unsupported_reason`` first."""
    s_row = token_row_stride(Bm.flatten(2), Cm.flatten(2), u_dt, u_A, u_lam, u_th)
    return _SsmInputs.apply(Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation,
                            A_floor, trapezoid, rotation, s_row)

