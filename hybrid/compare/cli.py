"""``hybrid-compare``: build the comparison dashboard of one or more sweeps.

    hybrid-compare logs/train/multiruns/<sweep>                 # -> <sweep>/dashboard/index.html
    hybrid-compare logs/train/multiruns/a logs/train/multiruns/b --out cmp/ --png
    hybrid-compare wandb:<entity>/<project> --group <sweep> --out cmp/
    hybrid-compare <sweep> --metric val/acc                     # rank by another metric
    hybrid-compare <sweep> --bench logs/bench/runs/<time>/bench.json   # + hybrid-bench efficiency beside quality

Prints the path of the HTML file. Local run records are read directly (no network); a ``wandb:`` source
uses the W&B API. Exit status 2 on bad input (no runs, unknown metric), with the reason.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from hybrid.compare import figures
from hybrid.compare.bench_panel import panel
from hybrid.compare.page import render
from hybrid.compare.runs import CompareError, Run, load_runs

log = logging.getLogger("hybrid.compare")
DEFAULT_METRICS = ("best/val/acc", "val/acc", "best/val/loss", "val/loss")


def choose_metric(runs: list[Run], wanted: str | None) -> str:
    """The requested metric, or the first default that some completed run has; unknown names are an error."""
    known = sorted({k for r in runs for k in r.metrics})
    if wanted:
        if wanted not in known:
            raise CompareError(f"unknown metric {wanted!r}: no run logged it. Metrics these runs have: {', '.join(known)}")
        return wanted
    return next((m for m in DEFAULT_METRICS if m in known), known[0] if known else "val/acc")


def charts(runs: list[Run], metric: str) -> list[tuple[str, str, object]]:
    done = [r for r in runs if r.status == "completed"]
    colors = figures.arch_colors(runs)
    return [
        ("pareto", "Accuracy vs state / KV bytes per token, with the Pareto front", figures.pareto(done, metric, colors)),
        ("length", "Accuracy vs sequence length",
         figures.versus(done, metric, colors, lambda r: r.seq_len, "training sequence length (tokens)",
                        f"{metric} vs training sequence length (best run per architecture and length)")),
        ("facts", "Accuracy vs number of facts",
         figures.versus(done, metric, colors, lambda r: r.n_facts, "facts to recall (key-value pairs / needles)",
                        f"{metric} vs facts to recall (best run per architecture and count)")),
        ("extrapolation", "Length extrapolation and needle retrieval (hybrid-eval)", figures.extrapolation(done, colors)),
        ("distance", "Recall by distance bucket", figures.distance(done, colors)),
        ("curves", "Loss and perplexity curves", figures.loss_curves(runs, colors)),
        ("routing", "Routing rates", figures.routing(runs, colors)),
        ("perf", "Throughput and peak memory (hybrid bars hatched)", figures.performance(done, colors)),
    ]


def build(sources: list[str], out: Path | None = None, metric: str | None = None, png: bool = False,
          title: str | None = None, group: str | None = None, bench: list[str] | None = None,
          bench_context: int | None = None) -> Path:
    """Write the dashboard; returns the HTML path. PNGs (page and one per chart) need Chromium."""
    runs, warnings = _load(sources, group)
    metric = choose_metric(runs, metric)
    bench_html, bench_figs = panel(bench, runs, metric, bench_context) if bench else ("", [])  # bad paths fail before any write
    for w in warnings:
        log.warning("%s", w)
    if out is None:
        first = Path(sources[0])
        out = (first if first.is_dir() else Path(".")) / "dashboard"
    out.mkdir(parents=True, exist_ok=True)
    page = out / "index.html"
    title = title or "hybrid comparison: " + ", ".join(Path(s).name or s for s in sources)
    figs = charts(runs, metric)
    page.write_text(render(title, sources, runs, metric, figs, warnings, bench_html), encoding="utf-8")
    if png:
        _pngs(page, out, figs + bench_figs)
    return page


def _load(sources: list[str], group: str | None) -> tuple[list[Run], list[str]]:
    local = [s for s in sources if not s.startswith("wandb:")]
    runs, warnings = load_runs(local) if local else ([], [])
    for s in sources:
        if s.startswith("wandb:"):
            from hybrid.compare.wandb_source import load_wandb

            runs += load_wandb(s[len("wandb:"):], group=group)
    return runs, warnings


def _pngs(page: Path, out: Path, figs) -> None:
    from hybrid.compare.browser import find_chromium, screenshot

    if find_chromium() is None:
        log.warning("no Chromium found: PNG figures skipped (the HTML dashboard is complete)")
        return
    screenshot(page, out / "dashboard.png")
    for cid, _, fig in figs:
        if fig is not None:
            fig.write_html(out / f".{cid}.html", include_plotlyjs=True, full_html=True)
            screenshot(out / f".{cid}.html", out / f"{cid}.png", width=1100, height=480)
            (out / f".{cid}.html").unlink()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="hybrid-compare: %(message)s")
    p = argparse.ArgumentParser(prog="hybrid-compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", help="sweep folders, run folders, or wandb:<entity>/<project>")
    p.add_argument("--out", type=Path, help="output folder (default <first sweep>/dashboard)")
    p.add_argument("--metric", help=f"metric to rank and plot (default: first of {', '.join(DEFAULT_METRICS)} present)")
    p.add_argument("--png", action="store_true", help="also write dashboard.png and one PNG per chart (needs Chromium)")
    p.add_argument("--title")
    p.add_argument("--group", help="W&B group (sweep / experiment name) to read from a wandb: source")
    p.add_argument("--bench", nargs="+", metavar="PATH",
                   help="hybrid-bench reports (bench.json, or its run folder): efficiency table and quality-vs-cost chart")
    p.add_argument("--bench-context", type=int, metavar="N",
                   help="context length of the quality-vs-cost chart (default: the longest every pattern decoded at)")
    args = p.parse_args(argv)
    try:
        page = build(args.sources, args.out, args.metric, args.png, args.title, args.group, args.bench, args.bench_context)
    except CompareError as exc:
        print(f"hybrid-compare: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    print(page.resolve())


if __name__ == "__main__":
    main()
