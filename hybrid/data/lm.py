"""Language modelling on a packed corpus: fixed windows over the concatenated documents of a split,
with document boundaries passed to the mixers as ``seq_idx``.

Each document is ``BOS bytes.. EOS``; documents are concatenated per split. A window of T tokens can
span several documents: ``seq_idx`` (B, T) is the document id per token, counted from 0 in each row
(non-decreasing), so no mixer lets one document see another, and the label that would predict the
next document's BOS across a boundary is not scored. Training window ``i`` of batch ``index`` starts
at a random offset drawn from ``(seed, index)``; the test set is ``num_test`` evenly spaced windows of
the evaluation split (``val`` by default), whose files never appear in training (hash split).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from hybrid.data import corpus
from hybrid.data.base import IGNORE, Task
from hybrid.data.common import base_scores
from hybrid.data.tokenizer import ByteTokenizer, build_tokenizer
from hybrid.registry import ConfigError, register_task


@dataclass
class LMConfig:
    source: Literal["stdlib", "folder", "hf"] = "stdlib"
    path: str | None = None  # folder source: the folder; hf source: a dataset name or a save_to_disk folder
    patterns: list[str] = field(default_factory=lambda: ["*.txt", "*.md", "*.py"])  # folder source
    include_tests: bool = False  # stdlib source: also the test/ and idlelib packages
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    tokenizer: str = "bytes"  # or a Hugging Face tokenizer name / local path
    vocab_size: int = 259  # >= the tokenizer's vocabulary (bytes: 256 + BOS, EOS, PAD)
    seq_len: int = 512
    val_fraction: float = 0.01
    test_fraction: float = 0.01
    eval_split: Literal["val", "test"] = "val"
    num_test: int = 256  # evaluation windows
    seed: int = 0

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"lm seq_len must be >= 2, got {self.seq_len}")
        if self.num_test < 1:
            raise ConfigError(f"lm num_test must be >= 1, got {self.num_test}")
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ConfigError(f"lm val_fraction and test_fraction must be in (0, 1) with a sum below 1, got "
                              f"{self.val_fraction}, {self.test_fraction}")
        if self.tokenizer == "bytes" and self.vocab_size < ByteTokenizer.vocab_size:
            raise ConfigError(f"lm vocab_size {self.vocab_size} is too small for the byte tokenizer: needs >= 259")
        if self.source == "folder":
            corpus.check_folder(self.path, list(self.patterns))
        if self.source == "hf" and not self.path:
            raise ConfigError("lm source 'hf' needs data.path = a dataset name (or a save_to_disk folder)")


@register_task("lm", LMConfig)
class LanguageModelling(Task):
    """Next-token prediction on a packed text corpus (default: the Python standard library, as bytes)."""

    def __init__(self, cfg: LMConfig):
        super().__init__(cfg)
        self.vocab_size, self.seq_len = cfg.vocab_size, cfg.seq_len
        self.tokenizer = build_tokenizer(cfg.tokenizer)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ConfigError(f"lm vocab_size {cfg.vocab_size} is smaller than tokenizer {cfg.tokenizer!r}'s vocabulary "
                              f"({self.tokenizer.vocab_size}); set data.vocab_size={self.tokenizer.vocab_size}")
        self._streams: dict[str, tuple[np.ndarray, np.ndarray]] | None = None
        self._info: dict = {}

    # ------------------------------------------------------------------ corpus
    def _load(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per split: the token stream (N,) and the start offset of every document (D,)."""
        if self._streams is not None:
            return self._streams
        cfg = self.cfg
        if cfg.source == "stdlib":
            docs, info = corpus.stdlib_documents(cfg.include_tests)
        elif cfg.source == "folder":
            docs, info = corpus.folder_documents(cfg.path, list(cfg.patterns))
        else:
            docs, info = corpus.hf_documents(cfg.path, cfg.hf_config, cfg.hf_split, cfg.text_field)
        parts: dict[str, list[corpus.Document]] = {s: [] for s in corpus.SPLITS}
        for d in docs:
            parts[corpus.split_of(d.name, cfg.val_fraction, cfg.test_fraction)].append(d)
        tok = self.tokenizer
        streams = {}
        for split, ds in parts.items():
            pieces = [np.concatenate([[tok.bos], tok.encode(d.data), [tok.eos]]).astype(np.int32) for d in ds]
            lengths = np.array([len(p) for p in pieces], dtype=np.int64)
            stream = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if pieces else np.zeros(0, np.int64)
            streams[split] = (stream, starts)
        for split in ("train", cfg.eval_split):
            n = len(streams[split][0])
            if n < cfg.seq_len + 1:
                raise ConfigError(f"lm {split} split has {n} tokens ({len(parts[split])} documents); a window needs "
                                  f"seq_len + 1 = {cfg.seq_len + 1}. Add documents, lower seq_len, or raise "
                                  f"{'val' if split == 'val' else 'test'}_fraction")
        self._streams = streams
        self._info = {**info, "tokenizer": tok.name, "sha256": corpus.fingerprint(docs),
                      "sha256_train": corpus.fingerprint(parts["train"]),
                      "n_docs": {s: len(parts[s]) for s in corpus.SPLITS},
                      "n_tokens": {s: int(len(streams[s][0])) for s in corpus.SPLITS}}
        return streams

    def describe(self) -> dict:
        self._load()
        return dict(self._info)

    # ------------------------------------------------------------------ windows
    def _windows(self, split: str, offsets: np.ndarray) -> dict[str, torch.Tensor]:
        stream, starts = self._load()[split]
        T = self.cfg.seq_len
        idx = offsets[:, None] + np.arange(T + 1)[None, :]  # (n, T + 1)
        tokens = stream[idx].astype(np.int64)
        doc = np.searchsorted(starts, idx, side="right") - 1  # (n, T + 1) document of each token
        labels = tokens[:, 1:].copy()
        labels[doc[:, 1:] != doc[:, :-1]] = IGNORE  # never predict across a document boundary
        seq_idx = doc[:, :T] - doc[:, :1]
        return {"inputs": torch.from_numpy(tokens[:, :T].copy()), "labels": torch.from_numpy(labels),
                "seq_idx": torch.from_numpy(seq_idx.astype(np.int64))}

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        """Training windows at random offsets of the train split."""
        stream, _ = self._load()["train"]
        return self._windows("train", rng.integers(0, len(stream) - self.cfg.seq_len, size=n))

    def test_set(self) -> dict[str, torch.Tensor]:
        if self._test is None:
            stream, _ = self._load()[self.cfg.eval_split]
            offsets = np.linspace(0, len(stream) - self.cfg.seq_len - 1, self.cfg.num_test).astype(np.int64)
            self._test = self._windows(self.cfg.eval_split, offsets)
            self._test_rows = set(self.row_keys(self._test["inputs"].numpy()))
        return self._test

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.score(logits.argmax(-1), batch)
        nll = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=IGNORE)
        out["nll"] = nll
        out["bits_per_token"] = nll / math.log(2)
        return out

    @torch.no_grad()
    def score(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return base_scores(pred, batch)[0]
