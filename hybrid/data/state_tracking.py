"""State tracking: parity, modular arithmetic (without and with brackets) and S5 composition, with the
protocol of Grazzi et al. (arXiv 2411.12537): train on short sequences, growing the longest length
with a curriculum, test on longer ones, report scaled accuracy (0 = chance, 1 = perfect).

    parity:              BOS 1 0 1 1 EQ        label at EQ: 1   (or the running parity at every bit)
    mod_arith:           BOS 3 + 4 * 2 - 1 EQ   label at EQ: (3 + 4*2 - 1) mod p = 0 for p = 5
    mod_arith_brackets:  BOS ( 3 + 4 ) * 2 EQ   label at EQ: 14 mod 5 = 4
    s5:                  BOS g1 g2 g3 EQ        label at g_t: g1 g2 .. g_t (the running product)

Arithmetic uses the usual precedence (* before + and -, brackets first), evaluated mod p. Rows are
right-padded with PAD to the longest length of their split; training rows are ``max_len + 2`` wide,
test rows ``test_max_len + 2``. These tasks test the recurrent half of a hybrid (Mamba-3's rotating
state), not retrieval: routing to attention should not help, a useful negative control.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from hybrid.data.base import IGNORE, Task
from hybrid.data.common import base_scores, is_eval_batch, scaled, sliced_acc
from hybrid.registry import ConfigError, register_task

PAD, BOS, EQ = 0, 1, 2
SYM0 = 3  # first task symbol
PLUS, MINUS, TIMES, OPEN, CLOSE = range(5)  # operator offsets after the p digits

PERMS = list(itertools.permutations(range(5)))  # the 120 elements of S5
_PERM_INDEX = {p: i for i, p in enumerate(PERMS)}
# S5_MUL[a, b] = index of "apply a, then b" (as maps on {0..4}); the running product is g1 then g2 then ...
S5_MUL = np.array([[_PERM_INDEX[tuple(PERMS[b][PERMS[a][x]] for x in range(5))] for b in range(120)] for a in range(120)])


@dataclass
class StateTrackingConfig:
    kind: Literal["parity", "mod_arith", "mod_arith_brackets", "s5"] = "parity"
    vocab_size: int = 16  # must cover the task's symbols (checked; the error names the minimum)
    min_len: int = 3  # training lengths, in input symbols
    max_len: int = 40
    test_min_len: int = 40
    test_max_len: int = 256
    curriculum_steps: int = 0  # batches over which the longest training length grows to max_len; 0 = off
    curriculum_start: int = 10  # longest training length at batch 0 when the curriculum is on
    modulus: int = 5  # arithmetic mod p
    bracket_prob: float = 0.3  # chance that a sub-expression is wrapped in brackets
    max_depth: int = 8  # bracket nesting bound
    label_mode: Literal["final", "every"] = "final"  # every: the running state at every symbol (parity, s5)
    num_test: int = 1000
    seed: int = 0

    @property
    def num_symbols(self) -> int:
        return {"parity": 2, "s5": 120, "mod_arith": self.modulus + 3, "mod_arith_brackets": self.modulus + 5}[self.kind]

    @property
    def chance(self) -> float:
        return {"parity": 0.5, "s5": 1 / 120}.get(self.kind, 1 / self.modulus)

    def __post_init__(self):
        if self.modulus < 2:
            raise ConfigError(f"state_tracking modulus must be >= 2 (arithmetic mod p needs p >= 2), got {self.modulus}")
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError(f"state_tracking needs 1 <= min_len <= max_len, got {self.min_len}, {self.max_len}")
        if not 1 <= self.test_min_len <= self.test_max_len:
            raise ConfigError(f"state_tracking needs 1 <= test_min_len <= test_max_len, got {self.test_min_len}, "
                              f"{self.test_max_len}")
        if self.curriculum_steps < 0 or not self.min_len <= self.curriculum_start:
            raise ConfigError(f"state_tracking curriculum_steps must be >= 0 and curriculum_start >= min_len, got "
                              f"{self.curriculum_steps}, {self.curriculum_start}")
        if self.label_mode == "every" and self.kind.startswith("mod_arith"):
            raise ConfigError("state_tracking label_mode 'every' is for parity and s5 (a partial expression has no value); "
                              "use label_mode=final for mod_arith")
        if self.kind.startswith("mod_arith") and self.max_len < 1:
            raise ConfigError("mod_arith needs max_len >= 1")
        if not 0 <= self.bracket_prob <= 1 or self.max_depth < 0:
            raise ConfigError(f"state_tracking bracket_prob must be in [0, 1] and max_depth >= 0, got {self.bracket_prob}, "
                              f"{self.max_depth}")
        need = SYM0 + self.num_symbols
        if self.vocab_size < need:
            raise ConfigError(f"state_tracking vocab_size {self.vocab_size} is too small for {self.kind}: needs >= {need}")
        if self.num_test < 1:
            raise ConfigError(f"state_tracking num_test must be >= 1, got {self.num_test}")


@register_task("state_tracking", StateTrackingConfig)
class StateTracking(Task):
    """Parity, modular arithmetic (with or without brackets) and S5 composition, with a length curriculum."""

    def __init__(self, cfg: StateTrackingConfig):
        super().__init__(cfg)
        self.vocab_size = cfg.vocab_size
        self.seq_len = cfg.max_len + 2  # training width: BOS, symbols, EQ

    # ------------------------------------------------------------------ protocol hooks
    def train_length(self) -> int:
        return int(self.cfg.max_len)

    def length_overrides(self, length: int) -> dict:
        return {"test_min_len": int(length), "test_max_len": int(length)}

    def curriculum_max(self, index: int) -> int:
        """Longest training length at batch ``index``: linear from curriculum_start to max_len."""
        cfg = self.cfg
        if cfg.curriculum_steps == 0 or index >= cfg.curriculum_steps:
            return cfg.max_len
        start = min(cfg.curriculum_start, cfg.max_len)
        return start + (cfg.max_len - start) * index // cfg.curriculum_steps

    def row_keys(self, inputs: np.ndarray) -> list[bytes]:
        """Rows without their right padding: train and test rows have different widths."""
        nonpad = inputs != PAD
        ends = inputs.shape[1] - np.argmax(nonpad[:, ::-1], axis=1)
        return [row[:e].tobytes() for row, e in zip(inputs, ends)]

    def sample(self, rng: np.random.Generator, n: int) -> dict[str, torch.Tensor]:
        """Test-distribution examples (lengths test_min_len..test_max_len)."""
        return self._generate(rng, n, self.cfg.test_min_len, self.cfg.test_max_len)

    def sample_train(self, rng: np.random.Generator, n: int, index: int) -> dict[str, torch.Tensor]:
        return self._generate(rng, n, self.cfg.min_len, self.curriculum_max(index), width=self.cfg.max_len)

    # ------------------------------------------------------------------ generation
    def _generate(self, rng: np.random.Generator, n: int, lo: int, hi: int, width: int | None = None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        W = (width or cfg.test_max_len) + 2
        lengths = rng.integers(lo, hi + 1, size=n)
        if cfg.kind.startswith("mod_arith"):  # expressions have an odd number of symbols
            lengths = np.where(lengths % 2 == 0, np.where(lengths - 1 >= max(lo, 1), lengths - 1, lengths + 1), lengths)
            lengths = np.minimum(lengths, W - 2 if (W - 2) % 2 else W - 3)
        inputs = np.zeros((n, W), np.int64)
        labels = np.full((n, W), IGNORE, np.int64)
        length_meta = np.full((n, W), -1, np.int64)
        rows = np.arange(n)
        inputs[:, 0] = BOS
        if cfg.kind == "mod_arith_brackets":
            for i, m in enumerate(lengths.tolist()):
                toks, value = self._bracketed(rng, m, 0)
                inputs[i, 1: 1 + m] = SYM0 + np.array(toks)
                labels[i, m + 1] = SYM0 + value
        else:
            sym, state = self._sequences(rng, n, int(lengths.max()))  # (n, M) symbols, (n, M) running state
            valid = np.arange(sym.shape[1])[None, :] < lengths[:, None]
            inputs[:, 1: 1 + sym.shape[1]] = np.where(valid, SYM0 + sym, PAD)
            if cfg.label_mode == "every":
                labels[:, 1: 1 + sym.shape[1]] = np.where(valid, SYM0 + state, IGNORE)
                length_meta[:, 1: 1 + sym.shape[1]] = np.where(valid, np.arange(1, sym.shape[1] + 1)[None, :], -1)
            else:
                labels[rows, lengths + 1] = SYM0 + state[rows, lengths - 1]
        inputs[rows, lengths + 1] = EQ
        if cfg.label_mode == "final":
            length_meta[rows, lengths + 1] = lengths
        return {"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels), "length": torch.from_numpy(length_meta)}

    def _sequences(self, rng: np.random.Generator, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(n, m) symbols and (n, m) the task's state after each prefix (symbol offsets, not token ids)."""
        cfg = self.cfg
        if cfg.kind == "parity":
            sym = rng.integers(0, 2, size=(n, m))
        elif cfg.kind == "s5":
            sym = rng.integers(0, 120, size=(n, m))
        else:  # mod_arith: digits at even positions, operators at odd ones
            p = cfg.modulus
            sym = rng.integers(0, p, size=(n, m))
            sym[:, 1::2] = p + rng.integers(0, 3, size=sym[:, 1::2].shape)
        return sym, self.running_state(sym)

    def running_state(self, sym: np.ndarray) -> np.ndarray:
        """(n, m) state after each prefix of symbols ``sym`` (n, m): the parity, the S5 product, or (at
        even indices) the value mod p of the expression so far."""
        cfg = self.cfg
        n, m = sym.shape
        if cfg.kind == "parity":
            return np.cumsum(sym, axis=1) % 2
        if cfg.kind == "s5":
            state = np.empty_like(sym)
            state[:, 0] = sym[:, 0]
            for t in range(1, m):
                state[:, t] = S5_MUL[state[:, t - 1], sym[:, t]]
            return state
        p = cfg.modulus
        state = np.zeros((n, m), np.int64)
        total, term, sign = np.zeros(n, np.int64), sym[:, 0].copy(), np.ones(n, np.int64)
        state[:, 0] = term % p
        for t in range(1, m - 1, 2):
            op, d = sym[:, t] - p, sym[:, t + 1]
            is_mul = op == TIMES
            total = np.where(is_mul, total, (total + sign * term) % p)
            sign = np.where(is_mul, sign, np.where(op == PLUS, 1, -1))
            term = np.where(is_mul, term * d % p, d)
            state[:, t + 1] = (total + sign * term) % p
        return state

    def encode(self, symbols: list[int]) -> dict[str, torch.Tensor]:
        """One example from given symbols (offsets: bits, permutation indices, or digits 0..p-1 then
        + - * ( ) as p..p+4), labelled exactly as generated ones are: for checking answers by hand."""
        cfg = self.cfg
        m = len(symbols)
        sym = np.asarray(symbols, dtype=np.int64)[None, :]
        inputs = np.concatenate([[BOS], SYM0 + sym[0], [EQ]])[None, :]
        labels = np.full_like(inputs, IGNORE)
        if cfg.kind == "mod_arith_brackets":
            labels[0, m + 1] = SYM0 + evaluate_expression(list(symbols), cfg.modulus)
        elif cfg.label_mode == "every":
            labels[0, 1: m + 1] = SYM0 + self.running_state(sym)[0]
        else:
            labels[0, m + 1] = SYM0 + self.running_state(sym)[0, m - 1]
        return {"inputs": torch.from_numpy(inputs), "labels": torch.from_numpy(labels)}

    def _bracketed(self, rng: np.random.Generator, m: int, depth: int) -> tuple[list[int], int]:
        """A random expression of exactly ``m`` (odd) symbols and its value mod p: either a bracketed
        expression, or a flat chain ``operand op operand ...`` whose operands are digits or bracketed
        groups (so precedence and nesting are both exercised), nesting at most ``max_depth`` deep."""
        cfg, p = self.cfg, self.cfg.modulus
        if m == 1:
            d = int(rng.integers(p))
            return [d], d
        nest = depth < cfg.max_depth
        if nest and rng.random() < cfg.bracket_prob:
            inner, v = self._bracketed(rng, m - 2, depth + 1)
            return [p + OPEN, *inner, p + CLOSE], v
        tokens: list[int] = []
        values: list[int] = []
        ops: list[int] = []
        left = m  # symbols left for "operand (op operand)*", always odd
        while left > 0:
            if ops or values:
                ops.append(int(rng.integers(3)))
                tokens.append(p + ops[-1])
            # group sizes: odd, >= 3, and either all that is left or leaving room for "op operand"
            sizes = [s for s in range(3, left - 1, 2)] + ([left] if left >= 3 and values else [])
            if nest and sizes and rng.random() < cfg.bracket_prob:
                size = sizes[int(rng.integers(len(sizes)))]
                inner, v = self._bracketed(rng, size - 2, depth + 1)
                tokens += [p + OPEN, *inner, p + CLOSE]
            else:
                size, v = 1, int(rng.integers(p))
                tokens.append(v)
            values.append(v)
            left -= size + (1 if left > size else 0)
        return tokens, evaluate_flat(values, ops, p)

    # ------------------------------------------------------------------ metrics
    @torch.no_grad()
    def score(self, pred: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out, correct, scored = base_scores(pred, batch)
        out["acc_scaled"] = scaled(out["acc"], self.cfg.chance)
        if is_eval_batch(batch):
            cfg = self.cfg
            width = max(1, math.ceil((cfg.test_max_len - cfg.test_min_len + 1) / 8))
            lo = cfg.test_min_len if cfg.label_mode == "final" else 1
            if cfg.label_mode == "every":
                width = max(1, math.ceil(cfg.test_max_len / 8))
            bucket = ((batch["length"] - lo).clamp(min=0) // width) * width + lo
            out.update(sliced_acc(correct, scored, bucket, "acc_len"))
        return out


def evaluate_flat(values: list[int], ops: list[int], p: int) -> int:
    """Value mod p of v0 op0 v1 op1 ... with * before + and -."""
    total, term, sign = 0, values[0] % p, 1
    for op, v in zip(ops, values[1:]):
        if op == TIMES:
            term = term * v % p
        else:
            total = (total + sign * term) % p
            sign, term = (1 if op == PLUS else -1), v % p
    return (total + sign * term) % p


def evaluate_expression(expr: str | list[int], p: int) -> int:
    """Value mod p of an expression: a string over single digits, + - * and brackets, or a list of
    symbols (digits 0..p-1, then + - * ( ) as p..p+4). The reference parser for tests and for
    reading examples: ``evaluate_expression("(3+4)*2", 5) == 4``."""
    if isinstance(expr, str):
        expr = [p + "+-*()".index(c) if c in "+-*()" else int(c) for c in expr.replace(" ", "")]
    sym = list(expr)
    pos = 0

    def operand() -> int:
        nonlocal pos
        if sym[pos] == p + OPEN:
            pos += 1
            v = chain()
            if pos >= len(sym) or sym[pos] != p + CLOSE:
                raise ValueError(f"expected ')' at symbol {pos}")
            pos += 1
            return v
        if not 0 <= sym[pos] < p:
            raise ValueError(f"expected a digit or '(' at symbol {pos}, got {sym[pos]}")
        pos += 1
        return sym[pos - 1]

    def chain() -> int:
        nonlocal pos
        values, ops = [operand()], []
        while pos < len(sym) and sym[pos] in (p + PLUS, p + MINUS, p + TIMES):
            ops.append(sym[pos] - p)
            pos += 1
            values.append(operand())
        return evaluate_flat(values, ops, p)

    value = chain()
    if pos != len(sym):
        raise ValueError(f"trailing symbols from {pos}")
    return value


def render(tokens: list[int] | np.ndarray, kind: str, p: int = 5) -> str:
    """Human-readable form of an example's symbols (inputs between BOS and EQ)."""
    out = []
    for t in list(tokens):
        s = int(t) - SYM0
        if int(t) in (PAD, BOS):
            continue
        if int(t) == EQ:
            out.append("=")
        elif kind == "parity":
            out.append(str(s))
        elif kind == "s5":
            out.append("".join(map(str, PERMS[s])) + " ")
        else:
            out.append(str(s) if s < p else "+-*()"[s - p])
    return "".join(out).strip()
