"""Interleaved recall and the MQAR variants: answers checked by re-reading the token stream,
metadata, the reduction of IR to MQAR, the error taxonomy, and capacity errors."""

import numpy as np
import pytest
import torch

from hybrid.data import build_task
from hybrid.data.base import IGNORE
from hybrid.data.interleaved import QRY, SEP, UPD
from hybrid.registry import ConfigError

IR_SMALL = {"name": "ir", "vocab_size": 160, "num_keys": 24, "num_values": 96, "seq_len": 160, "num_topics": 3,
            "facts_per_topic": 6, "distractor_mean": 3.0, "num_test": 30}


def _reread(task, row_x):
    """Reference reading of an IR sequence: bindings per (topic, key); the answer of each query."""
    cfg = task.cfg
    is_topic = lambda t: cfg.topic0 <= t < cfg.key0  # noqa: E731
    is_key = lambda t: cfg.key0 <= t < cfg.value0  # noqa: E731
    bind, hist, answers, topic = {}, {}, {}, None
    x = row_x.tolist()
    for p, t in enumerate(x):
        if is_topic(t) and (p == 0 or x[p - 1] != QRY):
            topic = t
        if is_key(t) and p + 1 < len(x):
            if p >= 2 and x[p - 2] == QRY:
                answers[p] = (bind[(x[p - 1], t)], hist[(x[p - 1], t)], x[p - 1], t)
            else:
                bind[(topic, t)] = x[p + 1]
                hist.setdefault((topic, t), []).append(x[p + 1])
    return answers, hist


@pytest.mark.parametrize("layout", ["segmented", "tagged"])
@pytest.mark.parametrize("mode", ["tail", "interleaved"])
def test_ir_answers_and_metadata(layout, mode):
    task = build_task({**IR_SMALL, "layout": layout, "query_mode": mode, "collision_rate": 0.7, "p_update": 0.3})
    b = task.train_batch(0, 16)
    x, y = b["inputs"], b["labels"]
    n_queries = task.cfg.num_facts
    assert ((y != IGNORE).sum(1) == n_queries).all()
    saw_collision = saw_update = False
    for i in range(16):
        answers, hist = _reread(task, x[i])
        scored = (y[i] != IGNORE).nonzero().flatten().tolist()
        assert sorted(answers) == scored  # loss exactly on the query keys
        for p in scored:
            value, history, topic, key = answers[p]
            assert y[i, p] == value and x[i, p + 1] == value and x[i, p - 2] == QRY
            assert b["updated"][i, p] == int(len(history) > 1)
            others = [v for (t, k), h in hist.items() if k == key and t != topic for v in h]
            assert b["collision"][i, p] == int(any(k == key and t != topic for (t, k) in hist))
            assert set(b["cross"][i, p][b["cross"][i, p] >= 0].tolist()) <= set(others)
            assert b["stale"][i, p][b["stale"][i, p] >= 0].tolist() == history[:-1][: task.cfg.taxonomy_width]
            assert b["distance"][i, p] > 0 and 1 <= b["topics"][i, p] <= 3
            saw_collision |= bool(b["collision"][i, p])
            saw_update |= bool(b["updated"][i, p])
        if mode == "tail":
            assert SEP in x[i].tolist()
    assert saw_collision and saw_update


def test_ir_reduces_to_mqar():
    """One topic, no collisions, updates or distractors: remove the tag tokens and it is MQAR."""
    K = 8
    task = build_task({"name": "ir", "vocab_size": 64, "num_keys": 16, "num_values": 32, "seq_len": 64, "num_topics": 1,
                       "facts_per_topic": K, "collision_rate": 0.0, "p_update": 0.0, "distractor_mean": 0.0, "num_test": 10})
    cfg = task.cfg
    b = task.train_batch(0, 32)
    for x, y in zip(b["inputs"].tolist(), b["labels"].tolist()):
        keep = [p for p, t in enumerate(x) if t not in (QRY, SEP, UPD, cfg.topic0)]
        xs, ys = [x[p] for p in keep], [y[p] for p in keep]
        keys, values = xs[0:2 * K:2], xs[1:2 * K:2]
        assert all(cfg.key0 <= k < cfg.value0 for k in keys) and len(set(keys)) == K  # K distinct keys
        assert all(cfg.value0 <= v < cfg.filler0 for v in values) and len(set(values)) == K
        assert all(t == IGNORE for t in ys[: 2 * K])  # nothing scored in the context
        kv = dict(zip(keys, values))
        q = [p for p, t in enumerate(ys) if t != IGNORE]
        assert sorted(xs[p] for p in q) == sorted(keys)  # every key queried once ...
        assert all(ys[p] == kv[xs[p]] == xs[p + 1] for p in q)  # ... labelled with its value, which follows it
        assert all(t == 0 for t in xs[4 * K:])  # then padding, as MQAR's zero filler
    for name in ("collision", "updated", "switches"):
        assert (b[name][b["labels"] != IGNORE] == 0).all()
    assert (b["topics"][b["labels"] != IGNORE] == 1).all()


def test_ir_taxonomy_on_hand_made_predictions():
    task = build_task({**IR_SMALL, "collision_rate": 1.0, "p_update": 0.5, "seq_len": 200})
    b = {k: v for k, v in task.test_set().items()}
    y = b["labels"]
    scored = y != IGNORE
    pred = y.clamp(min=0).clone()
    m = task.score(pred, b)
    assert float(m["acc"]) == 1.0 and float(m["err_cross_topic"]) == float(m["err_stale"]) == float(m["err_other"]) == 0
    assert "acc_dist/1" in m or any(k.startswith("acc_dist/") for k in m)
    assert {"acc_collision/1", "acc_updated/1", "acc_switches/0"} <= set(m)
    # answer every collided query with another topic's value, every updated one with its stale value
    cross = b["cross"][..., 0]
    stale = b["stale"][..., 0]
    pred = torch.where(scored & (stale >= 0), stale, pred)
    pred = torch.where(scored & (stale < 0) & (cross >= 0), cross, pred)
    m = task.score(pred, b)
    n = scored.sum().float()
    assert float(m["err_stale"]) == pytest.approx(float((scored & (stale >= 0)).sum() / n))
    assert float(m["err_cross_topic"]) > 0
    assert float(m["acc"] + m["err_cross_topic"] + m["err_stale"] + m["err_other"]) == pytest.approx(1.0)


def test_ir_bad_input():
    with pytest.raises(ConfigError, match="cannot fit 64 facts .* in seq_len 128"):
        build_task({"name": "ir", "seq_len": 128, "num_topics": 4, "facts_per_topic": 16})
    with pytest.raises(ConfigError, match="vocab_size 100 is too small"):
        build_task({"name": "ir", "vocab_size": 100})
    with pytest.raises(ConfigError, match="'query_mode' must be one of 'tail', 'interleaved'"):
        build_task({"name": "ir", "query_mode": "middle"})


def test_forgetting_mqar_latest_value():
    task = build_task({"name": "forgetting_mqar", "vocab_size": 64, "seq_len": 64, "num_kv_pairs": 6, "num_updates": 3,
                       "num_test": 10})
    b = task.train_batch(0, 16)
    for i in range(16):
        x, y = b["inputs"][i].tolist(), b["labels"][i].tolist()
        latest, first = {}, {}
        for p in range(0, 18, 2):  # 6 pairs then 3 updates
            first.setdefault(x[p], x[p + 1])
            latest[x[p]] = x[p + 1]
        q = [p for p, t in enumerate(y) if t != IGNORE]
        assert len(q) == 6 and all(p >= 18 for p in q)
        assert all(y[p] == latest[x[p]] for p in q)
        assert sum(b["updated"][i, p].item() for p in q) == 3
        assert all(b["stale"][i, p].item() == (first[x[p]] if latest[x[p]] != first[x[p]] else -1) for p in q)
    stale_answers = b["stale"].where(b["updated"] == 1, b["labels"]).clamp(min=0)
    m = task.score(stale_answers, {k: v for k, v in b.items() if k != "batch_index"})
    assert float(m["err_stale"]) == 1.0 and float(m["acc_updated/0"]) == 1.0


def test_compositional_mqar_pairs():
    task = build_task({"name": "compositional_mqar", "vocab_size": 96, "seq_len": 60, "num_kv_pairs": 9, "num_test": 10})
    b = task.train_batch(0, 8)
    for x, y in zip(b["inputs"].tolist(), b["labels"].tolist()):
        table = {(x[p], x[p + 1]): x[p + 2] for p in range(0, 27, 3)}
        assert len({a for a, _ in table}) == 3 and len({c for _, c in table}) == 3  # a 3 x 3 grid
        q = [p for p, t in enumerate(y) if t != IGNORE]
        assert len(q) == 9 and all(y[p] == table[(x[p - 1], x[p])] for p in q)
    with pytest.raises(ConfigError, match="perfect square"):
        build_task({"name": "compositional_mqar", "num_kv_pairs": 8})
    with pytest.raises(ConfigError, match="cannot fit 16 triplets in seq_len 64"):
        build_task({"name": "compositional_mqar", "seq_len": 64})
    with pytest.raises(ConfigError, match="num_updates must be in"):
        build_task({"name": "forgetting_mqar", "num_updates": 40})


def test_ir_generation_is_a_pure_function_of_the_seed():
    a = build_task({**IR_SMALL, "seed": 1}).sample(np.random.default_rng(3), 4)
    b = build_task({**IR_SMALL, "seed": 2}).sample(np.random.default_rng(3), 4)
    assert all(torch.equal(a[k], b[k]) for k in a)  # only the rng matters, the seed picks the rng
    assert not torch.equal(build_task({**IR_SMALL, "seed": 1}).train_batch(0, 4)["inputs"],
                           build_task({**IR_SMALL, "seed": 2}).train_batch(0, 4)["inputs"])
