"""Prefill time and decode latency vs length, one line per pattern (log-log), as one HTML file.

Log-log axes make the scaling exponent visible as a slope: attention bends up, SSMs stay straight.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots


def figure(report: dict) -> go.Figure:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("prefill latency", "decode latency per token"))
    colors = qualitative.Plotly
    for i, entry in enumerate(e for e in report["patterns"] if not e.get("oom")):
        color = colors[i % len(colors)]
        ok = [p for p in entry["prefill"] if not p.get("oom")]
        fig.add_trace(go.Scatter(x=[p["length"] for p in ok], y=[p["seconds"] * 1e3 for p in ok], mode="lines+markers",
                                 name=entry["canonical"], legendgroup=entry["canonical"], line=dict(color=color)), 1, 1)
        for j, (batch, rows) in enumerate(sorted(entry["decode"].items(), key=lambda kv: int(kv[0]))):
            ok = [p for p in rows if not p.get("oom")]
            fig.add_trace(go.Scatter(x=[p["length"] for p in ok], y=[p["seconds_per_token"] * 1e3 for p in ok],
                                     mode="lines+markers", name=f"{entry['canonical']} b={batch}", legendgroup=entry["canonical"],
                                     line=dict(color=color, dash="solid" if j == 0 else "dash"), showlegend=j > 0), 1, 2)
    fig.update_xaxes(type="log", title="context length (tokens)")
    fig.update_yaxes(type="log", title="ms")
    fig.update_layout(template="plotly_white", height=450, title=f"hybrid-bench on {report['device']} ({report['device_name']})")
    return fig


def write_html(report: dict, path: Path) -> Path:
    figure(report).write_html(path, include_plotlyjs=True, full_html=True)  # self-contained: opens offline
    return path
