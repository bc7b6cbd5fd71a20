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
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.device.cli import main as edgerun
from edgepipe.device.http import HTTPError_, JSONHandler, Server
from edgepipe.device.report import new_report
from edgepipe.device.send import Spool, deliver, describe, send_report
from ports import free_port

MODELS = Path(__file__).resolve().parents[1] / "data" / "models"


class Sink(JSONHandler):
    def end_headers(self):
        if getattr(self, "retry_after", None) is not None:
            self.send_header("Retry-After", self.retry_after)
        super().end_headers()

    def route(self, method, path, query):
        srv = self.server
        self.retry_after = None
        if (method, path) != ("POST", "/v1/reports"):
            raise HTTPError_(404, "no route")
        doc = self.read_json()
        with srv.lock:
            srv.posts += 1
            script = srv.script.get(doc["id"])
            status, self.retry_after = script.pop(0) if script else (None, None)
            srv.log.append((doc["id"], status or "ok"))
        if status == "drop":  # this report makes the host hang up without an answer
            self.connection.shutdown(socket.SHUT_RDWR)
            raise ConnectionAbortedError("no answer on purpose")
        if status:
            raise HTTPError_(status, f"scripted {status}")
        with srv.lock:
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
    srv.script, srv.log = {}, []  # id -> [(status or "drop", Retry-After or None), ...]; (id, status) per POST
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
    assert "cannot write the report spool" in res.output and "sent to" in res.output and len(sink.reports) == 1


# -- what each answer does to a report (issue 10) ----------------------------------------------------

def spooled(tmp_path, *reports):
    spool = Spool(tmp_path)
    for r in reports:
        spool.put(r)
    return spool


def test_a_report_answered_500_does_not_block_later_ones_and_backs_off_between_flushes(sink, tmp_path):
    a, b, c = report(), report(), report()
    sink.script[a["id"]] = [(500, None)] * 3
    spool = spooled(tmp_path, a, b, c)
    sleeps = []
    res = deliver(sink.url, spool, attempts=2, sleep=sleeps.append)
    assert res.sent == [b["id"], c["id"]] and res.pending == 1 and "500" in res.error
    assert [i for i, _ in sink.log] == [a["id"], a["id"], b["id"], c["id"]] and len(sleeps) == 1
    state = spool.retry_state(spool.pending()[0])
    assert state.failures == 1 and state.next_try > time.time() + 20 and "500" in state.last_error

    # A flush before it is due leaves it alone (and says when it is due)...
    res = deliver(sink.url, spool, attempts=2, sleep=sleeps.append)
    assert res.waiting == 1 and res.pending == 1 and len(sink.log) == 4
    assert "next retry in" in describe(res, sink.url, spool)
    # ...a flush after it is due sends it once more; the third 500 doubles the wait.
    res = deliver(sink.url, spool, attempts=1, clock=lambda: time.time() + 31)
    assert res.pending == 1 and len(sink.log) == 5
    again = spool.retry_state(spool.pending()[0])
    assert again.failures == 2 and again.next_try - state.next_try > 40
    res = deliver(sink.url, spool, clock=lambda: time.time() + 100)
    assert res.sent == [a["id"]] and res.pending == 0
    assert list(tmp_path.glob("*.retry")) == [] and set(sink.reports) == {a["id"], b["id"], c["id"]}


def test_a_report_the_host_hangs_up_on_does_not_block_the_queue(sink, tmp_path):
    a, b = report(), report()
    sink.script[a["id"]] = [("drop", None)] * 3
    spool = spooled(tmp_path, a, b)
    res = deliver(sink.url, spool, attempts=3, sleep=lambda s: None)
    # b answered, so the silence was about a: a backs off, b is delivered.
    assert res.sent == [b["id"]] and res.pending == 1 and spool.retry_state(spool.pending()[0]).failures == 1


def test_429_honours_a_short_retry_after_and_defers_a_long_one(sink, tmp_path):
    a, b = report(), report()
    sink.script[a["id"]] = [(429, "1"), (429, "0")]
    sink.script[b["id"]] = [(429, "3000")]
    spool = spooled(tmp_path, a, b)
    sleeps = []
    res = deliver(sink.url, spool, attempts=4, sleep=sleeps.append)
    # a: waited exactly what the host asked, then went through; b: too long to wait now.
    assert res.sent == [a["id"]] and sleeps == [1.0, 0.0] and res.pending == 1
    assert spool.retry_state(spool.pending()[0]).next_try > time.time() + 2900
    res = deliver(sink.url, spool, ignore_backoff=True)  # `edgerun flush --now`
    assert res.sent == [b["id"]] and res.pending == 0


def test_other_4xx_are_parked_with_their_reason_and_never_block(sink, tmp_path):
    bad = [report() for _ in range(4)]
    good = report()
    for r, status in zip(bad, (400, 404, 413, 409)):
        sink.script[r["id"]] = [(status, None)]
    spool = spooled(tmp_path, *bad, good)
    res = deliver(sink.url, spool, sleep=lambda s: None)
    assert res.sent == [good["id"]] and res.pending == 0 and sink.posts == 5  # each tried once
    reasons = sorted(p.read_text() for p in (tmp_path / "rejected").glob("*.reason.txt"))
    assert [r.split(":")[0] for r in reasons] == ["HTTP 400", "HTTP 404", "HTTP 409", "HTTP 413"]
    assert "scripted 413" in reasons[3]
    # Parked reports can be put back once the host is fixed.
    res = CliRunner().invoke(edgerun, ["flush", "--report-to", sink.url, "--spool", str(tmp_path),
                                       "--requeue-rejected", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["requeued"] == 4 and len(sink.reports) == 5


def test_refused_token_keeps_reports_queued_until_it_is_fixed(sink, tmp_path):
    sink.token = "right"
    a, b = report(), report()
    spooled(tmp_path, a, b)
    runner = CliRunner()
    flush = ["flush", "--report-to", sink.url, "--spool", str(tmp_path)]
    for extra in ([], ["--report-token", "wrong"]):
        res = runner.invoke(edgerun, flush + extra)
        assert res.exit_code == 1 and "token" in res.output and len(res.output.strip().splitlines()) == 1
        assert len(Spool(tmp_path).pending()) == 2 and not list(tmp_path.glob("rejected/*.json"))
    res = runner.invoke(edgerun, flush + ["--report-token", "right"])
    assert res.exit_code == 0, res.output
    assert set(sink.reports) == {a["id"], b["id"]}


def bench_cmd(*extra):
    return ["bench", str(MODELS / "float.tflite"), "--runs", "3", "--min-secs", "0", *extra]


def test_bench_with_a_refused_token_fails_and_keeps_the_report(sink, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERUN_SPOOL", str(tmp_path))
    monkeypatch.delenv("EDGEPIPE_TOKEN", raising=False)
    sink.token = "right"
    res = CliRunner().invoke(edgerun, bench_cmd("--report-to", sink.url))
    assert res.exit_code == 1 and "no token was given" in res.output and "Traceback" not in res.output
    assert len(Spool(tmp_path).pending()) == 1 and sink.reports == {}
    res = CliRunner().invoke(edgerun, ["flush", "--report-to", sink.url, "--report-token", "right"])
    assert res.exit_code == 0 and len(sink.reports) == 1


def test_bench_whose_report_is_refused_for_good_fails(sink, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERUN_SPOOL", str(tmp_path))
    sink.reject_kind = "bench"
    res = CliRunner().invoke(edgerun, bench_cmd("--report-to", sink.url))
    assert res.exit_code == 1 and "rejected (HTTP 422" in res.output
    assert len(list((tmp_path / "rejected").glob("*.json"))) == 1


def test_report_neither_sent_nor_spooled_fails_the_command(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool directory should be")
    monkeypatch.setenv("EDGERUN_SPOOL", str(blocker / "spool"))
    down = f"http://127.0.0.1:{free_port()}"
    res = CliRunner().invoke(edgerun, bench_cmd("--report-to", down))
    assert res.exit_code == 1 and "neither sent nor spooled" in res.output and "Traceback" not in res.output
    err = [line for line in res.output.splitlines() if "report" in line and "spool" in line]
    assert len(err) == 1 and "cannot write the report spool" in err[0]


def test_spooled_report_with_nan_is_valid_json(tmp_path):
    """A NaN in a measurement is spooled as null: the collector refuses bare NaN for good."""
    import json as _json

    from edgepipe.device.report import new_report
    from edgepipe.device.send import Spool

    rep = new_report("bench", latency_ms={"n": 1, "mean": float("nan"), "std": 0.0, "min": 1.0, "p50": 1.0,
                                          "p90": 1.0, "p99": 1.0, "max": 1.0})
    path = Spool(tmp_path).put(rep)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text
    assert _json.loads(text)["latency_ms"]["mean"] is None
