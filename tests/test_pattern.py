"""The layer-pattern language: every surface form compiles to the same layers and hash, canonical
strings round-trip, Megatron import/export, overrides, tied blocks, summaries and error messages."""

import copy
import doctest
import itertools
import json
import pickle
import random
import re
from dataclasses import dataclass

import pytest
from hybrid.layers.base import Mixer

import hybrid.pattern
from hybrid.pattern import DEFAULT_SYMBOLS, LayerSpec, ParsedPattern, canonical_string, parse_pattern
from hybrid.registry import MIXERS, ConfigError, Entry, Footprint

# ----------------------------------------------------------------------------------------------
# surface forms


EIGHT = "MMMAMMMA"
SAME_AS_EIGHT = [
    pytest.param(("MMMAx2", None), id="compact"),
    pytest.param(("  MMMAx2 ", None), id="compact-whitespace"),
    pytest.param(("MMMA_MMMA", None), id="compact-segments"),
    pytest.param(("Mx3_A_Mx3_A", None), id="compact-runs"),
    pytest.param(("MMMAx2", 8), id="compact-asserted-depth"),
    pytest.param(({"compact": "MMMAx2"}, None), id="compact-key"),
    pytest.param((list(EIGHT), None), id="list"),
    pytest.param((tuple(EIGHT), 8), id="tuple"),
    pytest.param(({"list": list(EIGHT)}, None), id="list-key"),
    pytest.param(({"period": {"every": 4, "offset": 3, "symbol": "A", "base": "M"}}, 8), id="period"),
    pytest.param(({"period": [{"every": 4, "offset": 3, "symbol": "A", "base": "M"}]}, 8), id="period-list"),
    pytest.param(({"layers": {"A": [3, 7], "base": "M"}}, 8), id="layers"),
    pytest.param(({"layers": {"A": [-5, -1], "base": "M"}}, 8), id="layers-negative"),
    pytest.param(({"megatron": "M-M-M-*-M-M-M-*-"}, None), id="megatron"),
]


@pytest.mark.parametrize("form", SAME_AS_EIGHT)
def test_every_surface_form_gives_the_same_layers_and_hash(form):
    pattern, n_layers = form
    reference = parse_pattern(EIGHT)
    parsed = parse_pattern(pattern, n_layers=n_layers)
    assert parsed == reference
    assert parsed.layers == reference.layers and parsed.pattern_hash == reference.pattern_hash
    assert parsed.symbols_string == EIGHT and parsed.canonical == "MMMAx2"


def test_expanded_layers():
    p = parse_pattern("MMMWx2_F")
    assert p.symbols_string == "MMMWMMMWF" and p.n_layers == 9
    assert [s.index for s in p.layers] == list(range(9))
    w = p.layers[3]
    assert (w.symbol, w.mixer, dict(w.mixer_kwargs), w.ffn, dict(w.ffn_kwargs), w.share_group) == (
        "W", "attention", {"window": 256}, "swiglu", {}, None)
    f = p.layers[-1]
    assert f.mixer is None and dict(f.mixer_kwargs) == {} and f.ffn == "swiglu"
    # The table holds the entries of the letters that occur.
    assert set(p.symbols) == {"F", "M", "W"} and dict(p.symbols["W"]) == {"mixer": "attention", "window": 256}


def test_period_with_several_symbols():
    spec = {"period": [{"every": 4, "offset": 1, "symbol": "W", "base": "M"}, {"every": 4, "offset": 3, "symbol": "A"}]}
    assert parse_pattern(spec, n_layers=8).symbols_string == "MWMAMWMA"
    # Qwen3-Next: full attention iff (i + 1) % 4 == 0.
    assert parse_pattern({"period": {"every": 4, "offset": 3, "symbol": "A", "base": "D"}}, n_layers=12).canonical == "DDDAx3"
    # offset defaults to 0
    assert parse_pattern({"period": {"every": 2, "symbol": "A", "base": "M"}}, n_layers=4).symbols_string == "AMAM"


def test_index_lists_with_several_symbols():
    p = parse_pattern({"layers": {"A": [3, -1], "W": [1], "base": "M"}}, n_layers=8)
    assert p.symbols_string == "MWMAMMMA"


def test_hydra_containers_are_accepted():
    from omegaconf import OmegaConf

    p = parse_pattern(OmegaConf.create({"list": ["M", "A"]}), symbols=OmegaConf.create({"Q": {"mixer": "attention"}}),
                      ffn=OmegaConf.create({"type": "swiglu", "mult": 4.0}),
                      overrides=OmegaConf.create([{"layers": [-1], "num_kv_heads": 1}]))
    assert p == parse_pattern("MA", ffn={"type": "swiglu", "mult": 4.0}, overrides=[{"layers": [1], "num_kv_heads": 1}])


# ----------------------------------------------------------------------------------------------
# symbol table and FFNs


def test_default_symbols():
    assert {k: dict(v) for k, v in DEFAULT_SYMBOLS.items()} == {
        "A": {"mixer": "attention"}, "W": {"mixer": "attention", "window": 256}, "K": {"mixer": "block_topk"},
        "M": {"mixer": "mamba3"}, "D": {"mixer": "mamba2"}, "H": {"mixer": "fusion"}, "R": {"mixer": "token_router"},
        "G": {"mixer": "chunk_gate"}, "F": {"mixer": None},
    }


def test_parsing_does_not_need_the_mixers():
    # K, H, R and G name mixers that may not be implemented; only summary() looks them up.
    p = parse_pattern("KHRG_Q", symbols={"Q": {"mixer": "no_such_mixer"}})
    assert [s.mixer for s in p.layers] == ["block_topk", "fusion", "token_router", "chunk_gate", "no_such_mixer"]


def test_user_symbol_replaces_the_default_entry_and_adds_new_letters():
    p = parse_pattern("WQ", symbols={"W": {"mixer": "attention", "num_heads": 2}, "Q": {"mixer": "mamba2", "d_state": 16}})
    assert dict(p.layers[0].mixer_kwargs) == {"num_heads": 2}  # no window: replaced, not merged
    assert (p.layers[1].mixer, dict(p.layers[1].mixer_kwargs)) == ("mamba2", {"d_state": 16})


def test_ffn_default_symbol_override_and_none():
    p = parse_pattern("MAF", ffn={"type": "swiglu", "mult": 4},
                      symbols={"M": {"mixer": "mamba3", "ffn": None}, "A": {"mixer": "attention", "ffn": {"type": "mlp"}}})
    assert [(s.ffn, dict(s.ffn_kwargs)) for s in p.layers] == [(None, {}), ("mlp", {}), ("swiglu", {"mult": 4})]
    assert [s.ffn for s in parse_pattern("MA", ffn=None).layers] == [None, None]


def test_layer_kwargs_are_read_only_and_copyable():
    p = parse_pattern("AW", symbols={"A": {"mixer": "attention", "sizes": [1, 2], "extra": {"a": 1}}})
    kwargs = p.layers[0].mixer_kwargs
    with pytest.raises(TypeError, match="read-only"):
        kwargs["num_heads"] = 2
    with pytest.raises(TypeError, match="read-only"):
        kwargs.update(num_heads=2)
    with pytest.raises(TypeError, match="read-only"):
        kwargs["extra"]["a"] = 2
    assert kwargs["sizes"] == (1, 2)
    assert json.loads(json.dumps(kwargs)) == {"sizes": [1, 2], "extra": {"a": 1}}
    assert copy.deepcopy(p) == p and pickle.loads(pickle.dumps(p)) == p
    assert hash(p) == hash(copy.deepcopy(p))  # usable as a dict key / in sets


# ----------------------------------------------------------------------------------------------
# canonical string


@pytest.mark.parametrize("expanded,canonical", [
    ("MMMAMMMA", "MMMAx2"),
    ("MMMA", "MMMA"),
    ("MMMMMMMA", "Mx7_A"),
    ("M" * 24, "Mx24"),
    ("A", "A"),
    ("AAAM", "AAAM"),
    ("AAAAM", "Ax4_M"),  # tie in length: fewer letters written wins
    ("MMMW" * 5 + "MMMA", "MMMWx5_MMMA"),
    ("MMMW" * 6 + "MMMA" * 6, "MMMWx6_MMMAx6"),
    ("MMMMMMMAMMMMMMMA", "MMMMMMMAx2"),
    ("M" * 20 + "A" + "M" * 20 + "A", "Mx20_A_Mx20_A"),
])
def test_canonical_examples(expanded, canonical):
    p = parse_pattern(expanded)
    assert p.canonical == canonical
    assert parse_pattern(canonical) == p


def _all_spellings(s):
    """Every grammar string that expands to ``s`` (brute force, for short strings)."""
    out = set()
    for cut in itertools.product([False, True], repeat=len(s) - 1):
        bounds = [0] + [i + 1 for i, c in enumerate(cut) if c] + [len(s)]
        options = []
        for a, b in zip(bounds, bounds[1:]):
            seg, forms = s[a:b], []
            for size in range(1, len(seg) + 1):
                unit, count = seg[:size], len(seg) // size
                if len(seg) % size == 0 and unit * count == seg:
                    forms.append(unit if count == 1 else f"{unit}x{count}")
            options.append(forms)
        out.update("_".join(choice) for choice in itertools.product(*options))
    return out


def test_canonical_is_the_documented_optimum_on_all_short_strings():
    def rule(t):
        return (len(t), sum(c.isupper() for c in t), t.count("_") + 1, t)

    for n in range(1, 9):
        for letters in itertools.product("AM", repeat=n):
            s = "".join(letters)
            assert canonical_string(s) == min(_all_spellings(s), key=rule), s


def test_canonical_round_trips_random_patterns():
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(rng.choice("MMMAWF") for _ in range(rng.randint(1, 40)))
        p = parse_pattern(s)
        assert parse_pattern(p.canonical) == p
        assert parse_pattern(p.canonical).symbols_string == s


# ----------------------------------------------------------------------------------------------
# Megatron


@pytest.mark.parametrize("megatron,symbols,ffns", [
    ("M-M-M*-", "MMMA", [True, True, False, True]),  # the third Mamba is followed by "*", not "-"
    ("M-M*M-", "MMAM", [True, False, False, True]),  # a mixer not followed by "-" has no FFN
    ("-M-", "FM", [True, True]),  # a lone "-" is an FFN-only block
    ("M--*", "MFA", [True, True, False]),
    ("*", "A", [False]),
])
def test_megatron_import_and_export_round_trip(megatron, symbols, ffns):
    p = parse_pattern({"megatron": megatron})
    assert p.symbols_string == symbols
    assert [s.ffn is not None for s in p.layers] == ffns
    assert p.to_megatron() == megatron
    assert parse_pattern({"megatron": p.to_megatron()}) == p


def test_megatron_export_of_compact_pattern():
    assert parse_pattern("MMMA_F").to_megatron() == "M-M-M-*--"
    assert parse_pattern("MMMA", ffn=None).to_megatron() == "MMM*"
    # Megatron's M is Mamba-2: importing with M = mamba2 keeps the mixer, and exports back.
    p = parse_pattern({"megatron": "M-*"}, symbols={"M": {"mixer": "mamba2"}})
    assert p.layers[0].mixer == "mamba2" and p.to_megatron() == "M-*"


@pytest.mark.parametrize("pattern,kwargs", [
    ("MW", {}),  # sliding window
    ("MK", {}),
    ("MA", {"overrides": [{"layers": [1], "window": 64}]}),
    ("MA", {"symbols": {"A": {"mixer": "mamba3"}}}),
])
def test_megatron_export_rejects_symbols_without_a_letter(pattern, kwargs):
    with pytest.raises(ConfigError, match="layer 1: symbol . .*has no Megatron letter; exportable: M"):
        parse_pattern(pattern, **kwargs).to_megatron()


@pytest.mark.parametrize("char,meaning", [("|", "pipeline-stage"), ("/", "multi-token"), ("E", "MoE"), ("G", "gated DeltaNet"),
                                          ("D", "DeepSeek"), ("+", "MLA"), ("m", None)])
def test_megatron_unsupported_characters(char, meaning):
    match = rf"unsupported character '{re.escape(char)}' at position 2"
    if meaning:
        match += rf" \(Megatron {meaning}"
    with pytest.raises(ConfigError, match=match + r".*supported: 'M' \(Mamba"):
        parse_pattern({"megatron": f"M-{char}M-"})


def test_megatron_errors():
    with pytest.raises(ConfigError, match="pattern 'megatron' must be a non-empty string"):
        parse_pattern({"megatron": ""})
    with pytest.raises(ConfigError, match=r"gives layer 0 \(symbol M\) an MLP '-', but it has no FFN"):
        parse_pattern({"megatron": "M-"}, ffn=None)
    with pytest.raises(ConfigError, match="expands to 2 layers but n_layers is 3"):
        parse_pattern({"megatron": "M-*-"}, n_layers=3)
    with pytest.raises(ConfigError, match="F must stay FFN-only"):
        parse_pattern({"megatron": "-"}, symbols={"F": {"mixer": "attention"}})


# ----------------------------------------------------------------------------------------------
# overrides


def test_overrides_merge_kwargs_with_negative_indices():
    p = parse_pattern("MMMAx2", overrides=[{"layers": [-1, 3], "num_kv_heads": 4}, {"layers": [2], "ffn": None},
                                           {"layers": [-1], "num_kv_heads": 1, "window": 8},
                                           {"layers": [0], "ffn": {"type": "mlp", "mult": 2}}])
    assert dict(p.layers[3].mixer_kwargs) == {"num_kv_heads": 4}
    assert dict(p.layers[7].mixer_kwargs) == {"num_kv_heads": 1, "window": 8}  # later overrides win
    assert p.layers[2].ffn is None and dict(p.layers[2].ffn_kwargs) == {}
    assert (p.layers[0].ffn, dict(p.layers[0].ffn_kwargs)) == ("mlp", {"mult": 2})
    assert p.symbols_string == "MMMAMMMA" and p.canonical == "MMMAx2"
    assert p.pattern_hash != parse_pattern("MMMAx2").pattern_hash
    # An override can give an FFN-only block a different FFN.
    assert parse_pattern("MF", overrides=[{"layers": [1], "ffn": {"type": "mlp"}}]).layers[1].ffn == "mlp"


@pytest.mark.parametrize("overrides,match", [
    ([{"layers": [8], "x": 1}], r"overrides\[0\].layers: layer index 8 is out of range for 8 layers \(valid: -8 .. 7\)"),
    ([{"layers": [-9], "x": 1}], "layer index -9 is out of range"),
    ([{"layers": [1, -7], "x": 1}], r"layer 1 is listed twice \(as 1 and -7\)"),
    ([{"layers": [1.5], "x": 1}], "layer index 1.5 is not an integer"),
    ([{"layers": [], "x": 1}], "must be a non-empty list of layer indices"),
    ([{"num_kv_heads": 1}], r"overrides\[0\] must be a mapping with 'layers'"),
    ([{"layers": [0]}], "sets nothing"),
    ([{"layers": [0], "mixer": "attention"}], "cannot change 'mixer'"),
    ([{"layers": [-1], "num_heads": 2}], r"layer 7 \(symbol F\) is FFN-only and has no mixer kwargs to override"),
    ([{"layers": [-1], "ffn": None}], r"layer 7 \(symbol F\) is FFN-only \(mixer: null\) but has no FFN"),
    ([{"layers": [0], "ffn": {"mult": 2}}], r"overrides\[0\].ffn must be null \(no FFN\) or a mapping with a 'type'"),
    ({"layers": [0], "x": 1}, "overrides must be a list of mappings"),
])
def test_override_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_pattern("MMMAMMMF", overrides=overrides)


# ----------------------------------------------------------------------------------------------
# tied blocks


def test_share_groups():
    p = parse_pattern("MAMAMA", share=[{"symbol": "A", "group": "shared_attn"}, {"layers": [0, -2], "group": "g2"}])
    assert [s.share_group for s in p.layers] == ["g2", "shared_attn", None, "shared_attn", "g2", "shared_attn"]
    assert p.pattern_hash != parse_pattern("MAMAMA").pattern_hash


@pytest.mark.parametrize("share,overrides,match", [
    ([{"symbol": "A", "group": "g"}], [{"layers": [-1], "num_kv_heads": 1}],
     r"share group 'g': layers 1 and 5 differ in mixer_kwargs \({} vs {\"num_kv_heads\": 1}\)"),
    ([{"layers": [0, 1], "group": "g"}], None, r"share group 'g': layers 0 and 1 differ in mixer \('mamba3' vs 'attention'\)"),
    ([{"symbol": "A", "group": "g"}], [{"layers": [3], "ffn": None}], "layers 1 and 3 differ in ffn"),
    ([{"symbol": "A", "group": "g"}, {"layers": [3, 5], "group": "h"}], None, "layer 3 is already in share group 'g'"),
    ([{"symbol": "W", "group": "g"}], None, r"share\[0\]: symbol 'W' does not occur in the pattern"),
    ([{"symbol": "A", "layers": [1], "group": "g"}], None, "needs exactly one of 'symbol'"),
    ([{"symbol": "A"}], None, r"share\[0\] needs 'group'"),
    ([{"symbol": "A", "group": "g", "adapter_rank": 4}], None, "unknown key 'adapter_rank'; valid keys: symbol, layers"),
    ([{"symbol": "a", "group": "g"}], None, "symbol 'a' must be one uppercase letter"),
])
def test_share_errors(share, overrides, match):
    with pytest.raises(ConfigError, match=match):
        parse_pattern("MAMAMA", share=share, overrides=overrides)


# ----------------------------------------------------------------------------------------------
# hashing


def test_hash_is_pinned():
    # A change here means every logged run's pattern_hash changes: only do it on purpose. Pinned values
    # also show the hash does not depend on this process's PYTHONHASHSEED or dict order.
    assert parse_pattern("MMMAx2").pattern_hash == "da46d2a4ec"
    assert parse_pattern("MMMWx5_MMMA", ffn={"type": "swiglu", "mult": 4.0}).pattern_hash == "d20fb2014b"


def test_hash_ignores_dict_order_and_int_vs_float():
    a = parse_pattern("QA", symbols={"Q": {"mixer": "attention", "num_heads": 2, "window": 8}},
                      ffn={"type": "swiglu", "mult": 4})
    b = parse_pattern("QA", symbols={"Q": {"window": 8, "num_heads": 2, "mixer": "attention"}},
                      ffn={"mult": 4.0, "type": "swiglu"})
    assert a.pattern_hash == b.pattern_hash


def test_hash_sees_every_architectural_field():
    base = parse_pattern("MA")
    variants = [
        parse_pattern("AM"),
        parse_pattern("MA", symbols={"A": {"mixer": "attention", "num_heads": 2}}),
        parse_pattern("MA", ffn={"type": "swiglu", "mult": 2}),
        parse_pattern("MA", ffn={"type": "mlp"}),
        parse_pattern("MA", overrides=[{"layers": [0], "ffn": None}]),
        parse_pattern("MA", share=[{"layers": [1], "group": "g"}]),
        parse_pattern("MQ", symbols={"Q": {"mixer": "attention"}}),  # the symbol letter is logged, so it counts
    ]
    hashes = {p.pattern_hash for p in variants}
    assert len(hashes) == len(variants) and base.pattern_hash not in hashes
    assert all(len(h) == 10 and int(h, 16) >= 0 for h in hashes)


# ----------------------------------------------------------------------------------------------
# summary


@dataclass
class _SSMConfig:
    d_state: int = 16


@dataclass
class _AttnConfig:
    num_kv_heads: int = 2


class _DummySSM(Mixer):
    """Test-only recurrent mixer: state of d_model * d_state."""

    @classmethod
    def footprint(cls, d_model, cfg, dtype_bytes=2):
        return Footprint(state_bytes=d_model * cfg.d_state * dtype_bytes)


class _DummyAttn(Mixer):
    """Test-only attention: K and V of num_kv_heads * 8 channels per token."""

    @classmethod
    def footprint(cls, d_model, cfg, dtype_bytes=2):
        return Footprint(kv_bytes_per_token=2 * cfg.num_kv_heads * 8 * dtype_bytes)


@pytest.fixture
def dummy_mixers(monkeypatch):
    # Registered only for the duration of one test, so the registry-wide contract tests never see them.
    MIXERS.names()  # load the built-ins first
    monkeypatch.setitem(MIXERS._entries, "_test_ssm", Entry("_test_ssm", "mixer", _DummySSM, _SSMConfig))
    attn = Entry("_test_attn", "mixer", _DummyAttn, _AttnConfig, is_attention=True)
    monkeypatch.setitem(MIXERS._entries, "_test_attn", attn)
    return {"S": {"mixer": "_test_ssm"}, "Q": {"mixer": "_test_attn"}}


def test_summary_numbers(dummy_mixers):
    p = parse_pattern("SSSQx2_F", symbols=dummy_mixers,
                      overrides=[{"layers": [0], "d_state": 32}, {"layers": [-2], "num_kv_heads": 4}])
    s = p.summary(d_model=10, dtype_bytes=4)
    assert json.loads(json.dumps(s)) == s
    assert s == {
        "canonical": "SSSQx2_F",
        "symbols_string": "SSSQSSSQF",
        "pattern_hash": p.pattern_hash,
        "n_layers": 9,
        "attention_fraction": 2 / 9,  # the FFN-only layer counts as non-attention
        "n_kv_cache_layers": 2,
        "recurrent_state_bytes": 10 * (32 + 5 * 16) * 4,
        "kv_bytes_per_token": 2 * 8 * 4 * (2 + 4),
        "family": "hybrid",
        "is_pure": False,
    }


def test_summary_pure_and_shared(dummy_mixers):
    p = parse_pattern("Sx4", symbols=dummy_mixers, share=[{"symbol": "S", "group": "tied"}])
    s = p.summary(d_model=8)
    assert (s["family"], s["is_pure"], s["attention_fraction"], s["n_kv_cache_layers"]) == ("pure-S", True, 0.0, 0)
    assert s["recurrent_state_bytes"] == 4 * 8 * 16 * 2  # tied weights, but each depth keeps its own state


def test_summary_needs_registered_mixers(dummy_mixers):
    with pytest.raises(ConfigError, match="unknown mixer 'no_such_mixer'"):
        parse_pattern("Q", symbols={"Q": {"mixer": "no_such_mixer"}}).summary(d_model=8)
    MIXERS.reserve("_test_reserved", "a test symbol")  # every default symbol's mixer is implemented now
    with pytest.raises(ConfigError, match="mixer '_test_reserved' is reserved but not implemented yet"):
        parse_pattern("Q", symbols={"Q": {"mixer": "_test_reserved"}}).summary(d_model=8)
    with pytest.raises(ConfigError, match=r"mixer '_test_ssm' \(layer 0, symbol S\): unknown field 'd_sate'"):
        parse_pattern("S", symbols={"S": {"mixer": "_test_ssm", "d_sate": 4}}).summary(d_model=8)


def test_summary_with_real_attention():
    if "attention" not in MIXERS:
        pytest.skip("the attention mixer is not registered yet")
    s = parse_pattern("AW").summary(d_model=64, dtype_bytes=2)
    per_layer = MIXERS.get("attention").cls.footprint(64, MIXERS.get("attention").make_config({}), 2).kv_bytes_per_token
    assert s["attention_fraction"] == 1.0 and s["n_kv_cache_layers"] == 2
    assert s["kv_bytes_per_token"] == 2 * per_layer > 0 and s["recurrent_state_bytes"] == 0


# ----------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("pattern,match", [
    ("", "empty pattern"),
    ("   ", "empty pattern"),
    (None, r"empty pattern \(got null\)"),
    ("MMx", r"pattern 'MMx': repeat 'x' has no count \(write e.g. 'MMx4'\). Grammar: segments joined by '_'"),
    ("x3", "pattern 'x3': repeat 'x3' at position 0 has no symbols before it"),
    ("MM_x3", "repeat 'x3' at position 3 has no symbols before it"),
    ("MMx0", "repeat count in 'MMx0' must be >= 1"),
    ("MxA", "repeat 'x' at position 1 must be followed by a count, got 'A'"),
    ("MMx2A", "unexpected 'A' at position 4 after the repeat count"),
    ("mmma", "lowercase 'm' at position 0: symbols are uppercase letters A-Z"),
    ("MMa", "lowercase 'a' at position 2"),
    ("M3", "digit '3' at position 1 without a preceding 'x'"),
    ("(MMMA)x4", r"bracket '\(' at position 0: there is no grouping"),
    ("MMMA,MMMM", "',' is not part of the grammar"),
    ("MMMW*5", r"'\*' at position 4 is not part of the grammar"),
    ("M-M*", "for a Megatron string use the mapping"),
    ("MM A", "whitespace at position 2"),
    ("MM__A", "empty segment at position 3"),
    ("MMA_", "empty segment at position 4"),
    ("MM#", "unexpected character '#' at position 2. Grammar:"),
    ("Mx1000000000", "segment 'Mx1000000000' expands to more than 10000 layers"),
    ("Mx6000_Ax6000", "expands to 12000 layers, more than 10000"),
    ("MMAZ", r"unknown symbol 'Z' \(layer 3\); defined symbols: A, D, F, G, H, K, M, R, W"),
    (["M", "Z"], "unknown symbol 'Z'"),
    (["M", "m"], "pattern list item 1 is 'm': each item must be one symbol letter"),
    (["MM"], "pattern list item 0 is 'MM'"),
    ([], "empty pattern list"),
    (42, "pattern must be a compact string, a list of symbols or a mapping"),
    ({}, "needs exactly one layout key of compact, list, period, layers, megatron; got none"),
    ({"pattern": "MMA"}, "unknown pattern layout key 'pattern'; use exactly one of compact, list"),
    ({"compact": "MA", "list": ["M"]}, "exactly one layout key .*; got compact, list"),
    ({"compact": ["M"]}, "pattern 'compact' must be a string"),
    ({"list": "MMA"}, "pattern 'list' must be a list of symbol letters"),
])
def test_pattern_errors(pattern, match):
    with pytest.raises(ConfigError, match=match):
        parse_pattern(pattern)


@pytest.mark.parametrize("pattern,n_layers,match", [
    ("MMMAx2", 6, r"pattern 'MMMAx2' expands to 8 layers but n_layers is 6"),
    (["M", "A"], 3, "expands to 2 layers but n_layers is 3"),
    ("MA", 0, "n_layers must be a positive integer"),
    ({"period": {"every": 4, "offset": 3, "symbol": "A", "base": "M"}}, None, "the 'period' pattern layout needs n_layers"),
    ({"layers": {"A": [1], "base": "M"}}, None, "the 'layers' pattern layout needs n_layers"),
    ({"period": {"every": 0, "symbol": "A", "base": "M"}}, 8, r"period.every must be an integer >= 1, got 0"),
    ({"period": {"every": 4, "offset": 4, "symbol": "A", "base": "M"}}, 8, r"offset must be an integer in \[0, every=4\)"),
    ({"period": {"every": 4, "symbol": "A"}}, 8, "pattern 'period' has no 'base'"),
    ({"period": {"every": 4, "offset": 3, "symbol": "a", "base": "M"}}, 8, "period.symbol: symbol 'a' must be one"),
    ({"period": {"every": 4, "offset": 3, "symbol": "A", "base": "M", "phase": 1}}, 8, "unknown key 'phase'; valid keys"),
    ({"period": {"offset": 3, "symbol": "A", "base": "M"}}, 8, "period needs 'every'"),
    ({"period": {"every": 16, "offset": 9, "symbol": "A", "base": "M"}}, 8, "selects no layer of 8"),
    ({"period": [{"every": 2, "symbol": "A", "base": "M"}, {"every": 4, "symbol": "W"}]}, 8,
     r"period\[1\]: layer 0 is already given symbol 'A'"),
    ({"period": [{"every": 2, "symbol": "A", "base": "M"}, {"every": 4, "offset": 1, "symbol": "W", "base": "D"}]}, 8,
     "conflicting bases D, M"),
    ({"period": []}, 8, "non-empty list"),
    ({"layers": {"A": [3, 8], "base": "M"}}, 8, r"layers.A: layer index 8 is out of range for 8 layers"),
    ({"layers": {"A": [3, -5], "base": "M"}}, 8, r"layers.A: layer 3 is listed twice \(as 3 and -5\)"),
    ({"layers": {"A": [3], "W": [-5], "base": "M"}}, 8, "layers.W: layer 3 is also listed under 'A'"),
    ({"layers": {"A": [3]}}, 8, "pattern 'layers' needs 'base'"),
    ({"layers": {"a": [3], "base": "M"}}, 8, "symbol 'a' must be one uppercase letter"),
    ({"layers": {"A": 3, "base": "M"}}, 8, "layers.A must be a non-empty list of layer indices"),
    ({"layers": {"Z": [3], "base": "M"}}, 8, r"unknown symbol 'Z' \(layer 3\)"),
])
def test_layout_errors(pattern, n_layers, match):
    with pytest.raises(ConfigError, match=match):
        parse_pattern(pattern, n_layers=n_layers)


@pytest.mark.parametrize("kwargs,match", [
    ({"symbols": {"m": {"mixer": "mamba3"}}}, "symbols: symbol 'm' must be one uppercase letter"),
    ({"symbols": {"QQ": {"mixer": "mamba3"}}}, "symbol 'QQ' must be one uppercase letter"),
    ({"symbols": {"Q": {"d_state": 4}}}, "symbols.Q has no 'mixer' key"),
    ({"symbols": {"Q": "mamba3"}}, "symbols.Q must be a mapping"),
    ({"symbols": {"Q": {"mixer": 3}}}, "symbols.Q.mixer must be a mixer registry name or null"),
    ({"symbols": {"Q": {"mixer": None, "num_heads": 2}}}, "symbols.Q is FFN-only .* takes no mixer kwargs, got num_heads"),
    ({"symbols": {"Q": {"mixer": "attention", "ffn": "swiglu"}}}, r"symbols.Q.ffn must be null \(no FFN\) or a mapping"),
    ({"symbols": {"Q": {"mixer": "attention", "f": object()}}}, "symbols.Q.f: .* is not plain config data"),
    ({"symbols": {"Q": {"mixer": "attention", "f": float("nan")}}}, "is not a finite number"),
    ({"symbols": ["Q"]}, "symbols must be a mapping"),
    ({"ffn": {"mult": 4}}, "ffn must be null .* or a mapping with a 'type'"),
    ({"ffn": None}, r"layer 1 \(symbol F\) is FFN-only \(mixer: null\) but has no FFN"),
    ({"symbols": {"Q": {"mixer": "attention"}, "F": {"mixer": None, "ffn": None}}}, "is FFN-only .* but has no FFN"),
])
def test_symbol_and_ffn_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        parse_pattern("QF", **{"symbols": {"Q": {"mixer": "attention"}}, **kwargs})


# ----------------------------------------------------------------------------------------------
# docs


def test_module_doctests():
    result = doctest.testmod(hybrid.pattern)
    assert result.attempted > 5 and result.failed == 0


def test_public_types():
    p = parse_pattern("MA")
    assert isinstance(p, ParsedPattern) and all(isinstance(s, LayerSpec) for s in p.layers)
    assert isinstance(p.layers, tuple)
