"""edgepipe.device.bench / edgepipe.device.inputs / edgepipe.device.report and `edgerun bench` end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgepipe.device.bench import BenchError, model_for, resource_warnings as _warnings, run_bench, run_matrix
from edgepipe.device.bundle import BundleError
from edgepipe.device.inputs import assumed_preprocess, random_inputs
from edgepipe.device.report import format_comparison, format_summary, new_report, validate_report
from edgepipe.device.runtime import CpuFallback, RuntimeLoadError, load_model

FAST = dict(runs=5, warmup=1, min_secs=0.0)


@pytest.fixture
def int8_bundle(make_bundle, uint8_io_model):
    return make_bundle(uint8_io_model, name="tiny", recipe="int8-io", labels=["a", "b", "c", "d"])


@pytest.fixture
def images_dir(tmp_path):
    """Real image files: JPEGs and a PNG of different sizes, plus a non-image."""
    d = tmp_path / "images"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(64, 48), (40, 40), (33, 57)]):
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / f"img{i}.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(d / "img9.png")
    (d / "notes.txt").write_text("not an image")
    return d


# --------------------------------------------------------------------------- run_bench


def test_bench_bundle_report_is_valid_and_complete(int8_bundle, assert_valid_report, backend):
    r = run_bench(int8_bundle, threads=1, **FAST)
    assert_valid_report(r)
    assert validate_report(r) is r
    assert r["kind"] == "bench"
    assert r["model"]["name"] == "tiny" and r["model"]["recipe"] == "int8-io" and len(r["model"]["sha256"]) == 64
    assert (r["runtime"]["backend"], r["runtime"]["version"]) == backend and r["runtime"]["threads"] == 1
    assert r["runtime"]["load"] == "cold" and r["runtime"]["delegate"] == "cpu"
    assert all(isinstance(r["load_ms"][k], float) for k in
               ("file_read", "interpreter_build", "delegate", "allocate", "first_invoke"))
    lat = r["latency_ms"]
    assert lat["n"] >= 5 and 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert r["throughput"]["fps"] == pytest.approx(1000 / lat["mean"])
    assert r["peak_rss_mb"] > 0
    assert r["input"] == {"kind": "random", "count": 1, "assumed": [], "seed": 0}
    assert r["device"]["temperature_c"].keys() == {"start", "end"}


def test_min_secs_keeps_running_past_runs(int8_bundle):
    r = run_bench(int8_bundle, runs=1, warmup=0, min_secs=0.2)
    assert r["settings"]["timed_wall_ms"] >= 200
    assert r["latency_ms"]["n"] > 1


def test_max_secs_caps_the_timed_loop(int8_bundle):
    r = run_bench(int8_bundle, runs=10**9, warmup=0, min_secs=0.0, max_secs=0.1)
    assert 1 <= r["latency_ms"]["n"] < 10**9
    assert r["settings"]["timed_wall_ms"] < 5000


def test_warm_model_is_reused_without_cold_figures(int8_bundle):
    loaded = load_model(int8_bundle / "model.tflite")
    r = run_bench(int8_bundle, loaded=loaded, **FAST)
    assert r["runtime"]["load"] == "warm" and r["load_ms"] is None
    assert r["latency_ms"]["n"] >= 5


def test_plain_tflite_states_assumptions(int8_io_model, assert_valid_report):
    r = assert_valid_report(run_bench(int8_io_model, **FAST))
    assert r["model"]["recipe"] is None and r["model"]["name"] == "int8_io"
    assumed = " ".join(r["input"]["assumed"])
    assert "plain model file" in assumed and "full int8 range" in assumed
    assert "assumed" in format_summary(r)


def test_real_images_through_manifest_preprocessing(int8_bundle, images_dir, assert_valid_report):
    pre = pytest.importorskip("edgepipe.device.preprocess")
    r = assert_valid_report(run_bench(int8_bundle, input=str(images_dir), **FAST))
    assert r["input"]["kind"] == "images" and r["input"]["count"] == 4 and r["input"]["skipped"] == 1
    # the bench feeds exactly what the runner would: preprocess + quantize of the first image
    from edgepipe.device.bundle import load_bundle
    from edgepipe.device.inputs import image_inputs

    b = load_bundle(int8_bundle)
    m = load_model(b.model_path)
    got = image_inputs(images_dir, m.inputs, b.manifest.preprocess)
    first = pre.to_model_input(pre.load_image(images_dir / "img0.jpg", b.manifest.preprocess), b.manifest.preprocess,
                               m.inputs[0])
    assert got.sets[0][0].dtype == np.uint8 and np.array_equal(got.sets[0][0], first)


def test_bad_image_folder(int8_bundle, tmp_path):
    pytest.importorskip("edgepipe.device.preprocess")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BenchError, match="no readable images"):
        run_bench(int8_bundle, input=str(tmp_path / "empty"), **FAST)
    with pytest.raises(BenchError, match="no such directory"):
        run_bench(int8_bundle, input=str(tmp_path / "absent"), **FAST)


def test_bad_arguments(int8_bundle):
    with pytest.raises(BenchError, match="runs") as e:
        run_bench(int8_bundle, runs=0)
    assert e.value.param == "runs" and "--" not in str(e.value)  # the CLI adds its own flag
    with pytest.raises(BenchError, match="negative") as e:
        run_bench(int8_bundle, warmup=-1)
    assert e.value.param == "warmup"


def test_cli_names_its_own_flag_for_a_library_error(int8_bundle):
    """A library error names a parameter; the command in which it escapes puts its own flag in front."""
    import click
    from click.testing import CliRunner

    from edgepipe.device.lazycli import LazyGroup

    @click.group(cls=LazyGroup)
    def group():
        pass

    @group.command()
    @click.option("--timed-runs", "runs", type=int)
    def go(runs):
        run_bench(int8_bundle, runs=runs)

    r = CliRunner().invoke(group, ["go", "--timed-runs", "0"])
    assert r.exit_code == 1 and r.exception is not None and not isinstance(r.exception, BenchError)
    assert r.output.strip() == "Error: --timed-runs: the number of timed runs must be at least 1"


def test_matrix_runs_every_pair_in_order(int8_bundle, noop_delegate):
    seen = []
    reports = run_matrix(int8_bundle, threads=[1, 2], delegates=["cpu", str(noop_delegate)],
                         on_report=seen.append, **FAST)
    assert seen == reports
    assert [(r["runtime"]["delegate"], r["runtime"]["threads"]) for r in reports] == [
        ("cpu", 1), ("cpu", 2), (str(noop_delegate), 1), (str(noop_delegate), 2)]
    assert len({r["id"] for r in reports}) == 4
    ext = reports[-1]
    assert ext["runtime"]["cpu_fallback_ops"] == ext["settings"]["cpu_fallback"]["total_ops"] > 0
    assert any("fell back to the CPU" in w for w in ext["warnings"])
    total = ext["settings"]["cpu_fallback"]["total_ops"]
    assert f"ops        0 of {total} on " in format_summary(ext)
    assert f"{total} on the CPU (CONV_2D x1" in format_summary(ext)
    table = format_comparison(reports)
    assert len(table.splitlines()) == 6 and "threads" in table


def test_matrix_error_policy(int8_bundle):
    from edgepipe.device.delegates import find_delegates

    if find_delegates()["gpu"]["available"]:
        pytest.skip("a GPU delegate is installed here")
    errors = []
    reports = run_matrix(int8_bundle, delegates=["cpu", "gpu"], threads=[None],
                         on_error=lambda label, e: errors.append((label, e)) or True, **FAST)
    assert len(reports) == 1 and len(errors) == 1 and isinstance(errors[0][1], RuntimeLoadError)
    with pytest.raises(RuntimeLoadError):
        run_matrix(int8_bundle, delegates=["gpu"], **FAST)


# --------------------------------------------------------------------------- inputs


def test_random_inputs_seeded_dtype_and_range(uint8_io_model, float_model):
    spec = load_model(uint8_io_model).inputs
    a, b, c = (random_inputs(spec, None, seed=s).sets[0][0] for s in (0, 0, 1))
    assert a.dtype == np.uint8 and a.shape == (1, 8, 8, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() < 20 and a.max() > 235  # the whole uint8 range is used
    from edgepipe.device.bundle import Preprocess

    pre = Preprocess(8, 8, mean=(127.5,) * 3, std=(127.5,) * 3)
    q = random_inputs(spec, pre, seed=0).sets[0][0]  # pixels -> [-1, 1] -> quantized
    s = spec[0]
    lo, hi = s.quantize(-1.0), s.quantize(1.0)
    assert q.dtype == np.uint8 and lo <= q.min() and q.max() <= hi
    f = random_inputs(load_model(float_model).inputs, None, seed=0)
    x = f.sets[0][0]
    assert x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1 and f.assumed


def test_assumed_preprocess_maps_pixels_onto_quantized_range(uint8_io_model, float_model):
    s = load_model(uint8_io_model).inputs[0]
    pre, notes = assumed_preprocess(s)
    assert (pre.height, pre.width) == (8, 8) and "no manifest" in notes[0]
    lo, hi = s.float_range()
    assert (0 - pre.mean[0]) / pre.std[0] == pytest.approx(lo)
    assert (255 - pre.mean[0]) / pre.std[0] == pytest.approx(hi)
    pre_f, _ = assumed_preprocess(load_model(float_model).inputs[0])
    assert pre_f.mean[0] == pre_f.std[0] == 127.5


# --------------------------------------------------------------------------- warnings, reports


def _fake_loaded(fb=None):
    return type("L", (), {"cpu_fallback": fb})()


def test_warnings_for_governor_throttling_heat_and_fallback(monkeypatch):
    monkeypatch.delenv("EDGEPIPE_EMULATED", raising=False)
    start = {"governor": "ondemand", "temperature_c": 60.0, "throttled": "0x0"}
    end = {"governor": "ondemand", "temperature_c": 82.5, "throttled": "0x20002"}
    fb = CpuFallback("edgetpu", 10, 8, 2, {"SOFTMAX": 1, "MEAN": 1})
    w = _warnings(start, end, _fake_loaded(fb), None)
    text = "\n".join(w)
    assert "governor is 'ondemand'" in text
    assert "throttling changed during the run (0x0 -> 0x20002: ARM frequency capped" in text
    assert "82.5 C" in text
    assert "2 of 10 ops fell back to the CPU under edgetpu (MEAN x1, SOFTMAX x1)" in text
    calm = {"governor": "performance", "temperature_c": 50.0, "throttled": "0x0"}
    assert _warnings(calm, calm, _fake_loaded(), None) == []
    monkeypatch.setenv("EDGEPIPE_EMULATED", "1")
    assert "emulation" in _warnings(calm, calm, _fake_loaded(), None)[0]


def test_new_report_basics():
    r = new_report("run", device={"hostname": "x"}, throughput={"fps": 3.0})
    assert r["schema"] == "edgepipe.report/1" and r["kind"] == "run" and r["throughput"] == {"fps": 3.0}
    assert r["created"].endswith("Z") and r["warnings"] == [] and r["errors"] == []
    assert new_report("run", device={"hostname": "x"})["id"] != r["id"]
    with pytest.raises(ValueError):
        new_report("other")


# --------------------------------------------------------------------------- the command


def _no_traceback(out):
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout


def test_cli_bench_json_and_out(edgerun, int8_bundle, tmp_path, assert_valid_report):
    out_file = tmp_path / "r" / "bench.json"
    out = edgerun("bench", int8_bundle, "--runs", 5, "--warmup", 1, "--min-secs", 0, "--json", "--out", out_file)
    assert out.returncode == 0, out.stderr
    _no_traceback(out)
    r = assert_valid_report(json.loads(out.stdout))
    assert json.loads(out_file.read_text()) == r
    assert out.stderr == ""


def test_cli_bench_summary_and_thread_list(edgerun, int8_bundle, tmp_path, assert_valid_report):
    out_file = tmp_path / "all.json"
    out = edgerun("bench", int8_bundle, "--threads", "1,2", "--runs", 3, "--min-secs", 0, "--out", out_file)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("latency    n=") == 2 and "load (ms)  file read" in out.stdout
    assert "delegate   threads" in out.stdout  # comparison table
    reports = json.loads(out_file.read_text())
    assert [assert_valid_report(r)["runtime"]["threads"] for r in reports] == [1, 2]


def test_cli_bench_partial_results_kept_when_one_setting_fails(edgerun, int8_bundle, tmp_path):
    out_file = tmp_path / "partial.json"
    out = edgerun("bench", int8_bundle, "--delegate", "cpu,/nonexistent/libx.so", "--runs", 3, "--min-secs", 0,
                  "--out", out_file)
    assert out.returncode == 1
    _no_traceback(out)
    assert "delegate library not found" in out.stderr and "1 of 2 settings failed" in out.stderr
    assert json.loads(out_file.read_text())["runtime"]["delegate"] == "cpu"


@pytest.mark.parametrize("case", ["missing", "truncated", "not_a_model", "custom_op", "schema", "digest",
                                  "threads", "delegate", "input"])
def test_cli_bench_bad_input_one_line_no_traceback(case, make_bundle, float_model, tmp_path, request):
    args = []
    if case == "missing":
        target = tmp_path / "nothing-here"
    elif case in ("truncated", "not_a_model", "custom_op"):
        target = request.getfixturevalue({"truncated": "truncated_model", "not_a_model": "not_a_model",
                                          "custom_op": "custom_op_model"}[case])
    else:
        target = make_bundle(float_model)
        if case == "schema":
            m = json.loads((target / "manifest.json").read_text())
            m["schema"] = "edgepipe.bundle/9"
            (target / "manifest.json").write_text(json.dumps(m))
        elif case == "digest":
            with open(target / "model.tflite", "ab") as f:
                f.write(b"\0")
        elif case == "threads":
            args = ["--threads", "two"]
        elif case == "delegate":
            args = ["--delegate", "npu"]
        elif case == "input":
            args = ["--input", str(tmp_path / "no-images")]
    from click.testing import CliRunner

    from edgepipe.device.cli import main

    res = CliRunner().invoke(main, ["bench", str(target), "--runs", "2", "--min-secs", "0", *args])
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), res.exception  # a clean exit, not an escaped exception
    assert "Traceback" not in res.output
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    expected = {
        "missing": "no such file or directory", "truncated": "corrupt or truncated", "not_a_model": "TFL3",
        "custom_op": "custom op 'EdgepipeTestOp'", "schema": "unsupported bundle schema 'edgepipe.bundle/9'",
        "digest": "does not match the manifest", "threads": "not a number", "delegate": "unknown delegate 'npu'",
        "input": "no such directory",
    }[case]
    assert expected in res.stderr
    if case not in ("threads",):  # click usage errors print a usage line first
        assert len(err) == 1, res.stderr


def test_edgetpu_delegate_picks_the_compiled_model(make_bundle, float_model, edgetpu_like_model):
    from edgepipe.device.bundle import EDGETPU_MODEL, load_bundle

    d = make_bundle(float_model)
    b = load_bundle(d)
    assert model_for(b, "edgetpu") == b.model_path  # no compiled model in the bundle
    (d / EDGETPU_MODEL).write_bytes(edgetpu_like_model.read_bytes())
    b = load_bundle(d)
    assert model_for(b, "edgetpu:usb") == d / EDGETPU_MODEL
    assert model_for(b, "cpu") == b.model_path


def test_bundle_error_is_raised_for_wrong_schema(make_bundle, float_model):
    d = make_bundle(float_model)
    m = json.loads((d / "manifest.json").read_text())
    m["schema"] = "edgepipe.bundle/2"
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="unsupported bundle schema"):
        run_bench(d, **FAST)


def test_plain_tflite_with_real_images_uses_assumed_preprocessing(uint8_io_model, images_dir, assert_valid_report):
    pytest.importorskip("edgepipe.device.preprocess")
    r = assert_valid_report(run_bench(uint8_io_model, input=str(images_dir), **FAST))
    assert r["input"]["kind"] == "images" and r["input"]["count"] == 4
    assert any("no manifest: 8x8 rgb" in a for a in r["input"]["assumed"])
