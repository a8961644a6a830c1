"""hybrid-bench end to end on the cpu_smoke preset, plus OOM handling and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_module

from hybrid.bench import measure
from hybrid.bench.cli import bench
from hybrid.bench.fit import loglog_slope
from hybrid.registry import ConfigError


def smoke_cfg(*overrides: str):
    with initialize_config_module("hybrid.conf", version_base="1.3"):
        return compose("bench", overrides=["bench=cpu_smoke", *overrides])


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    path = bench(smoke_cfg(), out)
    assert (out / "bench.html").stat().st_size > 0
    return json.loads(path.read_text())


def test_report_has_every_pattern_length_and_fit(report):
    assert report["device"] == "cpu" and report["note"]
    assert report["lengths"] == [16, 32, 48, 64]  # the doubling ladder plus extra_lengths
    assert [p["canonical"] for p in report["patterns"]] == ["AA", "MM", "MA"]
    for p in report["patterns"]:
        assert [(r["context"], r["batch"]) for r in p["train"]] == [(32, 4), (64, 2)]  # train_tokens 128 per step
        assert all(r["tokens_per_s"] > 0 and r["mfu"] is None for r in p["train"])  # no MFU on the CPU
        assert all(r["seconds_per_step_synced"] > 0 for r in p["train"])
        assert [r["length"] for r in p["prefill"]] == [16, 32, 48, 64]
        assert all(r["seconds"] > 0 and r["peak_bytes"] > 0 for r in p["prefill"])
        assert set(p["decode"]) == {"1", "4"}
        for rows in p["decode"].values():
            assert [r["length"] for r in rows] == [16, 32, 48, 64]
            assert all(r["seconds_per_token"] > 0 and r["tokens_per_s"] > 0 for r in rows)
        for key in ("prefill_time_slope", "prefill_memory_slope", "decode_latency_slope"):
            assert isinstance(p["fits"][key], float)


def test_backends_and_ratios_against_the_baseline(report):
    by = {p["canonical"]: p for p in report["patterns"]}
    assert by["MM"]["backends"] == {"Mamba3": "torch"}  # "auto" never picks Triton on the CPU
    assert by["AA"]["backends"]["Attention"].startswith("auto")
    vs = report["versus_baseline"]
    assert vs["baseline"] == "AA" and set(vs["patterns"]) == {"MM", "MA"}
    mm = vs["patterns"]["MM"]
    base_tps = by["AA"]["train"][0]["tokens_per_s"]
    assert mm["train_tokens_per_s"]["32"] == pytest.approx(by["MM"]["train"][0]["tokens_per_s"] / base_tps)
    assert mm["decode_speedup"]["1"]["64"] == pytest.approx(
        by["AA"]["decode"]["1"][-1]["seconds_per_token"] / by["MM"]["decode"]["1"][-1]["seconds_per_token"])
    assert set(mm["prefill_speedup"]) == set(mm["prefill_memory"]) == {"16", "32", "48", "64"}


def test_state_and_kv_bytes(report):
    by = {p["canonical"]: p for p in report["patterns"]}
    assert by["MM"]["memory"]["summary"]["recurrent_state_bytes"] > 0
    assert by["MM"]["memory"]["measured"]["state_bytes"] == by["MM"]["memory"]["summary"]["recurrent_state_bytes"]
    assert by["MM"]["memory"]["measured"]["kv_bytes_per_token"] == 0
    assert by["AA"]["memory"]["summary"]["kv_bytes_per_token"] > 0
    assert by["AA"]["memory"]["measured"]["kv_bytes_per_token"] == by["AA"]["memory"]["summary"]["kv_bytes_per_token"]
    kv = [r["cache"]["kv_bytes"] for r in by["AA"]["decode"]["1"]]
    assert kv == sorted(kv) and kv[0] < kv[-1]  # the KV cache grows with the context, the state does not
    assert len({r["cache"]["state_bytes"] for r in by["MM"]["decode"]["1"]}) == 1


def test_oom_is_recorded_and_run_continues(tmp_path, monkeypatch):
    real = measure.prefill

    def fake(model, tokens):
        if tokens.shape[1] == 32 and model.pattern.canonical == "AA":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, tokens)

    real_train = measure.train_throughput

    def fake_train(model, *args):
        if model.pattern.canonical == "MM":
            raise RuntimeError("CUDA error: out of memory (simulated)")  # the plain-RuntimeError form
        return real_train(model, *args)

    monkeypatch.setattr(measure, "prefill", fake)
    monkeypatch.setattr(measure, "train_throughput", fake_train)
    rep = json.loads(bench(smoke_cfg("bench.patterns=[AA,MM]", "plot=false"), tmp_path).read_text())
    aa, mm = rep["patterns"]
    assert aa["prefill"][0]["seconds"] > 0
    assert aa["prefill"][1] == {"length": 32, "oom": True}
    assert aa["prefill"][2:] == [{"length": n, "oom": True, "skipped": True} for n in (48, 64)]
    assert aa["fits"]["prefill_time_slope"] is None  # one point left: no fit, not a crash
    assert len(aa["decode"]["1"]) == 4 and not any(r.get("oom") for r in aa["decode"]["1"])  # other series unaffected
    assert not any(r.get("oom") for r in mm["prefill"])  # the next pattern is measured
    assert all(r["oom"] for r in mm["train"]) and aa["train"][0]["tokens_per_s"] > 0
    ratios = rep["versus_baseline"]["patterns"]["MM"]
    assert ratios["train_tokens_per_s"]["32"] == {"oom": ["pattern"]}
    assert ratios["prefill_speedup"]["32"] == {"oom": ["baseline"]}


def test_each_pattern_starts_with_fresh_compiled_kernels(tmp_path, monkeypatch):
    """torch.compile's caches are reset before each pattern: a shape change while measuring one model must not
    leave later models with dynamic-shape kernels that the first model did not have at the same length."""
    resets = []
    real = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real()))
    bench(smoke_cfg("bench.patterns=[AA,MM]", "plot=false"), tmp_path)
    assert len(resets) == 2


def test_runtime_error_that_is_not_oom_propagates(tmp_path, monkeypatch):
    monkeypatch.setattr(measure, "prefill", lambda model, tokens: (_ for _ in ()).throw(RuntimeError("shape mismatch")))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench(smoke_cfg("bench.patterns=[MM]", "bench.baseline=null", "plot=false"), tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["bench.patterns=[AA,MQ]"], "Q"),
    (["bench.min_len=128", "bench.max_len=64"], "min_len"),
    (["+bench.bogus=1"], "bogus"),
    (["bench.baseline=MMMM"], "baseline"),
    (["bench.train_contexts=[]"], "train_contexts"),
    (["bench.decode_compile=max-autotune"], "max-autotune-no-cudagraphs"),
])
def test_bad_input_fails_before_measuring(tmp_path, monkeypatch, overrides, message):
    def never(*args, **kwargs):
        raise AssertionError("measured before validation")

    monkeypatch.setattr(measure, "train_throughput", never)
    with pytest.raises(ConfigError, match=message):
        bench(smoke_cfg(*overrides), tmp_path)


def test_loglog_slope():
    assert loglog_slope([(n, 3.0 * n * n) for n in (16, 32, 64)], 16) == pytest.approx(2.0)
    assert loglog_slope([(n, 5.0 * n) for n in (16, 32, 64)], 32) == pytest.approx(1.0)
    assert loglog_slope([(16, 1.0), (32, None)], 16) is None


def test_cli_exits_2_on_bad_pattern(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "hybrid.bench.cli", "bench=cpu_smoke", "bench.patterns=[AQ]",
                           f"run_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "configuration error" in proc.stdout + proc.stderr


def test_router_kv_is_counted_as_kv():
    """The compact token router keeps routed keys in its own buffers: they are KV cache, not state."""
    import hybrid

    model = hybrid.build_model("MR", d_model=32, vocab_size=64)
    small, big = (measure.cache_bytes(model.allocate_cache(1, n)) for n in (16, 64))
    assert 0 < small["kv_bytes"] < big["kv_bytes"]
    assert small["state_bytes"] == big["state_bytes"]  # the SSM state does not grow with the context


def test_backends_name_every_mixer_kind():
    import hybrid

    model = hybrid.build_model("MKA", d_model=32, vocab_size=64, symbols={"M": {"mixer": "mamba3", "mimo_rank": 2}})
    assert measure.backends(model, torch.device("cpu")) == {
        "Mamba3": "torch scan, torch decode step", "BlockTopk": "auto (sdpa)",
        "Attention": "auto (sdpa/flex), decode: torch matmuls"}


@pytest.mark.gpu
def test_gpu_pipelined_timing_counts_gpu_time_not_the_host_ramp():
    """A call whose GPU work (a fixed sleep kernel) outlasts its host work times the same back to back as after a sync;
    one that launches many tiny kernels pays its host ramp only after a sync."""
    from hybrid.bench.timing import median_seconds, pipelined_median_seconds

    dev = torch.device("cuda")
    x = torch.zeros(1, device=dev)

    def gpu_bound():
        torch.cuda._sleep(20_000_000)  # ~10 ms of GPU

    def host_heavy_start():
        for _ in range(200):  # the host issues these slower than the GPU runs them ...
            x.add_(1)
        torch.cuda._sleep(20_000_000)  # ... then hands the GPU a long kernel that hides the next call's issue

    for fn in (gpu_bound, host_heavy_start):
        piped, synced = pipelined_median_seconds(fn, dev, 2, 5), median_seconds(fn, dev, 2, 5)
        assert piped <= synced * 1.05, fn.__name__
    assert pipelined_median_seconds(host_heavy_start, dev, 2, 5) < median_seconds(host_heavy_start, dev, 2, 5)
