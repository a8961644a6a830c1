"""Tokenizers for corpus tasks: bytes by default (no download, no unknown tokens), or any Hugging Face
tokenizer that is installed and cached (or reachable)."""

from __future__ import annotations

import numpy as np

from hybrid.registry import ConfigError


class ByteTokenizer:
    """Token = byte value (0..255), plus BOS = 256, EOS = 257, PAD = 258."""

    name = "bytes"
    bos, eos, pad = 256, 257, 258
    vocab_size = 259

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


class HFTokenizer:
    """A ``transformers`` tokenizer by name or local path. Documents are decoded as UTF-8 (invalid
    bytes replaced) before tokenizing; BOS/EOS come from the tokenizer or are added after its vocabulary."""

    def __init__(self, name: str):
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:
            raise ConfigError(f"tokenizer {name!r} needs the `transformers` library (pip install transformers); "
                              "the default tokenizer 'bytes' needs nothing") from exc
        try:
            self.tok = AutoTokenizer.from_pretrained(name)
        except Exception as exc:  # noqa: BLE001 - not cached, offline, or a typo
            raise ConfigError(f"cannot load tokenizer {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} "
                              "(it must be a local path or cached; HF_HUB_OFFLINE=1 uses only the cache)") from exc
        self.name = name
        n = len(self.tok)
        self.bos = self.tok.bos_token_id if self.tok.bos_token_id is not None else n
        self.eos = self.tok.eos_token_id if self.tok.eos_token_id is not None else n + 1
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos
        self.vocab_size = max(n, self.bos + 1, self.eos + 1)

    def encode(self, data: bytes) -> np.ndarray:
        ids = self.tok(data.decode("utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
        return np.asarray(ids, dtype=np.int32)


def build_tokenizer(name: str):
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)
