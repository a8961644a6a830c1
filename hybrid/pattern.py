"""Layer patterns: a symbol table plus several surface layouts, compiled to one list of LayerSpecs.

One symbol is one block: pre-norm -> mixer -> residual, then an optional pre-norm -> FFN -> residual.
A symbol table maps single uppercase letters to a registry mixer and its kwargs (``DEFAULT_SYMBOLS``
below; ``symbols=`` replaces or adds whole letters). Every surface layout compiles to the same fully
expanded ``ParsedPattern.layers``, which is what the model builds, what ``pattern_hash`` hashes and
what ``canonical`` prints back.

Compact grammar (the ``pattern:`` string, also ``{compact: ...}``)::

    pattern  := segment ("_" segment)*
    segment  := LETTER+ ("x" COUNT)?      # "x<N>" repeats the whole segment N times
    LETTER   := "A" .. "Z"                # a symbol of the table
    COUNT    := an integer >= 1

Whitespace around the pattern is ignored. There is no comma (in a Hydra override a comma makes a
sweep: ``model.pattern=AAAA,MMMA,MMMM``), no brackets and no nesting; ``x`` is the only operator.

Other layouts, each a mapping with exactly one key (``n_layers`` is the model depth)::

    {list: [M, M, M, A]}                                   # or a bare list; HF layer_types / Zamba
    {period: {every: 4, offset: 3, symbol: A, base: M}}    # Jamba / Qwen: i % every == offset; needs n_layers
    {period: [{every: 8, offset: 3, symbol: A, base: M}, {every: 8, offset: 7, symbol: W}]}
    {layers: {A: [3, 7], W: [1], base: M}}                 # FLA / mamba_ssm index lists; needs n_layers
    {megatron: "M-M-M*-"}                                  # Megatron sub-layers: M Mamba, * attention, - MLP

>>> p = parse_pattern("MMMAx2")
>>> p.symbols_string
'MMMAMMMA'
>>> p.canonical, p.n_layers, p.family
('MMMAx2', 8, 'hybrid')
>>> p.layers[3].mixer, p.layers[3].ffn
('attention', 'swiglu')
>>> same = [
...     parse_pattern(["M", "M", "M", "A"] * 2),
...     parse_pattern({"period": {"every": 4, "offset": 3, "symbol": "A", "base": "M"}}, n_layers=8),
...     parse_pattern({"layers": {"A": [3, -1], "base": "M"}}, n_layers=8),
...     parse_pattern({"megatron": "M-M-M-*-M-M-M-*-"}),
... ]
>>> all(q == p and q.pattern_hash == p.pattern_hash for q in same)
True
>>> parse_pattern("MMMMMMMA").canonical     # the shortest spelling (see ``canonical_string``)
'Mx7_A'
>>> parse_pattern({"megatron": "M-M*M-"}).to_megatron()   # the middle Mamba has no MLP
'M-M*M-'
>>> p = parse_pattern("MWA", symbols={"W": {"mixer": "attention", "window": 64}},
...                   overrides=[{"layers": [-1], "num_kv_heads": 1}])
>>> dict(p.layers[1].mixer_kwargs), dict(p.layers[2].mixer_kwargs)
({'window': 64}, {'num_kv_heads': 1})
>>> parse_pattern("MMx")  # doctest: +ELLIPSIS
Traceback (most recent call last):
    ...
hybrid.registry.ConfigError: pattern 'MMx': repeat 'x' has no count (write e.g. 'MMx4'). Grammar: ...

Only ``ParsedPattern.attention_fraction`` and ``summary()`` consult the mixer registry, so a pattern
may name mixers that are not implemented yet.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from hybrid.registry import MIXERS, ConfigError, Footprint


class FrozenDict(dict):
    """A read-only dict: hashable, JSON-serialisable, picklable and deep-copyable.

    ``types.MappingProxyType`` is read-only too but cannot be pickled or deep-copied, and LayerSpecs
    live inside models that get copied and checkpointed.
    """

    __slots__ = ()

    def _read_only(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("pattern kwargs are read-only; change them through symbols= or overrides=")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only  # type: ignore[assignment]

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(_canonical_json(self))

    def __reduce__(self) -> tuple:
        return (type(self), (dict(self),))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


EMPTY: FrozenDict = FrozenDict()


class Symbols:
    """The alphabet of the pattern language, in one place (cf. Megatron's ``Symbols``)."""

    LETTERS = string.ascii_uppercase
    REPEAT = "x"
    SEPARATOR = "_"
    # Megatron hybrid-pattern characters we import, and the symbol each becomes. Megatron's "M" is a
    # Mamba-2 layer; it becomes our M whatever M means in the table (mamba3 by default, so pass
    # symbols={M: {mixer: mamba2}} to import a Nemotron-H stack with its own mixer).
    MEGATRON_IMPORT = FrozenDict({"M": "M", "*": "A"})
    # Export: symbol -> (Megatron character, mixers that character stands for).
    MEGATRON_EXPORT = FrozenDict({"M": ("M", ("mamba3", "mamba2")), "A": ("*", ("attention",))})
    MEGATRON_MLP = "-"
    MEGATRON_FFN_ONLY = "F"  # a lone "-" (an MLP not following a mixer) is an FFN-only block
    # Megatron characters we know but reject, with what they mean there (for the error message).
    MEGATRON_UNSUPPORTED = FrozenDict({
        "|": "pipeline-stage boundary",
        "/": "multi-token-prediction separator",
        "E": "MoE layer",
        "G": "gated DeltaNet layer",
        "D": "DeepSeek sparse attention layer",
        "+": "MLA layer",
    })
    LAYOUT_KEYS = ("compact", "list", "period", "layers", "megatron")


GRAMMAR = ("Grammar: segments joined by '_', each one or more symbol letters A-Z optionally followed by 'x<N>' "
           "(N >= 1) to repeat that segment, e.g. 'MMMWx5_MMMA'")

DEFAULT_SYMBOLS: FrozenDict = FrozenDict({
    "A": FrozenDict({"mixer": "attention"}),  # dense causal attention
    "W": FrozenDict({"mixer": "attention", "window": 256}),  # sliding-window attention
    "K": FrozenDict({"mixer": "block_topk"}),  # block top-k sparse attention
    "M": FrozenDict({"mixer": "mamba3"}),
    "D": FrozenDict({"mixer": "mamba2"}),
    "H": FrozenDict({"mixer": "fusion"}),  # parallel SSM + attention heads
    "R": FrozenDict({"mixer": "token_router"}),
    "G": FrozenDict({"mixer": "chunk_gate"}),
    "F": FrozenDict({"mixer": None}),  # FFN-only block
})

DEFAULT_FFN: FrozenDict = FrozenDict({"type": "swiglu"})
MAX_LAYERS = 10_000  # far beyond any real stack; catches 'Mx1000000000'-style typos

# Mixers the default alphabet promises before they are implemented: looking one up explains that,
# instead of calling it a typo. Registering the mixer later removes the reservation.
for _letter, _entry in DEFAULT_SYMBOLS.items():
    if _entry["mixer"] is not None:
        MIXERS.reserve(_entry["mixer"], f"default pattern symbol {_letter}")


# ----------------------------------------------------------------------------------------------
# result types


@dataclass(frozen=True)
class LayerSpec:
    """One block of the expanded pattern, with its mixer and FFN named by registry name."""

    index: int
    symbol: str
    mixer: str | None  # registry name; None for an FFN-only block
    mixer_kwargs: Mapping[str, Any]  # read-only (FrozenDict), JSON-able
    ffn: str | None  # FFN registry name; None = this block has no FFN
    ffn_kwargs: Mapping[str, Any]
    share_group: str | None = None  # layers with the same group reuse one block (tied weights)

    def as_json(self) -> dict[str, Any]:
        """The fields that define the architecture (everything but the index), as plain JSON types."""
        return _normalize({"symbol": self.symbol, "mixer": self.mixer, "mixer_kwargs": self.mixer_kwargs,
                           "ffn": self.ffn, "ffn_kwargs": self.ffn_kwargs, "share_group": self.share_group})


@dataclass(frozen=True)
class ParsedPattern:
    """A fully expanded pattern: one LayerSpec per block plus the symbol entries it uses."""

    layers: tuple[LayerSpec, ...]
    symbols: Mapping[str, Mapping[str, Any]]  # effective entries of the letters that occur, sorted

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @cached_property
    def symbols_string(self) -> str:
        """One letter per layer, e.g. ``'MMMAMMMA'``."""
        return "".join(spec.symbol for spec in self.layers)

    @cached_property
    def canonical(self) -> str:
        """The compact string, e.g. ``'MMMAx2'``; see ``canonical_string`` for the rule."""
        return canonical_string(self.symbols_string)

    @cached_property
    def pattern_hash(self) -> str:
        """First 10 hex digits of the sha256 of the canonical JSON of the expanded layers.

        Equal for every surface form of one architecture, independent of dict order and Python run.
        Integral floats hash like ints (``mult: 4`` and ``mult: 4.0`` build the same model).
        """
        payload = json.dumps([spec.as_json() for spec in self.layers], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:10]

    @property
    def is_pure(self) -> bool:
        return len(set(self.symbols_string)) == 1

    @property
    def family(self) -> str:
        """``'pure-M'`` when every layer has the same symbol, else ``'hybrid'`` (for dashboard grouping)."""
        return f"pure-{self.layers[0].symbol}" if self.is_pure else "hybrid"

    @property
    def n_attention_layers(self) -> int:
        """Layers whose mixer is registered ``is_attention`` (the ones that pay attention's T^2 cost)."""
        return sum(1 for spec in self.layers if spec.mixer is not None and MIXERS.get(spec.mixer).is_attention)

    @property
    def attention_fraction(self) -> float:
        """Fraction of all layers (FFN-only ones included) whose mixer is registered ``is_attention``."""
        return self.n_attention_layers / self.n_layers

    def summary(self, d_model: int, dtype_bytes: int = 2) -> dict[str, Any]:
        """JSON-able description for logs and dashboards; inference memory is per sequence.

        Every layer counts, tied ones included: sharing weights does not share decode caches.
        """
        footprints = self._footprints(d_model, dtype_bytes)
        return {
            "canonical": self.canonical,
            "symbols_string": self.symbols_string,
            "pattern_hash": self.pattern_hash,
            "n_layers": self.n_layers,
            "attention_fraction": self.attention_fraction,
            "n_kv_cache_layers": sum(1 for fp in footprints if fp.has_kv_cache),
            "recurrent_state_bytes": sum(fp.state_bytes for fp in footprints),
            "kv_bytes_per_token": sum(fp.kv_bytes_per_token for fp in footprints),
            "family": self.family,
            "is_pure": self.is_pure,
        }

    def _footprints(self, d_model: int, dtype_bytes: int) -> list[Footprint]:
        cache: dict[tuple, Footprint] = {}  # deep stacks repeat a few distinct configs
        out = []
        for spec in self.layers:
            if spec.mixer is None:
                continue  # FFN-only blocks keep no decode state
            key = (spec.mixer, spec.mixer_kwargs)
            if key not in cache:
                entry = MIXERS.get(spec.mixer)
                cfg = entry.make_config(dict(spec.mixer_kwargs), where=f" (layer {spec.index}, symbol {spec.symbol})")
                cache[key] = entry.cls.footprint(d_model, cfg, dtype_bytes)
            out.append(cache[key])
        return out

    def to_megatron(self) -> str:
        """The Megatron hybrid-pattern string (``M`` Mamba, ``*`` attention, ``-`` MLP).

        Only symbol M with a Mamba mixer, symbol A with full (not sliding-window) attention and
        FFN-only blocks have Megatron letters. Mixer kwargs are not part of a Megatron pattern.
        """
        out = []
        for spec in self.layers:
            if spec.mixer is None:
                out.append(Symbols.MEGATRON_MLP)
                continue
            char, mixers = Symbols.MEGATRON_EXPORT.get(spec.symbol, (None, ()))
            if char is None or spec.mixer not in mixers or spec.mixer_kwargs.get("window") is not None:
                known = ", ".join(f"{sym} ({' or '.join(m)}) -> '{c}'" for sym, (c, m) in Symbols.MEGATRON_EXPORT.items())
                raise ConfigError(f"layer {spec.index}: symbol {spec.symbol} (mixer {spec.mixer!r}, "
                                  f"{_show(spec.mixer_kwargs)}) has no Megatron letter; exportable: {known} without "
                                  f"a window, FFN-only blocks -> '-'")
            out.append(char + (Symbols.MEGATRON_MLP if spec.ffn is not None else ""))
        return "".join(out)


# ----------------------------------------------------------------------------------------------
# entry point


def parse_pattern(pattern: Any, *, n_layers: int | None = None, symbols: Mapping[str, Any] | None = None,
                  ffn: Mapping[str, Any] | None = DEFAULT_FFN, overrides: Sequence[Mapping[str, Any]] | None = None,
                  share: Sequence[Mapping[str, Any]] | None = None) -> ParsedPattern:
    """Compile any surface layout to the canonical expanded pattern; every problem raises ConfigError.

    :param pattern: a compact string, a list of symbol letters, or a mapping with one layout key
        (compact, list, period, layers, megatron); see the module docstring.
    :param n_layers: model depth; required by ``period`` and ``layers``, checked against the others.
    :param symbols: letter -> ``{mixer: name | null, ffn?: null | {type: ..}, **mixer kwargs}``; an
        entry replaces the default entry of that letter as a whole.
    :param ffn: the FFN of every block unless its symbol or an override sets ``ffn``: ``{type: name,
        **kwargs}``, or None for no FFN anywhere.
    :param overrides: ``[{layers: [i, ...], **mixer kwargs, ffn?: ...}]`` applied in order; negative
        indices count from the end.
    :param share: ``[{symbol: A | layers: [i, ...], group: name}]``: layers of one group reuse one block.
    """
    table = _symbol_table(symbols)
    default_ffn = _ffn_spec(ffn, "ffn")
    letters, mlp_flags = _expand_layout(pattern, _check_n_layers(n_layers))
    _check_known(letters, table)
    layers = [_base_layer(i, letter, table[letter], default_ffn) for i, letter in enumerate(letters)]
    if mlp_flags is not None:
        layers = _apply_megatron_mlps(layers, mlp_flags)
    layers = _apply_overrides(layers, overrides)
    _check_ffn_only_blocks(layers)
    layers = _apply_share(layers, share)
    used = FrozenDict({letter: table[letter] for letter in sorted(set(letters))})
    return ParsedPattern(tuple(layers), used)


# ----------------------------------------------------------------------------------------------
# symbol table and FFN specs


def _symbol_table(user: Mapping[str, Any] | None) -> dict[str, FrozenDict]:
    table = dict(DEFAULT_SYMBOLS)
    if user is None:
        return table
    if not isinstance(user, Mapping):
        raise ConfigError(f"symbols must be a mapping of letter -> {{mixer: name, ...}}, got {user!r}")
    for letter, entry in user.items():
        _check_letter(letter, "symbols")
        table[letter] = _symbol_entry(letter, entry)
    return table


def _symbol_entry(letter: str, entry: Any) -> FrozenDict:
    where = f"symbols.{letter}"
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{mixer: attention, num_heads: 4}}, got {entry!r}")
    if "mixer" not in entry:
        raise ConfigError(f"{where} has no 'mixer' key: name a registered mixer, or mixer: null for an FFN-only block")
    mixer = entry["mixer"]
    if mixer is not None and not (isinstance(mixer, str) and mixer):
        raise ConfigError(f"{where}.mixer must be a mixer registry name or null, got {mixer!r}")
    if "ffn" in entry:
        _ffn_spec(entry["ffn"], f"{where}.ffn")
    extra = sorted(set(entry) - {"mixer", "ffn"})
    if mixer is None and extra:
        raise ConfigError(f"{where} is FFN-only (mixer: null) and takes no mixer kwargs, got {', '.join(extra)}")
    return _freeze(entry, where)


def _ffn_spec(value: Any, where: str) -> tuple[str, FrozenDict] | None:
    """``{type: name, **kwargs}`` -> (name, kwargs); None -> None (no FFN)."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("type"), str) or not value["type"]:
        raise ConfigError(f"{where} must be null (no FFN) or a mapping with a 'type' naming a registered FFN, "
                          f"e.g. {{type: swiglu, mult: 4}}; got {value!r}")
    return value["type"], _freeze({k: v for k, v in value.items() if k != "type"}, where)


def _base_layer(index: int, letter: str, entry: Mapping[str, Any], default_ffn: tuple[str, FrozenDict] | None) -> LayerSpec:
    kwargs = FrozenDict({k: v for k, v in entry.items() if k not in ("mixer", "ffn")})
    ffn = _ffn_spec(entry["ffn"], f"symbols.{letter}.ffn") if "ffn" in entry else default_ffn
    return LayerSpec(index, letter, entry["mixer"], kwargs, *(ffn if ffn else (None, EMPTY)))


def _check_known(letters: list[str], table: Mapping[str, Any]) -> None:
    for i, letter in enumerate(letters):
        if letter not in table:
            raise ConfigError(f"unknown symbol '{letter}' (layer {i}); defined symbols: {', '.join(sorted(table))}. "
                              f"Define it under symbols, e.g. symbols: {{{letter}: {{mixer: attention}}}}")


# ----------------------------------------------------------------------------------------------
# layouts


def _expand_layout(pattern: Any, n_layers: int | None) -> tuple[list[str], list[bool] | None]:
    """Symbol letters, one per layer, and (Megatron only) whether each block has an MLP sub-layer."""
    if pattern is None:
        raise ConfigError(f"empty pattern (got null). {GRAMMAR}")
    if isinstance(pattern, str):
        return _matching_depth(_parse_compact(pattern), n_layers, pattern), None
    if isinstance(pattern, Mapping):
        return _expand_mapping(pattern, n_layers)
    if isinstance(pattern, Sequence):
        return _matching_depth(_parse_list(pattern), n_layers, "list"), None
    raise ConfigError(f"pattern must be a compact string, a list of symbols or a mapping with one of "
                      f"{', '.join(Symbols.LAYOUT_KEYS)}; got {type(pattern).__name__} {pattern!r}")


def _expand_mapping(pattern: Mapping[str, Any], n_layers: int | None) -> tuple[list[str], list[bool] | None]:
    keys = list(pattern)
    unknown = [k for k in keys if k not in Symbols.LAYOUT_KEYS]
    if unknown:
        raise ConfigError(f"unknown pattern layout key {unknown[0]!r}; use exactly one of {', '.join(Symbols.LAYOUT_KEYS)}")
    if len(keys) != 1:
        given = ", ".join(keys) if keys else "none"
        raise ConfigError(f"a pattern mapping needs exactly one layout key of {', '.join(Symbols.LAYOUT_KEYS)}; got {given}")
    key, value = keys[0], pattern[keys[0]]
    if key == "compact":
        if not isinstance(value, str):
            raise ConfigError(f"pattern 'compact' must be a string like 'MMMAx4', got {value!r}")
        return _matching_depth(_parse_compact(value), n_layers, value), None
    if key == "list":
        return _matching_depth(_parse_list(value), n_layers, "list"), None
    if key == "megatron":
        letters, mlps = _parse_megatron(value)
        return _matching_depth(letters, n_layers, f"megatron {value!r}"), mlps
    depth = _required_depth(n_layers, key)
    return (_parse_period(value, depth) if key == "period" else _parse_index_lists(value, depth)), None


def _check_n_layers(n_layers: Any) -> int | None:
    if n_layers is not None and (isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1):
        raise ConfigError(f"n_layers must be a positive integer or null, got {n_layers!r}")
    return n_layers


def _required_depth(n_layers: int | None, key: str) -> int:
    if n_layers is None:
        raise ConfigError(f"the '{key}' pattern layout needs n_layers (the model depth)")
    return n_layers


def _matching_depth(letters: list[str], n_layers: int | None, what: str) -> list[str]:
    # n_layers next to an explicit layout is an assertion about depth, which catches a wrong count.
    if n_layers is not None and n_layers != len(letters):
        raise ConfigError(f"pattern {what!r} expands to {len(letters)} layers but n_layers is {n_layers}")
    return letters


def _parse_compact(text: str) -> list[str]:
    s = text.strip()
    if not s:
        raise ConfigError(f"empty pattern. {GRAMMAR}")
    letters: list[str] = []
    pos = 0
    for segment in s.split(Symbols.SEPARATOR):
        letters += _parse_segment(segment, s, pos)
        pos += len(segment) + 1
    if len(letters) > MAX_LAYERS:
        raise ConfigError(f"pattern {s!r} expands to {len(letters)} layers, more than {MAX_LAYERS}")
    return letters


_SEGMENT = re.compile(r"([A-Z]+)(?:x([0-9]+))?")


def _parse_segment(segment: str, pattern: str, pos: int) -> list[str]:
    m = _SEGMENT.fullmatch(segment)
    if m is None:
        raise ConfigError(f"pattern {pattern!r}: {_diagnose(segment, pos)}. {GRAMMAR}")
    count = int(m[2]) if m[2] is not None else 1
    if count < 1:
        raise ConfigError(f"pattern {pattern!r}: repeat count in {segment!r} must be >= 1. {GRAMMAR}")
    if len(m[1]) * count > MAX_LAYERS:  # checked before expanding, so a typo cannot exhaust memory
        raise ConfigError(f"pattern {pattern!r}: segment {segment!r} expands to more than {MAX_LAYERS} layers")
    return list(m[1]) * count


def _diagnose(segment: str, pos: int) -> str:
    """Why ``segment`` (starting at ``pos`` in the pattern) is not ``LETTER+ ("x" COUNT)?``."""
    if not segment:
        return f"empty segment at position {pos} (a '_' at the start or end, or two in a row)"
    letters = segment[:len(segment) - len(segment.lstrip(Symbols.LETTERS))]
    rest, at = segment[len(letters):], pos + len(letters)
    if not rest.startswith(Symbols.REPEAT):
        return _bad_char(rest[0], at)
    if not letters:
        return f"repeat {segment!r} at position {pos} has no symbols before it (write e.g. 'MMMA{segment}')"
    digits = re.match(r"x([0-9]*)", rest)[1]
    if not digits:
        if rest == Symbols.REPEAT:
            return f"repeat 'x' has no count (write e.g. '{letters}x4')"
        return f"repeat 'x' at position {at} must be followed by a count, got {rest[1]!r} (write e.g. '{letters}x4')"
    after = rest[1 + len(digits):]
    return (f"unexpected {after[0]!r} at position {at + 1 + len(digits)} after the repeat count "
            f"(a repeat ends its segment; start the next one with '_', e.g. '{letters}x{digits}_MMMA')")


def _bad_char(c: str, at: int) -> str:
    if c in string.ascii_lowercase:
        return f"lowercase {c!r} at position {at}: symbols are uppercase letters A-Z ('x' only repeats a segment)"
    if c in string.digits:
        return f"digit {c!r} at position {at} without a preceding 'x' (repeats are written with a lowercase x: 'Mx3')"
    if c == ",":
        return "',' is not part of the grammar (in a Hydra override a comma makes a sweep over patterns)"
    if c in "()[]{}":
        return f"bracket {c!r} at position {at}: there is no grouping; a segment is the group ('MMMAx4', not '(MMMA)x4')"
    if c in "*-|/+":
        return (f"{c!r} at position {at} is not part of the grammar: repeat with 'x<N>'; "
                f"for a Megatron string use the mapping {{megatron: '...'}}")
    if c.isspace():
        return f"whitespace at position {at} inside the pattern"
    return f"unexpected character {c!r} at position {at}"


def _parse_list(items: Any) -> list[str]:
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise ConfigError(f"pattern 'list' must be a list of symbol letters like [M, M, A], got {items!r}")
    if not items:
        raise ConfigError("empty pattern list: give one symbol letter per layer, e.g. [M, M, M, A]")
    for i, item in enumerate(items):
        if not (isinstance(item, str) and len(item) == 1 and item in Symbols.LETTERS):
            raise ConfigError(f"pattern list item {i} is {item!r}: each item must be one symbol letter A-Z, e.g. [M, M, A]")
    return list(items)


_PERIOD_KEYS = ("every", "offset", "symbol", "base")


def _parse_period(spec: Any, n_layers: int) -> list[str]:
    """Jamba / Qwen style: layer i gets ``symbol`` iff ``i % every == offset``; the rest get ``base``."""
    entries = [spec] if isinstance(spec, Mapping) else spec
    if isinstance(entries, str) or not isinstance(entries, Sequence) or not entries:
        raise ConfigError(f"pattern 'period' must be a mapping {{every: 4, offset: 3, symbol: A, base: M}} or a "
                          f"non-empty list of them; got {spec!r}")
    letters: list[str | None] = [None] * n_layers
    bases = set()
    for k, entry in enumerate(entries):
        where = "period" if isinstance(spec, Mapping) else f"period[{k}]"
        every, offset, symbol = _period_entry(entry, where)
        if "base" in entry:
            bases.add(_check_letter(entry["base"], f"{where}.base"))
        selected = [i for i in range(n_layers) if i % every == offset]
        if not selected:
            raise ConfigError(f"{where} (every {every}, offset {offset}) selects no layer of {n_layers}")
        for i in selected:
            if letters[i] is not None:
                raise ConfigError(f"{where}: layer {i} is already given symbol '{letters[i]}' by an earlier period entry")
            letters[i] = symbol
    if len(bases) != 1:
        problem = "has no 'base'" if not bases else f"has conflicting bases {', '.join(sorted(bases))}"
        raise ConfigError(f"pattern 'period' {problem}: give one 'base' symbol for the other layers, e.g. base: M")
    base = bases.pop()
    return [letter or base for letter in letters]


def _period_entry(entry: Any, where: str) -> tuple[int, int, str]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping {{every: 4, offset: 3, symbol: A, base: M}}, got {entry!r}")
    unknown = [k for k in entry if k not in _PERIOD_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_PERIOD_KEYS)}")
    for key in ("every", "symbol"):
        if key not in entry:
            raise ConfigError(f"{where} needs '{key}' (keys: every, offset (default 0), symbol, base)")
    every = entry["every"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ConfigError(f"{where}.every must be an integer >= 1, got {every!r}")
    offset = entry.get("offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset < every:
        raise ConfigError(f"{where}.offset must be an integer in [0, every={every}), got {offset!r}")
    return every, offset, _check_letter(entry["symbol"], f"{where}.symbol")


def _parse_index_lists(spec: Any, n_layers: int) -> list[str]:
    """FLA / mamba_ssm style: ``{A: [3, 7], W: [1], base: M}``; unlisted layers get ``base``."""
    if not isinstance(spec, Mapping):
        raise ConfigError(f"pattern 'layers' must be a mapping like {{A: [3, 7], base: M}}, got {spec!r}")
    if "base" not in spec:
        raise ConfigError("pattern 'layers' needs 'base': the symbol of every layer not listed, e.g. {A: [3, 7], base: M}")
    base = _check_letter(spec["base"], "layers.base")
    letters: list[str | None] = [None] * n_layers
    for symbol, indices in spec.items():
        if symbol == "base":
            continue
        _check_letter(symbol, "layers")
        for i in _indices(indices, n_layers, f"layers.{symbol}"):
            if letters[i] is not None:
                raise ConfigError(f"layers.{symbol}: layer {i} is also listed under '{letters[i]}'")
            letters[i] = symbol
    return [letter or base for letter in letters]


def _parse_megatron(text: Any) -> tuple[list[str], list[bool]]:
    """One character per Megatron sub-layer; an MLP ('-') folds into the mixer just before it."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"pattern 'megatron' must be a non-empty string like 'M-M-M*-', got {text!r}")
    letters: list[str] = []
    mlps: list[bool] = []
    after_mixer = False  # an MLP right after a mixer belongs to that mixer's block
    for pos, c in enumerate(text.strip()):
        if c in Symbols.MEGATRON_IMPORT:
            letters.append(Symbols.MEGATRON_IMPORT[c])
            mlps.append(False)
            after_mixer = True
        elif c == Symbols.MEGATRON_MLP:
            if after_mixer:
                mlps[-1] = True
            else:
                letters.append(Symbols.MEGATRON_FFN_ONLY)
                mlps.append(True)
            after_mixer = False
        else:
            meaning = Symbols.MEGATRON_UNSUPPORTED.get(c)
            what = f" (Megatron {meaning})" if meaning else ""
            raise ConfigError(f"megatron pattern {text!r}: unsupported character {c!r} at position {pos}{what}; "
                              f"supported: 'M' (Mamba -> symbol M), '*' (attention -> symbol A), "
                              f"'-' (MLP, folded into the preceding mixer's block, or an FFN-only block F)")
    return letters, mlps


def _apply_megatron_mlps(layers: list[LayerSpec], mlps: list[bool]) -> list[LayerSpec]:
    out = []
    for spec, has_mlp in zip(layers, mlps):
        if spec.symbol == Symbols.MEGATRON_FFN_ONLY and spec.mixer is not None:
            raise ConfigError(f"megatron pattern: a lone '-' becomes symbol F, but F is redefined with mixer {spec.mixer!r}; "
                              f"F must stay FFN-only (mixer: null)")
        if not has_mlp:
            out.append(replace(spec, ffn=None, ffn_kwargs=EMPTY))
        elif spec.ffn is None:
            raise ConfigError(f"megatron pattern gives layer {spec.index} (symbol {spec.symbol}) an MLP '-', but it has "
                              f"no FFN (ffn: null globally or for symbol {spec.symbol}); set ffn: {{type: swiglu}}")
        else:
            out.append(spec)
    return out


# ----------------------------------------------------------------------------------------------
# overrides and sharing


def _apply_overrides(layers: list[LayerSpec], overrides: Any) -> list[LayerSpec]:
    layers = list(layers)
    for k, override in enumerate(_entries(overrides, "overrides")):
        where = f"overrides[{k}]"
        if not isinstance(override, Mapping) or "layers" not in override:
            raise ConfigError(f"{where} must be a mapping with 'layers' and the kwargs to set, "
                              f"e.g. {{layers: [-1], num_kv_heads: 4}}; got {override!r}")
        changes = {key: v for key, v in override.items() if key != "layers"}
        if not changes:
            raise ConfigError(f"{where} sets nothing: add mixer kwargs or 'ffn' next to 'layers'")
        if "mixer" in changes:
            raise ConfigError(f"{where} cannot change 'mixer': give those layers a different symbol instead")
        set_ffn = "ffn" in changes  # present-with-None means "no FFN", so test the key, not the value
        ffn = _ffn_spec(changes.pop("ffn", None), f"{where}.ffn")
        kwargs = _freeze(changes, where)
        for i in _indices(override["layers"], len(layers), f"{where}.layers"):
            layers[i] = _override_layer(layers[i], kwargs, set_ffn, ffn, where)
    return layers


def _override_layer(spec: LayerSpec, kwargs: FrozenDict, set_ffn: bool, ffn: tuple[str, FrozenDict] | None,
                    where: str) -> LayerSpec:
    if kwargs and spec.mixer is None:
        raise ConfigError(f"{where}: layer {spec.index} (symbol {spec.symbol}) is FFN-only and has no mixer kwargs to "
                          f"override ({', '.join(kwargs)}); only 'ffn' can be overridden there")
    spec = replace(spec, mixer_kwargs=FrozenDict({**spec.mixer_kwargs, **kwargs}))
    if set_ffn:
        spec = replace(spec, ffn=ffn[0] if ffn else None, ffn_kwargs=ffn[1] if ffn else EMPTY)
    return spec


def _check_ffn_only_blocks(layers: list[LayerSpec]) -> None:
    for spec in layers:
        if spec.mixer is None and spec.ffn is None:
            raise ConfigError(f"layer {spec.index} (symbol {spec.symbol}) is FFN-only (mixer: null) but has no FFN; "
                              f"give it one (ffn: {{type: swiglu}}) globally, in its symbol or in an override")


_SHARE_KEYS = ("symbol", "layers", "group")


def _apply_share(layers: list[LayerSpec], share: Any) -> list[LayerSpec]:
    groups: dict[int, str] = {}
    for k, entry in enumerate(_entries(share, "share")):
        where = f"share[{k}]"
        group, indices = _share_entry(entry, layers, where)
        for i in indices:
            if groups.get(i, group) != group:
                raise ConfigError(f"{where}: layer {i} is already in share group {groups[i]!r}; a layer has one group")
            groups[i] = group
    layers = [replace(spec, share_group=groups.get(spec.index)) for spec in layers]
    _check_groups_identical(layers)
    return layers


def _share_entry(entry: Any, layers: list[LayerSpec], where: str) -> tuple[str, list[int]]:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where} must be a mapping like {{symbol: A, group: shared_attn}}, got {entry!r}")
    unknown = [key for key in entry if key not in _SHARE_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_SHARE_KEYS)}")
    group = entry.get("group")
    if not isinstance(group, str) or not group:
        raise ConfigError(f"{where} needs 'group': a non-empty name for the tied block, got {group!r}")
    if ("symbol" in entry) == ("layers" in entry):
        raise ConfigError(f"{where} needs exactly one of 'symbol' (every layer of that symbol) or 'layers' (indices)")
    if "layers" in entry:
        return group, _indices(entry["layers"], len(layers), f"{where}.layers")
    symbol = _check_letter(entry["symbol"], f"{where}.symbol")
    indices = [spec.index for spec in layers if spec.symbol == symbol]
    if not indices:
        raise ConfigError(f"{where}: symbol '{symbol}' does not occur in the pattern")
    return group, indices


def _check_groups_identical(layers: list[LayerSpec]) -> None:
    # Tied layers are one module object, so they must describe the same module.
    first: dict[str, LayerSpec] = {}
    for spec in layers:
        if spec.share_group is None:
            continue
        ref = first.setdefault(spec.share_group, spec)
        for field in ("mixer", "mixer_kwargs", "ffn", "ffn_kwargs"):
            a, b = getattr(ref, field), getattr(spec, field)
            if a != b:
                raise ConfigError(f"share group {spec.share_group!r}: layers {ref.index} and {spec.index} differ in {field} "
                                  f"({_show(a)} vs {_show(b)}); tied layers must be identical after overrides")


# ----------------------------------------------------------------------------------------------
# canonical string


def canonical_string(symbols: str) -> str:
    """The shortest compact spelling of a one-letter-per-layer string.

    Rule: among all strings of the grammar that expand to ``symbols``, take the shortest; break ties
    by fewer symbol letters written (longer runs), then by fewer segments, then alphabetically. So a
    whole-string period wins when it is shortest (``'MMMAMMMA'`` -> ``'MMMAx2'``), runs are
    compressed only when that saves characters (``'MMMMMMMA'`` -> ``'Mx7_A'``, but ``'MMMA'`` stays),
    and a count is never ``x1``.

    >>> canonical_string("MMMWMMMWMMMWMMMWMMMWMMMA")
    'MMMWx5_MMMA'
    >>> canonical_string("AAAB"), canonical_string("AAAAB"), canonical_string("M" * 100)
    ('AAAB', 'Ax4_B', 'Mx100')

    Dynamic programming over prefixes: a segment is either plain letters (never right after another
    plain segment, since merging the two is shorter) or a repeated unit. Roughly n^2 log n steps:
    about 0.1 s for 256 layers.
    """
    n = len(symbols)
    start: _Spelling = (0, 0, 0, "")
    best_plain: list[_Spelling | None] = [None] * (n + 1)  # best spelling of symbols[:i] ending in plain letters
    best_repeat: list[_Spelling | None] = [None] * (n + 1)  # ... ending in a "unit x count" segment
    for i in range(1, n + 1):
        best = None
        for j in range(i):
            prefix = start if j == 0 else best_repeat[j]
            if prefix is not None:
                best = _offer(best, prefix, i - j, i - j, lambda j=j, i=i: symbols[j:i])
        best_plain[i] = best
        best = None
        for size in range(1, i // 2 + 1):
            unit, count = symbols[i - size:i], 1
            while (count + 1) * size <= i and symbols[i - (count + 1) * size:i - count * size] == unit:
                count += 1
                j = i - count * size
                segment = f"{unit}{Symbols.REPEAT}{count}"
                for prefix in [start] if j == 0 else (best_plain[j], best_repeat[j]):
                    if prefix is not None:
                        best = _offer(best, prefix, len(segment), size, lambda s=segment: s)
        best_repeat[i] = best
    return min(p for p in (best_plain[n], best_repeat[n]) if p is not None)[3]


# (length, letters written, segments, text): tuples order by the canonical rule, and every part but
# the text adds up over segments, which keeps the prefix-wise choice optimal.
_Spelling = tuple[int, int, int, str]


def _offer(best: _Spelling | None, prefix: _Spelling, segment_len: int, letters: int,
           segment: Callable[[], str]) -> _Spelling:
    """The better of ``best`` and ``prefix`` + one more segment; the text is built only when it can win."""
    length, n_letters, segments, text = prefix
    key = (length + 1 + segment_len if text else segment_len, n_letters + letters, segments + 1)
    if best is not None and key > best[:3]:
        return best
    candidate = (*key, f"{text}{Symbols.SEPARATOR}{segment()}" if text else segment())
    return candidate if best is None or candidate < best else best


# ----------------------------------------------------------------------------------------------
# small helpers


def _check_letter(letter: Any, where: str) -> str:
    if not (isinstance(letter, str) and len(letter) == 1 and letter in Symbols.LETTERS):
        raise ConfigError(f"{where}: symbol {letter!r} must be one uppercase letter A-Z")
    return letter


def _entries(value: Any, what: str) -> Sequence[Any]:
    if value is None:
        return ()
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence):
        raise ConfigError(f"{what} must be a list of mappings, got {value!r}")
    return value


def _indices(value: Any, n_layers: int, where: str) -> list[int]:
    """Layer indices with negatives counted from the end; out-of-range or repeated ones are errors."""
    if isinstance(value, (str, Mapping)) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{where} must be a non-empty list of layer indices, got {value!r}")
    seen: dict[int, int] = {}
    for raw in value:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ConfigError(f"{where}: layer index {raw!r} is not an integer")
        if not -n_layers <= raw < n_layers:
            raise ConfigError(f"{where}: layer index {raw} is out of range for {n_layers} layers "
                              f"(valid: {-n_layers} .. {n_layers - 1})")
        i = raw % n_layers
        if i in seen:
            spelled = "" if raw == seen[i] else f" (as {seen[i]} and {raw})"
            raise ConfigError(f"{where}: layer {i} is listed twice{spelled}")
        seen[i] = raw
    return list(seen)


def _freeze(value: Any, where: str) -> Any:
    """Deep read-only copy of plain config data (mappings -> FrozenDict, lists -> tuples)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value} is not a finite number")
        return value
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _freeze(item, f"{where}.{key}")
        return FrozenDict(out)
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(_freeze(item, f"{where}[{i}]") for i, item in enumerate(value))
    raise ConfigError(f"{where}: {value!r} ({type(value).__name__}) is not plain config data "
                      f"(numbers, strings, booleans, null, lists and mappings)")


def _normalize(value: Any) -> Any:
    """Plain JSON types for hashing; integral floats become ints so 4 and 4.0 hash alike."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {key: _normalize(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalize(item) for item in value]
    return value


def _canonical_json(value: Any) -> str:
    return json.dumps(_normalize(value), sort_keys=True, separators=(",", ":"))


def _show(value: Any) -> str:
    return json.dumps(_normalize(value), sort_keys=True) if isinstance(value, Mapping) else repr(value)
