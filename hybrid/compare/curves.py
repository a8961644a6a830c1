"""Training curves from a run's Lightning CSV log (``csv/metrics.csv``).

Lightning writes one row per logging event with empty cells for the metrics not logged then, so each
column becomes its own ``[(step, value), ...]`` series. A missing log is no error (``logger=wandb`` only
runs have none); a garbled one is reported so the caller can warn and still show the run's record.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

MAX_POINTS = 400  # per series: keeps the self-contained page small for long runs


def read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    if not path.is_file():
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    try:
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                if not step:
                    continue
                for key, value in row.items():
                    if key in ("step", "epoch") or key is None or value in (None, ""):
                        continue
                    v = float(value)
                    if math.isfinite(v):
                        series.setdefault(key, []).append((int(float(step)), v))
    except (OSError, ValueError, csv.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: unreadable CSV log, curves left out ({type(exc).__name__}: {exc})") from exc
    return {k: _thin(v) for k, v in series.items()}


def _thin(points: list[tuple[int, float]]) -> list[tuple[int, float]]:
    if len(points) <= MAX_POINTS:
        return points
    stride = math.ceil(len(points) / MAX_POINTS)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])
