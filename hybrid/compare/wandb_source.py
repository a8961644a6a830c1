"""The same ``Run`` rows from a W&B project, for users who log online.

``hybrid-train`` logs the resolved config plus ``pattern`` and ``n_params`` as the W&B run config and
its metrics under the same names as the local records, so a W&B run maps onto a ``Run`` one to one.
History is sampled (``samples``) to keep the API calls and the page small.
"""

from __future__ import annotations

from typing import Any

from hybrid.compare.runs import CompareError, Run

CURVE_KEYS = ("train/loss", "val/loss", "val/acc", "perf/tokens_per_s", "perf/peak_memory_mb")
STATUS = {"finished": "completed", "crashed": "failed", "failed": "failed", "killed": "failed", "running": "running"}


def load_wandb(path: str, api: Any = None, samples: int = 300, group: str | None = None) -> list[Run]:
    """Runs of ``entity/project`` (optionally one group, i.e. one sweep); ``api`` is injectable for tests."""
    if api is None:
        try:
            import wandb

            api = wandb.Api(timeout=60)
        except Exception as exc:  # no login, no network: say so instead of a traceback
            raise CompareError(f"cannot reach the W&B API for {path!r}: {exc}. Run `wandb login`, or compare the "
                               f"local sweep folders instead (they work offline)") from exc
    filters = {"group": group} if group else {}
    try:
        wruns = list(api.runs(path, filters=filters))
    except Exception as exc:
        raise CompareError(f"cannot list W&B runs of {path!r}: {exc}") from exc
    runs = [_to_run(w, samples) for w in wruns if (w.config or {}).get("pattern") and getattr(w, "job_type", "train") != "eval"]
    if not runs:
        raise CompareError(f"W&B project {path!r} has no hybrid-train runs" + (f" in group {group!r}" if group else ""))
    return runs


def _to_run(w: Any, samples: int) -> Run:
    config = dict(w.config)
    summary = {k: v for k, v in dict(w.summary).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    curves: dict[str, list[tuple[int, float]]] = {}
    keys = [*CURVE_KEYS, *(k for k in summary if "/route/" in k)]
    for row in w.history(samples=samples, keys=None, pandas=False) if samples else []:
        step = row.get("trainer/global_step", row.get("_step"))
        for k in keys:
            v = row.get(k)
            if isinstance(v, (int, float)) and step is not None:
                curves.setdefault(k, []).append((int(step), float(v)))
    if "best/val/acc" not in summary and curves.get("val/acc"):
        summary["best/val/acc"] = max(v for _, v in curves["val/acc"])  # records keep it; W&B only has history
    status = STATUS.get(str(w.state), str(w.state))
    return Run(name=f"{w.group or ''}/{w.name}".strip("/"), status=status, config=config, pattern=config.pop("pattern", {}),
               metrics=summary, n_params=config.pop("n_params", None),
               error=None if status == "completed" else {"type": "W&B", "message": f"run state {w.state}"},
               curves=curves, source=getattr(w, "url", ""))
