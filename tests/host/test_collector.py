"""`edgepipe serve` on loopback: idempotent ingest, every bad request, tokens,
exactly-once delivery from device spools (host down, lost replies), 50 reporters."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import socketserver
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgepipe.device.http import ClientError, request
from edgepipe.device.report import new_report
from edgepipe.device.send import Spool, deliver, send_report
from edgepipe.pipeline.collector import CollectorServer
from edgepipe.pipeline.store import Store

TOKEN = "collector-token"
REPO = Path(__file__).resolve().parents[2]


def report(host="pi-1", name="mnv2-int8", recipe="int8", kind="bench", p50=10.0):
    r = new_report(kind, device={"hostname": host},
                   runtime={"backend": "ai_edge_litert", "delegate": "cpu", "threads": 4},
                   model={"name": name, "recipe": recipe, "sha256": "a" * 64, "size": 1000},
                   latency_ms={"n": 50, "mean": p50, "std": 0.1, "min": p50 * 0.9, "p50": p50,
                               "p90": p50 * 1.1, "p99": p50 * 1.2, "max": p50 * 1.5})
    return r


def start(db, port=0, token=TOKEN, **kw):
    srv = CollectorServer(Store(db), "127.0.0.1", port, token=token, **kw)
    srv.start_background()
    return srv


def stop(srv):
    srv.shutdown()
    srv.server_close()
    srv.store.close()


@pytest.fixture
def collector(tmp_path):
    srv = start(tmp_path / "results.db")
    yield srv
    stop(srv)


def post(srv, body=None, data=None, token=TOKEN, **kw):
    return request("POST", srv.url + "/v1/reports", body=body, data=data, token=token, **kw)


def test_ingest_is_idempotent_and_queryable(collector):
    r = report()
    assert post(collector, r) == (201, {"id": r["id"], "stored": True, "duplicate": False})
    assert post(collector, r)[0] == 200
    assert collector.store.count() == 1
    post(collector, report(host="pi-2", recipe="fp32", name="mnv2-fp32"))
    post(collector, report(host="pi-2", kind="run"))
    get = lambda q: request("GET", collector.url + "/v1/reports" + q, token=TOKEN)[1]  # noqa: E731
    assert get("")["count"] == 3
    assert {x["device"]["hostname"] for x in get("?device=pi-2")["reports"]} == {"pi-2"}
    assert get("?device=pi-2&kind=bench")["reports"][0]["model"]["recipe"] == "fp32"
    assert get("?recipe=int8&threads=4")["count"] == 2
    assert get("?limit=1")["count"] == 1
    assert get("?since=2999-01-01")["count"] == 0
    assert request("GET", collector.url + f"/v1/reports/{r['id']}", token=TOKEN)[1] == r


def test_bad_requests_get_a_reason_and_store_nothing(collector):
    good = report()
    no_id = {k: v for k, v in good.items() if k != "id"}
    cases = [
        (dict(data=b"{not json"), 400, "malformed JSON"),
        (dict(data=b"\xff\xfe"), 400, "malformed JSON"),
        (dict(body=[good]), 400, "JSON object"),
        (dict(body=no_id), 422, "must contain ['id']"),
        (dict(body={**good, "kind": "party"}), 422, "kind"),
        (dict(body={**good, "id": "not-a-uuid"}), 422, "id"),
        (dict(body={**good, "schema": "edgepipe.report/9"}), 422, "schema"),
        (dict(body={**good, "latency_ms": {"n": -1}}), 422, "latency_ms"),
        (dict(data=b"x" * (1 << 20 + 1)), 413, "exceeds the limit"),
        (dict(body=good, token=None), 401, "missing bearer token"),
        (dict(body=good, token="guess"), 403, "wrong token"),
        (dict(data=b"{}", content_type="text/plain"), 415, "application/json"),
    ]
    for kw, status, match in cases:
        with pytest.raises(ClientError) as e:
            post(collector, **kw)
        assert e.value.status == status, (kw.keys(), e.value)
        assert match in str(e.value), e.value
    for path, status in (("/v1/reports?color=red", 400), ("/v1/reports?limit=x", 400),
                         ("/v1/nothing", 404), ("/v1/reports/123", 404)):
        with pytest.raises(ClientError) as e:
            request("GET", collector.url + path, token=TOKEN)
        assert e.value.status == status
    # Chunked bodies (no Content-Length) are refused rather than read unbounded.
    conn = http.client.HTTPConnection("127.0.0.1", collector.server_address[1], timeout=5)
    conn.putrequest("POST", "/v1/reports")
    conn.putheader("Authorization", f"Bearer {TOKEN}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"2\r\n{}\r\n0\r\n\r\n")
    assert conn.getresponse().status == 411
    conn.close()
    assert collector.store.count() == 0
    assert post(collector, good)[0] == 201  # still serving
    assert request("GET", collector.url + "/healthz")[0] == 200


def test_refuses_to_listen_beyond_loopback_without_token(tmp_path):
    with pytest.raises(ValueError, match="without a token"):
        CollectorServer(Store(tmp_path / "x.db"), "0.0.0.0", 0, token=None)


def test_no_token_on_loopback_is_allowed(tmp_path):
    srv = start(tmp_path / "open.db", token=None)
    try:
        assert post(srv, report(), token=None)[0] == 201
    finally:
        stop(srv)


def test_spool_survives_a_collector_restart_and_delivers_once(tmp_path):
    db = tmp_path / "results.db"
    srv = start(db)
    port = srv.server_address[1]
    url = srv.url
    stop(srv)  # the host goes away
    spool = Spool(tmp_path / "spool")
    sent = [report(p50=float(i + 1)) for i in range(3)]
    for r in sent:
        res = send_report(r, url, spool=spool, token=TOKEN, attempts=2, sleep=lambda s: None)
        assert res.delivered == 0
    assert len(spool.pending()) == 3
    srv = start(db, port=port)  # back, same port and database
    try:
        res = deliver(url, Spool(tmp_path / "spool"), token=TOKEN)
        assert res.sent == [r["id"] for r in sent] and res.pending == 0
        assert srv.store.count() == 3
        # A device that lost its acknowledgements re-sends: still stored once.
        for r in sent:
            assert post(srv, r)[0] == 200
    finally:
        stop(srv)
    with Store(db) as s:  # survives the restart on disk
        assert sorted(x["id"] for x in s.query()) == sorted(r["id"] for r in sent)


class DropReplyProxy(socketserver.ThreadingTCPServer):
    """Forwards one HTTP request to the collector, then hangs up without the answer."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, target):
        self.target = target
        self.forwarded = 0
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(socketserver.StreamRequestHandler):
    def handle(self):
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = self.rfile.readline()
            if not line:
                return
            head += line
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = self.rfile.read(length)
        with socket.create_connection(self.server.target, timeout=5) as up:
            up.sendall(head.replace(b"Connection: keep-alive", b"Connection: close") + body)
            while up.recv(65536):  # the collector stored it and answered...
                pass
        self.server.forwarded += 1
        self.connection.shutdown(socket.SHUT_RDWR)  # ...but the device never hears back


def test_lost_reply_through_a_proxy_is_stored_once(collector, tmp_path):
    proxy = DropReplyProxy(collector.server_address[:2])
    threading.Thread(target=proxy.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        r = report()
        spool = Spool(tmp_path / "spool")
        res = send_report(r, f"http://127.0.0.1:{proxy.server_address[1]}", spool=spool, token=TOKEN,
                          attempts=3, sleep=lambda s: None)
        assert res.delivered == 0 and res.pending == 1 and proxy.forwarded == 3
        assert collector.store.count() == 1  # three arrivals, one row
        res = deliver(collector.url, spool, token=TOKEN)
        assert res.duplicates == [r["id"]] and res.pending == 0
        assert collector.store.count() == 1
    finally:
        proxy.shutdown()
        proxy.server_close()


def test_fifty_concurrent_reporters_lose_nothing(collector, tmp_path):
    per_sender, senders = 6, 50
    ids, errors = [], []
    lock = threading.Lock()

    def sender(k):
        spool = Spool(tmp_path / f"spool{k}")
        for i in range(per_sender):
            r = report(host=f"pi-{k}", p50=float(i + 1))
            res = send_report(r, collector.url, spool=spool, token=TOKEN, sleep=lambda s: None)
            with lock:
                ids.append(r["id"])
                if res.pending or not res.sent:
                    errors.append((k, res))

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert collector.store.count() == senders * per_sender
    assert sorted(x["id"] for x in collector.store.query(limit=10000)) == sorted(ids)


def test_serve_command_end_to_end(tmp_path):
    env = dict(os.environ, EDGEPIPE_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    db = tmp_path / "cli.db"
    refused = subprocess.run([sys.executable, "-m", "edgepipe.pipeline.cli", "serve", "--host", "0.0.0.0",
                              "--port", "0", "--db", str(db)],
                             env={k: v for k, v in env.items() if k != "EDGEPIPE_TOKEN"},
                             capture_output=True, text=True, timeout=60, cwd=REPO)
    assert refused.returncode != 0 and "without a token" in refused.stderr
    assert "Traceback" not in refused.stderr
    proc = subprocess.Popen([sys.executable, "-m", "edgepipe.pipeline.cli", "serve", "--port", "0", "--db", str(db)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert "collector listening on http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split()[3]
        assert proc.stdout.readline().startswith(f"dashboard {url}/")
        r = report()
        assert post_url(url, r) == 201 and post_url(url, r) == 200
        assert "new" in proc.stdout.readline() and "dup" in proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "collector stopped" in out
    with Store(db) as s:
        assert s.count() == 1


def post_url(url, r):
    return request("POST", url + "/v1/reports", body=r, token=TOKEN)[0]


# -- bad reports, concurrency, conflicts (issue 10) ---------------------------------------------

def unstorable_reports():
    """Schema-valid reports no database can keep: an int beyond 64 bits, a lone surrogate."""
    big = report()
    big["runtime"]["threads"] = 2 ** 70
    lone = report()
    lone["device"]["hostname"] = "pi-\ud800"
    return [big, lone]


def test_unstorable_reports_get_422_with_a_reason(collector):
    for bad, why in zip(unstorable_reports(), ("64-bit integer", "lone UTF-16 surrogate")):
        with pytest.raises(ClientError) as e:
            post(collector, bad)
        assert e.value.status == 422 and why in str(e.value), e.value
        assert "Traceback" not in str(e.value) and str(collector.store.path) not in str(e.value)
    assert collector.store.count() == 0
    assert post(collector, report())[0] == 201


def test_bad_reports_never_fail_good_concurrent_ones(collector):
    goods = [report(host=f"pi-{i % 7}", p50=float(i + 1)) for i in range(120)]
    bads = [unstorable_reports()[i % 2] for i in range(60)]
    for b in bads:
        b["id"] = report()["id"]
    work = [(r, 201) for r in goods] + [(r, 422) for r in bads]
    work = [work[i] for i in sorted(range(len(work)), key=lambda i: (i * 7919) % len(work))]  # interleave
    got, lock = [], threading.Lock()

    def sender(items):
        for r, want in items:
            try:
                status = post(collector, r, timeout=30)[0]
            except ClientError as e:
                status = e.status
            with lock:
                got.append((want, status))

    threads = [threading.Thread(target=sender, args=(work[k::12],)) for k in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wrong = [(want, status) for want, status in got if want != status]
    assert len(got) == len(work) and wrong == [], wrong[:5]
    assert collector.store.count() == len(goods)


@pytest.mark.parametrize("data,why", [
    (b"[" * 50_000 + b"]" * 50_000, "nested deeper"),
    (b'{"a":' * 200 + b"1" + b"}" * 200, "nested deeper"),
    (None, "NaN is not a finite number"),
    (None, "Infinity is not a finite number"),
])
def test_nested_and_non_finite_json_get_400(collector, data, why):
    if data is None:
        text = json.dumps(report(p50=float(why.split()[0].replace("NaN", "nan").replace("Infinity", "inf"))))
        data = text.encode()
    with pytest.raises(ClientError) as e:
        post(collector, data=data)
    assert e.value.status == 400 and why in str(e.value), e.value
    assert collector.store.count() == 0


def test_same_id_same_body_200_other_body_409(collector):
    r = report()
    assert post(collector, r)[0] == 201
    assert post(collector, json.loads(json.dumps(r)))[0] == 200
    with pytest.raises(ClientError) as e:
        post(collector, {**r, "kind": "run"})
    assert e.value.status == 409 and r["id"] in str(e.value)
    assert request("GET", collector.url + f"/v1/reports/{r['id']}", token=TOKEN)[1]["kind"] == "bench"
    with pytest.raises(ClientError) as e:  # a filter beyond 64 bits is a 400 (it was a 500)
        request("GET", collector.url + "/v1/reports?threads=" + "9" * 30, token=TOKEN)
    assert e.value.status == 400
    assert request("GET", collector.url + "/v1/reports?threads=" + "9" * 19, token=TOKEN)[1]["count"] == 0


@pytest.mark.slow
@pytest.mark.timing
def test_collector_answers_a_report_while_200_clients_idle_and_trickle(collector):
    sys.path.insert(0, str(REPO / "tests" / "device"))
    from test_http_server import Crowd

    crowd = Crowd(collector.server_address[1])
    try:
        time.sleep(1.2)
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            assert post(collector, report(), timeout=5)[0] == 201
            times.append(time.perf_counter() - t0)
        assert statistics.median(times) < 1.0, times
    finally:
        crowd.close()
    assert collector.store.count() == 5
