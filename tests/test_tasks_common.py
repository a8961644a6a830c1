"""Every data preset: shapes and dtypes, labels present, determinism from the seed, and training
examples that never equal a test example."""

import pytest
import torch

from hybrid.data import build_task
from hybrid.data.base import IGNORE
from hybrid.eval.cli import data_presets
from hybrid.eval.throughput import preset

SMALL = {  # keep every preset quick: a small test set, short sequences where the preset is long
    "niah": {"seq_len": 256}, "niah_multikey": {"seq_len": 256}, "vt": {"seq_len": 256},
    "stdlib": {"seq_len": 64}, "parity": {"test_max_len": 60}, "mod_arith": {"test_max_len": 60},
    "mod_arith_brackets": {"test_max_len": 60}, "s5": {"test_max_len": 60},
}
PRESETS = [p for p in data_presets() if p not in ("hf", "text_folder")]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_contract(name):
    cfg = preset(name, num_test=40, **SMALL.get(name, {}))
    task, again = build_task(cfg), build_task(cfg)
    b = task.train_batch(5, 8)
    x, y = b["inputs"], b["labels"]
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape and x.shape[0] == 8
    assert ((y != IGNORE).sum(1) > 0).all(), "every example has something to score"
    assert x.min() >= 0 and x.max() < task.vocab_size and y[y != IGNORE].max() < task.vocab_size
    for key, value in b.items():  # metadata is per example (and per position)
        if key != "batch_index":
            assert value.shape[:2] == x.shape, key
    # deterministic from (seed, index), different across indices
    b2 = again.train_batch(5, 8)
    assert all(torch.equal(b[k], b2[k]) for k in b)
    assert not torch.equal(task.train_batch(6, 8)["inputs"], x)
    # train and test disjoint, compared by the task's own row identity
    test_keys = set(task.row_keys(task.test_set()["inputs"].numpy()))
    for i in range(5):
        assert not test_keys & set(task.row_keys(task.train_batch(i, 16)["inputs"].numpy()))
    # metrics on perfect predictions
    m = task.score(y.clamp(min=0), {k: v for k, v in b.items() if k != "batch_index"})
    assert float(m["acc"]) == 1.0 and float(m["n_scored"]) == float((y != IGNORE).sum())


def test_disjointness_redraws_on_a_tiny_example_space():
    # parity over 3..6 bits: 120 distinct strings, so train rows would often equal test rows
    task = build_task({"name": "state_tracking", "kind": "parity", "min_len": 3, "max_len": 6, "test_min_len": 3,
                       "test_max_len": 8, "num_test": 60})
    test_keys = set(task.row_keys(task.test_set()["inputs"].numpy()))
    assert task.train_batch(0, 8)["inputs"].shape[1] != task.test_set()["inputs"].shape[1]  # widths differ
    for i in range(20):
        assert not test_keys & set(task.row_keys(task.train_batch(i, 32)["inputs"].numpy()))


def test_unknown_task_name():
    from hybrid.registry import ConfigError

    with pytest.raises(ConfigError, match="unknown task 'parityy'.*Valid tasks: .*state_tracking"):
        build_task({"name": "parityy"})
