"""``hybrid-quickstart``: the README's main command, the whole loop in miniature.

Runs the CPU-sized sweep ``experiment=quickstart_sweep`` (pure attention, pure Mamba-3 and one hybrid
on MQAR, two jobs at a time), then builds its dashboard and prints the path. Extra arguments go to
``hybrid-train``, e.g. ``hybrid-quickstart trainer.max_steps=100``.

Each job gets one torch thread (``OMP_NUM_THREADS=1`` unless set): two parallel jobs on a 2-core
machine each wanting every core would slow both down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from hybrid.compare.cli import build


def summary(sweep: Path) -> list[str]:
    """One line per job from its record.json: pattern, status, best held-out accuracy, steps, wall time."""
    lines = []
    for record in sorted(sweep.glob("*/record.json")):
        r = json.loads(record.read_text())
        m = r.get("metrics") or {}
        wall = ""
        if r.get("started") and r.get("finished"):
            seconds = (datetime.fromisoformat(r["finished"]) - datetime.fromisoformat(r["started"])).total_seconds()
            wall = f", {seconds:.0f} s"
        acc = m.get("best/val/acc")
        lines.append(f"{r.get('pattern', {}).get('canonical', '?')}: {r.get('status')}, best held-out accuracy "
                     f"{'n/a' if acc is None else f'{acc:.3f}'} after {int(m.get('global_step', 0))} steps{wall}"
                     f" (W&B offline run: {(r.get('wandb') or {}).get('dir', 'none')})")
    return lines


def main(argv: list[str] | None = None) -> None:
    extra = list(sys.argv[1:] if argv is None else argv)
    sweep_name = f"quickstart_sweep_{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **os.environ}
    env.setdefault("WANDB_MODE", "offline")
    cmd = [sys.executable, "-m", "hybrid.train", "-m", "experiment=quickstart_sweep", f"sweep_name={sweep_name}", *extra]
    print("hybrid-quickstart: " + " ".join(["hybrid-train", *cmd[3:]]), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.returncode)
    sweep = Path(env.get("HYBRID_LOG_DIR", "logs")) / "train" / "multiruns" / sweep_name
    print(f"hybrid-quickstart: sweep finished in {time.time() - t0:.0f} s: {sweep}", flush=True)
    for line in summary(sweep):
        print(f"hybrid-quickstart: {line}", flush=True)
    page = build([str(sweep)], png=True, title="hybrid quickstart: pure attention vs pure Mamba-3 vs hybrid on MQAR")
    print(f"hybrid-quickstart: dashboard written; open it in a browser:\n{page.resolve()}")


if __name__ == "__main__":
    main()
