"""hybrid-eval: a checkpoint evaluated on its task and others, length extrapolation, exact metrics
over the whole test set, perplexity by position, records and W&B, and bad input."""

import json

import pytest
import torch
from hydra import compose, initialize_config_module

import hybrid
from hybrid.data import build_task
from hybrid.eval import evaluate, extrapolation_lengths, load_run, task_at_length
from hybrid.eval.cli import main
from hybrid.registry import ConfigError
from hybrid.train import train

TINY = [
    "model=tiny", "data.seq_len=16", "data.num_kv_pairs=2", "data.vocab_size=32", "data.num_test=40",
    "batch_size=8", "eval_batch_size=40", "trainer.max_steps=4", "trainer.val_check_interval=4",
    "trainer.enable_progress_bar=false", "callbacks.progress_bar=null", "logger=csv",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        train(compose("train", overrides=TINY), d)
    return d


def _record(run_dir):
    return json.loads((run_dir / "record.json").read_text())


def test_extrapolation_is_recorded(run_dir, capsys):
    main([str(run_dir), "--extrapolate", "--logger", "none", "data.num_test=20"])
    evals = _record(run_dir)["eval"]
    assert [e["length"] for e in evals[-3:]] == [32, 64, 128] and all(e["train_length"] == 16 for e in evals)
    assert all(0.0 <= e["metrics"]["acc"] <= 1.0 and e["metrics"]["n_examples"] == 20 for e in evals[-3:])
    assert "mqar L=128 (train 16)" in capsys.readouterr().out


def test_checkpoint_file_and_wandb(run_dir):
    main([str(run_dir / "checkpoints" / "last.ckpt"), "--lengths", "16", "data.num_test=10", "--logger", "wandb"])
    assert list((run_dir / "wandb").glob("offline-run-*")), "an offline W&B eval run in the run folder"
    assert _record(run_dir)["eval"][-1]["checkpoint"].endswith("last.ckpt")
    model, config, _ = load_run(run_dir, "last")
    assert config["data"]["name"] == "mqar" and model.cfg.vocab_size == 32


@pytest.mark.parametrize("argv,message", [
    (["--extrapolate", "--lengths", "8", "64"], "evaluation length\\(s\\) \\[8\\] below the training length 16"),
    (["data=nope"], "unknown data preset 'nope'. Valid presets: .*ir"),
    (["data=ir"], "task ir needs a vocabulary of 1024, the model has 32"),
    (["data.name=tower"], "unknown task 'tower'"),
    (["data.num_kv_pairs=40"], "cannot fit 40 key-value pairs"),
])
def test_bad_input(run_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main([str(run_dir), "--logger", "none", "--no-record", *argv])
    assert exc.value.code == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_missing_run(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nothing"), "--logger", "none"])
    assert "no run folder or checkpoint" in capsys.readouterr().err


def test_lengths_policy():
    assert extrapolation_lengths(256, None, True) == [512, 1024, 2048]
    assert extrapolation_lengths(256, [300], True) == [300]
    assert extrapolation_lengths(256, [100], False) == [100]
    with pytest.raises(ConfigError, match="below the training length 256"):
        extrapolation_lengths(256, [128], True)
    ir = task_at_length({"name": "ir", "seq_len": 256, "distractor_mean": 8.0}, 1024)
    assert ir.seq_len == 1024 and ir.cfg.distractor_mean == 32.0
    st = task_at_length({"name": "state_tracking", "max_len": 40}, 160)
    assert st.train_length() == 40 and (st.test_set()["inputs"] >= 3).sum(1).eq(160).all()


@torch.no_grad()
def test_evaluate_is_exact_over_batches():
    """Batch-by-batch evaluation with compaction equals scoring the whole test set at once."""
    torch.manual_seed(0)
    task = build_task({"name": "ir", "vocab_size": 160, "num_keys": 24, "num_values": 96, "seq_len": 200,
                       "num_topics": 3, "facts_per_topic": 6, "num_test": 23})
    model = hybrid.build_model({"pattern": "A", "d_model": 16, "vocab_size": 160, "ffn": None, "init_std": 0.5})
    test = task.test_set()
    pred = model(test["inputs"]).argmax(-1)
    direct = {k: float(v) for k, v in task.score(pred, test).items()}
    got = evaluate(model, task, batch_size=5)
    assert set(direct) <= set(got)
    assert all(got[k] == pytest.approx(direct[k], abs=1e-6) for k in direct)
    assert any(k.startswith("acc_dist/") for k in got) and any(k.startswith("ppl_pos/") for k in got)
    niah = build_task({"name": "niah", "seq_len": 128, "num_needles": 2, "num_queries": 2, "num_test": 9})
    got = evaluate(hybrid.build_model({"pattern": "A", "d_model": 16, "vocab_size": 512, "ffn": None}), niah, 4)
    assert 0 <= got["exact"] <= got["acc"] + 1e-9 and got["n_examples"] == 9


def test_perplexity_by_position_on_a_corpus(tmp_path):
    for i in range(30):
        (tmp_path / f"d{i}.txt").write_text("hello world " * (5 + i))
    task = build_task({"name": "lm", "source": "folder", "path": str(tmp_path), "seq_len": 64, "num_test": 6,
                       "val_fraction": 0.3, "test_fraction": 0.1})
    got = evaluate(hybrid.build_model({"pattern": "A", "d_model": 16, "vocab_size": 259, "ffn": None}), task, 4)
    pos = [k for k in got if k.startswith("ppl_pos/")]
    assert len(pos) == 16 and pos[0] == "ppl_pos/0" and all(got[k] > 1 for k in pos)
    assert got["ppl"] == pytest.approx(torch.tensor(got["nll"]).exp().item(), rel=1e-5)
