"""Interleaved recall (IR): facts about several topics arrive interleaved with distractors; queries
ask for the value of a key *in a given topic*.

It stresses what a recurrent state finds hard and attention finds easy: carrying the current topic,
binding (topic, key) -> value when the same key means different things in different topics,
overwrites, and long gaps. Layouts (``S`` = topic tag token, ``U`` = UPD, ``Q`` = QRY):

    segmented:  S1 k v k v  f f f  S2 k v U k v'  f f  ...  SEP  Q S1 k v  Q S2 k v' ...
    tagged:     S1 k v S1 k v  f f f  S2 k v U S2 k v'  f f  ...  SEP  Q S1 k v ...

A segmented header is emitted only when the topic changes, so one topic carries no tag noise. The
label sits on the query's key (the value follows it, teacher-forced, as in MQAR). Queries come after
the context (``tail``) or at segment boundaries after a power-law delay from the fact's last write
(``interleaved``). With one topic, no collisions, updates or distractors the task is MQAR with
extra tag tokens (tests/test_tasks_recall.py checks that).

Per-query metadata (at the scored position): ``distance`` (tokens from the key's last write),
``switches`` (topic changes in between), ``collision`` (the key also belongs to another topic),
``updated`` (the fact was re-bound before the query), ``topics`` (distinct topics seen so far),
``cross`` / ``stale`` (B, T, C): values of the same key in other topics, and earlier values of the
fact, -1 padded, for the error taxonomy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hybrid.data.base import IGNORE, Task
from hybrid.data.common import base_scores, distance_buckets, is_eval_batch, sliced_acc
from hybrid.registry import ConfigError, register_task

PAD, BOS, SEP, QRY, UPD = 0, 1, 2, 3, 4
N_SPECIAL = 5


@dataclass
class IRConfig:
    vocab_size: int = 1024
    seq_len: int = 256
    num_topics: int = 2
    facts_per_topic: int = 8
    num_keys: int = 256  # shared key alphabet; the rest after keys and values is filler
    num_values: int = 512
    collision_rate: float = 0.5  # chance that a topic's key is reused from another topic
    p_switch: float = 0.7  # sticky topic chain: switch topic after a segment with this probability
    max_facts_per_segment: int = 4
    distractor_mean: float = 8.0  # mean filler run after each segment (geometric); 0 = none
    p_update: float = 0.25  # round(p_update * facts) extra writes re-bind a seen (topic, key)
    query_mode: Literal["tail", "interleaved"] = "tail"
    layout: Literal["segmented", "tagged"] = "segmented"
    num_queries: int | None = None  # None = one per fact
    power_a: float = 0.01  # interleaved query delay p(d) ~ (d + 1)^(a - 1), in segments
    taxonomy_width: int = 8  # cap on the cross-topic / stale values stored per query
    num_test: int = 1000
    seed: int = 0

    @property
    def num_facts(self) -> int:
        return self.num_topics * self.facts_per_topic

    @property
    def num_updates(self) -> int:
        return int(round(self.p_update * self.num_facts))

    @property
    def n_queries(self) -> int:
        return self.num_facts if self.num_queries is None else self.num_queries

    def __post_init__(self):
        S, F = self.num_topics, self.facts_per_topic
        for name in ("num_topics", "facts_per_topic", "max_facts_per_segment", "num_keys", "num_values", "num_test",
                     "taxonomy_width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"ir {name} must be >= 1, got {getattr(self, name)}")
        for name in ("collision_rate", "p_switch", "p_update"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"ir {name} must be in [0, 1], got {getattr(self, name)}")
        if self.distractor_mean < 0 or self.power_a <= 0:
            raise ConfigError(f"ir distractor_mean must be >= 0 and power_a > 0, got {self.distractor_mean}, {self.power_a}")
        if self.num_keys < F:
            raise ConfigError(f"ir num_keys {self.num_keys} < facts_per_topic {F}: a topic needs distinct keys")
        if not 1 <= self.n_queries <= self.num_facts:
            raise ConfigError(f"ir num_queries must be in [1, num_topics * facts_per_topic = {self.num_facts}], "
                              f"got {self.num_queries}")
        if self.num_values < self.num_facts + self.num_updates:
            raise ConfigError(f"ir num_values {self.num_values} < facts + updates = {self.num_facts + self.num_updates} "
                              "(values are distinct within an example)")
        need_vocab = N_SPECIAL + S + self.num_keys + self.num_values + (1 if self.distractor_mean > 0 else 0)
        if self.vocab_size < need_vocab:
            raise ConfigError(f"ir vocab_size {self.vocab_size} is too small: specials {N_SPECIAL} + topics {S} + keys "
                              f"{self.num_keys} + values {self.num_values} + filler needs vocab_size >= {need_vocab}")
        worst = self.worst_case_length()
        if worst > self.seq_len:
            raise ConfigError(f"ir cannot fit {self.num_facts} facts ({S} topics x {F}), {self.num_updates} updates and "
                              f"{self.n_queries} queries in seq_len {self.seq_len}: the worst case needs {worst} tokens "
                              "(raise seq_len, or lower num_topics / facts_per_topic / p_update / num_queries)")

    def worst_case_length(self) -> int:
        """Facts + UPD markers + one topic tag per write (worst case for both layouts) + 4-token
        queries + SEP; distractors shrink to fit whatever is left."""
        writes = self.num_facts + self.num_updates
        return 3 * writes + self.num_updates + 4 * self.n_queries + 1

    @property
    def topic0(self) -> int:
        return N_SPECIAL

    @property
    def key0(self) -> int:
        return N_SPECIAL + self.num_topics

    @property
    def value0(self) -> int:
        return self.key0 + self.num_keys

    @property
    def filler0(self) -> int:
        return self.value0 + self.num_values


META_KEYS = ("distance", "switches", "collision", "updated", "topics")


@register_task("ir", IRConfig)
class InterleavedRecall(Task):
    """Interleaved recall: topic-tagged key-value facts, distractors, collisions, updates, queries."""

    def __init__(self, cfg: IRConfig):
        super().__init__(cfg)
        self.vocab_size, self.seq_len = cfg.vocab_size, cfg.seq_len

    def length_overrides(self, length: int) -> dict:
        """A longer context spreads the same facts further apart: distractor runs grow with the length."""
        return {"seq_len": int(length), "distractor_mean": self.cfg.distractor_mean * length / self.cfg.seq_len}

    # ------------------------------------------------------------------ generation
    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        L, C = self.cfg.seq_len, self.cfg.taxonomy_width
        out = {"inputs": np.zeros((n, L), np.int64), "labels": np.full((n, L), IGNORE, np.int64),
               **{k: np.full((n, L), -1, np.int64) for k in META_KEYS},
               "cross": np.full((n, L, C), -1, np.int64), "stale": np.full((n, L, C), -1, np.int64)}
        for i in range(n):
            self._one(rng, out, i)
        return {k: torch.from_numpy(v) for k, v in out.items()}

    def _plan_topics(self, rng: np.random.Generator) -> list[list[int]]:
        """Key ids (0-based) of each topic; a key is reused from earlier topics with prob collision_rate."""
        cfg = self.cfg
        fresh = iter(rng.permutation(cfg.num_keys).tolist())
        used: list[int] = []
        topics = []
        for s in range(cfg.num_topics):
            mine: list[int] = []
            for _ in range(cfg.facts_per_topic):
                shared = [k for k in used if k not in mine] if s > 0 else []
                if shared and rng.random() < cfg.collision_rate:
                    mine.append(shared[rng.integers(len(shared))])
                else:
                    k = next(fresh, None)
                    if k is None:  # key alphabet exhausted: fall back to a collision
                        k = shared[rng.integers(len(shared))]
                    mine.append(k)
            used.extend(k for k in mine if k not in used)
            topics.append(mine)
        return topics

    def _plan_events(self, rng: np.random.Generator, topics: list[list[int]]) -> list[list[int]]:
        """Per topic, the key of each write in order: every key once, plus updates of already written keys."""
        cfg = self.cfg
        per_topic_updates = np.bincount(rng.integers(0, cfg.num_topics, cfg.num_updates), minlength=cfg.num_topics)
        events = []
        for s, keys in enumerate(topics):
            order = [keys[j] for j in rng.permutation(len(keys))]
            kinds = np.array([0] * len(keys) + [1] * int(per_topic_updates[s]))
            rng.shuffle(kinds)
            if kinds[0] == 1:  # the first write of a topic cannot be an update
                first_new = int(np.argmin(kinds))
                kinds[0], kinds[first_new] = 0, 1
            seq, written, it = [], [], iter(order)
            for kind in kinds:
                if kind == 0:
                    k = next(it)
                    written.append(k)
                else:
                    k = written[rng.integers(len(written))]
                seq.append(k)
            events.append(seq)
        return events

    def _plan_segments(self, rng: np.random.Generator, events: list[list[int]]) -> list[tuple[int, list[int]]]:
        """(topic, keys written) per segment, topics chosen by a sticky Markov chain."""
        cfg = self.cfg
        left = [list(e) for e in events]
        segments = []
        s = int(rng.integers(cfg.num_topics))
        while any(left):
            others = [t for t in range(cfg.num_topics) if left[t] and t != s]
            if not left[s] or (others and rng.random() < cfg.p_switch):
                s = others[rng.integers(len(others))]
            m = min(int(rng.integers(1, cfg.max_facts_per_segment + 1)), len(left[s]))
            segments.append((s, left[s][:m]))
            left[s] = left[s][m:]
        return segments

    def _one(self, rng: np.random.Generator, out: dict[str, np.ndarray], i: int) -> None:
        cfg = self.cfg
        topics = self._plan_topics(rng)
        segments = self._plan_segments(rng, self._plan_events(rng, topics))
        n_seg = len(segments)
        values = iter((cfg.value0 + rng.permutation(cfg.num_values)[: cfg.num_facts + cfg.num_updates]).tolist())
        owners: dict[int, set[int]] = {}
        for s, keys in enumerate(topics):
            for k in keys:
                owners.setdefault(k, set()).add(s)

        # Which facts are queried, and after which segment (tail: after the last one).
        facts = [(s, k) for s, keys in enumerate(topics) for k in keys]
        chosen = [facts[j] for j in rng.permutation(len(facts))[: cfg.n_queries]]
        last_seg: dict[tuple[int, int], int] = {}
        for j, (s, keys) in enumerate(segments):
            for k in keys:
                last_seg[(s, k)] = j
        after: list[list[tuple[int, int]]] = [[] for _ in range(n_seg)]
        for fact in chosen:
            if cfg.query_mode == "tail":
                after[-1].append(fact)
            else:
                w = last_seg[fact]
                span = n_seg - w
                p = np.arange(1, span + 1, dtype=np.float64) ** (cfg.power_a - 1)
                after[w + int(rng.choice(span, p=p / p.sum()))].append(fact)

        # Distractor runs, shrunk to fit what the facts, tags and queries leave.
        tag_tokens = (sum(len(k) for _, k in segments) if cfg.layout == "tagged"
                      else sum(1 for j in range(n_seg) if j == 0 or segments[j][0] != segments[j - 1][0]))
        fixed = 2 * (cfg.num_facts + cfg.num_updates) + cfg.num_updates + tag_tokens + 4 * cfg.n_queries
        fixed += 1 if cfg.query_mode == "tail" else 0
        runs = np.zeros(n_seg, np.int64)
        if cfg.distractor_mean > 0:
            runs = rng.geometric(1.0 / (1.0 + cfg.distractor_mean), size=n_seg) - 1
            budget = cfg.seq_len - fixed
            if runs.sum() > budget:
                runs = np.floor(runs * (budget / runs.sum())).astype(np.int64)
        filler = rng.integers(cfg.filler0, cfg.vocab_size, size=max(int(runs.sum()), 1)).tolist() if runs.sum() else []

        toks: list[int] = []
        lab: dict[int, tuple] = {}  # position -> (label, metadata...)
        current: dict[tuple[int, int], int] = {}
        history: dict[tuple[int, int], list[int]] = {}
        write_pos: dict[tuple[int, int], int] = {}
        write_seg: dict[tuple[int, int], int] = {}
        switches = np.zeros(n_seg, np.int64)
        seen_topics: set[int] = set()
        fpos = 0
        prev_topic = -1
        for j, (s, keys) in enumerate(segments):
            switches[j] = (switches[j - 1] if j else 0) + (1 if j and s != prev_topic else 0)
            seen_topics.add(s)
            if cfg.layout == "segmented" and s != prev_topic:
                toks.append(cfg.topic0 + s)
            prev_topic = s
            for k in keys:
                is_update = (s, k) in current
                if is_update:
                    toks.append(UPD)
                if cfg.layout == "tagged":
                    toks.append(cfg.topic0 + s)
                v = next(values)
                write_pos[(s, k)] = len(toks)
                write_seg[(s, k)] = j
                toks += [cfg.key0 + k, v]
                history.setdefault((s, k), []).append(v)
                current[(s, k)] = v
            r = int(runs[j])
            toks += filler[fpos: fpos + r]
            fpos += r
            if not after[j]:
                continue
            if cfg.query_mode == "tail":
                toks.append(SEP)
            for q in rng.permutation(len(after[j])).tolist():
                s_q, k_q = after[j][q]
                toks += [QRY, cfg.topic0 + s_q]
                pos = len(toks)
                cross = [v for t in owners[k_q] if t != s_q for v in history.get((t, k_q), [])]
                lab[pos] = (current[(s_q, k_q)], pos - write_pos[(s_q, k_q)], switches[j] - switches[write_seg[(s_q, k_q)]],
                            int(len(owners[k_q]) > 1), int(len(history[(s_q, k_q)]) > 1), len(seen_topics),
                            cross, history[(s_q, k_q)][:-1])
                toks += [cfg.key0 + k_q, current[(s_q, k_q)]]
        assert len(toks) <= cfg.seq_len + 1, (len(toks), cfg.seq_len)  # guaranteed by the capacity check
        n_tok = min(len(toks), cfg.seq_len)
        out["inputs"][i, :n_tok] = toks[:n_tok]
        C = cfg.taxonomy_width
        for pos, (label, dist, sw, col, upd, ntop, cross, stale) in lab.items():
            out["labels"][i, pos] = label
            for name, val in zip(META_KEYS, (dist, sw, col, upd, ntop)):
                out[name][i, pos] = val
            out["cross"][i, pos, : min(len(cross), C)] = cross[:C]
            out["stale"][i, pos, : min(len(stale), C)] = stale[:C]

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def score(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, correct, scored = base_scores(pred, batch)
        if not is_eval_batch(batch):
            return out
        out.update(distance_buckets(correct, scored, batch["distance"]))
        out.update(sliced_acc(correct, scored, batch["switches"].clamp(max=3), "acc_switches", {3: "3+"}))
        out.update(sliced_acc(correct, scored, batch["collision"], "acc_collision"))
        out.update(sliced_acc(correct, scored, batch["updated"], "acc_updated"))
        out.update(sliced_acc(correct, scored, batch["topics"], "acc_topics"))
        out.update(error_taxonomy(pred, batch, correct, scored))
        return out


def error_taxonomy(pred: torch.Tensor, batch: dict[str, torch.Tensor], correct: torch.Tensor,
                   scored: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fractions of scored queries answered with the same key's value in another topic (cross-topic
    confusion), with an earlier value of the fact (stale), or otherwise wrong. They sum to 1 - acc."""
    wrong = scored & ~correct
    p = pred.unsqueeze(-1)  # (B, T, 1)
    cross = wrong & (p == batch["cross"]).any(-1)
    stale = wrong & ~cross & (p == batch["stale"]).any(-1)
    other = wrong & ~cross & ~stale
    n = scored.sum().clamp(min=1).float()
    return {"err_cross_topic": cross.sum() / n, "err_stale": stale.sum() / n, "err_other": other.sum() / n}
