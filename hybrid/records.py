"""The local run record: one small JSON file per run folder, readable without W&B.

``record.json`` holds the status (running / completed / failed), the resolved config, the pattern
summary, parameter count, final and best metrics, the W&B run id, and the error of a failed run.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

RECORD_NAME = "record.json"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


class RunRecord:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / RECORD_NAME
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.data.setdefault("started", time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.data["run_dir"] = str(Path(run_dir).resolve())

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.path, self.data)

    def finish(self, metrics: dict[str, float]) -> None:
        self.update(status="completed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"), metrics=metrics, error=None)

    def fail(self, exc: BaseException) -> None:
        self.update(status="failed", finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
                    error={"type": type(exc).__name__, "message": str(exc),
                           "traceback": "".join(traceback.format_exception(exc))[-4000:]})


def load_records(root: Path) -> list[dict[str, Any]]:
    """Every run record under ``root`` (a run folder, a sweep folder, or a logs tree)."""
    return [json.loads(p.read_text()) for p in sorted(Path(root).rglob(RECORD_NAME))]
