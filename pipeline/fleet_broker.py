"""`edgepipe bench --broker`: bench bundles on boards that dial out to an MQTT broker.

The same outcomes as the HTTP path (:class:`edgepipe.pipeline.fleet.Outcome`),
so the CLI prints the same table, warnings and exit code.

How a run goes: pick the boards from their retained status (``all``, ids or
names, ``tag:T``); publish jobs (QoS 1, message expiry) to each board's jobs
topic, at most :data:`WINDOW` unfinished per board so one job always waits
behind the running one; read final results from the boards' events topics.
The host picks every job id, and boards treat a job they already know as a
question about it, so after anything that may have lost messages (the host
reconnected, a board came back online) every unfinished job is simply sent
again. A board that stays offline for ``offline_grace`` seconds has its
unfinished jobs failed; a job that outlives ``job_timeout`` fails as timed out.
One thread owns all state; paho's thread only queues messages.
"""
from __future__ import annotations

import base64
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from edgepipe.device.mqtt import SAFE_MESSAGE, Broker, BrokerError, Connection, Topics, dumps, loads
from edgepipe.pipeline.broker import MAX_SETTLE, SETTLE, BundleServer, Roster
from edgepipe.pipeline.fleet import FleetResult, Outcome, Status, expand_settings, setting_label
from edgepipe.pipeline.reporting import fmt

WINDOW = 2
INLINE_LIMIT = (SAFE_MESSAGE * 3) // 4 - 4096  # base64 grows by 4/3; room for the rest of the message
OFFLINE_GRACE = 30.0
Event = Callable[[str, str, str, str], None]  # (device, bundle, stage, detail), as in fleet


@dataclass
class _Ticket:
    id: str
    device: str
    outcome: Outcome
    message: bytes
    sha256: str
    name: str
    sent: Optional[float] = None
    deadline: Optional[float] = None
    done: bool = False


def select(devices: list, wanted: list) -> tuple:
    """``(chosen DeviceStatus list, [(label, reason)] for names that cannot be used)``.

    ``all`` = every online board; ``tag:T`` = online boards tagged T; anything
    else is a device id or a name (an offline one is reported, not used).
    """
    chosen, problems, seen = [], [], set()

    def take(d):
        if d.id not in seen:
            seen.add(d.id)
            chosen.append(d)

    for w in wanted:
        if w == "all" or w.startswith("tag:"):
            tag = None if w == "all" else w[4:]
            hits = [d for d in devices if d.online and (tag is None or tag in d.tags)]
            if not hits:
                problems.append((w, "no online board matches"))
            for d in hits:
                take(d)
            continue
        device, problem = _named(devices, w)
        if problem:
            problems.append(problem)
        else:
            take(device)
    return chosen, problems


def _named(devices: list, w: str) -> tuple:
    """(the online board with id or name ``w``, None), or (None, (label, why it cannot be used))."""
    hits = [d for d in devices if d.id == w] or [d for d in devices if d.name == w]
    if not hits:
        return None, (w, "no such device on the broker")
    if len(hits) > 1:
        return None, (w, f"{len(hits)} boards are named {w!r}; use the device id")
    if not hits[0].online:
        return None, (hits[0].label, f"device offline (last seen {hits[0].last_seen or 'never'})")
    return hits[0], None


class BrokerBench:
    """One `edgepipe bench --broker` run (see the module docstring)."""

    def __init__(self, broker: Broker, *, store=None, job_timeout: float = 1800.0,
                 offline_grace: float = OFFLINE_GRACE, bundle_server: Optional[BundleServer] = None,
                 on_event: Optional[Event] = None, session_expiry: Optional[int] = None):
        from edgepipe.device.contracts import report_problem

        self.broker, self.store, self.job_timeout = broker, store, float(job_timeout)
        self.offline_grace, self.bundle_server = float(offline_grace), bundle_server
        self.emit = on_event or (lambda *a: None)
        self.validate = report_problem
        self.topics = Topics(broker.prefix)
        self.roster = Roster(self.topics)
        self._inbox: "queue.Queue" = queue.Queue()
        self._subscribed = threading.Event()
        self._tickets: dict = {}
        self._by_device: dict = {}  # device id -> [ticket ids] in order
        self._offline_since: dict = {}
        self._targets: list = []
        expiry = session_expiry or int(job_timeout + 3600)
        self.conn = Connection(broker, f"edgepipe-bench-{uuid.uuid4().hex[:12]}", session_expiry=expiry,
                               on_connect=self._on_connect, on_message=self._on_message)
        self.conn.client.on_subscribe = lambda *a: self._subscribed.set()

    # -- paho's thread: only queue -------------------------------------------
    def _on_connect(self, conn: Connection) -> None:
        subs = [(self.topics.every("status"), 1), (self.topics.every("seen"), 0)]
        subs += [(self.topics.events(d), 1) for d in self._targets]
        conn.client.subscribe(subs)
        self._inbox.put(("connected", None, None))

    def _on_message(self, msg) -> None:
        self._inbox.put(("message", msg.topic, msg.payload))

    # -- the run ---------------------------------------------------------------
    def run(self, packed: list, wanted: list, settings: Optional[list] = None) -> FleetResult:
        """Bench every ``PackedBundle`` x setting on the selected boards; never raises for a board's failure."""
        settings = settings or expand_settings(None)
        self.conn.start()
        try:
            self._settle()
            chosen, problems = select(self.roster.devices(), wanted)
            result = FleetResult()
            for label, reason in problems:
                self.emit(label, "-", "down", reason)
                for i, (pb, st) in enumerate((pb, st) for pb in packed for st in settings):
                    result.outcomes.append(Outcome(label, pb.name, pb.recipe, Status.SKIPPED.value, error=reason,
                                                   index=i, setting=st))
            if not chosen:
                return result
            self._targets = [d.id for d in chosen]
            self._subscribed.clear()
            self.conn.client.subscribe([(self.topics.events(d), 1) for d in self._targets])
            self._subscribed.wait(10)
            self._plan(chosen, packed, settings)
            self._loop()
            result.outcomes += [self._tickets[i].outcome for d in chosen for i in self._by_device[d.id]]
            return result
        finally:
            self.conn.stop(end_session=True)

    def _settle(self) -> None:
        """Read the burst of retained statuses that follows the subscription."""
        end = time.monotonic() + MAX_SETTLE
        self._subscribed.wait(MAX_SETTLE)
        start = time.monotonic()
        while time.monotonic() < end and time.monotonic() - max(self.roster.last_change, start) < SETTLE:
            self._drain(0.05)

    def _plan(self, chosen: list, packed: list, settings: list) -> None:
        jobs = [(pb, st) for pb in packed for st in settings]
        for d in chosen:
            ids = []
            for n, (pb, st) in enumerate(jobs):
                tid = str(uuid.uuid4())
                o = Outcome(d.label, pb.name, pb.recipe, "failed", index=n, setting=st)
                name = f"{pb.name} {setting_label(st) if len(settings) > 1 else ''}".strip()
                self._tickets[tid] = _Ticket(tid, d.id, o, self._message(tid, pb, st), pb.sha256, name)
                ids.append(tid)
            self._by_device[d.id] = ids

    def _message(self, tid: str, pb, setting: dict) -> bytes:
        doc = {"schema": "edgepipe.job/1", "id": tid, "op": "submit",
               "job": {"kind": "bench", "bundle": pb.sha256, **setting}}
        if len(pb.data) <= INLINE_LIMIT:
            doc["inline"] = base64.b64encode(pb.data).decode("ascii")
        elif self.bundle_server is not None:
            doc["fetch"] = {"url": self.bundle_server.add(pb.sha256, pb.data),
                            "token": self.bundle_server.token_value}
        else:
            raise BrokerError(f"bundle {pb.name} ({len(pb.data)} bytes) is too large for a message and no "
                              "bundle server was given")
        return dumps(doc)

    def _loop(self) -> None:
        for dev in self._by_device:
            self._top_up(dev)
        while not all(t.done for t in self._tickets.values()):
            self._drain(0.2)
            self._check_time()

    def _drain(self, wait: float) -> None:
        try:
            item = self._inbox.get(timeout=wait) if wait else self._inbox.get_nowait()
        except queue.Empty:
            return
        while item is not None:
            kind, topic, payload = item
            if kind == "connected":
                self._resend_all()
            else:
                self._handle(topic, payload)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                item = None

    # -- sending ---------------------------------------------------------------
    def _publish(self, t: _Ticket) -> None:
        expiry = int(self.job_timeout + self.offline_grace + 60)
        self.conn.publish(self.topics.jobs(t.device), t.message, qos=1, expiry=expiry)
        if t.sent is None:
            t.sent = time.monotonic()
            t.deadline = t.sent + self.job_timeout
            self.emit(t.outcome.device, t.name, "queued", "")

    def _top_up(self, dev: str) -> None:
        """Keep WINDOW unfinished jobs sent to ``dev``."""
        ids = self._by_device.get(dev, [])
        live = sum(1 for i in ids if self._tickets[i].sent is not None and not self._tickets[i].done)
        for i in ids:
            if live >= WINDOW:
                return
            t = self._tickets[i]
            if t.sent is None and not t.done:
                self._publish(t)
                live += 1

    def _resend_all(self, dev: Optional[str] = None) -> None:
        """Send unfinished jobs again: the boards answer for those they have, run those they lost."""
        for t in self._tickets.values():
            if t.sent is not None and not t.done and (dev is None or t.device == dev):
                self._publish(t)

    # -- receiving -------------------------------------------------------------
    def _handle(self, topic: str, payload: bytes) -> None:
        leaf = topic.rsplit("/", 1)[-1]
        if leaf in ("status", "seen"):
            before = self.roster.get(self.topics.device_of(topic) or "")
            now = self.roster.feed(topic, payload)
            if now is not None and now.id in self._by_device and leaf == "status":
                self._presence(before, now)
            return
        if leaf != "events":
            return
        try:
            doc = loads(payload, "event")
        except BrokerError:
            return
        t = self._tickets.get(doc.get("job")) if isinstance(doc, dict) else None
        if t is None or t.done or t.device != self.topics.device_of(topic):
            return
        status = doc.get("status")
        if status in ("queued", "running"):
            if status == "running":
                t.deadline = time.monotonic() + self.job_timeout
                self.emit(t.outcome.device, t.name, "running", str(doc.get("stage") or ""))
            return
        self._final(t, doc)

    def _presence(self, before, now) -> None:
        if not now.online:
            self._offline_since.setdefault(now.id, time.monotonic())
            self.emit(now.label, "-", "offline", "waiting for it to come back")
            return
        was_offline = self._offline_since.pop(now.id, None) is not None
        if was_offline or (before is not None and before.since != now.since):
            self.emit(now.label, "-", "online", "sending its unfinished jobs again")
            self._resend_all(now.id)

    def _final(self, t: _Ticket, doc: dict) -> None:
        o = t.outcome
        if doc.get("status") == "done":
            rep = doc.get("report")
            reason = self.validate(rep) if isinstance(rep, dict) else "no report in the job result"
            if reason:
                o.error = f"invalid report from the agent: {reason}"
            else:
                o.report, o.status = rep, "ok"
                o.stored = self._store(rep, o)
        else:
            o.error = doc.get("error") or f"job ended as {doc.get('status')}"
            o.crash = doc.get("crash") if isinstance(doc.get("crash"), dict) else None
            if doc.get("status") == "refused":
                o.status = Status.REFUSED.value
        self._close(t)

    def _store(self, rep: dict, o: Outcome) -> Optional[bool]:
        if self.store is None:
            return None
        from edgepipe.pipeline.store import StoreError

        try:
            return self.store.add(rep)
        except StoreError as e:  # the measurement stands; say it was not kept
            o.error = f"report not stored: {e}"
            return None

    def _close(self, t: _Ticket) -> None:
        t.done = True
        o = t.outcome
        if o.status == "ok":
            p50 = ((o.report or {}).get("latency_ms") or {}).get("p50")
            self.emit(o.device, t.name, "done", f"p50 {fmt(p50)} ms" if isinstance(p50, (int, float)) else "")
        else:
            self.emit(o.device, t.name, "failed", o.error or "")
        self._top_up(t.device)

    def _check_time(self) -> None:
        now = time.monotonic()
        for t in self._tickets.values():
            if t.done:
                continue
            gone = self._offline_since.get(t.device)
            if gone is not None and now - gone > self.offline_grace:
                t.outcome.error = (f"device went offline and did not come back within {self.offline_grace:g} s "
                                   "(agent stopped or lost its connection)")
                self._close(t)
            elif t.deadline is not None and now > t.deadline:
                t.outcome.error = f"timed out: no result within {self.job_timeout:g} s"
                self._close(t)


def bench_broker(packed: list, broker: Broker, wanted: list, *, settings: Optional[list] = None, store=None,
                 job_timeout: float = 1800.0, offline_grace: float = OFFLINE_GRACE,
                 bundle_server: Optional[BundleServer] = None, on_event: Optional[Event] = None) -> FleetResult:
    """Bench every ``PackedBundle`` x setting on the boards ``wanted`` selects (see :func:`select`)."""
    return BrokerBench(broker, store=store, job_timeout=job_timeout, offline_grace=offline_grace,
                       bundle_server=bundle_server, on_event=on_event).run(packed, wanted, settings)


__all__ = ["BrokerBench", "INLINE_LIMIT", "bench_broker", "select"]
