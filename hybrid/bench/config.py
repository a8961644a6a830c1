"""Typed, validated bench settings: every error is raised here, before any model is built or timed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hybrid.decode_graph import compile_mode
from hybrid.model import check_mixers, model_config
from hybrid.registry import ConfigError, build_dataclass


@dataclass
class BenchConfig:
    patterns: list = field(default_factory=lambda: ["AA", "MM"])
    d_model: int = 768
    n_layers: int | None = None  # checked against each pattern's depth when set
    vocab_size: int = 50304
    model: dict = field(default_factory=dict)  # extra ModelConfig fields (symbols, ffn, ...) shared by all patterns
    device: str = "auto"  # auto = cuda when available, else cpu
    seed: int = 0
    # training throughput: one point per context, each step holding about train_tokens tokens
    train_contexts: list = field(default_factory=lambda: [2048])
    train_tokens: int = 16384  # batch = max(1, train_tokens // context)
    peak_tflops: float = 989.0  # H100 SXM dense bf16; MFU is null on the CPU
    # prefill
    min_len: int = 1024
    max_len: int = 131072
    prefill_batch: int = 1
    extra_lengths: list = field(default_factory=list)  # off-ladder lengths (e.g. 102400) for prefill and decode
    # decode
    decode_batches: list = field(default_factory=lambda: [1, 16])
    decode_tokens: int = 32  # timed single-token steps after the cache is filled
    decode_graph: bool = True  # on CUDA, replay captured graphs of the step when every mixer allows it
    # torch.compile the step before capturing it (fewer, fused kernels): false, true (the default mode) or
    # max-autotune-no-cudagraphs (Triton matmul templates with the elementwise work around them fused in)
    decode_compile: bool | str = False
    # timing
    warmup: int = 2
    repeats: int = 5
    # fits: log-log slopes over lengths >= fit_min_len (null = the top half of the measured lengths)
    fit_min_len: int | None = None
    # ratios of every pattern against this one (null = the first pattern with the most attention layers)
    baseline: str | None = None

    def __post_init__(self):
        for name in ("d_model", "vocab_size", "train_tokens", "min_len", "max_len", "prefill_batch", "decode_tokens",
                     "repeats"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"bench.{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ConfigError(f"bench.warmup must be >= 0, got {self.warmup}")
        if self.min_len > self.max_len:
            raise ConfigError(f"bench.min_len ({self.min_len}) is larger than bench.max_len ({self.max_len}): "
                              f"lengths double from min_len up to max_len, so min_len <= max_len")
        if not self.patterns:
            raise ConfigError("bench.patterns is empty: give at least one layer pattern, e.g. [AA, MM]")
        if not self.train_contexts or any(int(c) < 1 for c in self.train_contexts):
            raise ConfigError(f"bench.train_contexts must be a non-empty list of lengths >= 1, got {self.train_contexts}")
        if any(int(n) < 1 for n in self.extra_lengths):
            raise ConfigError(f"bench.extra_lengths must hold lengths >= 1, got {self.extra_lengths}")
        try:
            compile_mode(self.decode_compile)
        except ValueError as exc:
            raise ConfigError(f"bench.{exc}") from None
        if self.baseline is not None and self.baseline not in self.patterns:
            raise ConfigError(f"bench.baseline {self.baseline!r} is not one of bench.patterns {self.patterns}")
        if not self.decode_batches or any(int(b) < 1 for b in self.decode_batches):
            raise ConfigError(f"bench.decode_batches must be a non-empty list of sizes >= 1, got {self.decode_batches}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"bench.device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.peak_tflops <= 0:
            raise ConfigError(f"bench.peak_tflops must be > 0, got {self.peak_tflops}")

    @property
    def lengths(self) -> list[int]:
        """min_len, 2*min_len, ... up to max_len (inclusive when it lies on the doubling ladder), plus extra_lengths."""
        out, n = [], self.min_len
        while n <= self.max_len:
            out.append(n)
            n *= 2
        return sorted(set(out) | {int(n) for n in self.extra_lengths})

    def train_batch(self, context: int) -> int:
        return max(1, self.train_tokens // context)

    def model_cfg(self, pattern: Any):
        """The ModelConfig of one pattern; pattern or mixer problems raise ConfigError."""
        return model_config({**self.model, "pattern": pattern, "d_model": self.d_model, "vocab_size": self.vocab_size,
                             "n_layers": self.n_layers})


def bench_config(cfg: dict) -> BenchConfig:
    """Build and fully validate: unknown keys, bad lengths, and every pattern (symbols, mixer configs)."""
    bc = build_dataclass(BenchConfig, dict(cfg), "bench")
    for pattern in bc.patterns:
        mcfg = bc.model_cfg(pattern)
        check_mixers(mcfg.parse(), mcfg.d_model)
    return bc
