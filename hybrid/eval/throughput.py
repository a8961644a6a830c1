"""Generation speed of every data preset: examples/s and tokens/s of the training stream, so a
GPU's data loader can be sized (``num_workers``) to never starve it.

    python -m hybrid.eval.throughput                 # every preset in conf/data
    python -m hybrid.eval.throughput ir niah --batch-size 64 --batches 20
"""

from __future__ import annotations

import argparse
import time
from importlib import resources

from omegaconf import OmegaConf

from hybrid.data import build_task


def measure(data: dict, batch_size: int = 64, batches: int = 10) -> dict[str, float]:
    """Examples/s of ``train_batch`` (with the test-set disjointness check), after building the test set."""
    task = build_task(data)
    t0 = time.perf_counter()
    task.test_set()
    setup = time.perf_counter() - t0
    task.train_batch(0, batch_size)  # warm up
    t0 = time.perf_counter()
    for i in range(1, batches + 1):
        b = task.train_batch(i, batch_size)
    dt = time.perf_counter() - t0
    n = batches * batch_size
    return {"examples_per_s": n / dt, "tokens_per_s": n * b["inputs"].shape[1] / dt, "seq_len": b["inputs"].shape[1],
            "setup_s": setup}


def preset(name: str, **fields) -> dict:
    text = (resources.files("hybrid.conf") / "data" / f"{name}.yaml").read_text()
    data = OmegaConf.to_container(OmegaConf.create({"seed": 0, "data": OmegaConf.create(text)}), resolve=True)["data"]
    return {**data, **fields}


def main(argv: list[str] | None = None) -> None:
    from hybrid.eval.cli import data_presets

    p = argparse.ArgumentParser(prog="python -m hybrid.eval.throughput", description=__doc__)
    p.add_argument("presets", nargs="*")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=10)
    args = p.parse_args(argv)
    names = args.presets or [n for n in data_presets() if n not in ("hf", "text_folder")]
    print(f"{'preset':22s} {'seq_len':>8s} {'examples/s':>12s} {'tokens/s':>12s} {'test set s':>10s}")
    for name in names:
        r = measure(preset(name), args.batch_size, args.batches)
        print(f"{name:22s} {r['seq_len']:8d} {r['examples_per_s']:12.0f} {r['tokens_per_s']:12.0f} {r['setup_s']:10.2f}",
              flush=True)


if __name__ == "__main__":
    main()
