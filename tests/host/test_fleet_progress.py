"""Fleet `edgepipe bench` progress: a bar per device (current job, ETA) on stderr, plain lines otherwise."""
from __future__ import annotations

import io
import json
import socket

import pytest
from click.testing import CliRunner

from bundle_factory import make_bundle
from edgepipe.device.agent import Agent, AgentServer
from edgepipe.device.bundle_store import BundleStore
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.fleet_progress import FleetProgress


class TTY(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def agent(tmp_path):
    srv = AgentServer(Agent(BundleStore(tmp_path / "store")), "127.0.0.1", 0)
    srv.start_background()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.agent.close()


def _dead_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


def test_bench_draws_a_line_per_device_on_stderr_only(agent, tmp_path, monkeypatch):
    pytest.importorskip("tqdm")
    bundles = [make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32"),
               make_bundle(tmp_path / "b", "int8_io.tflite", "tiny-int8-io", "int8-io")]
    dead = _dead_url()
    live, gone = agent.url.split("//")[1], dead.split("//")[1]
    args = ["bench", *map(str, bundles), "--device", agent.url, "--device", dead, "--no-db", "--runs", "5",
            "--warmup", "1", "--min-secs", "0", "--threads", "1,2"]
    monkeypatch.setenv("EDGEPIPE_PROGRESS", "1")  # stands in for a terminal
    res = CliRunner().invoke(edgepipe, args)
    assert res.exit_code == 1, res.output  # the dead device fails its jobs
    err = res.stderr
    assert "all devices" in err and "8/8" in err and "ETA" in err  # 2 devices x 2 bundles x 2 thread counts
    assert f"{live}: 100%" in err and "4/4" in err  # the live device's own line went through its jobs
    assert "tiny-int8-io t2" in err  # its current job was named on its line
    assert f"DOWN    {gone}" in err
    assert "ETA" not in res.stdout and "all devices" not in res.stdout
    assert "4/8 jobs succeeded on 2 device(s)" in res.stdout

    # --json: no bars, today's timestamped event lines on stderr, clean JSON on stdout.
    res = CliRunner().invoke(edgepipe, [*args, "--json"])
    assert res.exit_code == 1
    assert "ETA" not in res.stderr and "all devices" not in res.stderr
    assert any(live in ln and " done " in ln and ln.startswith("[") for ln in res.stderr.splitlines())
    assert len(json.loads(res.stdout)["outcomes"]) == 8


def test_devices_joining_on_the_way_grow_the_total():
    """The broker path learns its boards as they answer: each adds its jobs to the overall bar."""
    pytest.importorskip("tqdm")
    out = TTY()
    jobs = ["mnv2-fp32", "mnv2-int8"]
    with FleetProgress(jobs, on=True, stream=out) as prog:
        prog("pi5", "mnv2-fp32", "queued", "")
        prog("pi5", "mnv2-fp32", "running", "bench")
        prog("pi5", "mnv2-fp32", "done", "p50 1.70 ms")
        prog("pi4", "mnv2-fp32", "queued", "")
        prog("pi4", "-", "offline", "waiting for it to come back")
        prog("pi4", "mnv2-fp32", "failed", "job timed out")
        prog("pi5", "mnv2-int8", "done", "p50 0.90 ms")
        prog("pi4", "mnv2-int8", "done", "p50 3.10 ms")
    text = out.getvalue()
    assert "4/4" in text and "pi5" in text and "pi4" in text
    assert "mnv2-int8  (last: p50 1.70 ms)" in text  # pi5's line moved on to its next job
    assert "OFFLINE pi4: waiting" in text and "FAILED  pi4  mnv2-fp32: job timed out" in text


def test_plain_lines_when_off():
    out = io.StringIO()
    with FleetProgress(["a"], ["dev:1"], on=False, stream=out) as prog:
        prog("dev:1", "a", "done", "p50 1.00 ms")
    (line,) = out.getvalue().splitlines()
    assert line.startswith("[") and "dev:1" in line and "done" in line and "p50 1.00 ms" in line


def test_broker_bench_shows_boards_as_they_join(tmp_path, monkeypatch):
    """--broker: the boards are known only once they answer; each gets its line under the overall bar."""
    pytest.importorskip("tqdm")
    from mqtt_broker import Mosquitto, missing_reason

    if missing_reason() is not None:
        pytest.skip(missing_reason())
    from test_broker_fleet import AgentProc, wait_online  # the same `edgerun agent --broker` processes

    bundle = make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32")
    with Mosquitto() as mq:
        board = AgentProc(tmp_path / "agents", mq.url, "pi-bar").start()
        try:
            wait_online(mq.url, {"pi-bar"})
            monkeypatch.setenv("EDGEPIPE_PROGRESS", "1")
            res = CliRunner().invoke(edgepipe, ["bench", str(bundle), "--broker", mq.url, "--devices", "pi-bar",
                                                "--runs", "3", "--no-db", "--threads", "1,2"])
        finally:
            board.stop()
    assert res.exit_code == 0, res.output
    assert "pi-bar: 100%" in res.stderr and "all devices: 100%" in res.stderr and "2/2" in res.stderr
    assert "ETA" not in res.stdout and "2/2 jobs succeeded on 1 device(s)" in res.stdout
