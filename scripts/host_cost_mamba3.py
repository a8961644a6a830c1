"""Host cost of each piece of a Mamba-3 block's training step (diagnostic, GPU only).

    python scripts/host_cost_mamba3.py

At a tiny shape (1 x 256, d_model 768) the GPU finishes each kernel long before the host issues the next, so the
time to issue N calls, divided by N, is what each call costs the host: the Python, dispatcher and launch work a
training step pays per block whatever its shape. ``host_vs_gpu_block.py`` compares such costs with the kernels'
time at 8 x 4096.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import torch
import triton
from hybrid.kernels.mamba3 import triton_siso
from hybrid.layers.base import compiled
from hybrid.layers.mamba3 import gate_output, ssm_inputs

import hybrid

CALLS = 20


def host_us(fn, calls: int = CALLS, repeats: int = 5) -> float:
    """Median over repeats of the host time per call of ``fn`` (issued back to back, synchronised after)."""
    fn()
    torch.cuda.synchronize()
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(per_call)


def main() -> None:
    model = hybrid.build_model("MA", d_model=768, vocab_size=50304).cuda().train()
    mamba_block, attn_block = model.blocks
    mixer = mamba_block.mixer
    x = torch.randn(1, 256, 768, device="cuda", requires_grad=True)
    grad = torch.randn_like(x)
    amp = torch.autocast("cuda", dtype=torch.bfloat16)
    rows: list[tuple[str, float]] = []

    def row(name: str, fn) -> None:
        rows.append((name, host_us(fn)))
        print(f"{name:58s} {rows[-1][1]:8.1f} us", flush=True)

    for label, block in (("mamba3", mamba_block), ("attention", attn_block)):
        def fwd(block=block):
            with amp:
                block(x)

        def fwd_bwd(block=block):
            with amp:
                y = block(x)
            y.backward(grad)

        row(f"{label} block forward", fwd)
        row(f"{label} block forward + backward", fwd_bwd)

    cfg = mixer.cfg
    with amp:
        xn = mamba_block.mixer_norm(x)
        proj = mixer.in_proj(xn)
    Bsz, T = proj.shape[:2]
    z, xs, Bm, Cm, u_dt, u_A, u_lam, u_th = proj.detach().requires_grad_().split(mixer.split, dim=-1)
    Bm, Cm = Bm.reshape(Bsz, T, 1, mixer.G, mixer.N), Cm.reshape(Bsz, T, 1, mixer.G, mixer.N)
    args = (Bm, Cm, u_dt, u_A, u_lam, u_th, mixer.dt_bias, getattr(mixer, "B_norm_weight", None),
            getattr(mixer, "C_norm_weight", None), cfg.norm_eps, cfg.a_activation, cfg.A_floor, cfg.trapezoid, cfg.rotation,
            torch.float32)
    def mixer_fwd():
        with amp:
            mixer(xn)

    def norm_ffn_fwd():
        with amp:
            mamba_block.ffn(mamba_block.ffn_norm(x))

    row("mixer forward (autocast)", mixer_fwd)
    row("mixer norm (autocast)", lambda: mamba_block.mixer_norm(x))
    row("ffn norm + ffn (autocast)", norm_ffn_fwd)
    row("in_proj (autocast linear)", lambda: mixer.in_proj(xn))
    row("ssm_inputs, compiled: forward", lambda: compiled(ssm_inputs)(*args))
    row("ssm_inputs, eager: forward", lambda: ssm_inputs(*args))
    Bn, Cn, dt, log_decay, lam, omega = (t.detach() for t in compiled(ssm_inputs)(*args))
    y = torch.randn(Bsz, T, 1, mixer.H, mixer.P, device="cuda", dtype=torch.bfloat16)
    zz = z.detach().reshape(Bsz, T, mixer.H, mixer.P)
    gate_args = (y, zz, getattr(mixer, "out_norm_weight", None), cfg.norm_eps, None, None)
    row("gate_output, compiled: forward", lambda: compiled(gate_output)(*gate_args))
    row("gate_output, eager: forward", lambda: gate_output(*gate_args))
    q, k = Cn[:, :, 0].contiguous(), Bn[:, :, 0].contiguous()
    v = xs.detach().reshape(Bsz, T, mixer.H, mixer.P).contiguous()
    row("angle_offsets", lambda: triton_siso.angle_offsets(omega, dt, True, None, 64, mixer.H))
    row("chunk_forward (no autograd)", lambda: triton_siso.chunk_forward(
        q, k, v, log_decay, dt, lam, omega, True, None, None, mixer.D, None, 64, None, False))

    # One launch of the forward scan kernel three ways: through ChosenConfig (the default), through Triton's
    # autotuner, and through the JIT with the tuned config; the arguments are captured from a real call.
    wrapper = triton_siso._chunk_scan_fwd_tuned
    tuner = wrapper.autotuner
    captured = {}
    original = type(tuner).run

    def capture(self, *a, **kw):
        captured.setdefault(id(self), (a, kw))
        return original(self, *a, **kw)

    wrapper.chosen.clear()  # so that the next launch goes through the autotuner, where it is captured
    type(tuner).run = capture
    triton_siso.chunk_forward(q, k, v, log_decay, dt, lam, omega, True, None, None, mixer.D, None, 64, None, False)
    type(tuner).run = original
    a, kw = captured[id(tuner)]
    plain = {key: val for key, val in kw.items() if key not in ("grid", "warmup")}
    best = tuner.best_config.all_kwargs()
    row("_chunk_scan_fwd: ChosenConfig launch (default)", lambda: wrapper[kw["grid"]](*a, **plain))
    row("_chunk_scan_fwd: autotuner launch", lambda: tuner.run(*a, **kw))
    row("_chunk_scan_fwd: JIT launch, tuned config", lambda: tuner.fn.run(*a, **kw, **best))
    print(f"(triton {triton.__version__}, torch {torch.__version__})")

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(50):
        with amp:
            mamba_block(x)
    torch.cuda.synchronize()
    profiler.disable()
    print("cProfile of 50 Mamba-3 block forwards (autocast), by cumulative time:")
    pstats.Stats(profiler).strip_dirs().sort_stats("cumulative").print_stats(70)


if __name__ == "__main__":
    main()
