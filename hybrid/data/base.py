"""The task contract: deterministic batches addressed by (seed, index), and a fixed test set.

Batch ``i`` of the training stream is a pure function of the task config and ``i``, so a resumed run
sees exactly the batches an uninterrupted run would, and no data order lives outside the checkpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from hybrid.registry import TASKS, ConfigError

IGNORE = -100  # label value that is not scored


class Task:
    """Base class of registered tasks.

    A batch is a dict with ``inputs`` (B, T) int64 token ids and ``labels`` (B, T) int64, where
    ``labels[b, t]`` is the target for the prediction made after reading ``inputs[b, : t + 1]``
    (IGNORE where nothing is scored); tasks that pack documents add ``seq_idx`` (B, T).
    """

    vocab_size: int
    seq_len: int

    def __init__(self, cfg: Any):
        self.cfg = cfg
        self._test: dict[str, torch.Tensor] | None = None
        self._test_rows: set[bytes] | None = None

    # subclasses implement this: `n` examples from numpy generator `rng`
    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError  # abstract

    def sample_train(self, rng: np.random.Generator, n: int, index: int) -> dict[str, torch.Tensor]:
        """Training examples for batch ``index``; tasks with a curriculum override this (it must stay a
        pure function of the config, ``rng`` and ``index`` so resumed runs see the same batches)."""
        return self.sample(rng, n)

    def row_keys(self, inputs: np.ndarray) -> list[bytes]:
        """One identity per example, used to keep training examples out of the test set. Tasks whose
        train and test rows differ in padded width override this to ignore the padding."""
        return [row.tobytes() for row in inputs]

    def describe(self) -> dict[str, Any]:
        """Facts about the data worth recording with a run (corpus hash, file counts, ...)."""
        return {}

    def train_length(self) -> int:
        """The sequence length the task trains at (the reference for length extrapolation)."""
        return int(self.cfg.seq_len)

    def length_overrides(self, length: int) -> dict[str, Any]:
        """Config changes that make this task's evaluation examples ``length`` tokens long."""
        return {"seq_len": int(length)}

    def test_batches(self, batch_size: int):
        """The test set in batches; tasks with very long examples override this to generate lazily."""
        test = self.test_set()
        n = len(test["inputs"])
        for i in range(0, n, batch_size):
            yield {k: v[i:i + batch_size] for k, v in test.items()}

    def rng(self, split: str, index: int) -> np.random.Generator:
        stream = {"train": 0, "test": 1}[split]
        return np.random.default_rng([self.cfg.seed, stream, index])

    def test_set(self) -> dict[str, torch.Tensor]:
        if self._test is None:
            self._test = self.sample(self.rng("test", 0), self.cfg.num_test)
            self._test_rows = set(self.row_keys(self._test["inputs"].numpy()))
        return self._test

    def train_batch(self, index: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Training batch ``index``; rows identical to a test example are redrawn, so the splits are disjoint."""
        test_rows = self._test_rows if self._test_rows is not None else (self.test_set() and self._test_rows)
        rng = self.rng("train", index)
        batch = self.sample_train(rng, batch_size, index)
        for _ in range(100):
            clash = [i for i, key in enumerate(self.row_keys(batch["inputs"].numpy())) if key in test_rows]
            if not clash:
                break
            redraw = self.sample_train(rng, len(clash), index)
            for key in batch:
                batch[key][clash] = redraw[key]
        else:  # pragma: no cover - only a task with a tiny example space gets here
            raise RuntimeError(f"{type(self).__name__}: cannot draw training examples disjoint from the test set")
        batch["batch_index"] = torch.tensor(index)
        return batch

    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accuracy over the scored positions (for recall tasks: the query positions only)."""
        return self.score(logits.argmax(-1), batch)

    @torch.no_grad()
    def score(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Metrics from argmax predictions ``pred`` (B, T). Kept separate from ``metrics`` so evaluation
        can score a whole test set at once (exact slice averages) without holding its logits."""
        return base_scores(pred, batch)[0]


def base_scores(pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``{"acc", "n_scored"}`` and the (B, T) masks ``correct`` and ``scored``."""
    labels = batch["labels"]
    scored = labels != IGNORE
    correct = (pred == labels) & scored
    n = scored.sum()
    return {"acc": correct.sum().float() / n.clamp(min=1), "n_scored": n.float()}, correct, scored


def build_task(cfg: Any) -> Task:
    """A task from its config mapping ``{name: mqar, ...fields}``; fails early on any bad field."""
    values = dict(cfg)
    name = values.pop("name", None)
    if name is None:
        raise ConfigError(f"data config needs a 'name'. Valid tasks: {', '.join(TASKS.names())}")
    entry = TASKS.get(name)
    return entry.cls(entry.make_config(values))
