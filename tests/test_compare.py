"""The comparison dashboard and the ready-made sweeps: a real 3-job joblib sweep with one failing job,
its dashboard rendered in headless Chromium (screenshot kept as a test artifact), bad input, and every
sweep config composing into valid models and tasks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from hybrid.compare.browser import dump_dom, find_chromium, screenshot
from hybrid.compare.cli import build, main
from hybrid.compare.figures import distance, pareto_front
from hybrid.compare.runs import CompareError, Run

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("HYBRID_TEST_ARTIFACTS", ROOT / "tests" / "artifacts"))
TINY = [
    "model=tiny", "data.seq_len=16", "data.num_kv_pairs=2", "data.vocab_size=32", "data.num_test=40",
    "batch_size=8", "eval_batch_size=40", "trainer.max_steps=12", "trainer.val_check_interval=6",
    "trainer.log_every_n_steps=2", "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
    "callbacks.throughput.log_every=2",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Pure attention, a routed hybrid and a hybrid made to fail at step 3, two jobs at a time."""
    logs = tmp_path_factory.mktemp("logs")
    env = {**os.environ, "HYBRID_LOG_DIR": str(logs), "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "hybrid.train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "model.pattern=AA,MR,MA", "+fail_map={AA: null, MR: null, MA: 3}", "fail_at_step='${fail_map.${model.pattern}}'",
           *TINY, "sweep_name=s", "logger=csv"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = logs / "train" / "multiruns" / "s"
    aa = next(p.parent for p in folder.glob("*/record.json") if json.loads(p.read_text())["config"]["model"]["pattern"] == "AA")
    from hybrid.eval.cli import main as eval_main  # extrapolation results for one run, for that chart

    eval_main([str(aa), "--lengths", "16", "32", "--max-examples", "20", "--logger", "none"])
    return folder


def test_failing_job_is_recorded_and_listed(sweep, tmp_path):
    records = {r["config"]["model"]["pattern"]: r for r in map(json.loads, (p.read_text() for p in sweep.glob("*/record.json")))}
    assert records["AA"]["status"] == records["MR"]["status"] == "completed"
    assert records["MA"]["status"] == "failed" and "injected failure at step 3" in records["MA"]["error"]["message"]
    page = build([str(sweep)], out=tmp_path)
    html = page.read_text()
    assert "pure</span> · AA" in html and "hybrid</span> · MR" in html            # both completed runs in the table
    assert "Failed or unfinished runs (1)" in html and "injected failure at step 3" in html
    assert "cdn.plot.ly" not in html.split("</head>")[1] and "<script src=" not in html  # self-contained


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (install Debian's chromium; .ci/run does)")
def test_dashboard_renders_in_headless_chromium(sweep, tmp_path):
    page = build([str(sweep)], out=tmp_path)
    dom, console_errors = dump_dom(page)
    body = dom[dom.index("<body"):dom.index(">", dom.index("<body"))]
    attrs = dict(a.split("=", 1) for a in body.replace('"', "").split()[1:] if "=" in a)
    total, ok = int(attrs["data-charts-total"]), int(attrs["data-charts-ok"])
    assert total >= 5 and ok == total, (attrs, "charts without data")
    assert attrs["data-page-errors"].replace("&quot;", "") == "[]", attrs["data-page-errors"]
    assert not console_errors, console_errors
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = screenshot(page, ARTIFACTS / "dashboard.png")
    assert png.stat().st_size > 20_000


def test_bad_input(sweep, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CompareError, match="no runs found"):
        build([str(empty)])
    with pytest.raises(SystemExit) as exc:
        main([str(empty)])
    assert exc.value.code == 2 and "no runs found" in capsys.readouterr().err
    with pytest.raises(CompareError, match="no such file"):
        build([str(tmp_path / "missing")])
    # A truncated and a corrupt record are skipped with a warning; the rest is still shown.
    copy = tmp_path / "sweep"
    shutil.copytree(sweep, copy, ignore=shutil.ignore_patterns("dashboard"))
    good = sorted(copy.glob("*/record.json"))
    good[0].write_text(good[0].read_text()[:200])
    (copy / "9").mkdir()
    (copy / "9" / "record.json").write_bytes(b"\x00\xff garbage")
    html = build([str(copy)], out=tmp_path / "out").read_text()
    assert html.count("skipped ") == 2 and "unreadable run record" in html
    assert "hybrid comparison" in html and "class='chart'" in html
    with pytest.raises(CompareError, match="unknown metric 'val/acuracy'.*val/acc"):
        build([str(sweep)], out=tmp_path / "o2", metric="val/acuracy")


def _run(arch: str, pure: bool, **metrics) -> Run:
    return Run(name=arch, status="completed", config={"data": {"seq_len": 64}}, metrics=metrics,
               pattern={"canonical": arch, "is_pure": pure, "recurrent_state_bytes": 100, "kv_bytes_per_token": 8})


def test_pareto_front_and_distance_chart():
    assert pareto_front([(1, 0.5), (2, 0.4), (3, 0.9), (3, 0.7), (5, 0.9)]) == [(1, 0.5), (3, 0.9)]
    runs = [_run("AA", True, **{"val/acc": 0.5, "val/acc_dist/1": 0.9, "val/acc_dist/8": 0.2}), _run("MA", False)]
    fig = distance(runs, {"AA": "red", "MA": "blue"})
    assert len(fig.data) == 1 and list(fig.data[0].x) == [1, 8] and fig.data[0].name == "pure · AA"


SWEEPS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("sweep_*.yaml"))


def _plugin(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(f"hydra_plugins.{name}") is not None


@pytest.mark.parametrize("name", [*SWEEPS, "quickstart_sweep"])
def test_sweep_configs_compose_and_validate(name):
    """Every ready-made sweep composes, and its first and last grid points build a valid model and task."""
    from hybrid.data import build_task
    from hybrid.model import model_config
    from hybrid.pattern import parse_pattern

    if name == "sweep_lr_optuna" and not _plugin("hydra_optuna_sweeper"):
        pytest.skip("hydra-optuna-sweeper not installed")
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        base = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
        params = {k: str(v) for k, v in base.hydra.sweeper.params.items()}
        assert params, name
        grid = {k: v.split(",") for k, v in params.items() if not v.startswith(("tag(", "interval(", "choice(", "range("))}
        for pick in (0, -1):
            cfg = compose("train", overrides=[f"experiment={name}", *(f"{k}={v[pick]}" for k, v in grid.items())])
            c = OmegaConf.to_container(cfg, resolve=True)
            task, mcfg = build_task(c["data"]), model_config(c["model"])
            assert mcfg.vocab_size >= task.vocab_size
            parse_pattern(mcfg.pattern, n_layers=mcfg.n_layers, symbols=mcfg.symbols).summary(mcfg.d_model)
            assert c["experiment_name"] == name and c["logger"]["wandb"]["group"] == name


@pytest.mark.skipif(not _plugin("hydra_submitit_launcher"), reason="hydra-submitit-launcher not installed")
def test_slurm_launcher_config_composes():
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.gpus_per_node == 1


class _FakeWandbRun:
    def __init__(self, name, pattern, state):
        self.name, self.group, self.state, self.job_type, self.url = name, "sweep_x", state, "train", ""
        self.config = {"model": {"pattern": pattern}, "data": {"seq_len": 64, "num_kv_pairs": 8}, "n_params": 1000,
                       "pattern": {"canonical": pattern, "is_pure": len(set(pattern)) == 1, "recurrent_state_bytes": 0,
                                   "kv_bytes_per_token": 64}}
        self.summary = {"val/acc": 0.4, "val/loss": 2.0, "_runtime": 10}

    def history(self, samples, keys, pandas):
        return [{"trainer/global_step": s, "val/acc": 0.1 * s, "train/loss": 3.0 - 0.1 * s} for s in range(1, 6)]


class _FakeApi:
    def runs(self, path, filters):
        assert path == "me/proj" and filters == {"group": "sweep_x"}
        return [_FakeWandbRun("a", "AA", "finished"), _FakeWandbRun("b", "MA", "crashed")]


def test_wandb_source_maps_runs():
    from hybrid.compare.wandb_source import load_wandb

    runs = load_wandb("me/proj", api=_FakeApi(), group="sweep_x")
    assert [r.status for r in runs] == ["completed", "failed"] and runs[0].label == "pure · AA"
    assert runs[0].metric("best/val/acc") == pytest.approx(0.5) and len(runs[0].curves["train/loss"]) == 5
    assert runs[0].n_params == 1000 and runs[0].cache_bytes_per_token == 64


def test_quickstart_summary_lines(tmp_path):
    from hybrid.compare.quickstart import summary

    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "record.json").write_text(json.dumps({
        "status": "completed", "started": "2026-11-26T04:39:05", "finished": "2026-11-26T04:39:53",
        "metrics": {"best/val/acc": 0.99675, "global_step": 350.0}, "pattern": {"canonical": "AA"},
        "wandb": {"dir": "w"}}))
    assert summary(tmp_path) == ["AA: completed, best held-out accuracy 0.997 after 350 steps, 48 s (W&B offline run: w)"]
