"""Local run records into flat ``Run`` rows for the dashboard.

A sweep folder holds one folder per job, each with ``record.json`` (written by ``hybrid-train``) and a
Lightning CSV log. A record that is truncated or corrupt is skipped with a warning so one bad job does
not hide the rest of a sweep; a folder with no records at all is an error, since an empty dashboard
would look like a sweep where nothing worked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hybrid.compare.curves import read_curves
from hybrid.records import RECORD_NAME


class CompareError(ValueError):
    """Bad input to ``hybrid-compare`` (no runs, unknown metric, unreadable source)."""


@dataclass
class Run:
    """One training run, flattened to what the dashboard shows."""

    name: str
    status: str
    config: dict[str, Any]
    pattern: dict[str, Any]
    metrics: dict[str, float]
    n_params: int | None = None
    error: dict[str, Any] | None = None
    eval: list[dict[str, Any]] = field(default_factory=list)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    source: str = ""

    @property
    def arch(self) -> str:
        return str(self.pattern.get("canonical") or (self.config.get("model") or {}).get("pattern") or "?")

    @property
    def is_pure(self) -> bool:
        return bool(self.pattern.get("is_pure", False))

    @property
    def kind(self) -> str:
        return "pure" if self.is_pure else "hybrid"

    @property
    def label(self) -> str:
        """Legend label: pure or hybrid first, so the two kinds read apart at a glance."""
        return f"{self.kind} · {self.arch}"

    @property
    def data(self) -> dict[str, Any]:
        return self.config.get("data") or {}

    @property
    def seq_len(self) -> int | None:
        return self.data.get("seq_len")

    @property
    def n_facts(self) -> int | None:
        """Key-value facts to remember: MQAR pairs, interleaved-recall facts, or needles."""
        d = self.data
        if "num_kv_pairs" in d:
            return d["num_kv_pairs"]
        if "facts_per_topic" in d:
            return d["facts_per_topic"] * d.get("num_topics", 1)
        return d.get("num_needles")

    @property
    def cache_bytes_per_token(self) -> float | None:
        """Inference cache (recurrent state + KV cache) at the training length, per token of context."""
        kv, state, L = self.pattern.get("kv_bytes_per_token"), self.pattern.get("recurrent_state_bytes"), self.seq_len
        if kv is None or state is None or not L:
            return None
        return kv + state / L

    def metric(self, name: str) -> float | None:
        v = self.metrics.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def find_records(root: Path) -> list[Path]:
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(root.rglob(RECORD_NAME), key=_job_order)


def _job_order(p: Path) -> tuple:
    parts = p.parent.parts
    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in parts)


def load_record(path: Path, root: Path) -> tuple[Run, list[str]]:
    """One record and its warnings; raises ``ValueError`` when it is unreadable or not a run record."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable run record ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise ValueError(f"{path}: not a hybrid-train run record (no config)")
    run_dir = path.parent
    name = str(run_dir.relative_to(root)) if root.is_dir() and run_dir != root else run_dir.name
    warnings: list[str] = []
    try:
        curves = read_curves(run_dir / "csv" / "metrics.csv")
    except ValueError as exc:  # the record is still worth showing without its curves
        warnings.append(str(exc))
        curves = {}
    run = Run(name=name if name != "." else run_dir.name, status=str(data.get("status", "unknown")),
               config=data["config"], pattern=data.get("pattern") or {}, metrics=data.get("metrics") or {},
               n_params=data.get("n_params"), error=data.get("error"), eval=data.get("eval") or [],
               curves=curves, source=str(run_dir))
    return run, warnings


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[str]]:
    """Every run under ``paths`` (sweep folders, run folders or record files) and the warnings."""
    runs: list[Run] = []
    warnings: list[str] = []
    for p in map(Path, paths):
        if not p.exists():
            raise CompareError(f"{p}: no such file or folder")
        records = find_records(p)
        if not records:
            raise CompareError(f"{p}: no runs found (no {RECORD_NAME} below it). Point hybrid-compare at a sweep folder "
                               f"such as logs/train/multiruns/<sweep>, a run folder, or a W&B project (wandb:<entity>/<project>)")
        root = p if p.is_dir() else p.parent
        for rec in records:
            try:
                run, extra = load_record(rec, root)
            except ValueError as exc:
                warnings.append(f"skipped {exc}")
                continue
            warnings.extend(extra)
            if len(paths) > 1:
                run.name = f"{p.name}/{run.name}"
            runs.append(run)
    if not runs:
        raise CompareError(f"no readable runs in {', '.join(map(str, paths))}: " + "; ".join(warnings))
    return runs, warnings
