"""``hybrid-compare --bench``: a real (tiny) hybrid-bench report with OOM points written into it, beside a
hand-made sweep folder; the table, the OOM cells, the quality-vs-cost chart, and bad --bench input."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from hybrid.bench.cli import bench
from hybrid.compare.bench_panel import best_runs, canon, default_context, load_bench, tradeoff
from hybrid.compare.browser import dump_dom, find_chromium
from hybrid.compare.cli import build, main
from hybrid.compare.runs import CompareError, load_runs

SMALL = ["bench=cpu_smoke", "bench.patterns=[AA,MM,MA]", "bench.max_len=32", "bench.extra_lengths=[]", "bench.repeats=1",
         "bench.decode_batches=[1,2]", "bench.decode_tokens=2", "plot=false"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """cpu_smoke cut to lengths 16 and 32, then OOM points as a GPU run writes them: AA's prefill and batch-1
    decode at 32, a ratio where the baseline ran out, and a pattern whose model did not fit at all."""
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        cfg = compose("bench", overrides=SMALL)
    out = tmp_path_factory.mktemp("bench")
    report = json.loads(bench(cfg, out).read_text())
    aa = report["patterns"][0]
    assert aa["canonical"] == "AA" and report["lengths"] == [16, 32]
    aa["prefill"][-1] = {"length": 32, "oom": True}
    aa["decode"]["1"][-1] = {"length": 32, "oom": True}
    report["versus_baseline"]["patterns"]["MM"]["decode_speedup"]["1"]["32"] = {"oom": ["baseline"]}
    report["patterns"].append({"pattern": "Ax12", "canonical": "Ax12", "oom": True})
    (out / "bench.json").write_text(json.dumps(report))
    return out


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """Records only (no training): two AA runs, one MM run, one failed MA run, one MMMA run the bench lacks."""
    root = tmp_path_factory.mktemp("sweep")
    jobs = [("AA", True, 0.61, "completed"), ("AA", True, 0.4, "completed"), ("MM", True, 0.33, "completed"),
            ("MA", False, None, "failed"), ("MMMA", False, 0.5, "completed")]
    for i, (pattern, pure, acc, status) in enumerate(jobs):
        (root / str(i)).mkdir()
        (root / str(i) / "record.json").write_text(json.dumps({
            "status": status, "config": {"model": {"pattern": pattern}, "data": {"seq_len": 32}}, "n_params": 1000 + i,
            "pattern": {"canonical": pattern, "is_pure": pure, "recurrent_state_bytes": 64, "kv_bytes_per_token": 16},
            "metrics": {} if acc is None else {"best/val/acc": acc},
            "error": {"type": "RuntimeError", "message": "boom"} if status == "failed" else None}))
    return root


def _row(html: str, pattern: str) -> str:
    """The pattern's rows of both bench tables (quality and costs; slopes and ratios), joined."""
    head = f"<tr><td class='l'><b>{pattern}</b></td>"
    parts = html.split(head)[1:]
    assert len(parts) == 2, f"{pattern}: {len(parts)} rows"
    return "".join(part[:part.index("</tr>")] for part in parts)


def test_panel_table_and_charts(sweep, bench_dir, tmp_path):
    html = build([str(sweep)], out=tmp_path, bench=[str(bench_dir)]).read_text()
    assert "Efficiency (hybrid-bench) beside quality" in html and "× baseline AA" in html
    assert html.index("id='runs'") < html.index("id='bench'") < html.index("id='pareto'")  # efficiency beside quality
    _, report = load_bench(bench_dir)
    aa, mm, ma = report["patterns"][:3]
    row = _row(html, "AA")
    assert f"<td>{aa['n_params']:,}</td>" in row and "<td>16 (OOM from 32)</td>" in row  # prefill at the longest that fit
    assert f"<td>{aa['prefill'][0]['seconds'] * 1e3:,.3f}</td>" in row
    assert "<td class='oom'>OOM</td>" in row and "<td>baseline</td>" in row and "<td>0.6100</td>" in row
    assert f"<td>{aa['decode']['2'][-1]['seconds_per_token'] * 1e3:,.3f}</td>" in row  # batch 2 fit at 32
    row = _row(html, "MM")
    assert "<td class='oom'>OOM (baseline)</td>" in row and "<td>0.3300</td>" in row
    assert f"<td>{mm['fits']['decode_latency_slope']:.2f}</td>" in row
    assert f"<td>{report['versus_baseline']['patterns']['MM']['prefill_memory']['32']:.2f}×</td>" in row
    assert "no runs" in _row(html, "MA")  # benched, only a failed run: still in the table
    assert "OOM (the model did not fit" in _row(html, "Ax12")
    assert "Runs without a bench row: MMMA" in html
    assert "id=\"chart-bench-tradeoff\"" in html and "id=\"chart-bench-latency-0\"" in html
    # The chart: AA decoded at 16 only, so 16 is the default context; one point per pattern with runs.
    runs, _ = load_runs([sweep])
    best = best_runs(runs, "best/val/acc")
    assert default_context(report) == 16
    fig = tradeoff([(bench_dir / "bench.json", report)], best, "best/val/acc", None, {})
    points = {t.name: (t.x[0], t.y[0]) for t in fig.data if t.xaxis == "x" and t.name != "Pareto front"}
    assert set(points) == {"pure · AA", "pure · MM"}
    assert points["pure · MM"] == pytest.approx((mm["decode"]["1"][0]["seconds_per_token"] * 1e3, 0.33))
    cache = {t.name: t.x[0] for t in fig.data if t.xaxis == "x2" and t.name != "Pareto front"}
    assert cache["pure · MM"] == mm["decode"]["1"][0]["cache"]["state_bytes"] + mm["decode"]["1"][0]["cache"]["kv_bytes"]


def test_bad_bench_input(sweep, bench_dir, tmp_path, capsys):
    empty = tmp_path / "nobench"
    empty.mkdir()
    with pytest.raises(CompareError, match=f"--bench {empty}: no bench.json"):
        build([str(sweep)], out=tmp_path / "o", bench=[str(empty)])
    assert not (tmp_path / "o").exists()  # nothing written on bad input
    with pytest.raises(SystemExit) as exc:
        main([str(sweep), "--out", str(tmp_path / "o"), "--bench", str(tmp_path / "missing.json")])
    assert exc.value.code == 2 and f"{tmp_path / 'missing.json'}: no such file" in capsys.readouterr().err
    other = tmp_path / "record.json"
    other.write_text("{}")
    with pytest.raises(CompareError, match="not a hybrid-bench report"):
        build([str(sweep)], out=tmp_path / "o", bench=[str(other)])
    with pytest.raises(CompareError, match=r"--bench-context 48: .* measured lengths \[16, 32\]"):
        build([str(sweep)], out=tmp_path / "o", bench=[str(bench_dir)], bench_context=48)


def test_pattern_matching_and_loss_direction(sweep):
    assert canon("MMMAMMMA") == "MMMAx2" and canon("not a pattern!") == "not a pattern!"
    runs, _ = load_runs([sweep])
    for r, loss in zip(runs, [1.0, 2.0, 3.0, 4.0, 5.0]):
        r.metrics["val/loss"] = loss
    assert best_runs(runs, "val/loss")["AA"].metrics["val/loss"] == 1.0  # lower is better for a loss
    assert best_runs(runs, "best/val/acc")["AA"].metrics["best/val/acc"] == 0.61


@pytest.mark.skipif(find_chromium() is None, reason="no Chromium (install Debian's chromium; .ci/run does)")
def test_bench_charts_render_in_headless_chromium(sweep, bench_dir, tmp_path):
    dom, console_errors = dump_dom(build([str(sweep)], out=tmp_path, bench=[str(bench_dir)]))
    body = dom[dom.index("<body"):dom.index(">", dom.index("<body"))]
    assert 'data-charts-empty="[]"' in body and 'data-page-errors="[]"' in body and not console_errors, body
    assert 'data-charts-total="4"' in body  # trade-off, bench latency, and the two quality charts these records feed
