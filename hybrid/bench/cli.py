"""``hybrid-bench``: training throughput, prefill and decode cost per layer pattern (Hydra app).

    hybrid-bench                                    # preset_125m: Ax12, Mx12, MMMAx3, MMMWx3, MMMRx3 on the GPU
    hybrid-bench bench=cpu_smoke                    # tiny, seconds on a CPU
    hybrid-bench bench.patterns=[AA,MA] bench.max_len=8192 bench.peak_tflops=989

Writes ``bench.json`` and ``bench.html`` into the run folder and prints the JSON path. Bad input (an
unknown pattern symbol, min_len > max_len, an unknown field) exits with status 2 before anything is timed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from hybrid.bench.config import bench_config
from hybrid.bench.run import run_bench
from hybrid.registry import ConfigError

log = logging.getLogger("hybrid.bench")


def bench(cfg: DictConfig | dict, out_dir: Path) -> Path:
    """Validate, measure, write ``bench.json`` (+ ``bench.html``) into ``out_dir``; returns the JSON path."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    bc = bench_config(plain["bench"])  # every ConfigError is raised here, before any timing
    report = run_bench(bc)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=1))
    if plain.get("plot", True):
        try:  # plotly is optional (the `dashboard`/`dev` extras): a GPU box may only have torch
            from hybrid.bench.plot import write_html
        except ImportError:
            log.warning("plotly is not installed: no bench.html (the JSON report has every number)")
        else:
            write_html(report, out_dir / "bench.html")
    return path


@hydra.main(version_base="1.3", config_path="pkg://hybrid.conf", config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    try:
        path = bench(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        raise SystemExit(2) from exc
    print(path)


def main() -> None:
    torch.set_float32_matmul_precision("high")
    _hydra_main()


if __name__ == "__main__":
    main()
