"""Rebuild a trained model from its run folder: the resolved config in ``record.json`` and the
weights of a checkpoint, read with ``weights_only=True`` (no pickled objects are ever executed)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from hybrid.checkpoint import resolve_ckpt_path
from hybrid.model import HybridLM, model_config
from hybrid.records import RECORD_NAME
from hybrid.registry import ConfigError


def find_run(target: str | Path, ckpt: str = "best") -> tuple[Path, Path]:
    """(run folder, checkpoint file) from a run folder (``ckpt`` = best | last | a path) or a .ckpt file
    inside ``<run>/checkpoints/``."""
    target = Path(target)
    if target.is_file():
        run_dir = target.parent.parent if target.parent.name == "checkpoints" else target.parent
        path = target
    elif target.is_dir():
        run_dir = target
        if ckpt in ("best", "last"):
            path = run_dir / "checkpoints" / f"{ckpt}.ckpt"
            if ckpt == "best" and not path.is_file():
                path = run_dir / "checkpoints" / "last.ckpt"
        else:
            path = Path(ckpt)
    else:
        raise ConfigError(f"no run folder or checkpoint at {str(target)!r}")
    if not (run_dir / RECORD_NAME).is_file():
        raise ConfigError(f"{run_dir} has no {RECORD_NAME}: pass a run folder written by hybrid-train (or a checkpoint "
                          "inside its checkpoints/ folder)")
    resolved = resolve_ckpt_path(str(path), run_dir)
    assert resolved is not None
    return run_dir, resolved


def load_run(target: str | Path, ckpt: str = "best", device: str | torch.device = "cpu") -> tuple[HybridLM, dict[str, Any], Path]:
    """(model in eval mode on ``device``, the run's resolved config, the checkpoint path)."""
    run_dir, path = find_run(target, ckpt)
    record = json.loads((run_dir / RECORD_NAME).read_text())
    config = record.get("config")
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError(f"{run_dir / RECORD_NAME} holds no resolved config with a model")
    model = HybridLM(model_config(config["model"]))
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    weights = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ConfigError(f"checkpoint {path} does not match the recorded model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.to(device).eval(), config, path
