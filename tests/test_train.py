"""End-to-end training: records, offline W&B, checkpoint resume, sweeps that survive a failing job,
and clear errors for bad input before training starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from hybrid.registry import ConfigError
from hybrid.train import train

TINY = [
    "model=tiny", "data.seq_len=16", "data.num_kv_pairs=2", "data.vocab_size=32", "data.num_test=40",
    "batch_size=8", "eval_batch_size=40", "trainer.max_steps=12", "trainer.val_check_interval=6",
    "trainer.enable_progress_bar=false", "callbacks.progress_bar=null",
]


def _cfg(*overrides):
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        return compose("train", overrides=[*TINY, *overrides])


def _record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())


def test_train_writes_record_and_offline_wandb(tmp_path):
    metrics = train(_cfg(), tmp_path)
    rec = _record(tmp_path)
    assert rec["status"] == "completed" and rec["metrics"]["global_step"] == 12
    assert "val/acc" in rec["metrics"] and "best/val/acc" in rec["metrics"]
    assert rec["pattern"]["canonical"] == "AA" and rec["pattern"]["family"] == "pure-A"
    assert rec["n_params"] > 0 and rec["config"]["model"]["pattern"] == "AA"
    assert metrics["val/acc"] == rec["metrics"]["val/acc"]
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and rec["wandb"]["id"] in offline[0].name
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file() and (tmp_path / "checkpoints" / "best.ckpt").is_file()
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    # Checkpoints load with weights_only=True (no pickled objects).
    torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)


def test_resume_after_crash_equals_uninterrupted(tmp_path):
    common = ["trainer.max_steps=16", "trainer.val_check_interval=100", "callbacks.checkpoint.every_n_train_steps=5",
              "callbacks.checkpoint.monitor=null", "logger=csv"]
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(_cfg(*common), straight)
    with pytest.raises(RuntimeError, match="injected failure at step 12"):
        train(_cfg(*common, "fail_at_step=12"), crashed)
    assert _record(crashed)["status"] == "failed"
    assert torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 10
    train(_cfg(*common, "ckpt_path=last"), crashed)
    assert _record(crashed)["status"] == "completed"
    a = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(crashed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 16
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k


def test_resume_continues_same_wandb_run(tmp_path):
    train(_cfg("trainer.max_steps=6"), tmp_path)
    first_id = (tmp_path / "wandb_id.txt").read_text()
    train(_cfg("trainer.max_steps=12", "ckpt_path=last"), tmp_path)
    assert (tmp_path / "wandb_id.txt").read_text() == first_id
    assert _record(tmp_path)["wandb"]["id"] == first_id
    assert all(first_id in p.name for p in (tmp_path / "wandb").glob("offline-run-*"))


@pytest.mark.parametrize("overrides,message", [
    (["model.pattern=AZ"], "unknown symbol 'Z'"),
    (["model.pattern=MMx"], "MMx"),
    (["model.pattern=x3"], "x3"),
    (["model.pattern="], "empty"),
    (["model.symbols={A: {mixer: atention}}"], "unknown mixer 'atention'"),
    (["model.d_model=30", "model.symbols={A: {mixer: attention, num_heads: 4}}"], "d_model \\(30\\) is not divisible"),
    (["data.num_kv_pairs=8", "data.seq_len=16"], "cannot fit 8 key-value pairs in seq_len 16"),
    (["ckpt_path=/nonexistent/x.ckpt"], "checkpoint not found: /nonexistent/x.ckpt"),
    (["ckpt_path=last"], "checkpoint not found: .*last.ckpt"),
    (["+trainer.max_step=3"], "unknown option\\(s\\) max_step"),
    (["optim.schedule=linear"], "must be one of 'cosine', 'wsd', 'constant'"),
])
def test_bad_input_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(_cfg(*overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert _record(tmp_path)["status"] == "failed"


def test_corrupt_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ConfigError, match="is corrupt or not a checkpoint"):
        train(_cfg(f"ckpt_path={bad}"), tmp_path / "run")
    truncated = tmp_path / "trunc.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(ConfigError, match="is corrupt"):
        train(_cfg(f"ckpt_path={truncated}"), tmp_path / "run2")


def test_multirun_survives_failing_job(tmp_path):
    """A sweep over architectures in which one job is invalid: the others finish and all are recorded."""
    env = {**os.environ, "HYBRID_LOG_DIR": str(tmp_path), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "hybrid.train", "-m", "model.pattern=AA,AZ,A", *TINY, "trainer.max_steps=4",
           "trainer.val_check_interval=4", "sweep_name=s", "logger=wandb"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "train" / "multiruns" / "s"
    records = {r["config"]["model"]["pattern"]: r for r in map(json.loads, (p.read_text() for p in sweep.glob("*/record.json")))}
    assert set(records) == {"AA", "AZ", "A"}
    assert records["AA"]["status"] == records["A"]["status"] == "completed"
    assert records["AZ"]["status"] == "failed" and "unknown symbol 'Z'" in records["AZ"]["error"]["message"]
    # Each job is its own W&B run.
    ids = {records[p]["wandb"]["id"] for p in ("AA", "A")}
    assert len(ids) == 2


def test_optuna_learning_rate_search_runs(tmp_path):
    """The Optuna sweep (sweep_lr_optuna) end to end at toy size: trials run, each is recorded."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    env = {**os.environ, "HYBRID_LOG_DIR": str(tmp_path), "WANDB_MODE": "offline"}
    cmd = [sys.executable, "-m", "hybrid.train", "-m", "experiment=sweep_lr_optuna", *TINY, "trainer.max_steps=4",
           "trainer.val_check_interval=2", "logger=csv", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1", "sweep_name=opt"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Best parameters" in proc.stdout + proc.stderr
    records = [json.loads(p.read_text()) for p in (tmp_path / "train" / "multiruns" / "opt").glob("*/record.json")]
    assert len(records) == 2 and all(r["status"] == "completed" for r in records)
    assert len({r["config"]["optim"]["lr"] for r in records}) == 2


def test_cli_lists_layers():
    out = subprocess.run([sys.executable, "-m", "hybrid.train", "--list-layers"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "attention [attention]" in out.stdout and "swiglu" in out.stdout
