"""Short MQAR training runs of each router: realised capacity vs target, and where the routers route.

    python scripts/route_capacity.py --steps 1500 --out route_capacity.json      # GPU: a few minutes
    python scripts/route_capacity.py --steps 5 --quick --out smoke.json          # CPU smoke test

Per variant (a 2-layer model: a Mamba-3 block, then the routed block) it trains on the MQAR stream,
then on the held-out test set (eval mode, causal routing) reports accuracy, the realised routing
fraction against the target capacity, and routing rates at query positions (labels != -100), at the
key-value context and at the filler (zeros) between queries; then the realised fraction when decoding
token by token through the cache. The MoD variant is evaluated with thresholding and with top-k.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F

from hybrid.data.mqar import MQAR, MQARConfig
from hybrid.model import build_model

SSM = {"d_state": 32, "headdim": 32, "backend": "torch"}  # the PyTorch scan: routing, not kernels, is measured
VARIANTS = {  # most important first: each finished variant is saved at once
    "token_router_compact": {"mixer": "token_router", "capacity": 0.25, "attend": "compact", "attn": {"num_heads": 4}},
    "mod_topk": {"mixer": "token_router", "capacity": 0.25, "routing": "topk", "attn": {"num_heads": 4}},
    "chunk_gate": {"mixer": "chunk_gate", "capacity": 0.5, "chunk_size": 16, "block_size": 8, "topk": 2,
                   "attn": {"num_heads": 4}},
    "token_router_query_only": {"mixer": "token_router", "capacity": 0.25, "attend": "query_only", "attn": {"num_heads": 4}},
    "token_router_compact_bw10": {"mixer": "token_router", "capacity": 0.25, "attend": "compact", "budget_weight": 10.0,
                                  "attn": {"num_heads": 4}},
}


def build(variant: dict, d_model: int, vocab: int):
    symbols = {"R": {**variant, "ssm": SSM}, "M": {"mixer": "mamba3", **SSM}}
    return build_model("MR", d_model=d_model, vocab_size=vocab, symbols=symbols)


@torch.no_grad()
def evaluate(model, test: dict, K: int, device, batch: int = 250) -> dict:
    router = model.blocks[1].mixer
    keys = ("acc", "frac", "query", "context", "filler")
    sums = dict.fromkeys(keys, 0.0)
    counts = dict.fromkeys(keys, 0)
    for a in range(0, test["inputs"].shape[0], batch):
        x, y = test["inputs"][a:a + batch].to(device), test["labels"][a:a + batch].to(device)
        logits = model(x)
        route = router.last_route.float()
        q = y != -100
        ctx = torch.zeros_like(q)
        ctx[:, :2 * K] = True
        parts = {"acc": ((logits.argmax(-1) == y).float(), q), "frac": (route, torch.ones_like(q)), "query": (route, q),
                 "context": (route, ctx), "filler": (route, ~q & ~ctx)}
        for key, (val, where) in parts.items():
            sums[key] += float(val[where].sum())
            counts[key] += int(where.sum())
    return {k: sums[k] / max(counts[k], 1) for k in keys}


@torch.no_grad()
def decode_fraction(model, test: dict, device, rows: int = 16) -> float:
    """Realised routing fraction when the test inputs are fed one token at a time through the cache."""
    x = test["inputs"][:rows].to(device)
    cache = model.allocate_cache(rows, x.shape[1])
    for t in range(x.shape[1]):
        model(x[:, t:t + 1], cache=cache)
    return float(model.blocks[1].mixer.stats["cache_frac_routed"])


def run(name: str, variant: dict, args, device) -> dict:
    task = MQAR(MQARConfig(vocab_size=256, seq_len=args.seq_len, num_kv_pairs=args.kv, num_test=args.num_test, seed=0))
    torch.manual_seed(0)
    model = build(variant, args.d_model, 256).to(device)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(
        math.pi * min(s, args.steps) / args.steps))))
    t0 = time.time()
    history = []
    for step in range(args.steps):
        model.train()
        b = task.train_batch(step, args.batch)
        x, y = b["inputs"].to(device), b["labels"].to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100)
        aux = model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            stats = model.blocks[1].mixer.stats
            history.append({"step": step, "loss": float(loss), "train_frac": stats.get("frac_routed")})
            print(name, history[-1], flush=True)
    model.eval()
    test = task.test_set()
    out = {"variant": variant, "train_seconds": time.time() - t0, "history": history,
           "capacity": variant["capacity"], "eval": evaluate(model, test, args.kv, device)}
    out["capacity_error_points"] = 100 * (out["eval"]["frac"] - variant["capacity"])
    out["decode_frac"] = decode_fraction(model, test, device)
    if variant.get("routing") == "topk":
        model.blocks[1].mixer.cfg.eval_routing = "topk"
        out["eval_topk"] = evaluate(model, test, args.kv, device)
    print(name, json.dumps({k: v for k, v in out.items() if k != "history"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="route_capacity.json")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--kv", type=int, default=16)
    ap.add_argument("--num-test", type=int, default=1000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="tiny model and data (smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.d_model, args.seq_len, args.kv, args.num_test, args.batch = 32, 32, 4, 20, 4
    device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "args": vars(args), "runs": {}}
    for name in args.variants.split(","):
        report["runs"][name] = run(name, VARIANTS[name], args, device)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
