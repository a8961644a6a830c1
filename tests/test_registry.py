from dataclasses import dataclass
from typing import Literal

import pytest

import hybrid
from hybrid.registry import MIXERS, ConfigError, build_dataclass


def test_unknown_mixer_names_valid_choices():
    with pytest.raises(ConfigError, match=r"unknown mixer 'atention'. Did you mean 'attention'\?.*Valid mixers: .*attention"):
        MIXERS.get("atention")


def test_unknown_and_ill_typed_fields():
    entry = MIXERS.get("attention")
    with pytest.raises(ConfigError, match=r"unknown field 'num_head' \(did you mean 'num_heads'\?\). Valid fields: num_heads"):
        entry.make_config({"num_head": 4})
    with pytest.raises(ConfigError, match="field 'num_heads' must be an integer, got 'four'"):
        entry.make_config({"num_heads": "four"})
    with pytest.raises(ConfigError, match="field 'position' must be one of 'rope', 'none'"):
        entry.make_config({"position": "alibi"})


def test_coercion_rules():
    @dataclass
    class C:
        a: float = 1.0
        b: int | None = None
        c: Literal["x", "y"] = "x"
        d: tuple[float, float] = (0.9, 0.95)
        e: bool = False

    c = build_dataclass(C, {"a": 2, "b": None, "d": [1, 2], "e": True}, "test")
    assert c.a == 2.0 and isinstance(c.a, float) and c.d == (1.0, 2.0)
    with pytest.raises(ConfigError, match="must be true or false"):
        build_dataclass(C, {"e": 1}, "test")
    with pytest.raises(ConfigError, match="must be int | None"):
        build_dataclass(C, {"b": 1.5}, "test")


def test_list_layers_lists_builtins():
    layers = hybrid.list_layers()
    mixers = {e["name"]: e for e in layers["mixer"]}
    assert "attention" in mixers and mixers["attention"]["attention"]
    assert mixers["attention"]["fields"]["num_heads"] == 4
    assert {e["name"] for e in layers["ffn"]} >= {"swiglu"}
    assert {e["name"] for e in layers["norm"]} >= {"rmsnorm"}


def test_reserved_mixer_explains():
    MIXERS.reserve("future_mixer", "arrives with a later issue")
    with pytest.raises(ConfigError, match="reserved but not implemented yet"):
        MIXERS.get("future_mixer")
