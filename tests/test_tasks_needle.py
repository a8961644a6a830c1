"""Needle retrieval and variable tracking: answers found by re-reading the haystack, lazy test batches
equal to the test set, very long examples, capacity errors."""

import numpy as np
import pytest
import torch

from hybrid.data import build_task
from hybrid.data.base import IGNORE
from hybrid.data.needle import DOT, EQ, IS, MAGIC, QRY, VAR
from hybrid.registry import ConfigError


def _find(seq, pattern):
    n = len(pattern)
    return [p for p in range(len(seq) - n + 1) if seq[p:p + n] == pattern]


@pytest.mark.parametrize("needles,queries", [(1, 1), (4, 1), (4, 3)])
def test_niah_answers(needles, queries):
    task = build_task({"name": "niah", "seq_len": 300, "num_needles": needles, "num_queries": queries, "num_test": 5})
    b = task.train_batch(0, 8)
    for i in range(8):
        x, y = b["inputs"][i].tolist(), b["labels"][i].tolist()
        assert x.count(MAGIC) == needles and x.count(QRY) == queries
        for q in [p for p, t in enumerate(x) if t == QRY]:
            key = x[q + 1: q + 3]
            (hit,) = _find(x[:q], [MAGIC, *key, IS])
            value = x[hit + 4: hit + 11]
            assert x[hit + 11] == DOT
            assert y[q + 3: q + 10] == value  # IS predicts d1, ..., d6 predicts d7
            assert x[q + 4: q + 11] == value
            assert 0 <= b["depth"][i, q + 3] <= 9 and b["distance"][i, q + 3] == (q + 3) - (hit + 3)
        assert sum(t != IGNORE for t in y) == 7 * queries
    m = task.score(b["labels"].clamp(min=0), {k: v for k, v in b.items() if k != "batch_index"})
    assert float(m["exact"]) == 1.0
    wrong = b["labels"].clamp(min=0).clone()
    wrong[0, (b["labels"][0] != IGNORE).nonzero()[0]] += 1  # one digit wrong in one answer
    m = task.score(wrong, {k: v for k, v in b.items() if k != "batch_index"})
    assert float(m["exact"]) == pytest.approx(1 - 1 / (8 * queries))


def test_vt_chain():
    task = build_task({"name": "vt", "seq_len": 400, "num_chains": 2, "num_hops": 3, "num_test": 5})
    b = task.train_batch(0, 8)
    for x, y in zip(b["inputs"].tolist(), b["labels"].tolist()):
        q = x.index(QRY)
        value = x[q + 1: q + 6]
        (start,) = _find(x[:q], [EQ, *value, DOT])
        chain = [x[start - 1]]
        while True:
            nxt = _find(x[:q], [EQ, VAR, chain[-1], DOT])
            if not nxt:
                break
            chain.append(x[nxt[0] - 1])
        assert len(chain) == 4
        assert [t for t in y if t != IGNORE] == chain and x[q + 6] == IS


def test_lazy_test_batches_equal_the_test_set_and_long_examples():
    task = build_task({"name": "niah", "seq_len": 512, "num_test": 7})
    lazy = list(task.test_batches(3))
    assert [len(b["inputs"]) for b in lazy] == [3, 3, 1]
    full = build_task({"name": "niah", "seq_len": 512, "num_test": 7}).test_set()
    assert all(torch.equal(torch.cat([b[k] for b in lazy]), full[k]) for k in full)
    long = build_task({"name": "niah", "seq_len": 131072, "num_needles": 4, "haystack": "random", "num_test": 1})
    b = long.sample(np.random.default_rng(0), 1)
    assert b["inputs"].shape == (1, 131072) and (b["labels"] != IGNORE).sum() == 7
    assert (b["inputs"] == MAGIC).sum() == 4


def test_needle_bad_input():
    with pytest.raises(ConfigError, match="cannot fit 8 needles and 1 queries in seq_len 64"):
        build_task({"name": "niah", "seq_len": 64, "num_needles": 8})
    with pytest.raises(ConfigError, match="num_queries 2 > num_needles 1"):
        build_task({"name": "niah", "num_queries": 2})
    with pytest.raises(ConfigError, match="vt cannot fit"):
        build_task({"name": "vt", "seq_len": 30})
