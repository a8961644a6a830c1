"""Every pattern against a baseline pattern of the same report: the ratios the efficiency claims are about.

Ratios are "how many times better than the baseline": training tokens/s over the baseline's, baseline
decode latency over the pattern's (per batch and length), baseline prefill time over the pattern's,
and the pattern's prefill peak memory over the baseline's. A point where either side ran out of memory
has no ratio (null) but says which side did.
"""

from __future__ import annotations


def _default_baseline(entries: list[dict]) -> dict | None:
    ok = [e for e in entries if not e.get("oom")]
    return max(ok, key=lambda e: e.get("n_attention_layers", 0), default=None)


def _by_key(rows: list[dict], key: str) -> dict:
    return {r[key]: r for r in rows if key in r}


def _ratio(mine: dict | None, base: dict | None, field: str, invert: bool) -> float | dict | None:
    if mine is None or base is None:
        return None
    if mine.get("oom") or base.get("oom"):
        return {"oom": [side for side, r in (("pattern", mine), ("baseline", base)) if r.get("oom")]}
    a, b = mine.get(field), base.get(field)
    if not a or not b:
        return None
    return b / a if invert else a / b


def against_baseline(report: dict, baseline: str | None) -> dict | None:
    entries = report["patterns"]
    base = next((e for e in entries if baseline in (e.get("pattern"), e.get("canonical"))), None) if baseline else \
        _default_baseline(entries)
    if base is None or base.get("oom"):
        return None
    out = {"baseline": base["canonical"], "patterns": {}}
    for e in entries:
        if e is base or e.get("oom"):
            continue
        train_b = _by_key(base["train"], "context")
        prefill_b = _by_key(base["prefill"], "length")
        out["patterns"][e["canonical"]] = {
            "train_tokens_per_s": {str(c): _ratio(r, train_b.get(c), "tokens_per_s", False)
                                   for c, r in _by_key(e["train"], "context").items()},
            "prefill_speedup": {str(n): _ratio(r, prefill_b.get(n), "seconds", True)
                                for n, r in _by_key(e["prefill"], "length").items()},
            "prefill_memory": {str(n): _ratio(r, prefill_b.get(n), "peak_bytes", False)
                               for n, r in _by_key(e["prefill"], "length").items()},
            "decode_speedup": {b: {str(n): _ratio(r, _by_key(base["decode"].get(b, []), "length").get(n),
                                                  "seconds_per_token", True)
                                   for n, r in _by_key(rows, "length").items()}
                               for b, rows in e["decode"].items()},
        }
    return out
