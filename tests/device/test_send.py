"""Reports reach the host exactly once: spool, retries with backoff, lost replies.

The collector here is a real HTTP server on loopback built from edgepipe.device.http
(device tests may not import pipeline); it is idempotent on the report id like
the real one and can be told to fail, or to store a report and then drop the
connection without answering (the lost-reply case). The host suite repeats
the important cases against the real `edgepipe serve` collector.
"""
from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.device.cli import main as edgerun
from edgepipe.device.http import HTTPError_, JSONHandler, Server
from edgepipe.device.report import new_report
from edgepipe.device.send import Spool, deliver, send_report

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"


class Sink(JSONHandler):
    def route(self, method, path, query):
        srv = self.server
        if (method, path) != ("POST", "/v1/reports"):
            raise HTTPError_(404, "no route")
        doc = self.read_json()
        with srv.lock:
            srv.posts += 1
            if srv.fail_next > 0:
                srv.fail_next -= 1
                raise HTTPError_(503, "busy")
            if srv.reject_kind and doc.get("kind") == srv.reject_kind:
                raise HTTPError_(422, "report does not match edgepipe.report/1")
            new = doc["id"] not in srv.reports
            srv.reports.setdefault(doc["id"], doc)
            drop = srv.drop_next > 0
            srv.drop_next -= drop
        if drop:  # stored, but the reply never arrives
            self.connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("reply dropped on purpose")
        return (201 if new else 200), {"id": doc["id"], "stored": new}


def start_sink(port=0):
    srv = Server(("127.0.0.1", port), Sink)
    srv.lock = threading.Lock()
    srv.reports, srv.posts = {}, 0
    srv.fail_next = srv.drop_next = 0
    srv.reject_kind = None
    srv.start_background()
    return srv


@pytest.fixture
def sink():
    srv = start_sink()
    yield srv
    srv.shutdown()
    srv.server_close()


def report(kind="bench"):
    return new_report(kind, device={"hostname": "pi-test"},
                      runtime={"backend": "ai_edge_litert", "delegate": "cpu", "threads": 1},
                      model={"name": "tiny-fp32", "recipe": "fp32", "sha256": "0" * 64, "size": 1})


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_host_down_spools_with_backoff_then_delivers_exactly_once(tmp_path):
    port = free_port()  # nothing listens here yet
    url = f"http://127.0.0.1:{port}"
    sleeps = []
    a, b = report(), report()
    res = send_report(a, url, spool=Spool(tmp_path), attempts=4, backoff=0.5, sleep=sleeps.append)
    assert res.pending == 1 and res.delivered == 0 and "refused" in res.error.lower()
    # Four attempts, three waits, growing (with jitter in [0.5, 1) x base).
    assert len(sleeps) == 3 and 0.25 <= sleeps[0] < 0.5 and 0.5 <= sleeps[1] < 1 and 1 <= sleeps[2] < 2
    res = send_report(b, url, spool=Spool(tmp_path), attempts=1)
    assert res.pending == 2

    sink = start_sink(port)  # the host comes back; a new Spool = a restarted device
    try:
        res = deliver(url, Spool(tmp_path))
        assert res.sent == [a["id"], b["id"]] and res.pending == 0 and res.error is None
        assert set(sink.reports) == {a["id"], b["id"]} and sink.posts == 2
        assert sink.reports[a["id"]] == json.loads(json.dumps(a))
        res = deliver(url, Spool(tmp_path))  # nothing left, nothing re-sent
        assert res.delivered == 0 and sink.posts == 2
    finally:
        sink.shutdown()
        sink.server_close()


def test_lost_reply_is_resent_and_stored_once(sink, tmp_path):
    sink.drop_next = 1
    r = report()
    res = send_report(r, sink.url, spool=Spool(tmp_path), attempts=1)
    assert res.pending == 1 and res.delivered == 0  # the device cannot know it arrived
    assert list(sink.reports) == [r["id"]]          # ...but it did
    res = deliver(sink.url, Spool(tmp_path))
    assert res.duplicates == [r["id"]] and res.sent == [] and res.pending == 0
    assert list(sink.reports) == [r["id"]] and sink.posts == 2

    # The same within one call: the retry finds the report already stored.
    sink.drop_next = 1
    r2 = report()
    res = send_report(r2, sink.url, spool=Spool(tmp_path), attempts=3, sleep=lambda s: None)
    assert res.duplicates == [r2["id"]] and res.pending == 0 and len(sink.reports) == 2


def test_server_errors_are_retried(sink, tmp_path):
    sink.fail_next = 2
    sleeps = []
    res = send_report(report(), sink.url, spool=Spool(tmp_path), attempts=4, sleep=sleeps.append)
    assert len(res.sent) == 1 and len(sleeps) == 2 and sink.posts == 3


def test_permanent_refusal_is_parked_and_does_not_block_the_queue(sink, tmp_path):
    sink.reject_kind = "run"
    bad, good = report("run"), report("bench")
    spool = Spool(tmp_path)
    spool.put(bad)
    res = send_report(good, sink.url, spool=spool, sleep=lambda s: None)
    assert [i for i, _ in res.rejected] == [bad["id"]] and res.sent == [good["id"]] and res.pending == 0
    parked = list((tmp_path / "rejected").glob("*.json"))
    assert len(parked) == 1 and json.loads(parked[0].read_text())["id"] == bad["id"]
    assert "422" in next((tmp_path / "rejected").glob("*.reason.txt")).read_text()


def test_flush_command(sink, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERUN_SPOOL", str(tmp_path))
    monkeypatch.setenv("EDGERUN_SEND_ATTEMPTS", "1")
    runner = CliRunner()
    spool = Spool(tmp_path)
    r = report()
    spool.put(r)
    down = f"http://127.0.0.1:{free_port()}"
    res = runner.invoke(edgerun, ["flush", "--report-to", down, "--json"])
    assert res.exit_code == 1 and json.loads(res.output)["pending"] == 1
    res = runner.invoke(edgerun, ["flush", "--report-to", sink.url])
    assert res.exit_code == 0, res.output
    assert "1 report(s) sent" in res.output and list(sink.reports) == [r["id"]]
    res = runner.invoke(edgerun, ["flush", "--report-to", "ftp://nope"])
    assert res.exit_code == 2 and "http" in res.output


def test_bench_report_to_sends_spools_and_catches_up(sink, tmp_path, monkeypatch):
    """`edgerun bench --report-to`: the real bench, the real command line."""
    monkeypatch.setenv("EDGERUN_SPOOL", str(tmp_path))
    monkeypatch.setenv("EDGERUN_SEND_ATTEMPTS", "1")
    model = str(MODELS / "float.tflite")
    runner = CliRunner()
    down = f"http://127.0.0.1:{free_port()}"
    res = runner.invoke(edgerun, ["bench", model, "--runs", "5", "--min-secs", "0", "--json",
                                  "--report-to", down])
    assert res.exit_code == 0, res.output
    assert len(Spool(tmp_path).pending()) == 1  # host away: kept, the command still succeeded
    res = runner.invoke(edgerun, ["bench", model, "--runs", "5", "--min-secs", "0", "--json",
                                  "--report-to", sink.url])
    assert res.exit_code == 0, res.output
    # The next run delivers the earlier report too, each exactly once.
    assert len(sink.reports) == 2 and sink.posts == 2 and Spool(tmp_path).pending() == []
    assert {r["kind"] for r in sink.reports.values()} == {"bench"}


def test_unusable_spool_falls_back_to_a_direct_send(sink, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool directory should be")
    monkeypatch.setenv("EDGERUN_SPOOL", str(blocker / "spool"))
    res = CliRunner().invoke(edgerun, ["bench", str(MODELS / "float.tflite"), "--runs", "3", "--min-secs", "0",
                                       "--report-to", sink.url])
    assert res.exit_code == 0, res.output
    assert "cannot use the report spool" in res.output and len(sink.reports) == 1
