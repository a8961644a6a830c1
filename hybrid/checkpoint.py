"""Checkpoint files: written atomically, read with ``weights_only=True`` and checked before training."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO

from hybrid.registry import ConfigError


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file in the same folder, fsync, then rename: a crash mid-write leaves the
    previous checkpoint intact, never a truncated one. Loading never unpickles arbitrary objects."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = True) -> dict[str, Any]:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> Path | None:
    """``last`` -> ``<run_dir>/checkpoints/last.ckpt``; any path must exist and be a readable checkpoint."""
    if ckpt_path in (None, ""):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = (" ('last' looks in <run_dir>/checkpoints; resume with run_dir=<the run's folder> ckpt_path=last)"
                if ckpt_path == "last" else "")
        raise ConfigError(f"checkpoint not found: {path}{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise ConfigError(f"checkpoint {path} is corrupt or not a checkpoint ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200]})") from exc
    if not isinstance(state, dict) or "state_dict" not in state:
        raise ConfigError(f"checkpoint {path} has no model state_dict; is it a hybrid/Lightning checkpoint?")
    return path
