"""The dashboard's Plotly charts, one function per chart.

Every chart colours by architecture and marks pure runs with circles and solid lines, hybrid runs
with diamonds and dashed lines, and names each legend entry ``pure · AA`` / ``hybrid · MA``. A chart
whose data no run has (no routers, no distance-sliced task) returns ``None`` and the page says so,
rather than showing an empty frame.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from hybrid.compare.runs import Run

PALETTE = qualitative.D3 + qualitative.Set2
SYMBOL = {"pure": "circle", "hybrid": "diamond"}
DASH = {"pure": "solid", "hybrid": "dash"}
LAYOUT = dict(template="plotly_white", height=430, margin=dict(l=70, r=20, t=50, b=60), font=dict(size=13),
              legend=dict(title="architecture (● pure, ◆ hybrid)"), hovermode="closest")


def arch_colors(runs: list[Run]) -> dict[str, str]:
    archs = sorted({r.arch for r in runs}, key=lambda a: (not _pure(runs, a), a))
    return {a: PALETTE[i % len(PALETTE)] for i, a in enumerate(archs)}


def _pure(runs: list[Run], arch: str) -> bool:
    return any(r.is_pure for r in runs if r.arch == arch)


def _by_arch(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (not r.is_pure, r.arch)):
        out[r.arch].append(r)
    return out


def _style(run: Run, color: str, mode: str = "markers") -> dict:
    return dict(name=run.label, legendgroup=run.arch, mode=mode,
                marker=dict(symbol=SYMBOL[run.kind], size=11, color=color, line=dict(width=1, color="#333")),
                line=dict(color=color, dash=DASH[run.kind], width=2))


def _layout(fig: go.Figure, title: str, x: str, y: str, **kw) -> go.Figure:
    fig.update_layout(**{**LAYOUT, **kw}, title=title)
    fig.update_xaxes(title_text=x)
    fig.update_yaxes(title_text=y)
    return fig


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not beaten by another with at most the bytes and at least the accuracy (lower x, higher y)."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto(runs: list[Run], metric: str, colors: dict[str, str]) -> go.Figure | None:
    fig = go.Figure()
    pts = []
    for arch, rs in _by_arch(runs).items():
        xs, ys, text = [], [], []
        for r in rs:
            x, y = r.cache_bytes_per_token, r.metric(metric)
            if x is None or y is None:
                continue
            xs.append(x), ys.append(y), pts.append((x, y))
            p = r.pattern
            text.append(f"{r.name}<br>state {p.get('recurrent_state_bytes')} B, "
                        f"KV {p.get('kv_bytes_per_token')} B/token<br>L={r.seq_len}")
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, text=text, hovertemplate="%{text}<br>%{x:.0f} B/token, %{y:.3f}<extra></extra>",
                                     **_style(rs[0], colors[arch])))
    if not pts:
        return None
    front = pareto_front(pts)
    fig.add_trace(go.Scatter(x=[p[0] for p in front], y=[p[1] for p in front], mode="lines", name="Pareto front",
                             line=dict(color="#222", width=1.5, shape="hv", dash="dot"), hoverinfo="skip"))
    fig.update_xaxes(type="log")
    return _layout(fig, f"{metric} vs inference cache per token (recurrent state + KV at the training length)",
                   "cache bytes per token of context (log)", metric)


def _best_by(runs: list[Run], key, metric: str) -> dict[float, float]:
    out: dict[float, float] = {}
    for r in runs:
        k, v = key(r), r.metric(metric)
        if k is not None and v is not None:
            out[k] = max(out.get(k, -math.inf), v)
    return dict(sorted(out.items()))


def versus(runs: list[Run], metric: str, colors: dict[str, str], key, what: str, title: str) -> go.Figure | None:
    """Best ``metric`` per value of ``key`` (sequence length, number of facts), one line per architecture."""
    fig = go.Figure()
    for arch, rs in _by_arch(runs).items():
        best = _best_by(rs, key, metric)
        if best:
            fig.add_trace(go.Scatter(x=list(best), y=list(best.values()), **_style(rs[0], colors[arch], "lines+markers")))
    if not fig.data:
        return None
    return _layout(fig, title, what, f"{metric} (best run)")


def extrapolation(runs: list[Run], colors: dict[str, str], metric: str = "acc") -> go.Figure | None:
    """``hybrid-eval --extrapolate`` results: test metric vs evaluation length, the training length marked."""
    fig = go.Figure()
    for arch, rs in _by_arch(runs).items():
        pts: dict[int, float] = {}
        for r in rs:
            for e in r.eval:
                v = (e.get("metrics") or {}).get(metric)
                if v is not None and e.get("length"):
                    pts[int(e["length"])] = max(pts.get(int(e["length"]), -math.inf), float(v))
        if pts:
            pts = dict(sorted(pts.items()))
            fig.add_trace(go.Scatter(x=list(pts), y=list(pts.values()), **_style(rs[0], colors[arch], "lines+markers")))
    if not fig.data:
        return None
    fig.update_xaxes(type="log")
    return _layout(fig, f"Length extrapolation and retrieval vs context length (hybrid-eval, test {metric})",
                   "evaluation length (tokens, log)", f"test {metric}")


DIST = re.compile(r"^val/acc_dist/(\d+)$")


def distance(runs: list[Run], colors: dict[str, str]) -> go.Figure | None:
    """Validation accuracy by log2 distance bucket between a fact and its query (best run per architecture)."""
    fig = go.Figure()
    for arch, rs in _by_arch(runs).items():
        best = max(rs, key=lambda r: r.metric("val/acc") or -1.0)
        pts = sorted((int(m.group(1)), v) for k, v in best.metrics.items() if (m := DIST.match(k)))
        if pts:
            fig.add_trace(go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], **_style(best, colors[arch], "lines+markers")))
    if not fig.data:
        return None
    fig.update_xaxes(type="log")
    return _layout(fig, "Recall by distance (fact to query, log2 buckets; best run per architecture)",
                   "distance bucket lower edge (tokens, log)", "val accuracy")


def loss_curves(runs: list[Run], colors: dict[str, str]) -> go.Figure | None:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "validation perplexity"))
    shown: set[str] = set()
    for r in sorted(runs, key=lambda r: (not r.is_pure, r.arch, r.name)):
        for col, key, f in ((1, "train/loss", None), (2, "val/loss", math.exp)):
            pts = r.curves.get(key) or []
            if not pts:
                continue
            ys = [min(f(v), 1e6) if f else v for _, v in pts]
            fig.add_trace(go.Scatter(x=[s for s, _ in pts], y=ys, text=[r.name] * len(pts),
                                     hovertemplate="%{text}<br>step %{x}: %{y:.3f}<extra></extra>",
                                     showlegend=r.arch not in shown,
                                     **_style(r, colors[r.arch], "lines" if len(pts) > 20 else "lines+markers")), row=1, col=col)
            shown.add(r.arch)
    if not fig.data:
        return None
    fig.update_yaxes(type="log", row=1, col=2)
    return _layout(fig, "", "step", "")


ROUTE = re.compile(r"^(train|val)/route/layer(\d+)/(frac\w*)$")


def routing(runs: list[Run], colors: dict[str, str]) -> go.Figure | None:
    """Fraction of tokens (or chunks) each router sends to attention, per layer, over training."""
    fig = go.Figure()
    for r in sorted(runs, key=lambda r: (r.arch, r.name)):
        for key, pts in sorted(r.curves.items()):
            m = ROUTE.match(key)
            if not m or m.group(1) != "val" and any(k.startswith("val/route/") for k in r.curves):
                continue
            fig.add_trace(go.Scatter(x=[s for s, _ in pts], y=[v for _, v in pts],
                                     name=f"{r.label} · layer {m.group(2)} {m.group(3)}", legendgroup=r.arch, mode="lines+markers",
                                     line=dict(color=colors[r.arch], dash=DASH[r.kind]), marker=dict(symbol=SYMBOL[r.kind])))
    if not fig.data:
        return None
    return _layout(fig, "Routing rates (share routed to attention, per layer)", "step", "rate", legend=dict(title="run · layer"))


def _last(r: Run, key: str, reduce=None) -> float | None:
    pts = r.curves.get(key)
    if pts:
        vals = [v for _, v in pts]
        return reduce(vals) if reduce else vals[-1]
    return r.metric(key)


def performance(runs: list[Run], colors: dict[str, str]) -> go.Figure | None:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training throughput (tokens/s, median)", "peak memory (MB)"))
    rs = [r for r in sorted(runs, key=lambda r: (not r.is_pure, r.arch, r.name)) if r.curves.get("perf/tokens_per_s") or
          r.metric("perf/tokens_per_s") is not None]
    shown: set[str] = set()
    for r in rs:
        tps = _last(r, "perf/tokens_per_s", lambda v: sorted(v)[len(v) // 2])
        mem = _last(r, "perf/peak_memory_mb", max)
        for col, v in ((1, tps), (2, mem)):
            if v is not None:
                fig.add_trace(go.Bar(x=[f"{r.name} · {r.arch}"], y=[v],
                                     name=r.label, legendgroup=r.arch, showlegend=r.arch not in shown,
                                     marker=dict(color=colors[r.arch], pattern_shape="" if r.is_pure else "/")), row=1, col=col)
                shown.add(r.arch)
    if not fig.data:
        return None
    return _layout(fig, "", "run", "")
