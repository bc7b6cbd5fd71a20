"""`edgerun agent --broker`: the MQTT front end of the device's job core.

The board dials out to the broker (it may sit behind NAT), announces itself on
its retained status topic (the last will marks it offline), takes jobs from
``…/devices/{id}/jobs`` and answers on ``…/events``; reports also go to
``{prefix}/reports`` for collectors (topics: :mod:`edgepipe.device.mqtt`).

Delivery. Job messages are QoS 1 on a persistent session and acknowledged only
once the job is in the core's journal (or refused), so a job survives a broker
or agent restart. The host picks the job id and submitting is idempotent on it:
a job sent again (after any reconnection the host re-sends what is unfinished)
is answered with its current state instead of running twice. Final results and
reports wait in an on-disk outbox until the broker acknowledges them, so they
survive an agent restart; collectors store a report once per id.

Bundles ride inside the job message when small (base64); larger ones are
fetched over HTTP from the URL in the job and checked against their sha256 by
the bundle store, as an HTTP upload would be.
"""
from __future__ import annotations

import base64
import binascii
import datetime as _dt
import io
import json
import os
import queue
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, Optional

from edgepipe.device.bundle_store import UploadError, check_digest
from edgepipe.device.errors import EdgepipeError, one_line
from edgepipe.device.identity import DeviceIdentity
from edgepipe.device.jobs import Job, JobCore, JobRefused, parse_job
from edgepipe.device.mqtt import Broker, BrokerError, Connection, Topics, dumps, loads

SESSION_EXPIRY = 7 * 86400  # jobs wait this long at the broker for a board that is away
HEARTBEAT = 30.0
FETCH_TIMEOUT = 300.0
JOB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{7,127}$")
STATE_DIR = ".mqtt"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="milliseconds")


class Outbox:
    """Messages that must reach the broker, one file each, removed once it acknowledged them."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.glob(".*.tmp"):
            p.unlink(missing_ok=True)

    def put(self, topic: str, doc: dict) -> str:
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps({"topic": topic, "doc": doc}, separators=(",", ":")), "utf-8")
        os.replace(tmp, self.dir / name)
        return name

    def pending(self) -> list:
        """``[(name, topic, payload bytes)]`` oldest first; unreadable entries are dropped."""
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                entry = json.loads(p.read_text("utf-8"))
                out.append((p.name, entry["topic"], dumps(entry["doc"])))
            except (OSError, ValueError, KeyError, TypeError) as e:
                print(f"agent: dropping unreadable outbox entry {p.name}: {e}", file=sys.stderr)
                p.unlink(missing_ok=True)
        return out

    def done(self, name: str) -> None:
        (self.dir / name).unlink(missing_ok=True)


class Ledger:
    """Which core jobs came through the broker, and whether their final result is in the outbox."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def mark(self, job_id: str, state: str) -> None:
        (self.dir / job_id).write_text(state, "utf-8")

    def state(self, job_id: str) -> Optional[str]:
        try:
            return (self.dir / job_id).read_text("utf-8")
        except OSError:
            return None

    def forget(self, job_id: str) -> None:
        (self.dir / job_id).unlink(missing_ok=True)

    def prune(self, known: set) -> None:
        for p in self.dir.iterdir():
            if p.name not in known:
                p.unlink(missing_ok=True)


class MqttAgent:
    """Maps the broker onto a :class:`JobCore`.

    Build it first, pass :meth:`job_changed` as the core's ``on_change``, then
    :meth:`attach` the core and :meth:`start`.
    """

    def __init__(self, broker: Broker, identity: DeviceIdentity, state_dir: Path, *,
                 info: Optional[Callable[[], dict]] = None, session_expiry: int = SESSION_EXPIRY,
                 heartbeat: float = HEARTBEAT, fetch_timeout: float = FETCH_TIMEOUT):
        self.broker, self.identity = broker, identity
        self.topics = Topics(broker.prefix)
        self.info, self.heartbeat, self.fetch_timeout = info, heartbeat, fetch_timeout
        self.session_expiry = session_expiry
        root = Path(state_dir) / STATE_DIR
        self.outbox, self.ledger = Outbox(root / "outbox"), Ledger(root / "jobs")
        self.core: Optional[JobCore] = None
        self.conn: Optional[Connection] = None
        self._intake: "queue.Queue" = queue.Queue()
        self._inflight: dict = {}  # paho mid -> outbox entry name
        self._sent: set = set()  # outbox entries handed to paho (it re-sends them after reconnecting)
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._acked_early: set = set()
        self._stop = threading.Event()
        self._threads: list = []

    # -- wiring ------------------------------------------------------------
    def attach(self, core: JobCore) -> None:
        self.core = core

    def start(self) -> None:
        """Connect (one-line :class:`BrokerError` when it cannot), announce, take jobs."""
        assert self.core is not None, "attach() the job core first"
        self._recover_results()
        will = (self.topics.status(self.identity.id), dumps(self._status(online=False)))
        self.conn = Connection(self.broker, f"edgerun-{self.identity.id}", session_expiry=self.session_expiry,
                               on_connect=self._on_connect, on_message=self._on_message, will=will,
                               manual_ack=True)
        self.conn.client.on_publish = self._on_publish
        self.conn.start()
        for target, name in ((self._intake_loop, "edgerun-mqtt-intake"), (self._heartbeat_loop, "edgerun-mqtt-seen")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def close(self) -> None:
        """Say offline (retained), flush what paho holds, disconnect keeping the session."""
        self._stop.set()
        self._intake.put(None)
        if self.conn is None:
            return
        try:
            info = self._send(self.topics.status(self.identity.id), dumps(self._status(online=False)), qos=1,
                              retain=True)
            info.wait_for_publish(3)
        except (RuntimeError, ValueError, OSError):
            pass  # not connected: the broker publishes the last will instead
        deadline = time.monotonic() + 3
        while any(self._inflight.values()) and self.conn.connected.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.conn.stop()
        for t in self._threads:
            t.join(5)

    # -- announcing --------------------------------------------------------
    def _status(self, online: bool) -> dict:
        base = {}
        if self.info is not None:
            try:
                base = dict(self.info())
            except Exception as e:  # never fail to announce; say why the details are missing
                base = {"error": f"{type(e).__name__}: {one_line(e)}"}
        delegates = base.get("delegates") or {}
        doc = {k: base.get(k) for k in ("hostname", "board", "cpu", "machine", "cores", "os", "python", "edgerun")}
        doc.update({"schema": "edgepipe.status/1", **self.identity.to_dict(), "online": online,
                    "since": _now(), "runtimes": base.get("backends") or [],
                    "delegates": sorted(k for k, v in delegates.items() if isinstance(v, dict) and v.get("available"))})
        return doc

    def _on_connect(self, conn: Connection) -> None:
        me = self.identity.id
        conn.client.subscribe(self.topics.jobs(me), qos=1)
        self._send(self.topics.status(me), dumps(self._status(online=True)), qos=1, retain=True)
        self._publish_seen()
        threading.Thread(target=self._flush_outbox, name="edgerun-mqtt-flush", daemon=True).start()

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat):
            self._publish_seen()

    def _publish_seen(self) -> None:
        if self.conn is not None and self.conn.connected.is_set():
            queued = self.core.queued() if self.core is not None else 0
            self._send(self.topics.seen(self.identity.id), dumps({"at": _now(), "queued": queued}), qos=0,
                       retain=True)

    # -- results -------------------------------------------------------------
    def job_changed(self, job: Job) -> None:
        """The core's ``on_change``: progress as QoS 0 events, final results through the outbox."""
        if self.ledger.state(job.id) is None:
            return  # not a broker job (e.g. accepted by the HTTP front end earlier)
        if not job.status.final:
            self._event(job, qos=0)
            return
        self._finalize(job, with_report=True)
        self._flush_outbox()

    def _finalize(self, job: Job, *, with_report: bool) -> None:
        doc = {"job": job.id, "device": self.identity.id, "status": job.status.value, "error": job.error,
               "crash": job.crash, "finished_at": job.finished_at, "report": job.report}
        self.outbox.put(self.topics.events(self.identity.id), doc)
        if with_report and job.report is not None:
            self.outbox.put(self.topics.reports, job.report)
        self.ledger.mark(job.id, "final")

    def _recover_results(self) -> None:
        """Final results the last run could not hand to the outbox (it stopped first)."""
        jobs = self.core.list()
        for job in jobs:
            if job.status.final and self.ledger.state(job.id) == "accepted":
                self._finalize(job, with_report=True)
        self.ledger.prune({j.id for j in jobs})

    def _event(self, job: Job, *, qos: int) -> None:
        if self.conn is None or not self.conn.connected.is_set():
            return
        doc = {"job": job.id, "device": self.identity.id, "status": job.status.value, "stage": job.stage}
        self._send(self.topics.events(self.identity.id), dumps(doc), qos=qos)

    def _flush_outbox(self) -> None:
        if self.conn is None or not self.conn.connected.is_set():
            return
        with self._flush_lock:  # one flusher at a time, so an entry is handed to paho once
            for name, topic, payload in self.outbox.pending():
                with self._lock:
                    if name in self._sent:
                        continue
                    self._sent.add(name)
                self._send(topic, payload, qos=1, entry=name)

    def _send(self, topic: str, payload: bytes, *, qos: int, retain: bool = False, entry: Optional[str] = None):
        """Publish, noting the mid so the broker's answer can be matched (``entry``: an outbox file)."""
        # Never publish under self._lock: paho calls on_publish holding its own
        # message lock, and on_publish takes self._lock.
        info = self.conn.publish(topic, payload, qos=qos, retain=retain)
        with self._lock:
            if info.mid in self._acked_early:  # answered before we noted the mid
                self._acked_early.discard(info.mid)
                self._settle(entry)
            else:
                self._inflight[info.mid] = entry
        return info

    def _settle(self, entry: Optional[str]) -> None:
        if entry is not None:
            self._sent.discard(entry)
            self.outbox.done(entry)

    def _on_publish(self, client, userdata, mid, reason_code, props) -> None:
        with self._lock:
            if mid in self._inflight:
                self._settle(self._inflight.pop(mid))
            else:
                self._acked_early.add(mid)

    # -- jobs ----------------------------------------------------------------
    def _on_message(self, msg) -> None:
        # paho's network thread must not wait for a bundle download: queue it.
        self._intake.put((msg.payload, msg.mid, msg.qos, self.conn.generation))

    def _intake_loop(self) -> None:
        while True:
            item = self._intake.get()
            if item is None:
                return
            payload, mid, qos, generation = item
            try:
                self._handle(payload)
            except Exception as e:  # a bug must not stop the intake: say so, drop the message
                print(f"agent: job message failed: {type(e).__name__}: {one_line(e)}", file=sys.stderr)
            if self.conn.generation == generation and self.conn.connected.is_set():
                self.conn.client.ack(mid, qos)  # after the journal has it: a crash before means redelivery

    def _handle(self, payload: bytes) -> None:
        job_id = None
        try:
            doc = loads(payload, "job message")
            job_id = doc.get("id") if isinstance(doc, dict) else None
            if not isinstance(job_id, str) or not JOB_ID_RE.match(job_id):
                raise BrokerError("a job message needs an id (8-128 letters, digits, _.:-)")
            if doc.get("op", "submit") == "cancel":
                self._cancel(job_id)
                return
            known = self.core.get(job_id)
            if known is not None:
                self._answer_known(known)
                return
            spec = parse_job(doc.get("job"))
            self._ensure_bundle(spec.bundle, doc)
            self.ledger.mark(job_id, "accepted")
            try:
                self.core.submit(spec, job_id=job_id)
            except BaseException:
                self.ledger.forget(job_id)
                raise
        except (EdgepipeError, OSError) as e:
            reason = e.reason if isinstance(e, (JobRefused, UploadError)) else one_line(e)
            print(f"agent: refused job {job_id or '(no id)'}: {reason}", file=sys.stderr)
            if job_id is not None and self.conn is not None:
                doc = {"job": job_id, "device": self.identity.id, "status": "refused", "error": reason}
                self._send(self.topics.events(self.identity.id), dumps(doc), qos=1)

    def _answer_known(self, job: Job) -> None:
        """A job sent again: its final result again (not to the reports topic), or where it is."""
        if job.status.final:
            self._finalize(job, with_report=False)
            self._flush_outbox()
        else:
            self._event(job, qos=1)

    def _cancel(self, job_id: str) -> None:
        try:
            self.core.cancel(job_id, wait=0)
        except JobRefused:
            pass  # unknown or already finished: nothing to stop

    def _ensure_bundle(self, sha: str, doc: dict) -> None:
        store = self.core.store
        if store.has(check_digest(sha)):
            store.touch(sha)
            return
        inline, fetch = doc.get("inline"), doc.get("fetch")
        if isinstance(inline, str):
            try:
                data = base64.b64decode(inline, validate=True)
            except (binascii.Error, ValueError):
                raise BrokerError("the job's inline bundle is not base64") from None
            store.put(sha, io.BytesIO(data), len(data))
        elif isinstance(fetch, dict) and isinstance(fetch.get("url"), str):
            self._fetch(sha, fetch["url"], fetch.get("token"))
        else:
            raise BrokerError(f"bundle {sha[:12]} is not on this device and the job says neither "
                              "inline nor fetch")

    def _fetch(self, sha: str, url: str, token: Optional[str]) -> None:
        """Download a bundle tar; the store checks its size and sha256 before keeping it."""
        if not url.startswith(("http://", "https://")):
            raise BrokerError("a bundle URL must be http(s)")
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
        store = self.core.store
        try:
            with urllib.request.urlopen(req, timeout=self.fetch_timeout) as resp:
                length = int(resp.headers.get("Content-Length") or -1)
                if length < 0:
                    raise BrokerError(f"bundle download from {url} has no Content-Length")
                store.put(sha, resp, length)
        except urllib.error.HTTPError as e:
            raise BrokerError(f"bundle download from {url} failed: HTTP {e.code}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise BrokerError(f"bundle download from {url} failed: {getattr(e, 'reason', None) or e}") from None


__all__ = ["MqttAgent", "Outbox", "Ledger", "SESSION_EXPIRY"]
