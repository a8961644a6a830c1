"""Language modelling: the standard-library corpus (hash split, SHA-256), packing with document
boundaries (seq_idx), local folders, and clear errors for missing data or libraries."""

import importlib.util

import pytest
import torch

from hybrid.data import build_task
from hybrid.data.base import IGNORE
from hybrid.data.corpus import split_of
from hybrid.registry import ConfigError


@pytest.fixture(scope="module")
def stdlib_task():
    return build_task({"name": "lm", "seq_len": 128, "num_test": 16})


def test_stdlib_corpus_split_and_hash(stdlib_task):
    info = stdlib_task.describe()
    assert info["source"] == "stdlib" and len(info["sha256"]) == 64 and info["python_version"]
    assert info["n_docs"]["train"] > 20 * info["n_docs"]["val"] > 0
    assert info["n_tokens"]["train"] > 1_000_000
    # the split is a function of the path alone
    assert split_of("json/decoder.py", 0.01, 0.01) == split_of("json/decoder.py", 0.01, 0.01)
    assert build_task({"name": "lm", "seq_len": 128}).describe()["sha256"] == info["sha256"]


def test_packing_and_seq_idx(tmp_path):
    for i in range(60):  # short documents: most windows span several
        (tmp_path / f"d{i}.txt").write_text("abcdefghij"[: 3 + i % 7] * (1 + i % 3))
    task = build_task({"name": "lm", "source": "folder", "path": str(tmp_path), "seq_len": 48, "num_test": 4,
                       "val_fraction": 0.2, "test_fraction": 0.2})
    b = task.train_batch(0, 16)
    x, y, s = b["inputs"], b["labels"], b["seq_idx"]
    assert x.shape == y.shape == s.shape == (16, 48)
    assert (s[:, 0] == 0).all() and (s.diff(dim=1) >= 0).all() and (s[:, -1] > 1).all()  # doc id from 0, non-decreasing
    bos, eos = 256, 257
    boundary = s[:, 1:] != s[:, :-1]  # (B, T-1): a new document starts at t+1
    assert (y[:, :-1][boundary] == IGNORE).all()  # never scored across documents
    assert (x[:, 1:][boundary] == bos).all() and (x[:, :-1][boundary] == eos).all()
    inside = ~boundary
    assert torch.equal(y[:, :-1][inside], x[:, 1:][inside])  # next-token labels within a document


def test_stdlib_windows(stdlib_task):
    b = stdlib_task.train_batch(0, 8)
    assert b["inputs"].shape == b["seq_idx"].shape == (8, 128) and (b["labels"][b["labels"] != IGNORE] < 259).all()


def test_folder_source(tmp_path):
    for i in range(40):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 30)
    task = build_task({"name": "lm", "source": "folder", "path": str(tmp_path), "seq_len": 32, "num_test": 4,
                       "val_fraction": 0.2, "test_fraction": 0.1})
    info = task.describe()
    assert info["source"] == "folder" and sum(info["n_docs"].values()) == 40
    val_docs = {f"doc{i}.txt" for i in range(40) if split_of(f"doc{i}.txt", 0.2, 0.1) == "val"}
    test_text = bytes(t for t in task.test_set()["inputs"].flatten().tolist() if t < 256).decode()
    assert any(f"document {n.removeprefix('doc').removesuffix('.txt')} " in test_text for n in val_docs)
    assert task.train_batch(0, 4)["inputs"].shape == (4, 32)


def test_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        build_task({"name": "lm", "source": "folder", "path": str(tmp_path / "nope")})
    with pytest.raises(ConfigError, match="has no non-empty files matching"):
        build_task({"name": "lm", "source": "folder", "path": str(tmp_path)})
    with pytest.raises(ConfigError, match="needs data.path"):
        build_task({"name": "lm", "source": "folder"})
    (tmp_path / "one.txt").write_text("tiny")
    with pytest.raises(ConfigError, match="split has .* tokens"):
        build_task({"name": "lm", "source": "folder", "path": str(tmp_path), "seq_len": 64}).train_batch(0, 2)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_tokenizer_needs_transformers():
    with pytest.raises(ConfigError, match="needs the `transformers` library"):
        build_task({"name": "lm", "tokenizer": "gpt2"})


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_source_needs_datasets():
    with pytest.raises(ConfigError, match="needs the Hugging Face `datasets` library"):
        build_task({"name": "lm", "source": "hf", "path": "wikitext"}).describe()


def test_lm_metrics(stdlib_task):
    b = {k: v for k, v in stdlib_task.test_set().items()}
    logits = torch.nn.functional.one_hot(b["labels"].clamp(min=0), 259).float() * 20
    m = stdlib_task.metrics(logits, b)
    assert float(m["acc"]) == 1.0 and float(m["nll"]) < 1e-6 and "bits_per_token" in m


def test_training_run_records_the_corpus_hash(tmp_path):
    import json

    from hydra import compose, initialize_config_module

    from hybrid.train import train

    overrides = ["data=stdlib", "model=tiny", "data.seq_len=32", "data.num_test=8", "batch_size=4", "eval_batch_size=8",
                 "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
                 "callbacks.progress_bar=null", "logger=csv", "callbacks.checkpoint.monitor=val/loss",
                 "callbacks.checkpoint.mode=min"]
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        train(compose("train", overrides=overrides), tmp_path)
    rec = json.loads((tmp_path / "record.json").read_text())
    assert rec["status"] == "completed" and len(rec["data_info"]["sha256"]) == 64
    assert rec["data_info"]["source"] == "stdlib" and "val/nll" in rec["metrics"]
