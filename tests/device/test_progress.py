"""Progress bars: ETA when a terminal watches, nothing otherwise, and no tqdm needed on a device."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgepipe.device import progress

ROOT = Path(__file__).resolve().parents[2]


class TTY(io.StringIO):
    def isatty(self):
        return True


def test_bar_shows_counts_and_eta_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    monkeypatch.delenv(progress.ENV, raising=False)
    out = TTY()
    with progress.Bar(4, "convert", stream=out) as bar:
        assert bar.active
        for recipe in ("fp32", "fp16", "int8", "int16x8"):
            bar.note(recipe)
            bar.update()
    text = out.getvalue()
    assert "convert" in text and "4/4" in text and "ETA" in text and "int16x8" in text


def test_off_when_not_a_terminal_or_json(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    plain = io.StringIO()
    with progress.Bar(3, "bench", stream=plain) as bar:
        bar.update(3)
        bar.note("x")
    assert not bar.active and plain.getvalue() == ""
    assert not progress.enabled(TTY(), as_json=True)
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.enabled(TTY())


def test_board_has_a_line_per_device(monkeypatch):
    pytest.importorskip("tqdm")
    out = TTY()
    with progress.Board(["pi5", "pi4"], [2, 1], "fleet", stream=out) as board:
        board.start("pi5", "mnv2-int8")
        board.done("pi5", "mnv2-int8 1.7 ms")
        board.start("pi4", "mnv2-fp32")
    text = out.getvalue()
    assert "pi5" in text and "pi4" in text and "mnv2-fp32" in text and "fleet" in text


def test_works_without_tqdm():
    # A device without tqdm: bars are silent no-ops, nothing raises.
    code = ("import sys; sys.modules['tqdm'] = None\n"
            "from edgepipe.device import progress\n"
            "assert not progress.enabled()\n"
            "b = progress.Bar(3, 'x', on=True); b.update(); b.note('y'); b.reset(5); b.close()\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, EDGEPIPE_PROGRESS="1"))
    assert res.stdout.strip() == "ok", res.stderr


def test_step_lines_drive_the_bar(monkeypatch):
    pytest.importorskip("tqdm")
    out = TTY()
    with progress.Bar(None, "convert", stream=out, unit="recipe") as bar:
        bar.message("loading TensorFlow")           # not a step: printed above the bar
        bar.message("[1/3] fp32")
        bar.message("[2/3] int8")
        assert bar.count == 1
        bar.message("[3/3] int16x8")
        bar.finish()
        assert bar.count == 3
    text = out.getvalue()
    assert "loading TensorFlow" in text and "3/3" in text and "ETA" in text


@pytest.mark.slow  # 10-45 s under arm64 emulation (process start-ups); nothing here depends on the CPU or runtime
def test_edgerun_bench_draws_a_timed_runs_bar_only_when_asked(edgerun, tmp_path):
    """Forced on (a TTY stands in): the bar is on stderr, stdout keeps the summary; --json never draws it."""
    pytest.importorskip("tqdm")
    model = ROOT / "tests/data/models/float.tflite"
    on = edgerun("bench", model, "--runs", "40", "--min-secs", "0", env={"EDGEPIPE_PROGRESS": "1"})
    assert on.returncode == 0, on.stderr
    assert "timed runs" in on.stderr and "timed runs" not in on.stdout and "latency" in on.stdout
    off = edgerun("bench", model, "--runs", "40", "--min-secs", "0", "--json", env={"EDGEPIPE_PROGRESS": "1"})
    assert off.returncode == 0 and "timed runs" not in off.stderr
