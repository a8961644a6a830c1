import pytest
import torch

from hybrid.data import build_task
from hybrid.data.base import IGNORE
from hybrid.registry import ConfigError


def test_mqar_structure():
    task = build_task({"name": "mqar", "vocab_size": 64, "seq_len": 40, "num_kv_pairs": 5, "num_test": 20})
    b = task.train_batch(3, 8)
    x, y = b["inputs"], b["labels"]
    assert x.shape == y.shape == (8, 40)
    for row_x, row_y in zip(x, y):
        keys, values = row_x[0:10:2], row_x[1:10:2]
        assert len(set(keys.tolist())) == 5 and len(set(values.tolist())) == 5
        assert (keys < 32).all() and (keys >= 1).all() and (values >= 32).all()
        q = (row_y != IGNORE).nonzero().flatten()
        assert len(q) == 5 and (q >= 10).all()
        kv = dict(zip(keys.tolist(), values.tolist()))
        for p in q.tolist():  # the label at a query is the value bound to the key read there
            assert row_y[p].item() == kv[row_x[p].item()]


def test_mqar_deterministic_and_disjoint():
    cfg = {"name": "mqar", "vocab_size": 16, "seq_len": 8, "num_kv_pairs": 2, "num_test": 200}
    t1, t2 = build_task(cfg), build_task(cfg)
    assert torch.equal(t1.train_batch(7, 16)["inputs"], t2.train_batch(7, 16)["inputs"])
    assert not torch.equal(t1.train_batch(7, 16)["inputs"], t1.train_batch(8, 16)["inputs"])
    # A small example space makes collisions frequent: the redraw must keep the splits apart.
    test_rows = {tuple(r) for r in t1.test_set()["inputs"].tolist()}
    for i in range(50):
        rows = {tuple(r) for r in t1.train_batch(i, 64)["inputs"].tolist()}
        assert not rows & test_rows


def test_mqar_errors():
    with pytest.raises(ConfigError, match="cannot fit 40 key-value pairs in seq_len 128.*>= 4 \\* num_kv_pairs = 160"):
        build_task({"name": "mqar", "num_kv_pairs": 40, "seq_len": 128})
    with pytest.raises(ConfigError, match="unknown task 'mqr'. Did you mean 'mqar'"):
        build_task({"name": "mqr"})


def test_random_filler_never_uses_keys():
    task = build_task({"name": "mqar", "vocab_size": 64, "seq_len": 64, "num_kv_pairs": 4, "filler": "random"})
    b = task.train_batch(0, 16)
    x, y = b["inputs"], b["labels"]
    query_region = x[:, 8:]
    is_query = (y[:, 8:] != IGNORE)
    assert ((query_region < 32) == is_query).all()  # key tokens appear only at query positions
