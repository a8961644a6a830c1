"""Needle-in-a-haystack retrieval and variable tracking over a synthetic vocabulary (RULER's protocol
re-done at token level, for small models and lengths from 1k to 128k tokens).

niah:  BOS  hay .. [MAGIC k1 k2 IS d1..d7 DOT] .. hay .. [needle] ..  QRY k1 k2 IS d1..d7
vt:    BOS  hay .. [VAR x0 EQ d1..d5 DOT] .. [VAR x1 EQ VAR x0 DOT] .. hay ..  QRY d1..d5 IS x0 x1 ..

``num_needles`` > 1 with one query is RULER's multi-key NIAH; ``num_queries`` > 1 is multi-query.
The haystack is ``noise`` (one fixed random "sentence" repeated, like RULER's noise haystack) or
``random`` words. Labels sit on the answer tokens only (teacher-forced). Metrics: token accuracy,
``exact`` (every token of an answer right, RULER's string match), and accuracy by needle depth
decile and by distance. Examples are built one at a time from slices of a preallocated row and the
test set can be generated batch by batch (``test_batches``), so a 128k evaluation holds only the
batch in hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hybrid.data.base import IGNORE, Task
from hybrid.data.common import base_scores, distance_buckets, is_eval_batch, sliced_acc
from hybrid.registry import ConfigError, register_task

PAD, BOS, MAGIC, IS, DOT, QRY, VAR, EQ = range(8)
DIGIT0 = 8  # ten digit tokens
NAME0 = DIGIT0 + 10  # key / variable-name tokens, then haystack words
MIN_WORDS = 16


def _check_vocab(name: str, vocab_size: int, names: int) -> None:
    need = NAME0 + names + MIN_WORDS
    if vocab_size < need:
        raise ConfigError(f"{name} vocab_size {vocab_size} is too small: 18 structural/digit tokens + {names} name tokens "
                          f"+ {MIN_WORDS} haystack words needs vocab_size >= {need}")


@dataclass
class NIAHConfig:
    vocab_size: int = 512
    seq_len: int = 1024
    num_needles: int = 1
    num_queries: int = 1
    key_len: int = 2  # tokens per key
    value_len: int = 7  # digits per value
    num_names: int = 128  # key-token alphabet; the rest of the vocabulary is haystack words
    haystack: Literal["noise", "random"] = "noise"
    noise_len: int = 24  # length of the repeated noise sentence
    num_test: int = 100
    seed: int = 0

    def fixed_tokens(self) -> int:
        needle, query = self.key_len + self.value_len + 3, self.key_len + self.value_len + 2
        return 1 + self.num_needles * needle + self.num_queries * query

    def __post_init__(self):
        for f in ("num_needles", "num_queries", "key_len", "value_len", "num_names", "num_test", "noise_len"):
            if getattr(self, f) < 1:
                raise ConfigError(f"niah {f} must be >= 1, got {getattr(self, f)}")
        if self.num_queries > self.num_needles:
            raise ConfigError(f"niah num_queries {self.num_queries} > num_needles {self.num_needles}: "
                              "only needles can be asked for")
        if self.num_names < self.num_needles * self.key_len:
            raise ConfigError(f"niah num_names {self.num_names} < num_needles * key_len = {self.num_needles * self.key_len}")
        _check_vocab("niah", self.vocab_size, self.num_names)
        if self.seq_len < self.fixed_tokens():
            raise ConfigError(f"niah cannot fit {self.num_needles} needles and {self.num_queries} queries in seq_len "
                              f"{self.seq_len}: needs seq_len >= {self.fixed_tokens()}")


class _HaystackTask(Task):
    """Shared machinery: haystack words, inserting pieces at depths, lazy test batches, metrics."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.vocab_size, self.seq_len = cfg.vocab_size, cfg.seq_len
        self.word0 = NAME0 + cfg.num_names
        sentence_rng = np.random.default_rng([cfg.seed, 7])  # one noise sentence per seed, shared by both splits
        self.noise = sentence_rng.integers(self.word0, cfg.vocab_size, size=cfg.noise_len)

    def _hay(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.cfg.haystack == "noise":
            start = int(rng.integers(self.cfg.noise_len))  # vary the phase so depth is not given away
            return np.resize(np.roll(self.noise, -start), n)
        return rng.integers(self.word0, self.cfg.vocab_size, size=n)

    def _assemble(self, rng: np.random.Generator, row: np.ndarray, pieces: list[np.ndarray], tail: int) -> list[tuple[int, float]]:
        """Write BOS, the haystack with ``pieces`` inserted in order at random depths, into ``row``,
        leaving ``tail`` tokens at the end. Returns (start position, depth in [0, 1)) per piece."""
        hay_len = len(row) - 1 - sum(len(p) for p in pieces) - tail
        offsets = np.sort(rng.integers(0, hay_len + 1, size=len(pieces)))
        hay = self._hay(rng, hay_len)
        row[0] = BOS
        pos, prev, placed = 1, 0, []
        for off, piece in zip(offsets.tolist(), pieces):
            row[pos: pos + off - prev] = hay[prev:off]
            pos += off - prev
            placed.append((pos, off / max(hay_len, 1)))
            row[pos: pos + len(piece)] = piece
            pos += len(piece)
            prev = off
        row[pos: pos + hay_len - prev] = hay[prev:]
        return placed

    def _digits(self, rng: np.random.Generator, n: int) -> np.ndarray:
        d = rng.integers(0, 10, size=n)
        d[0] = rng.integers(1, 10)
        return DIGIT0 + d

    def _empty(self, n: int) -> dict[str, np.ndarray]:
        L = self.cfg.seq_len
        return {"inputs": np.zeros((n, L), np.int64), "labels": np.full((n, L), IGNORE, np.int64),
                "distance": np.full((n, L), -1, np.int64), "depth": np.full((n, L), -1, np.int64),
                "qid": np.full((n, L), -1, np.int64)}

    def test_batches(self, batch_size: int):
        """The test set generated batch by batch from the same stream as ``test_set`` (examples are
        drawn one after another from one generator), never holding more than one batch."""
        if self._test is not None:
            yield from super().test_batches(batch_size)
            return
        rng = self.rng("test", 0)
        for i in range(0, self.cfg.num_test, batch_size):
            yield self.sample(rng, min(batch_size, self.cfg.num_test - i))

    @torch.no_grad()
    def score(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, correct, scored = base_scores(pred, batch)
        out["exact"] = exact_match(correct, scored, batch["qid"])
        if is_eval_batch(batch):
            out.update(distance_buckets(correct, scored, batch["distance"]))
            out.update(sliced_acc(correct, scored, batch["depth"], "acc_depth"))
        return out


def exact_match(correct: torch.Tensor, scored: torch.Tensor, qid: torch.Tensor) -> torch.Tensor:
    """Fraction of answers (row, qid) whose every scored token is right."""
    B = qid.shape[0]
    nq = int(qid.max().item()) + 1 if scored.any() else 1
    ids = (torch.arange(B, device=qid.device)[:, None] * nq + qid)[scored]
    wrong = torch.zeros(B * nq, device=qid.device).index_add_(0, ids, (~correct[scored]).float())
    present = torch.zeros(B * nq, device=qid.device, dtype=torch.bool)
    present[ids] = True
    return (wrong[present] == 0).float().mean() if present.any() else torch.zeros((), device=qid.device)


@register_task("niah", NIAHConfig)
class NeedleInAHaystack(_HaystackTask):
    """Needle-in-a-haystack: retrieve the digit value stored under a multi-token key."""

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        out = self._empty(n)
        kl, vl = cfg.key_len, cfg.value_len
        qlen = kl + vl + 2
        for i in range(n):
            keys = (NAME0 + rng.permutation(cfg.num_names)[: cfg.num_needles * kl]).reshape(cfg.num_needles, kl)
            values = [self._digits(rng, vl) for _ in range(cfg.num_needles)]
            needles = [np.concatenate([[MAGIC], keys[j], [IS], values[j], [DOT]]) for j in range(cfg.num_needles)]
            row = out["inputs"][i]
            placed = self._assemble(rng, row, needles, cfg.num_queries * qlen)
            asked = rng.permutation(cfg.num_needles)[: cfg.num_queries]
            pos = cfg.seq_len - cfg.num_queries * qlen
            for q, j in enumerate(asked.tolist()):
                row[pos: pos + qlen] = np.concatenate([[QRY], keys[j], [IS], values[j]])
                ans = pos + 1 + kl  # the IS token: its label is the first digit
                span = slice(ans, ans + vl)
                out["labels"][i, span] = values[j]  # the IS token predicts d1, d1 predicts d2, ...
                out["distance"][i, span] = ans - (placed[j][0] + 1 + kl)
                out["depth"][i, span] = min(int(placed[j][1] * 10), 9)
                out["qid"][i, span] = q
                pos += qlen
        return {k: torch.from_numpy(v) for k, v in out.items()}


@dataclass
class VTConfig:
    vocab_size: int = 512
    seq_len: int = 1024
    num_chains: int = 1  # chains beyond the first are distractors with other values
    num_hops: int = 4  # VAR y = VAR x statements after the initial assignment
    value_len: int = 5
    num_names: int = 128
    haystack: Literal["noise", "random"] = "noise"
    noise_len: int = 24
    num_test: int = 100
    seed: int = 0

    def fixed_tokens(self) -> int:
        chain = (self.value_len + 4) + self.num_hops * 5
        return 1 + self.num_chains * chain + (self.value_len + 2 + self.num_hops + 1)

    def __post_init__(self):
        for f in ("num_chains", "value_len", "num_names", "num_test", "noise_len"):
            if getattr(self, f) < 1:
                raise ConfigError(f"vt {f} must be >= 1, got {getattr(self, f)}")
        if self.num_hops < 0:
            raise ConfigError(f"vt num_hops must be >= 0, got {self.num_hops}")
        if self.num_names < self.num_chains * (self.num_hops + 1):
            raise ConfigError(f"vt num_names {self.num_names} < num_chains * (num_hops + 1) = "
                              f"{self.num_chains * (self.num_hops + 1)} distinct variables")
        _check_vocab("vt", self.vocab_size, self.num_names)
        if self.seq_len < self.fixed_tokens():
            raise ConfigError(f"vt cannot fit {self.num_chains} chains of {self.num_hops} hops and the query in seq_len "
                              f"{self.seq_len}: needs seq_len >= {self.fixed_tokens()}")


@register_task("vt", VTConfig)
class VariableTracking(_HaystackTask):
    """Variable tracking: follow a chain of assignments and name every variable holding the value."""

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        out = self._empty(n)
        h, vl = cfg.num_hops, cfg.value_len
        qlen = vl + 2 + h + 1
        for i in range(n):
            names = (NAME0 + rng.permutation(cfg.num_names)[: cfg.num_chains * (h + 1)]).reshape(cfg.num_chains, h + 1)
            values = [self._digits(rng, vl) for _ in range(cfg.num_chains)]
            while len({v.tobytes() for v in values}) < len(values):  # chains hold different values
                values = [self._digits(rng, vl) for _ in range(cfg.num_chains)]
            order = np.repeat(np.arange(cfg.num_chains), h + 1)
            rng.shuffle(order)  # interleave the chains, each in its own order
            step = [0] * cfg.num_chains
            pieces, who = [], []
            for c in order.tolist():
                j = step[c]
                step[c] += 1
                x = names[c, j]
                pieces.append(np.concatenate([[VAR, x, EQ], values[c], [DOT]]) if j == 0
                              else np.array([VAR, x, EQ, VAR, names[c, j - 1], DOT]))
                who.append((c, j))
            row = out["inputs"][i]
            placed = self._assemble(rng, row, pieces, qlen)
            where = {cj: p for cj, p in zip(who, placed)}
            pos = cfg.seq_len - qlen
            answer = names[0]
            row[pos: pos + qlen] = np.concatenate([[QRY], values[0], [IS], answer])
            ans = pos + 1 + vl  # the IS token
            out["labels"][i, ans: ans + h + 1] = answer
            for j in range(h + 1):
                start, depth = where[(0, j)]
                out["distance"][i, ans + j] = ans + j - (start + 1)
                out["depth"][i, ans + j] = min(int(depth * 10), 9)
            out["qid"][i, ans: ans + h + 1] = 0
        return {k: torch.from_numpy(v) for k, v in out.items()}
