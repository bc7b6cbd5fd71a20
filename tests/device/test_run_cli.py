"""`edgerun run` end to end: JSON lines on stdout, report file, one-line errors with partial results kept."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "sample_data" / "images"
VIDEO = ROOT / "sample_data" / "video" / "vtest_short.avi"
LABELS = ["cat", "dog", "fish", "bird"]


@pytest.fixture
def bundle(make_bundle, int8_io_model):
    return make_bundle(int8_io_model, name="tinyq", recipe="int8-io", labels=LABELS)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    for p in sorted(IMAGES.glob("*.jpg"))[:6]:
        shutil.copy(p, d / p.name)
    (d / "zz_broken.jpg").write_text("broken")
    return d


def _no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def _lines(text: str) -> list:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def cli(*args):
    """In-process `edgerun run ARGS` (fast under emulation); stderr separate, exceptions not swallowed."""
    from click.testing import CliRunner

    from edgepipe.device.cli_run import run

    res = CliRunner().invoke(run, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception  # a traceback would have reached the user
    return res


def test_predictions_stream_to_stdout_summary_to_stderr(edgerun, bundle, photos, tmp_path, assert_valid_report):
    rep = tmp_path / "run.json"
    p = edgerun("run", bundle, "--source", photos, "--report", rep, "--top-k", "2")
    assert p.returncode == 0, p.stderr
    recs = _lines(p.stdout)
    assert [r["frame"] for r in recs] == list(range(7))
    for r in recs[:6]:
        assert set(r) == {"frame", "source", "top_k"} and len(r["top_k"]) == 2
        assert set(r["top_k"][0]) == {"index", "label", "score"} and r["top_k"][0]["label"] in LABELS
    assert recs[6]["source"] == "zz_broken.jpg" and "cannot read image" in recs[6]["error"]
    assert "stages p50 (ms)" in p.stderr and "pipelined" in p.stderr and "skipped 1" in p.stderr
    report = assert_valid_report(json.loads(rep.read_text()))
    assert report["kind"] == "run" and report["throughput"]["frames"] == 6
    _no_traceback(p.stderr)


def test_sequential_and_pipelined_print_identical_predictions(bundle):
    pytest.importorskip("cv2")
    a = cli(bundle, "--source", VIDEO, "--sequential", "-q", "--max-frames", 20)
    b = cli(bundle, "--source", VIDEO, "--pipeline", "--workers", "2", "--lanes", "2", "-q", "--max-frames", 20)
    assert a.exit_code == 0 and b.exit_code == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and len(a.stdout.splitlines()) == 20
    assert a.stderr == "" == b.stderr


def test_out_file_and_json_report(bundle, photos, tmp_path, assert_valid_report):
    out = tmp_path / "preds.jsonl"
    res = cli(bundle, "--source", photos, "--out", out, "--json", "--max-frames", "3", "--sequential")
    assert res.exit_code == 0, res.output
    report = assert_valid_report(json.loads(res.stdout))
    assert report["throughput"]["mode"] == "sequential" and report["settings"]["max_frames"] == 3
    assert [r["frame"] for r in _lines(out.read_text())] == [0, 1, 2]
    res = cli(bundle, "--source", photos, "--json")
    assert res.exit_code != 0 and "--out FILE" in res.stderr


@pytest.mark.parametrize("case", ["empty", "missing_video", "camera", "corrupt_model", "schema", "not_bundle"])
def test_bad_input_is_one_line_nonzero_no_traceback(case, bundle, truncated_model, tmp_path, photos):
    target, source = bundle, photos
    if case == "empty":
        source = tmp_path / "empty"
        source.mkdir()
    elif case == "missing_video":
        source = tmp_path / "clip.mp4"
    elif case == "camera":
        if Path("/dev/video9").exists():
            pytest.skip("/dev/video9 exists here")
        source = "camera:9"
    elif case == "corrupt_model":
        target = truncated_model
    elif case == "schema":
        m = json.loads((bundle / "manifest.json").read_text())
        m["schema"] = "edgepipe.bundle/2"
        (bundle / "manifest.json").write_text(json.dumps(m))
    elif case == "not_bundle":
        target = tmp_path
    res = cli(target, "--source", source)
    assert res.exit_code == 1
    err = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("Error: "), res.stderr
    assert res.stdout == ""


def test_bad_input_in_a_real_process(edgerun, truncated_model, photos):
    p = edgerun("run", truncated_model, "--source", photos)
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.startswith("Error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    _no_traceback(p.stderr)


def test_all_unreadable_exits_nonzero_but_keeps_report_and_lines(bundle, tmp_path, assert_valid_report):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_text("x")
    (d / "b.jpg").write_bytes(b"\xff\xd8\xff")
    rep = tmp_path / "r.json"
    res = cli(bundle, "--source", d, "--report", rep, "-q")
    assert res.exit_code == 1
    assert res.stderr.strip() == "Error: no frame could be processed (2 unreadable)"
    assert [r["source"] for r in _lines(res.stdout)] == ["a.jpg", "b.jpg"]
    report = assert_valid_report(json.loads(rep.read_text()))
    assert report["errors"] == ["no frame could be processed (2 unreadable)"]
    assert report["throughput"]["frames_skipped"] == 2


def test_help_lists_real_examples():
    res = cli("--help")
    assert res.exit_code == 0
    for opt in ("--source", "--pipeline / --sequential", "--max-frames", "--threads", "--delegate", "--out",
                "--report", "--live"):
        assert opt in res.stdout
    assert "edgerun run out/mobilenet_v2-int8 --source sample_data/images" in res.stdout
