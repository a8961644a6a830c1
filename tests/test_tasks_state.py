"""State tracking: exact answers on hand-built examples, generated labels against a reference parser,
the length curriculum, scaled accuracy and bad input."""

import numpy as np
import pytest
import torch

from hybrid.data import build_task
from hybrid.data.base import IGNORE
from hybrid.data.state_tracking import EQ, PERMS, SYM0, evaluate_expression
from hybrid.registry import ConfigError


def _task(kind, **kw):
    return build_task({"name": "state_tracking", "kind": kind, "vocab_size": 128, "num_test": 20, **kw})


def test_parity_hand_built():
    ex = _task("parity").encode([1, 0, 1, 1])  # BOS 1 0 1 1 EQ -> 1
    assert ex["inputs"].tolist() == [[1, SYM0 + 1, SYM0, SYM0 + 1, SYM0 + 1, EQ]]
    assert ex["labels"].tolist() == [[IGNORE] * 5 + [SYM0 + 1]]
    assert _task("parity").encode([1, 1, 0, 0, 0])["labels"][0, -1] == SYM0 + 0
    every = _task("parity", label_mode="every").encode([1, 0, 1, 1])["labels"][0]
    assert (every[1:5] - SYM0).tolist() == [1, 1, 0, 1] and every[5] == IGNORE


def test_modular_arithmetic_hand_built():
    p = 5
    plus, minus, times, open_, close = p, p + 1, p + 2, p + 3, p + 4
    # 3 + 4 * 2 - 1 = 10 = 0 (mod 5): * binds tighter
    assert _task("mod_arith").encode([3, plus, 4, times, 2, minus, 1])["labels"][0, -1] == SYM0 + 0
    # ( 3 + 4 ) * 2 = 14 = 4 (mod 5)
    ex = _task("mod_arith_brackets").encode([open_, 3, plus, 4, close, times, 2])
    assert ex["labels"][0, -1] == SYM0 + 4 and (ex["labels"][0, :-1] == IGNORE).all()
    assert evaluate_expression("(3+4)*2", 5) == 4
    assert evaluate_expression("2-(3*(4+1))", 5) == 2
    assert evaluate_expression("((1+2)*(3-4))", 7) == 4  # -3 mod 7
    assert evaluate_expression("2*2*2", 3) == 2


def test_s5_hand_built():
    swap01 = PERMS.index((1, 0, 2, 3, 4))
    cycle = PERMS.index((1, 2, 3, 4, 0))  # x -> x + 1
    ex = _task("s5", label_mode="every").encode([swap01, cycle])
    # apply swap01 then the cycle: 0 -> 1 -> 2, 1 -> 0 -> 1, 2 -> 2 -> 3, 3 -> 4, 4 -> 0
    assert (ex["labels"][0, 1:3] - SYM0).tolist() == [swap01, PERMS.index((2, 1, 3, 4, 0))]
    assert PERMS.index((2, 1, 3, 4, 0)) != PERMS.index((1, 0, 3, 4, 2))  # order matters: S5 is not abelian


@pytest.mark.parametrize("kind", ["mod_arith", "mod_arith_brackets"])
def test_generated_expressions_match_the_reference_parser(kind):
    task = _task(kind, modulus=7, max_len=31, test_min_len=21, test_max_len=41)
    for batch in (task.train_batch(0, 64), task.test_set()):
        for x, y in zip(batch["inputs"], batch["labels"]):
            sym = [t - SYM0 for t in x.tolist() if t >= SYM0]
            eq = x.tolist().index(EQ)
            assert len(sym) % 2 == 1 and (y != IGNORE).sum() == 1 and y[eq] != IGNORE
            assert evaluate_expression(sym, 7) == y[eq] - SYM0
    # brackets appear, nested, and balanced
    if kind == "mod_arith_brackets":
        x = task.test_set()["inputs"]
        assert (x == SYM0 + 7 + 3).any() and ((x == SYM0 + 7 + 3).sum(1) == (x == SYM0 + 7 + 4).sum(1)).all()


def test_parity_and_s5_labels_against_a_direct_computation():
    task = _task("parity", label_mode="final")
    b = task.train_batch(1, 64)
    for x, y in zip(b["inputs"].tolist(), b["labels"].tolist()):
        bits = [t - SYM0 for t in x if t >= SYM0]
        assert y[x.index(EQ)] - SYM0 == sum(bits) % 2
    task = _task("s5", label_mode="every")
    b = task.train_batch(1, 8)
    for x, y in zip(b["inputs"].tolist(), b["labels"].tolist()):
        state = tuple(range(5))
        for p, t in enumerate(x):
            if t >= SYM0:
                g = PERMS[t - SYM0]
                state = tuple(g[state[i]] for i in range(5))
                assert PERMS[y[p] - SYM0] == state


def test_length_curriculum_and_splits():
    task = _task("parity", min_len=3, max_len=40, curriculum_steps=100, curriculum_start=10, test_min_len=50, test_max_len=60)
    assert [task.curriculum_max(i) for i in (0, 50, 99, 100, 10_000)] == [10, 25, 39, 40, 40]

    def lengths(batch):
        return (batch["inputs"] >= SYM0).sum(1)

    assert lengths(task.train_batch(0, 256)).max() <= 10 and lengths(task.train_batch(0, 256)).min() >= 3
    late = lengths(task.train_batch(500, 256))
    assert late.max() > 30 and late.max() <= 40
    assert task.train_batch(0, 4)["inputs"].shape[1] == 42  # width max_len + 2 throughout training
    test_len = lengths(task.test_set())
    assert test_len.min() >= 50 and test_len.max() <= 60  # evaluation only on longer sequences
    assert task.length_overrides(320) == {"test_min_len": 320, "test_max_len": 320} and task.train_length() == 40


def test_scaled_accuracy():
    task = _task("mod_arith", modulus=5)
    b = {k: v for k, v in task.test_set().items()}
    y = b["labels"]
    m = task.score(y.clamp(min=0), b)
    assert float(m["acc_scaled"]) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    wrong = torch.where(y != IGNORE, SYM0 + torch.from_numpy(rng.integers(0, 5, size=y.shape)), y.clamp(min=0))
    m = task.score(wrong, b)
    assert abs(float(m["acc_scaled"])) < 0.2  # random answers score about 0
    assert float(m["acc_scaled"]) == pytest.approx((float(m["acc"]) - 0.2) / 0.8)
    assert any(k.startswith("acc_len/") for k in m)


def test_state_tracking_bad_input():
    with pytest.raises(ConfigError, match="modulus must be >= 2"):
        _task("mod_arith", modulus=1)
    with pytest.raises(ConfigError, match="vocab_size 16 is too small for s5: needs >= 123"):
        build_task({"name": "state_tracking", "kind": "s5", "vocab_size": 16})
    with pytest.raises(ConfigError, match="kind' must be one of 'parity'"):
        _task("majority")
    with pytest.raises(ConfigError, match="label_mode 'every' is for parity and s5"):
        _task("mod_arith", label_mode="every")
