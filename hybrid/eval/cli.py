"""``hybrid-eval``: evaluate a checkpoint on any task and length.

    hybrid-eval logs/train/runs/<run>                                # its own task, as configured
    hybrid-eval logs/train/runs/<run> --extrapolate                  # at 2L, 4L, 8L (L = training length)
    hybrid-eval <run> --lengths 1024 4096 data=niah data.num_needles=4
    hybrid-eval <run>/checkpoints/last.ckpt data.num_test=200 --logger none

``data=<name>`` picks a ``conf/data/<name>.yaml`` instead of the run's recorded data config, and
``data.<field>=<value>`` overrides a field (values are read as YAML). Results are printed, appended
to ``eval`` in the run's ``record.json`` and logged to W&B (offline by default) as a run of job type
``eval`` in the training run's folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import OmegaConf

from hybrid.eval.evaluate import evaluate
from hybrid.eval.extrapolation import extrapolation_lengths, task_at_length
from hybrid.eval.loading import load_run
from hybrid.records import RunRecord
from hybrid.registry import ConfigError

log = logging.getLogger("hybrid.eval")


def data_presets() -> list[str]:
    folder = resources.files("hybrid.conf") / "data"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def data_config(recorded: dict[str, Any], overrides: list[str], seed: int) -> dict[str, Any]:
    """The run's data config, or a ``conf/data`` preset, with ``data.<field>=<value>`` overrides applied."""
    data = dict(recorded)
    fields: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not (key == "data" or key.startswith("data.")):
            raise ConfigError(f"override {item!r} must be data=<preset> or data.<field>=<value>")
        if key == "data":
            presets = data_presets()
            if value not in presets:
                raise ConfigError(f"unknown data preset {value!r}. Valid presets: {', '.join(presets)}")
            text = (resources.files("hybrid.conf") / "data" / f"{value}.yaml").read_text()
            root = OmegaConf.create({"seed": seed, "data": OmegaConf.create(text)})
            data = OmegaConf.to_container(root, resolve=True)["data"]  # type: ignore[index]
        else:
            fields[key[len("data."):]] = yaml.safe_load(value)
    data.update(fields)
    return data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hybrid-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run folder written by hybrid-train, or a checkpoint file in its checkpoints/ folder; "
                   "then data=<preset> and/or data.<field>=<value> anywhere on the line")
    p.add_argument("--ckpt", default="best", help="best | last | a path (when RUN is a folder); default best")
    p.add_argument("--lengths", type=int, nargs="+", help="evaluation lengths (default: as configured)")
    p.add_argument("--extrapolate", action="store_true",
                   help="length extrapolation: lengths >= the training length, default 2L 4L 8L")
    p.add_argument("--tokens-per-batch", type=int, default=32768, help="batch size = max(1, this // length)")
    p.add_argument("--max-examples", type=int, default=None, help="stop after this many test examples per length")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--logger", choices=["wandb", "none"], default="wandb")
    p.add_argument("--wandb-mode", choices=["offline", "online", "disabled"], default="offline")
    p.add_argument("--no-record", action="store_true", help="do not append the results to record.json")
    argv = list(sys.argv[1:] if argv is None else argv)
    # data overrides may sit anywhere, also after a list option such as --lengths
    overrides = [a for a in argv if a.startswith(("data=", "data."))]
    args = p.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    return args


def run_eval(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, config, ckpt = load_run(args.run, args.ckpt, args.device)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    trained = config["data"]
    data = data_config(trained, args.overrides, int(config.get("seed", 0)))
    base = task_at_length(data, None)
    train_task = task_at_length(trained, None)
    train_length = train_task.train_length() if trained.get("name") == data.get("name") else base.train_length()
    lengths = extrapolation_lengths(train_length, args.lengths, args.extrapolate)
    results = []
    for length in lengths:
        task = task_at_length(data, length)
        if task.vocab_size > model.cfg.vocab_size:
            raise ConfigError(f"task {data['name']} needs a vocabulary of {task.vocab_size}, the model has "
                              f"{model.cfg.vocab_size}")
        L = length or task.train_length()
        bs = max(1, args.tokens_per_batch // max(L, 1))
        metrics = evaluate(model, task, bs, args.device, args.max_examples)
        results.append({"task": data["name"], "length": L, "train_length": train_length,
                        "data": {**data, **task.length_overrides(L)} if length else data,
                        "metrics": metrics, "checkpoint": str(ckpt), "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        print(f"{data['name']} L={L} (train {train_length}): {_short(metrics)}", flush=True)
    if not args.no_record:
        record = RunRecord(run_dir)
        record.update(eval=[*record.data.get("eval", []), *results])
    if args.logger == "wandb":
        _log_wandb(run_dir, config, results, args.wandb_mode)
    return results


def _short(metrics: dict[str, float]) -> str:
    keys = [k for k in ("acc", "acc_scaled", "exact", "nll", "ppl") if k in metrics]
    return ", ".join(f"{k}={metrics[k]:.4f}" for k in keys) + f" ({metrics['n_examples']:.0f} examples, {metrics['seconds']:.1f}s)"


def _log_wandb(run_dir: Path, config: dict, results: list[dict], mode: str) -> None:
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    wb_cfg = (config.get("logger") or {}).get("wandb") or {}
    run = wandb.init(project=wb_cfg.get("project", "hybrid"), entity=wb_cfg.get("entity"), dir=str(run_dir), mode=mode,
                     job_type="eval", group=config.get("experiment_name"), name=f"eval-{config.get('run_name') or run_dir.name}",
                     config={"train_config": config, "checkpoint": results[0]["checkpoint"] if results else None},
                     reinit=True)
    run.define_metric("eval/length")
    run.define_metric("eval/*", step_metric="eval/length")
    table = wandb.Table(columns=["task", "length", "train_length", "metric", "value"])
    for r in results:
        run.log({"eval/length": r["length"], **{f"eval/{k}": v for k, v in r["metrics"].items()}})
        for k, v in r["metrics"].items():
            table.add_data(r["task"], r["length"], r["train_length"], k, v)
    run.log({"eval/table": table})
    run.finish()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_float32_matmul_precision("high")
    args = parse_args(argv)
    try:
        results = run_eval(args)
    except ConfigError as exc:
        print(f"hybrid-eval: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    if not results:
        raise SystemExit(1)
    json.dump([{"task": r["task"], "length": r["length"], **{k: r["metrics"][k] for k in ("acc", "nll") if k in r["metrics"]}}
               for r in results], sys.stdout)
    print()


if __name__ == "__main__":
    main()
