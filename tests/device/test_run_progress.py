"""`edgerun run` progress: a frames bar on stderr when asked, never on stdout, never with --json."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ROOT / "sample_data" / "images"
VIDEO = ROOT / "sample_data" / "video" / "vtest_short.avi"
MODEL = ROOT / "tests/data/models/float.tflite"
FORCE = {"EDGEPIPE_PROGRESS": "1"}  # stands in for a terminal


def _frames(stdout: str) -> list:
    return [json.loads(line)["frame"] for line in stdout.splitlines() if line.strip()]


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_run_draws_a_frames_bar_on_stderr_only(edgerun):
    pytest.importorskip("tqdm")
    n = len([p for p in IMAGES.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")])
    p = edgerun("run", MODEL, "--source", IMAGES, env=FORCE)
    assert p.returncode == 0, p.stderr
    assert _frames(p.stdout) == list(range(n))  # every stdout line is a prediction: no bar in it
    assert f"{n}/{n}" in p.stderr and "ETA" in p.stderr and "run:" in p.stderr
    assert "frames/s" in p.stderr  # the summary still follows the bar


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_max_frames_sets_the_total(edgerun):
    pytest.importorskip("tqdm")
    p = edgerun("run", MODEL, "--source", IMAGES, "--max-frames", "4", "--sequential", env=FORCE)
    assert p.returncode == 0, p.stderr
    assert _frames(p.stdout) == [0, 1, 2, 3]
    assert "4/4" in p.stderr and f"/{len(list(IMAGES.iterdir()))}" not in p.stderr


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_no_bar_with_json_or_quiet_or_when_not_a_terminal(edgerun, tmp_path):
    out = tmp_path / "preds.jsonl"
    j = edgerun("run", MODEL, "--source", IMAGES, "--max-frames", "3", "--out", out, "--json", env=FORCE)
    assert j.returncode == 0, j.stderr
    assert json.loads(j.stdout)["kind"] == "run" and "run:" not in j.stderr and "ETA" not in j.stderr
    q = edgerun("run", MODEL, "--source", IMAGES, "--max-frames", "3", "--quiet", env=FORCE)
    # --quiet: no bar (a runtime or emulation warning may still reach stderr)
    assert q.returncode == 0 and "ETA" not in q.stderr and "frames/s" not in q.stderr, q.stderr
    plain = edgerun("run", MODEL, "--source", IMAGES, "--max-frames", "3", env={"EDGEPIPE_PROGRESS": ""})
    assert plain.returncode == 0 and "ETA" not in plain.stderr and "frames/s" in plain.stderr


def test_frame_totals_by_source():
    from edgepipe.device.cli_run import frames_total
    from edgepipe.device.sources import open_source

    with open_source(str(IMAGES)) as folder:
        assert frames_total(folder, None) == len(folder.paths)
        assert frames_total(folder, 2) == 2
        assert frames_total(folder, 10_000) == len(folder.paths)
    pytest.importorskip("cv2")
    with open_source(str(VIDEO)) as video:
        assert frames_total(video, None) == video.frame_count > 0
    with open_source(str(VIDEO), live=True) as live:  # drops frames like a camera: open-ended
        assert frames_total(live, None) is None and frames_total(live, 7) == 7
