"""edgepipe.device.throughput (bench --mode throughput) and edgepipe.device.sweep (--threads auto)."""
from __future__ import annotations

import pytest

from edgepipe.device.report import Report, format_summary
from edgepipe.device.sweep import format_sweep, run_sweep, summarize, thread_counts
from edgepipe.device.throughput import MAX_STREAMS, ThroughputError, cores, default_streams, run_throughput

FAST = dict(runs=20, warmup=1, min_secs=0.1)


def test_streams_run_concurrently_and_are_reported(make_bundle, float_model):
    bundle = make_bundle(float_model, name="tiny", recipe="fp32")
    r = run_throughput(bundle, streams=2, **FAST)
    Report.from_dict(r)
    tp, s = r["throughput"], r["settings"]
    assert tp["mode"] == "throughput" and tp["streams"] == 2 and tp["workers"] == 2
    assert tp["frames"] >= 20 and r["latency_ms"]["n"] == tp["frames"]
    assert len(s["per_stream_requests"]) == 2 and all(n > 0 for n in s["per_stream_requests"])
    assert sum(s["per_stream_requests"]) == tp["frames"]
    # every request counted once over the common wall time: fps * wall == requests
    assert tp["fps"] * s["timed_wall_ms"] / 1000 == pytest.approx(tp["frames"], rel=1e-6)
    assert tp["cpu_percent"] > 0 and r["runtime"]["threads"] == 1
    assert "inferences/s" in format_summary(r)


def test_default_streams_follow_cores_and_threads(float_model):
    assert default_streams(1, 3000) == cores()
    assert default_streams(cores(), 3000) == 1
    assert default_streams(1, 10 ** 15) == 1  # copies that cannot fit in memory: one stream


def test_bad_stream_count_is_one_line(float_model):
    with pytest.raises(ThroughputError, match="between 1 and"):
        run_throughput(float_model, streams=MAX_STREAMS + 1, **FAST)


def test_thread_sweep_names_the_fastest_count(make_bundle, float_model):
    bundle = make_bundle(float_model, name="tiny", recipe="fp32")
    seen = []
    reports = run_sweep(bundle, counts=[1, 2], on_report=seen.append, **FAST)
    assert len(reports) == 4 and seen == reports
    modes = [(r["runtime"]["threads"], (r["throughput"] or {}).get("mode")) for r in reports]
    assert modes == [(1, "sequential"), (2, "sequential"), (1, "throughput"), (2, "throughput")]
    summary = reports[0]["settings"]["thread_sweep"]
    assert all(r["settings"]["thread_sweep"] == summary for r in reports)
    assert summary["tried"] == [1, 2]
    lat = [r for r in reports if r["throughput"]["mode"] == "sequential"]
    best = min(lat, key=lambda r: r["latency_ms"]["p50"])
    assert summary["best_latency"]["threads"] == best["runtime"]["threads"]
    top = max(reports, key=lambda r: r["throughput"]["fps"])
    assert summary["best_throughput"]["fps"] == top["throughput"]["fps"]
    for r in reports:
        Report.from_dict(r)
    text = format_sweep(summary)
    assert "fastest single request:" in text and "most inferences/s:" in text


def test_sweep_counts_and_summary_of_nothing():
    assert thread_counts(3) == [1, 2, 3] and thread_counts()[0] == 1
    s = summarize([])
    assert s["best_latency"] is None and s["best_throughput"] is None
    assert "thread sweep" in format_sweep(s)


# --------------------------------------------------------------------------- edgerun bench flags


def _bench(*args):
    import json

    from click.testing import CliRunner

    from edgepipe.device.cli import main

    res = CliRunner().invoke(main, ["bench", *map(str, args), "--warmup", "1", "--runs", "5", "--min-secs", "0",
                                    "--no-isolate"])
    out = json.loads(res.stdout) if res.exit_code == 0 and "--json" in args else None
    return res, out


def test_cli_throughput_mode_json(float_model):
    res, r = _bench(float_model, "--mode", "throughput", "--streams", "2", "--json")
    assert res.exit_code == 0, res.output
    assert r["throughput"]["mode"] == "throughput" and r["throughput"]["streams"] == 2


def test_cli_thread_auto_prints_the_answer(float_model):
    res, _ = _bench(float_model, "--threads", "auto")
    assert res.exit_code == 0, res.output
    assert "thread sweep" in res.stdout and "fastest single request:" in res.stdout


def test_cli_profile_ops_prints_the_table(models_dir):
    res, _ = _bench(models_dir / "conv_stack_int8.tflite", "--profile-ops")
    assert res.exit_code == 0, res.output
    assert "per-op" in res.stdout and ("by op type" in res.stdout or "no per-op profiler" in res.stdout)


@pytest.mark.parametrize("args, msg", [(["--streams", "2"], "--streams needs --mode throughput"),
                                       (["--mode", "throughput", "--profile-ops"], "--profile-ops profiles one"),
                                       (["--threads", "auto", "--profile-ops"], "--profile-ops profiles one")])
def test_cli_flag_conflicts_are_one_line(float_model, args, msg):
    res, _ = _bench(float_model, *args)
    assert res.exit_code == 2 and msg in res.stderr and "Traceback" not in res.output
