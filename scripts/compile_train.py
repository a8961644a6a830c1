"""Training step time, eager against torch.compile of the whole model (an experiment for issue 8).

    python scripts/compile_train.py

Mx12 and Ax12 at d_model 768, 8 x 4096 and 2 x 16384 tokens, bf16 autocast, forward + backward.
"""

import time

import torch
import torch.nn.functional as F

import hybrid
from hybrid.bench.timing import median_seconds

for pattern, B, T in (("Mx12", 8, 4096), ("Ax12", 8, 4096), ("Mx12", 2, 16384), ("Ax12", 2, 16384)):
    model = hybrid.build_model(pattern, d_model=768, vocab_size=50304).cuda().train()
    tokens = torch.randint(0, 50304, (B, T), device="cuda")
    for mode in ("eager", "compiled"):
        fwd = model if mode == "eager" else torch.compile(model)

        def step(fwd=fwd, model=model, tokens=tokens):
            model.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(fwd(tokens).float().flatten(0, 1), tokens.flatten())
            loss.backward()

        t0 = time.time()
        try:
            step()
            torch.cuda.synchronize()
            s = median_seconds(step, torch.device("cuda"), 2, 5)
            print(f"{pattern} {B}x{T} {mode}: {s * 1e3:.1f} ms/step ({B * T / s:.0f} tok/s), "
                  f"first call {time.time() - t0:.0f} s", flush=True)
        except Exception as exc:  # noqa: BLE001
            print(f"{pattern} {B}x{T} {mode}: failed {type(exc).__name__}: {str(exc)[:300]}", flush=True)
    model = None
    torch.cuda.empty_cache()
