"""Boards that dial out: real Mosquitto (auth on), real `edgerun agent --broker` processes, real store.

Faults: the broker killed (SIGKILL) and restarted mid-run, an agent killed
mid-job (with and without a restart), the host's connection cut. In every
case no report is lost and none is stored twice.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from bundle_factory import make_bundle
from mqtt_broker import Mosquitto, missing_reason
from edgepipe.device.mqtt import parse_broker
from edgepipe.pipeline.broker import BrokerCollector, BundleServer, discover
from edgepipe.pipeline.cli import main as edgepipe
from edgepipe.pipeline.fleet_broker import BrokerBench
from edgepipe.pipeline.remote import pack_bundle
from edgepipe.pipeline.store import Store

pytestmark = pytest.mark.skipif(missing_reason() is not None, reason=missing_reason() or "")
EDGERUN = str(Path(sys.executable).with_name("edgerun"))
BOUND = 90  # seconds any wait in these tests may take


@pytest.fixture
def mq():
    with Mosquitto() as broker:
        yield broker


@pytest.fixture
def bundles(tmp_path):
    return [make_bundle(tmp_path / "b", "float.tflite", "tiny-fp32", "fp32"),
            make_bundle(tmp_path / "b", "int8_io.tflite", "tiny-int8-io", "int8-io")]


class AgentProc:
    """`edgerun agent --broker` in its own process, state and store."""

    def __init__(self, tmp: Path, url: str, name: str, *tags: str):
        self.dir = tmp / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.url, self.name, self.tags, self.proc = url, name, tags, None
        self.log = self.dir / "agent.log"

    def start(self) -> "AgentProc":
        env = dict(os.environ, EDGERUN_STATE=str(self.dir / "state"), EDGERUN_STORE=str(self.dir / "store"))
        args = [EDGERUN, "agent", "--broker", self.url, "--name", self.name]
        for t in self.tags:
            args += ["--tag", t]
        self.proc = subprocess.Popen(args, env=env, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    @property
    def id(self) -> str:
        return json.loads((self.dir / "state" / "identity.json").read_text())["id"]

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # the agent and its job worker: a board losing power
        self.proc.wait(15)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def agents(tmp_path):
    started = []

    def start(url, name, *tags):
        a = AgentProc(tmp_path / "agents", url, name, *tags).start()
        started.append(a)
        return a
    yield start
    for a in started:
        a.stop()


def wait_online(url: str, names: set, timeout: float = BOUND) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {d.name: d for d in discover(parse_broker(url), quiet=0.2)}
        if all(n in found and found[n].online for n in names):
            return found
        time.sleep(0.3)
    raise AssertionError(f"agents {names} did not come online: {found}")


def report_ids(db: Path) -> list:
    with Store(db) as s:
        return [r["id"] for r in s.query()]


class Bench(threading.Thread):
    """A BrokerBench run in the background; ``events`` records (device, bundle, stage, detail)."""

    def __init__(self, url: str, packed: list, wanted: list, settings: list, store=None, **kw):
        super().__init__(daemon=True)
        self.events, self.result = [], None
        self.bench = BrokerBench(parse_broker(url), store=store, on_event=lambda *e: self.events.append(e), **kw)
        self.args = (packed, wanted, settings)

    def run(self):
        self.result = self.bench.run(*self.args)

    def wait_for(self, pred, timeout: float = BOUND):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(pred(e) for e in list(self.events)):
                return
            time.sleep(0.05)
        raise AssertionError(f"no such event within {timeout} s: {self.events}")

    def finish(self, timeout: float = BOUND):
        self.join(timeout)
        assert not self.is_alive(), f"bench still running: {self.events[-5:]}"
        return self.result


# --------------------------------------------------------------------------- the happy path


def test_bench_devices_and_serve_over_the_broker(mq, agents, bundles, tmp_path):
    a, b = agents(mq.url, "pi-a", "lab"), agents(mq.url, "pi-b", "lab", "coral")
    wait_online(mq.url, {"pi-a", "pi-b"})
    run = CliRunner()
    res = run.invoke(edgepipe, ["devices", "--broker", mq.url])
    assert res.exit_code == 0, res.output
    assert "pi-a" in res.output and "pi-b" in res.output and "coral,lab" in res.output
    assert res.output.count("online") >= 2 and socket.gethostname() in res.output

    db = tmp_path / "results.db"
    collector_db = tmp_path / "collector.db"
    coll_store = Store(collector_db)
    collector = BrokerCollector(parse_broker(mq.url), coll_store)
    collector.start()
    try:
        res = run.invoke(edgepipe, ["bench", *map(str, bundles), "--broker", mq.url, "--devices", "tag:lab",
                                    "--runs", "3", "--db", str(db)])
        assert res.exit_code == 0, res.output
        assert "4/4 jobs succeeded on 2 device(s)" in res.output
        assert "tiny-fp32" in res.output and "tiny-int8-io" in res.output
        ids = report_ids(db)
        assert len(ids) == 4 == len(set(ids))
        with Store(db) as s:
            devs = {r["device"]["id"] for r in s.query()}
        assert devs == {a.id, b.id}  # one device per agent, by id (both share this hostname)
        deadline = time.monotonic() + BOUND
        while collector.stats.stored < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(r["id"] for r in coll_store.query()) == sorted(ids)
    finally:
        collector.close()
        coll_store.close()

    res = run.invoke(edgepipe, ["bench", str(bundles[0]), "--broker", mq.url, "--devices", "pi-a,nope",
                                "--no-db", "--json"])
    assert res.exit_code == 1
    out = json.loads(res.stdout)
    by_dev = {o["device"]: o for o in out["outcomes"]}
    assert by_dev["pi-a"]["status"] == "ok" and by_dev["nope"]["status"] == "skipped"
    assert "no such device" in by_dev["nope"]["error"]

    b.stop()
    res = run.invoke(edgepipe, ["devices", "--broker", mq.url, "--json"])
    state = {d["name"]: d["online"] for d in json.loads(res.stdout)["devices"]}
    assert state == {"pi-a": True, "pi-b": False}


def test_collector_stores_a_redelivered_report_once(mq, bundles, tmp_path):
    from edgepipe.device.mqtt import Connection, dumps

    rep = json.loads(subprocess.run([EDGERUN, "bench", str(bundles[0]), "--runs", "2", "--json"],
                                    capture_output=True, check=True, timeout=BOUND).stdout)
    store = Store(tmp_path / "c.db")
    coll = BrokerCollector(parse_broker(mq.url), store)
    coll.start()
    pub = Connection(parse_broker(mq.url), "pub", session_expiry=0)
    pub.start()
    try:
        for payload in (dumps(rep), dumps(rep), b"{not json", dumps({"id": "x"})):
            pub.publish("edgepipe/reports", payload).wait_for_publish(10)
        deadline = time.monotonic() + BOUND
        while coll.stats.stored + coll.stats.duplicates + coll.stats.refused < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (coll.stats.stored, coll.stats.duplicates, coll.stats.refused) == (1, 1, 2)
        assert store.count() == 1
    finally:
        pub.stop(end_session=True)
        coll.close()
        store.close()


def test_credentials_are_required(mq, tmp_path):
    env = dict(os.environ, EDGERUN_STATE=str(tmp_path / "s"), EDGERUN_STORE=str(tmp_path / "st"))
    res = subprocess.run([EDGERUN, "agent", "--broker", mq.anonymous_url], env=env, capture_output=True,
                         text=True, timeout=BOUND)
    assert res.returncode == 1 and "Not authorized" in res.stderr and "Traceback" not in res.stderr
    res = subprocess.run([EDGERUN, "agent", "--broker", "mqtt://broker.example:1883"], env=env,
                         capture_output=True, text=True, timeout=BOUND)
    assert res.returncode == 2 and "without credentials" in res.stderr


def test_large_bundles_are_fetched_over_http_and_checked(mq, agents, bundles, monkeypatch, tmp_path):
    import edgepipe.pipeline.fleet_broker as fb

    agents(mq.url, "pi-a")
    wait_online(mq.url, {"pi-a"})
    monkeypatch.setattr(fb, "INLINE_LIMIT", 0)  # every bundle "too large" for a message
    good, bad = pack_bundle(bundles[0]), pack_bundle(bundles[1])
    server = BundleServer()
    server.start_background()
    real_add = server.add
    # The second bundle is served with the first one's bytes: the board must refuse it.
    server.add = lambda sha, data: real_add(sha, good.data)
    try:
        bench = Bench(mq.url, [good, bad], ["pi-a"], [{"runs": 2}], bundle_server=server, job_timeout=60)
        bench.start()
        res = bench.finish()
    finally:
        server.close()
    st = {o.bundle: o for o in res.outcomes}
    assert st["tiny-fp32"].status == "ok"
    assert st["tiny-int8-io"].status == "refused" and "digest mismatch" in st["tiny-int8-io"].error


# --------------------------------------------------------------------------- faults


class Proxy:
    """A loopback TCP proxy whose connections can be cut (the host losing its network)."""

    def __init__(self, port: int):
        self.target, self.cut_off, self.conns = port, threading.Event(), []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            if self.cut_off.is_set():
                c.close()
                continue
            u = socket.create_connection(("127.0.0.1", self.target))
            self.conns += [c, u]
            for x, y in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(x, y), daemon=True).start()

    @staticmethod
    def _pipe(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self):
        self.cut_off.set()
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def restore(self):
        self.cut_off.clear()

    def close(self):
        self.cut()
        self.sock.close()


def _jobs(bundles, n_settings: int, min_secs: float) -> tuple:
    packed = [pack_bundle(b) for b in bundles]
    settings = [{"runs": 2, "min_secs": min_secs, "seed": i} for i in range(n_settings)]
    return packed, settings


@pytest.mark.slow
def test_broker_killed_and_restarted_mid_run(mq, agents, bundles, tmp_path):
    agents(mq.url, "pi-a"), agents(mq.url, "pi-b")
    wait_online(mq.url, {"pi-a", "pi-b"})
    packed, settings = _jobs(bundles, 3, 0.5)
    db = tmp_path / "r.db"
    with Store(db) as store:
        bench = Bench(mq.url, packed, ["all"], settings, store=store, job_timeout=BOUND, offline_grace=BOUND)
        bench.start()
        bench.wait_for(lambda e: e[2] == "done")
        mq.kill()  # SIGKILL: sessions, queued messages and retained statuses since the last save are gone
        time.sleep(1.5)
        mq.start()
        res = bench.finish()
    assert res.ok, [(o.device, o.bundle, o.error) for o in res.failed()]
    ids = report_ids(db)
    assert len(ids) == len(res.outcomes) == 12 and len(set(ids)) == 12


@pytest.mark.slow
def test_agent_killed_mid_job_fails_only_its_jobs(mq, agents, bundles, tmp_path):
    dead = agents(mq.url, "pi-dead")
    agents(mq.url, "pi-alive")
    wait_online(mq.url, {"pi-dead", "pi-alive"})
    packed, settings = _jobs(bundles[:1], 3, 1.5)
    db = tmp_path / "r.db"
    with Store(db) as store:
        bench = Bench(mq.url, packed, ["all"], settings, store=store, job_timeout=BOUND, offline_grace=2)
        bench.start()
        bench.wait_for(lambda e: e[0] == "pi-dead" and e[2] == "running")
        dead.kill()
        res = bench.finish()
    by = {}
    for o in res.outcomes:
        by.setdefault(o.device, []).append(o)
    assert [o.status for o in by["pi-alive"]] == ["ok"] * 3
    assert all(o.status == "failed" and "went offline" in o.error for o in by["pi-dead"])
    assert len(report_ids(db)) == 3


@pytest.mark.slow
def test_agent_restarted_mid_job_fails_the_running_job_and_runs_the_rest(mq, agents, bundles, tmp_path):
    a = agents(mq.url, "pi-a")
    wait_online(mq.url, {"pi-a"})
    packed, settings = _jobs(bundles[:1], 3, 1.5)
    db = tmp_path / "r.db"
    with Store(db) as store:
        bench = Bench(mq.url, packed, ["pi-a"], settings, store=store, job_timeout=BOUND, offline_grace=BOUND)
        bench.start()
        bench.wait_for(lambda e: e[0] == "pi-a" and e[2] == "running")
        a.kill()
        a.start()
        res = bench.finish()
    st = [o.status for o in res.outcomes]
    assert st[0] == "failed" and "restarted while the job was running" in res.outcomes[0].error
    assert st[1:] == ["ok", "ok"], [(o.status, o.error) for o in res.outcomes]
    ids = report_ids(db)
    assert len(ids) == 2 == len(set(ids))


@pytest.mark.slow
def test_host_disconnected_mid_run(mq, agents, bundles, tmp_path):
    agents(mq.url, "pi-a"), agents(mq.url, "pi-b")
    wait_online(mq.url, {"pi-a", "pi-b"})
    proxy = Proxy(mq.port)
    packed, settings = _jobs(bundles, 2, 0.5)
    db = tmp_path / "r.db"
    try:
        with Store(db) as store:
            url = mq.url.replace(f":{mq.port}", f":{proxy.port}")
            bench = Bench(url, packed, ["all"], settings, store=store, job_timeout=BOUND, offline_grace=BOUND)
            bench.start()
            bench.wait_for(lambda e: e[2] == "done")
            proxy.cut()
            time.sleep(3)  # results keep arriving at the broker, held in the host's session
            proxy.restore()
            res = bench.finish()
    finally:
        proxy.close()
    assert res.ok, [(o.device, o.bundle, o.error) for o in res.failed()]
    ids = report_ids(db)
    assert len(ids) == 8 == len(set(ids))
