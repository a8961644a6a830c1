"""``hybrid-compare --bench``: hybrid-bench efficiency reports (``bench.json``) beside the quality of the runs.

A bench report measures each layer pattern's training throughput, prefill and decode cost and cache size;
the sweep's runs measure its quality. Both carry the pattern's canonical string, so a bench pattern and
its runs are matched on that string alone. The bench model is usually another size than the sweep's (the
125M preset vs tiny task models): the match means "same layer layout", not "same model", and the table
shows both parameter counts so the difference is visible.

The section: per report, a table with one row per pattern (patterns without runs too, OOM points as
"OOM"); the trade-off chart users choose on (best quality vs decode ms/token and vs cache bytes at one
context, one point per pattern, with the Pareto front); and hybrid-bench's own latency-vs-length figure.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from hybrid.bench.plot import figure as latency_figure
from hybrid.compare import figures
from hybrid.compare.page import chart, esc, num
from hybrid.compare.runs import CompareError, Run
from hybrid.pattern import parse_pattern
from hybrid.registry import ConfigError

BENCH_NAME = "bench.json"


def bench_file(path: str | Path) -> Path:
    """``path`` itself, or the one ``bench.json`` in (or below) that folder; anything else is an error naming it."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise CompareError(f"--bench {p}: no such file or folder")
    if (p / BENCH_NAME).is_file():
        return p / BENCH_NAME
    found = sorted(p.rglob(BENCH_NAME))
    if len(found) == 1:
        return found[0]
    if not found:
        raise CompareError(f"--bench {p}: no {BENCH_NAME} in this folder (give the file hybrid-bench printed, "
                           f"or its run folder logs/bench/runs/<time>)")
    raise CompareError(f"--bench {p}: {len(found)} {BENCH_NAME} files below it ({', '.join(map(str, found[:4]))}, ...); "
                       f"name the ones to show")


def load_bench(path: str | Path) -> tuple[Path, dict]:
    f = bench_file(path)
    try:
        report = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CompareError(f"--bench {f}: unreadable bench report ({type(exc).__name__}: {exc})") from exc
    if not isinstance(report, dict) or not isinstance(report.get("patterns"), list):
        raise CompareError(f"--bench {f}: not a hybrid-bench report (no 'patterns' list)")
    return f, report


@cache
def canon(pattern: str) -> str:
    """The canonical spelling (``MMMAMMMA`` -> ``MMMAx2``); a string that does not parse is kept as it is."""
    try:
        return parse_pattern(pattern).canonical
    except ConfigError:  # custom symbols the default table lacks: compare the strings as written
        return pattern


def lower_is_better(metric: str) -> bool:
    return any(k in metric for k in ("loss", "ppl", "perplexity"))


def best_runs(runs: list[Run], metric: str) -> dict[str, Run]:
    """The best completed run per canonical pattern (``metric`` present); max, or min for a loss."""
    sign = -1 if lower_is_better(metric) else 1
    out: dict[str, Run] = {}
    for r in runs:
        v = r.metric(metric)
        if r.status != "completed" or v is None:
            continue
        key = canon(r.arch)
        if key not in out or sign * v > sign * out[key].metric(metric):
            out[key] = r
    return out


# ------------------------------------------------------------------------------------------------
# reading a report


def _ok(report: dict) -> list[dict]:
    return [e for e in report["patterns"] if not e.get("oom")]


def _at(rows, key: str, value) -> dict | None:
    return next((r for r in _rows(rows) if r.get(key) == value), None)


def _rows(x) -> list[dict]:
    """A series of points; a lone dict is a one-point series (``train`` was one point in early reports)."""
    return [x] if isinstance(x, dict) else list(x or [])


def longest(report: dict) -> int | None:
    lengths = report.get("lengths") or [r["length"] for e in _ok(report) for r in e.get("prefill") or []]
    return max(lengths, default=None)


def decode_batch(report: dict) -> str | None:
    """Batch 1 when measured (the latency a user waits for), else the smallest batch."""
    return min((b for e in _ok(report) for b in e.get("decode") or {}), key=int, default=None)


def default_context(report: dict) -> int | None:
    """The longest length at which every pattern has a decode point at ``decode_batch`` (none OOM), else the longest."""
    b, lengths = decode_batch(report), sorted(report.get("lengths") or [], reverse=True)
    for n in lengths:
        rows = [_at((e.get("decode") or {}).get(b), "length", n) for e in _ok(report)]
        if all(r is not None and not r.get("oom") for r in rows):
            return n
    return longest(report)


def _len(n) -> str:
    return f"{n // 1024}k" if isinstance(n, int) and n >= 1024 and n % 1024 == 0 else str(n)


def _bytes(b) -> str:
    if b is None:
        return ""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{b:,.0f} B"


def _cell(row: dict | None, field: str, fmt: str, scale: float = 1.0) -> str:
    """A measured point: blank when not measured, "OOM" when it ran out of memory."""
    if row is None:
        return ""
    if row.get("oom"):
        return "OOM"
    v = row.get(field)
    return "" if v is None else fmt.format(v * scale)


def _ratio(v) -> str:
    """A ``versus_baseline`` entry: a ratio, null (not measured), or ``{"oom": [sides]}``."""
    if isinstance(v, dict):
        sides = v.get("oom") or []
        return "OOM" if sides == ["pattern"] else "OOM (baseline)" if sides == ["baseline"] else "OOM (both)"
    return "" if v is None else f"{v:.2f}×"


def _prefill_top(e: dict) -> tuple[dict | None, str]:
    """The prefill point at the longest length that fit, and its length cell (with where OOM began)."""
    rows = e.get("prefill") or []
    ok = [r for r in rows if not r.get("oom")]
    first_oom = next((r["length"] for r in rows if r.get("oom")), None)
    if not ok:
        return ({"oom": True} if rows else None), ("OOM" if rows else "")
    top = ok[-1]
    return top, _len(top["length"]) + (f" (OOM from {_len(first_oom)})" if first_oom else "")


# ------------------------------------------------------------------------------------------------
# the table


Cols = list[tuple[str, str, object]]


def columns(report: dict, best: dict[str, Run], metric: str) -> tuple[Cols, Cols]:
    """(group, header, cell of a pattern entry) per column, for two tables (one would need side-scrolling):
    quality and costs at the longest lengths; scaling slopes and ratios to the baseline."""
    ok, L = _ok(report), longest(report)
    ctxs = sorted({r["context"] for e in ok for r in _rows(e.get("train")) if "context" in r})
    batches = sorted({b for e in ok for b in e.get("decode") or {}}, key=int)
    vs = report.get("versus_baseline") or {}
    base = vs.get("baseline")

    def ratio(e: dict, key: str, *path) -> str:
        if e["canonical"] == base:
            return "baseline"
        v = ((vs.get("patterns") or {}).get(e["canonical"]) or {}).get(key) or {}
        for k in path:
            v = v.get(str(k)) if isinstance(v, dict) and "oom" not in v else v
        return _ratio(v)

    def run(e: dict) -> Run | None:
        return best.get(canon(e["canonical"]))

    cols: Cols = [  # quality first, so it reads beside the costs
        ("quality (runs of this pattern)", f"best {metric}", lambda e: num(run(e).metric(metric), "{:.4f}") if run(e) else ""),
        ("quality (runs of this pattern)", "best run", lambda e: run(e).name if run(e) else "no runs"),
        ("quality (runs of this pattern)", "run params", lambda e: num(run(e).n_params) if run(e) else ""),
        ("bench model", "params", lambda e: num(e.get("n_params"))),
        ("bench model", "attention layers", lambda e: num(e.get("n_attention_layers"))),
    ]
    cols += [("train tokens/s", f"ctx {_len(c)}",
              lambda e, c=c: _cell(_at(e.get("train"), "context", c), "tokens_per_s", "{:,.0f}")) for c in ctxs]
    cols += [("prefill (longest length that fit)", "length", lambda e: _prefill_top(e)[1]),
             ("prefill (longest length that fit)", "ms", lambda e: _cell(_prefill_top(e)[0], "seconds", "{:,.3f}", 1e3)),
             ("prefill (longest length that fit)", "peak memory",
              lambda e: "OOM" if (_prefill_top(e)[0] or {}).get("oom") else _bytes((_prefill_top(e)[0] or {}).get("peak_bytes")))]
    cols += [(f"decode ms/token at {_len(L)}", f"batch {b}",
              lambda e, b=b: _cell(_at((e.get("decode") or {}).get(b), "length", L), "seconds_per_token", "{:,.3f}", 1e3))
             for b in batches]

    def mem(e: dict, k: str):
        return ((e.get("memory") or {}).get("summary") or {}).get(k)

    cols += [("cache", "state bytes", lambda e: _bytes(mem(e, "recurrent_state_bytes"))),
             ("cache", "KV bytes/token", lambda e: _bytes(mem(e, "kv_bytes_per_token")))]
    scaling: Cols = [("log-log slope vs length", h, lambda e, k=k: num((e.get("fits") or {}).get(k), "{:.2f}"))
                     for h, k in (("prefill time", "prefill_time_slope"), ("prefill memory", "prefill_memory_slope"),
                                  ("decode latency", "decode_latency_slope"))]
    if base:
        g = f"× baseline {base} (higher is better, memory: lower)"
        if ctxs:
            scaling.append((g, f"train tok/s ctx {_len(ctxs[-1])}", lambda e: ratio(e, "train_tokens_per_s", ctxs[-1])))
        scaling += [(g, f"prefill speed {_len(L)}", lambda e: ratio(e, "prefill_speedup", L)),
                    (g, f"prefill memory {_len(L)}", lambda e: ratio(e, "prefill_memory", L))]
        scaling += [(g, f"decode speed b{b} {_len(L)}", lambda e, b=b: ratio(e, "decode_speedup", b, L)) for b in batches]
    return cols, scaling


def table(report: dict, cols: Cols) -> str:
    groups: list[list] = []  # [group, span], consecutive columns of one group share a top header cell
    for g, _, _ in cols:
        if groups and groups[-1][0] == g:
            groups[-1][1] += 1
        else:
            groups.append([g, 1])
    head = ("<tr><th class='l' rowspan='2'>pattern</th>" + "".join(f"<th colspan='{n}'>{esc(g)}</th>" for g, n in groups)
            + "</tr><tr>" + "".join(f"<th>{esc(h)}</th>" for _, h, _ in cols) + "</tr>")
    rows = []
    for e in report["patterns"]:
        name = f"<td class='l'><b>{esc(e.get('canonical') or e.get('pattern'))}</b></td>"
        if e.get("oom"):  # the model itself did not fit: nothing else was measured
            rows.append(f"<tr>{name}<td class='l oom' colspan='{len(cols)}'>OOM (the model did not fit on the device)</td></tr>")
            continue
        cells = [str(f(e)) for _, _, f in cols]
        tds = (("<td class='oom'>" if c.startswith("OOM") else "<td>") + f"{esc(c)}</td>" for c in cells)
        rows.append("<tr>" + name + "".join(tds) + "</tr>")
    return f"<div class='scroll'><table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table></div>"


def _about(path: Path, report: dict) -> str:
    dtype = report.get("dtype") or {}
    src = next((r.get("peak_source") for e in _ok(report) for r in e.get("prefill") or [] if r.get("peak_source")), None)
    bits = [f"{report.get('device', '?')} ({report.get('device_name', '?')})", f"torch {report.get('torch', '?')}",
            "dtype " + ", ".join(f"{k} {v}" for k, v in dtype.items()) if isinstance(dtype, dict) else f"dtype {dtype}",
            report.get("timing"), f"peak memory: {src}" if src else None, report.get("note")]
    return f"<p class='sub'>{esc(path)}: " + "; ".join(esc(b) for b in bits if b) + ".</p>"


# ------------------------------------------------------------------------------------------------
# the trade-off chart


def tradeoff(reports: list[tuple[Path, dict]], best: dict[str, Run], metric: str, context: int | None,
             colors: dict[str, str]) -> go.Figure | None:
    """Best ``metric`` per pattern vs its decode ms/token (left) and inference cache bytes (right) at one context."""
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=("decode latency", "inference cache per sequence (state + KV)"))
    pts: dict[int, list[tuple[float, float]]] = {1: [], 2: []}
    where = set()
    for path, report in reports:
        L, b = context or default_context(report), decode_batch(report)
        where.add(f"batch {b}, context {_len(L)}")
        for e in _ok(report):
            run = best.get(canon(e["canonical"]))
            if run is None:
                continue
            y = run.metric(metric)
            dec = _at((e.get("decode") or {}).get(b), "length", L)
            xs = {1: None if dec is None or dec.get("oom") else dec["seconds_per_token"] * 1e3, 2: _cache_bytes(e, dec, L)}
            style = figures._style(run, colors.get(run.arch, "#555"))
            if len(reports) > 1:
                style["name"] += f" ({path.parent.name})"
            hover = f"{e['canonical']}: bench {e.get('n_params')} params, run {run.name} ({run.n_params} params)"
            for i, (col, x) in enumerate((c, x) for c, x in xs.items() if x is not None):
                pts[col].append((x, y))
                fig.add_trace(go.Scatter(x=[x], y=[y], showlegend=i == 0, text=[hover],
                                         hovertemplate="%{text}<br>x %{x:.4g}, y %{y:.4f}<extra></extra>", **style), 1, col)
    if not fig.data:
        return None
    sign = -1 if lower_is_better(metric) else 1  # the front wants "higher is better"
    for col, p in pts.items():
        front = [(x, sign * y) for x, y in figures.pareto_front([(x, sign * y) for x, y in p])]
        fig.add_trace(go.Scatter(x=[q[0] for q in front], y=[q[1] for q in front], mode="lines", name="Pareto front",
                                 showlegend=col == 1, legendgroup="front", hoverinfo="skip",
                                 line=dict(color="#222", width=1.5, shape="hv", dash="dot")), 1, col)
    fig.update_xaxes(type="log")
    figures._layout(fig, f"Quality vs inference cost at {', '.join(sorted(where))} (best run per pattern)",
                    "decode ms/token (log)", f"{metric} (best run)")
    fig.update_yaxes(title_text="", row=1, col=2)  # shared with the left panel
    return fig.update_xaxes(title_text="cache bytes per sequence (log)", row=1, col=2)


def _cache_bytes(e: dict, dec: dict | None, L: int) -> float | None:
    """Measured at the decode point when there is one (it sees window caps), else state + KV/token x length."""
    cache = (dec or {}).get("cache")
    if cache:
        return cache.get("kv_bytes", 0) + cache.get("state_bytes", 0)
    summ = (e.get("memory") or {}).get("summary")
    return summ.get("recurrent_state_bytes", 0) + summ.get("kv_bytes_per_token", 0) * L if summ else None


# ------------------------------------------------------------------------------------------------
# the section


Figs = list[tuple[str, str, go.Figure]]


def panel(paths: list[str], runs: list[Run], metric: str, context: int | None = None) -> tuple[str, Figs]:
    """The section's HTML and its figures (id, heading, figure) for PNG export; errors name the bad path."""
    reports = [load_bench(p) for p in paths]
    if context is not None:
        for f, r in reports:
            if context not in (r.get("lengths") or []):
                raise CompareError(f"--bench-context {context}: {f} measured lengths {r.get('lengths')}")
    best = best_runs(runs, metric)
    benched = {canon(e["canonical"]) for _, r in reports for e in r["patterns"] if e.get("canonical")}
    parts = ["<h2 id='bench'>Efficiency (hybrid-bench) beside quality</h2>",
             "<p class='note'>Bench patterns and runs are matched by canonical pattern string; the bench model size "
             "(params) may differ from the runs' (run params).</p>"]
    figs: Figs = []
    for f, report in reports:
        costs, scaling = columns(report, best, metric)
        parts.append(f"<h3>{esc(f.parent.name)}</h3>" + _about(f, report) + table(report, costs) + "<br>" + table(report, scaling))
    fig = tradeoff(reports, best, metric, context, figures.arch_colors(runs))
    if fig is None:
        parts.append(f"<p class='note'>No completed run with {esc(metric)} shares a pattern with the bench: "
                     "no trade-off chart.</p>")
    else:
        figs.append(("bench-tradeoff", "Quality vs decode cost and cache size (one point per pattern)", fig))
    missing = sorted(benched - set(best))
    unbenched = sorted(set(best) - benched)
    if missing or unbenched:
        parts.append("<p class='note'>" + (f"Benched without quality runs: {esc(', '.join(missing))}. " if missing else "")
                     + (f"Runs without a bench row: {esc(', '.join(unbenched))}." if unbenched else "") + "</p>")
    for i, (f, report) in enumerate(reports):  # hybrid-bench's own chart, as its bench.html shows it
        figs.append((f"bench-latency-{i}", f"Prefill and decode latency vs length ({f.parent.name})", latency_figure(report)))
    for cid, heading, fg in figs:
        parts.append(f"<h3 id='{cid}'>{esc(heading)}</h3>" + chart(cid, fg))
    return "".join(parts), figs
