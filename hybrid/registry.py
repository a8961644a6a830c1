"""Component registry: every mixer, FFN and norm is selected by a short name.

A YAML file can only name registered components and set their typed config fields, so a
config from a colleague cannot import or run arbitrary code.

    >>> from hybrid.registry import MIXERS
    >>> entry = MIXERS.get("attention")
    >>> cfg = entry.make_config({"num_heads": 4})
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A configuration problem found before any training starts."""


@dataclass(frozen=True)
class Footprint:
    """Inference memory of one layer for one sequence, as a function of context length.

    ``state_bytes`` is constant in length (recurrent state, conv state); attention-like layers add
    ``kv_bytes_per_token`` for each cached token, up to ``kv_max_tokens`` (a sliding window) or
    without bound when it is ``None``.
    """

    state_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_max_tokens: int | None = None

    @property
    def has_kv_cache(self) -> bool:
        return self.kv_bytes_per_token > 0

    def bytes_at(self, seqlen: int) -> int:
        cached = seqlen if self.kv_max_tokens is None else min(seqlen, self.kv_max_tokens)
        return self.state_bytes + self.kv_bytes_per_token * cached


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # "mixer" | "ffn" | "norm"
    cls: type
    config_cls: type
    is_attention: bool = False  # counts towards the pattern's attention fraction
    summary: str = ""

    def make_config(self, kwargs: dict[str, Any] | None = None, where: str = "") -> Any:
        """Build the typed config, failing with the valid field names on any mistake."""
        return build_dataclass(self.config_cls, dict(kwargs or {}), f"{self.kind} '{self.name}'" + where)


class Registry:
    """Name -> component table of one kind (mixers, FFNs or norms)."""

    def __init__(self, kind: str, provider: str = "hybrid.layers"):
        self.kind = kind
        self.provider = provider  # module whose import registers the built-in entries
        self._entries: dict[str, Entry] = {}
        # Names promised by the pattern alphabet whose implementation lands later; looking one up
        # explains that instead of calling it a typo.
        self._reserved: dict[str, str] = {}

    def register(self, name: str, config_cls: type, *, is_attention: bool = False) -> Callable[[type], type]:
        if not dataclasses.is_dataclass(config_cls):
            raise TypeError(f"config class for {self.kind} '{name}' must be a dataclass")

        def decorator(cls: type) -> type:
            if name in self._entries and self._entries[name].cls is not cls:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            doc = (cls.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, self.kind, cls, config_cls, is_attention, doc[0] if doc else "")
            self._reserved.pop(name, None)
            return cls

        return decorator

    def reserve(self, name: str, note: str) -> None:
        if name not in self._entries:
            self._reserved[name] = note

    def get(self, name: str) -> Entry:
        self._load()
        if name in self._entries:
            return self._entries[name]
        if name in self._reserved:
            raise ConfigError(f"{self.kind} '{name}' is reserved but not implemented yet ({self._reserved[name]}). "
                              f"Available {self.kind}s: {', '.join(self.names())}")
        raise ConfigError(_unknown(self.kind, name, self.names()))

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def _load(self) -> None:
        # Built-ins register when their module is imported; importing lazily avoids a cycle
        # (those modules import this one).
        importlib.import_module(self.provider)


MIXERS = Registry("mixer")
FFNS = Registry("ffn")
NORMS = Registry("norm")
TASKS = Registry("task", provider="hybrid.data")

register_mixer = MIXERS.register
register_ffn = FFNS.register
register_norm = NORMS.register
register_task = TASKS.register


def _unknown(kind: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} '{name}'.{hint} Valid {kind}s: {', '.join(valid)}"


def list_layers() -> dict[str, list[dict[str, Any]]]:
    """Every registered component with its config fields and defaults, grouped by kind."""
    out: dict[str, list[dict[str, Any]]] = {}
    for reg in (MIXERS, FFNS, NORMS):
        out[reg.kind] = [
            {
                "name": e.name,
                "summary": e.summary,
                "attention": e.is_attention,
                "fields": {f.name: _default_of(f) for f in dataclasses.fields(e.config_cls)},
            }
            for e in reg.entries()
        ]
    return out


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return "<required>"


# ----------------------------------------------------------------------------------------------
# typed dataclass construction from untrusted dicts (YAML / CLI)


def build_dataclass(cls: type, values: dict[str, Any], what: str) -> Any:
    """Instantiate dataclass ``cls`` from ``values`` with field-name and type checks.

    Runs the dataclass's own ``__post_init__`` validation, so range checks live beside the fields.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        parts = []
        for k in unknown:
            close = difflib.get_close_matches(k, list(fields), n=1)
            parts.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        raise ConfigError(f"{what}: unknown field {', '.join(parts)}. Valid fields: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    checked = {}
    for k, v in values.items():
        checked[k] = coerce(v, hints.get(k, Any), f"{what}: field '{k}'")
    try:
        return cls(**checked)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what}: {exc}") from exc


def coerce(value: Any, tp: Any, what: str) -> Any:
    """Check ``value`` against annotation ``tp``; ints are accepted where floats are expected."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, what)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{what} must be {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{what} must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        items = [coerce(v, inner, what) for v in value]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{what} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{what} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{what} must be a string, got {value!r}")
    return value


def _type_name(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
