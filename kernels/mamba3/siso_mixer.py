"""The Mamba-3 SISO mixer from its in_proj output to its gated output as one autograd function (training, prefill
without a cache), in the manner of Mamba-2's official ``mamba_split_conv1d_scan_combined``.

    proj (B, T, D_proj) = [z | x | B | C | u_dt | u_A | u_lam | u_theta]      (the in_proj output, any float type)
      -> ssm inputs (triton_ssm_inputs.py) -> chunked scan (triton_siso.py) -> y * silu(z) (triton_gate.py)
      -> (B, T, H * P) in proj's dtype, for out_proj

Why one function: in a training step the layer otherwise enters autograd three times per direction (the scan's
function and two torch.compile'd helpers, ~170-280 us of host time each), which left a Mamba-3 block's forward
host-bound; and its backward would hand autograd eight slice gradients that the split's backward concatenates
(0.16 ms of GPU per block at 8 x 4096). Here the backward allocates d(proj) once and every piece writes its columns
in place: the gate's dz, the scan's dx, the ssm inputs' gradients; and the scan reads x in place (both when the
in_proj width is a multiple of ``ROW_ALIGN``, e.g. 3432 at d_model 768; otherwise x and dx are copied).

Same math as the layer's composed path (``ssm_inputs`` -> ``mamba3_siso_chunk`` -> ``gate_output``), which is the
oracle in ``tests/test_mamba3_siso_mixer.py``. Supported: R = 1, BCNorm on, no per-head output norm, float32
compute; the layer checks ``unsupported_reason`` and otherwise takes the composed path.
"""

from __future__ import annotations

import torch
from hybrid.kernels.mamba3.triton_gate import gate_backward, gate_forward
from hybrid.kernels.mamba3.triton_siso import chunk_forward, rows_fit
from hybrid.kernels.mamba3.triton_siso_bwd import mamba3_siso_chunk_bwd
from hybrid.kernels.mamba3.triton_ssm_inputs import ssm_inputs_backward, ssm_inputs_forward


class _SisoMixer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, proj, dt_bias, B_norm_weight, C_norm_weight, q_bias, k_bias, D, rope_freq, split, shape, options,
                seq_idx):
        H, P, G, N = shape
        eps, a_activation, A_floor, trapezoid, rotation, chunk_size = options
        Bsz, T = proj.shape[:2]
        z, xs, Bm, Cm, u_dt, u_A, u_lam, u_th = proj.split(split, dim=-1)
        Bm, Cm = Bm.unflatten(-1, (1, G, N)), Cm.unflatten(-1, (1, G, N))
        Bn, Cn, dt, log_decay, lam, omega = ssm_inputs_forward(
            Bm, Cm, u_dt, u_A, u_lam, u_th, dt_bias, B_norm_weight, C_norm_weight, eps, a_activation, A_floor, trapezoid,
            rotation, proj.stride(1))
        angle_dt = rotation == "data_dependent"
        if rotation == "data_independent":
            omega = rope_freq.expand(Bsz, T, rope_freq.shape[-1])  # fixed frequencies, not scaled by dt
        y, _, saved = chunk_forward(Cn.squeeze(2), Bn.squeeze(2), xs.unflatten(-1, (H, P)), log_decay, dt, lam, omega,
                                    angle_dt, q_bias, k_bias, D, None, chunk_size, seq_idx, need_state=False)
        y = y.view(Bsz, T, H * P)
        out = gate_forward(y, z)
        scan = {key: val for key, val in saved.items() if torch.is_tensor(val)}
        ctx.scan_names = list(scan)
        ctx.scan_flags = {key: val for key, val in saved.items() if not torch.is_tensor(val) and val is not None}
        ctx.save_for_backward(proj, dt_bias, B_norm_weight, C_norm_weight, y, *scan.values())
        ctx.args = (split, shape, options)
        ctx.param_dtypes = [None if t is None else t.dtype for t in (q_bias, k_bias, D)]
        return out

    @staticmethod
    def backward(ctx, dout):
        proj, dt_bias, Bw, Cw, y, *scan_tensors = ctx.saved_tensors
        split, (H, P, G, N), (eps, a_activation, A_floor, trapezoid, rotation, _) = ctx.args
        saved = dict(zip(ctx.scan_names, scan_tensors))
        saved.update(ctx.scan_flags)
        for key in ("v0", "k0", "seq"):
            saved.setdefault(key, None)
        Bsz, T = proj.shape[:2]
        z, _, Bm, Cm, u_dt, u_A, u_lam, u_th = proj.split(split, dim=-1)
        d_proj = torch.empty_like(proj)
        dz, dx, dBm, dCm, du_dt, du_A, du_lam, du_th = d_proj.split(split, dim=-1)
        dy = gate_backward(dout, y, z, dz)  # dz written into d_proj
        dx = dx.unflatten(-1, (H, P))
        in_place = rows_fit(dx)  # false for an in_proj width that is not a multiple of ROW_ALIGN
        g = mamba3_siso_chunk_bwd(saved, dy.view(Bsz, T, H, P), None, None, None, dx_out=dx if in_place else None)
        if not in_place:
            dx.copy_(g["v"])
        grads = (g["k"].unsqueeze(2), g["q"].unsqueeze(2), g["dt"], g["log_decay"],
                 g["lam"] if trapezoid == "learned" else None, g["omega"] if rotation == "data_dependent" else None)
        d_dt_bias, d_bw, d_cw = ssm_inputs_backward(
            Bm.unflatten(-1, (1, G, N)), Cm.unflatten(-1, (1, G, N)), u_dt, u_A, u_lam, u_th, dt_bias, Bw, Cw, eps,
            a_activation, A_floor, trapezoid, rotation, proj.stride(1), grads,
            (dBm.unflatten(-1, (1, G, N)), dCm.unflatten(-1, (1, G, N)), du_dt, du_A, du_lam, du_th))
        d_params = [None if dtype is None or g[name] is None else g[name].to(dtype)
                    for name, dtype in zip(("q_bias", "k_bias", "D"), ctx.param_dtypes)]
        return (d_proj, d_dt_bias, d_bw, d_cw, *d_params, None, None, None, None, None)


def unsupported_reason(proj: torch.Tensor, mimo: bool, bc_norm: bool, outproj_norm: bool) -> str | None:
    """Why ``mamba3_siso_mixer`` cannot run this layer call (the layer then takes its composed path), or None."""
    if mimo:
        return "MIMO"
    if not bc_norm:
        return "BCNorm is off"
    if outproj_norm:
        return "the per-head output norm"
    if proj.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype {proj.dtype}"
    if not proj.is_contiguous():
        return "a non-contiguous in_proj output"
    return None


def mamba3_siso_mixer(proj: torch.Tensor, split: list[int], dt_bias: torch.Tensor, B_norm_weight: torch.Tensor,
                      C_norm_weight: torch.Tensor, q_bias: torch.Tensor | None, k_bias: torch.Tensor | None,
                      D: torch.Tensor | None, rope_freq: torch.Tensor | None, *, heads: int, headdim: int, groups: int,
                      d_state: int, eps: float, a_activation: str, A_floor: float, trapezoid: str, rotation: str,
                      chunk_size: int, seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D_proj) in_proj output -> (B, T, heads * headdim) gated scan output, in proj's dtype.

    ``split``: the column widths of [z, x, B, C, u_dt, u_A, u_lam, u_theta] (u_lam 0 unless the trapezoid is
    learned, u_theta 0 unless the rotation is data-dependent); q_bias / k_bias (H, N) are C's and B's biases;
    ``rope_freq`` (S,) the fixed frequencies of data-independent rotation. Check ``unsupported_reason`` first."""
    return _SisoMixer.apply(proj, dt_bias, B_norm_weight, C_norm_weight, q_bias, k_bias, D, rope_freq, list(split),
                            (heads, headdim, groups, d_state), (eps, a_activation, A_floor, trapezoid, rotation, chunk_size),
                            seq_idx)
