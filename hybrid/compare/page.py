"""The dashboard page: one self-contained HTML file.

Plotly's JavaScript is inlined once (no CDN fetch at view time, so the file opens offline and can be
mailed or archived). A small script at the end checks that every chart holds data and records the
result, and any page error, as ``data-*`` attributes on ``<body>``, so a headless browser test (or a
user in the console) can tell a rendered dashboard from a broken one.
"""

from __future__ import annotations

import html
import time
from collections import defaultdict

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from hybrid.compare.runs import Run

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:24px auto;max-width:1400px;color:#222;padding:0 16px}
h1{font-size:1.6em;margin-bottom:4px} h2{font-size:1.2em;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;font-size:13px;width:100%}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:right;white-space:nowrap} th{background:#f4f4f4}
td.l,th.l{text-align:left} tr.grp td{background:#eef3fa;font-weight:600;text-align:left}
.pure{color:#1f5fa8} .hybrid{color:#a8521f} .warn{background:#fff7e0;border:1px solid #e8c65a;padding:8px 12px}
.fail{background:#fdecec;border:1px solid #e39a9a;padding:8px 12px} .note{color:#777;font-style:italic}
.chart{min-height:430px} .scroll{overflow-x:auto} .scroll th{white-space:normal;text-align:center}
td.oom{color:#b00;font-weight:600}
"""

CHECK = """
<script>
(function(){
  var errs=[];
  function note(m){errs.push(String(m));document.body.setAttribute('data-page-errors',JSON.stringify(errs));}
  window.addEventListener('error',function(e){note(e.message||e);});
  window.addEventListener('unhandledrejection',function(e){note(e.reason);});
  var ce=console.error;console.error=function(){note(Array.prototype.join.call(arguments,' '));ce.apply(console,arguments);};
  function check(){
    var divs=document.querySelectorAll('.chart .js-plotly-plot'),ok=0,empty=[];
    divs.forEach(function(d){
      var n=(d.data||[]).reduce(function(a,t){return a+((t.y||t.values||[]).length||0);},0);
      if(n>0&&d.querySelector('.main-svg'))ok++;else empty.push(d.id);
    });
    document.body.setAttribute('data-charts-total',String(divs.length));
    document.body.setAttribute('data-charts-ok',String(ok));
    document.body.setAttribute('data-charts-empty',JSON.stringify(empty));
    if(!document.body.hasAttribute('data-page-errors'))document.body.setAttribute('data-page-errors','[]');
  }
  window.hybridCheck=check;check();window.addEventListener('load',check);
})();
</script>
"""


def esc(x) -> str:
    return html.escape(str(x))


def num(v, fmt: str = "{:,.0f}") -> str:
    return "" if v is None else fmt.format(v)


def runs_table(runs: list[Run], metric: str) -> str:
    """Completed runs grouped by architecture, pure ones first, best ``metric`` per group in the header."""
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[r.arch].append(r)
    cols = ["run", "task", "L", "facts", "lr", "seed", "params", "state B", "KV B/token", metric, "val/acc", "val/loss",
            "steps", "tokens/s", "peak MB"]
    out = ["<table><thead><tr>" + "".join(f'<th class="{"l" if i < 2 else ""}">{esc(c)}</th>' for i, c in enumerate(cols))
           + "</tr></thead><tbody>"]
    for arch, rs in sorted(groups.items(), key=lambda kv: (not kv[1][0].is_pure, kv[0])):
        r0 = rs[0]
        best = max((r.metric(metric) for r in rs if r.metric(metric) is not None), default=None)
        p = r0.pattern
        out.append(f'<tr class="grp"><td colspan="{len(cols)}"><span class="{r0.kind}">{r0.kind}</span> · {esc(arch)} '
                   f'({esc(p.get("family", ""))}, hash {esc(p.get("pattern_hash", "?"))}, {p.get("n_layers", "?")} layers, '
                   f'attention fraction {num(p.get("attention_fraction"), "{:.2f}")}) — {len(rs)} run(s), best {esc(metric)} '
                   f'{num(best, "{:.4f}")}</td></tr>')
        for r in sorted(rs, key=lambda r: -(r.metric(metric) or -1)):
            optim = r.config.get("optim") or {}
            cells = [r.name, r.data.get("name", ""), num(r.seq_len), num(r.n_facts), num(optim.get("lr"), "{:g}"),
                     num(r.config.get("seed")), num(r.n_params), num(p.get("recurrent_state_bytes")),
                     num(p.get("kv_bytes_per_token")), num(r.metric(metric), "{:.4f}"), num(r.metric("val/acc"), "{:.4f}"),
                     num(r.metric("val/loss"), "{:.4f}"), num(r.metric("global_step")),
                     num(r.metric("perf/tokens_per_s")), num(r.metric("perf/peak_memory_mb"))]
            out.append("<tr>" + "".join(f'<td class="{"l" if i < 2 else ""}">{esc(c)}</td>' for i, c in enumerate(cells)) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def failures(runs: list[Run]) -> str:
    bad = [r for r in runs if r.status != "completed"]
    if not bad:
        return ""
    rows = "".join(f'<tr><td class="l">{esc(r.name)}</td><td class="l">{esc(r.arch)}</td><td class="l">{esc(r.status)}</td>'
                   f'<td class="l">{esc((r.error or {}).get("type", ""))}: {esc((r.error or {}).get("message", ""))}</td></tr>'
                   for r in bad)
    return (f'<h2 id="failed">Failed or unfinished runs ({len(bad)})</h2><div class="fail"><table><thead><tr>'
            f'<th class="l">run</th><th class="l">pattern</th><th class="l">status</th><th class="l">error</th></tr></thead>'
            f'<tbody>{rows}</tbody></table></div>')


def chart(cid: str, fig: go.Figure) -> str:
    """One chart's div; the ``chart`` class is what the self-check counts."""
    return "<div class='chart'>" + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"chart-{cid}",
                                                config={"displaylogo": False, "responsive": True}) + "</div>"


def render(title: str, sources: list[str], runs: list[Run], metric: str, charts: list[tuple[str, str, go.Figure | None]],
           warnings: list[str], bench: str = "") -> str:
    """The whole page; ``charts`` are (id, heading, figure or None when no run has that data); ``bench`` is the
    ``--bench`` section's HTML, placed right after the runs table so efficiency reads beside quality."""
    done = [r for r in runs if r.status == "completed"]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title><style>{CSS}</style>",
             f"<script>{get_plotlyjs()}</script></head><body>",
             f"<h1>{esc(title)}</h1><p class='sub'>{len(done)} completed of {len(runs)} runs from {esc(', '.join(sources))}; "
             f"ranked by <b>{esc(metric)}</b>; built {time.strftime('%Y-%m-%d %H:%M')}.</p>"]
    if warnings:
        parts.append("<div class='warn'><b>Warnings</b><ul>" + "".join(f"<li>{esc(w)}</li>" for w in warnings) + "</ul></div>")
    parts.append(failures(runs))
    parts.append("<h2 id='runs'>Runs by architecture</h2>" + (runs_table(done, metric) if done else
                                                                "<p class='note'>No run completed.</p>"))
    parts.append(bench)
    for cid, heading, fig in charts:
        parts.append(f"<h2 id='{cid}'>{esc(heading)}</h2>")
        if fig is None:
            parts.append("<p class='note'>No run in this comparison has this data.</p>")
        else:
            parts.append(chart(cid, fig))
    parts.append(CHECK + "</body></html>")
    return "".join(parts)
