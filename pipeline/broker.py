"""The host's side of the broker: who is there, bundles over HTTP, reports into the store.

- :func:`discover` / :class:`Roster`: boards from their retained status and
  heartbeat topics (online/offline, last seen, runtimes), kept live.
- :class:`BundleServer`: bundle tars by sha256 over HTTP for boards to fetch
  when a bundle is too large to ride in a job message (token per run).
- :class:`BrokerCollector`: `edgepipe serve --broker` — a persistent QoS 1
  subscription to ``{prefix}/reports``; every valid report is stored (the
  store is idempotent on the report id, so redelivery never stores twice).
The bench over the broker lives in :mod:`edgepipe.pipeline.fleet_broker`.
"""
from __future__ import annotations

import queue
import secrets
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from edgepipe.device.errors import one_line
from edgepipe.device.http import HTTPError_, JSONHandler, Server, check_bind
from edgepipe.device.mqtt import Broker, BrokerError, Connection, Topics, loads

SETTLE = 0.5  # quiet time that ends the burst of retained messages after subscribing
MAX_SETTLE = 5.0


@dataclass(frozen=True)
class DeviceStatus:
    """One board as its retained status (and heartbeat) describe it."""

    id: str
    name: Optional[str] = None
    tags: Tuple[str, ...] = ()
    hostname: Optional[str] = None
    online: bool = False
    since: Optional[str] = None  # when it last came online (or said goodbye)
    seen: Optional[str] = None  # last heartbeat
    queued: Optional[int] = None
    runtimes: tuple = ()
    delegates: tuple = ()
    board: Optional[str] = None
    edgerun: Optional[str] = None

    @property
    def label(self) -> str:
        return self.name or self.id

    @property
    def runtime(self) -> str:
        return ", ".join(f"{r.get('name')} {r.get('version') or ''}".strip() for r in self.runtimes
                         if isinstance(r, dict)) or "-"

    @property
    def last_seen(self) -> Optional[str]:
        return max((t for t in (self.seen, self.since) if t), default=None)

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "tags": list(self.tags), "hostname": self.hostname,
                "online": self.online, "since": self.since, "last_seen": self.last_seen, "queued": self.queued,
                "runtimes": list(self.runtimes), "delegates": list(self.delegates), "board": self.board,
                "edgerun": self.edgerun}


def status_from(device_id: str, doc, seen=None) -> Optional[DeviceStatus]:
    """A :class:`DeviceStatus` from a status document, or None when it is not one."""
    if not isinstance(doc, dict):
        return None
    tags = doc.get("tags") if isinstance(doc.get("tags"), list) else []
    seen = seen if isinstance(seen, dict) else {}
    text = lambda v: v if isinstance(v, str) else None  # noqa: E731
    return DeviceStatus(
        id=device_id, name=text(doc.get("name")), tags=tuple(str(t) for t in tags), hostname=text(doc.get("hostname")),
        online=doc.get("online") is True, since=text(doc.get("since")), seen=text(seen.get("at")),
        queued=seen.get("queued") if isinstance(seen.get("queued"), int) else None,
        runtimes=tuple(r for r in doc.get("runtimes") or () if isinstance(r, dict)),
        delegates=tuple(str(d) for d in doc.get("delegates") or ()), board=text(doc.get("board")),
        edgerun=text(doc.get("edgerun")))


class Roster:
    """Live view of the boards on a broker, fed by status/seen messages."""

    def __init__(self, topics: Topics):
        self.topics = topics
        self._status: dict = {}
        self._seen: dict = {}
        self._lock = threading.Lock()
        self.last_change = time.monotonic()

    def feed(self, topic: str, payload: bytes) -> Optional[DeviceStatus]:
        """Take a status/seen message; returns the board's new status (None for anything else)."""
        dev = self.topics.device_of(topic)
        leaf = topic.rsplit("/", 1)[-1]
        if dev is None or leaf not in ("status", "seen"):
            return None
        try:
            doc = loads(payload, f"{leaf} of {dev}") if payload else None
        except BrokerError:
            return None
        with self._lock:
            (self._status if leaf == "status" else self._seen)[dev] = doc
            if doc is None:  # a cleared retained topic: the board was forgotten
                self._status.pop(dev, None) if leaf == "status" else None
            self.last_change = time.monotonic()
            return status_from(dev, self._status.get(dev), self._seen.get(dev))

    def devices(self) -> list:
        with self._lock:
            out = [status_from(d, s, self._seen.get(d)) for d, s in self._status.items()]
        return sorted((d for d in out if d is not None), key=lambda d: (d.label, d.id))

    def get(self, device_id: str) -> Optional[DeviceStatus]:
        with self._lock:
            return status_from(device_id, self._status.get(device_id), self._seen.get(device_id))

    def settle(self, subscribed: threading.Event, quiet: float = SETTLE, limit: float = MAX_SETTLE) -> None:
        """Wait for the retained burst that follows a subscription to end."""
        end = time.monotonic() + limit
        subscribed.wait(limit)
        start = time.monotonic()
        while time.monotonic() < end:
            if time.monotonic() - max(self.last_change, start) >= quiet:
                return
            time.sleep(0.05)


def discover(broker: Broker, *, quiet: float = SETTLE, timeout: float = 15.0) -> list:
    """Every board that ever announced itself on this broker (online or not), as :class:`DeviceStatus`."""
    topics = Topics(broker.prefix)
    roster = Roster(topics)
    subscribed = threading.Event()

    def on_connect(conn: Connection) -> None:
        conn.client.subscribe([(topics.every("status"), 1), (topics.every("seen"), 0)])

    conn = Connection(broker, f"edgepipe-devices-{uuid.uuid4().hex[:12]}", session_expiry=0,
                      on_connect=on_connect, on_message=lambda m: roster.feed(m.topic, m.payload))
    conn.client.on_subscribe = lambda *a: subscribed.set()
    conn.start(timeout)
    try:
        roster.settle(subscribed, quiet)
        return roster.devices()
    finally:
        conn.stop(end_session=True)


# --------------------------------------------------------------------------- bundles over HTTP


class _BundleHandler(JSONHandler):
    def route(self, method, path, query):
        parts = [p for p in path.split("/") if p]
        if method not in ("GET", "HEAD") or parts[:2] != ["v1", "bundles"] or len(parts) != 3:
            raise HTTPError_(404, f"no route for {method} {path}")
        data = self.server.bundles.get(parts[2])
        if data is None:
            raise HTTPError_(404, "no such bundle")
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        if method == "GET":
            self.wfile.write(data)
        return None, None

    def send_json(self, status, payload) -> None:
        if status is not None:  # None: route() already wrote the tar
            super().send_json(status, payload)


class BundleServer(Server):
    """Serves packed bundles at ``GET /v1/bundles/{sha256}``; a bearer token per run."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, public_url: Optional[str] = None,
                 token: Optional[str] = None):
        self.token_value = token or secrets.token_urlsafe(24)
        check_bind(host, self.token_value)
        self.bundles: dict = {}
        super().__init__((host, port), _BundleHandler, token=self.token_value, max_body=1 << 10)
        self.public_url = (public_url or self.url).rstrip("/")

    def add(self, sha256: str, data: bytes) -> str:
        """Serve ``data``; returns the URL boards fetch it from."""
        self.bundles[sha256] = data
        return f"{self.public_url}/v1/bundles/{sha256}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


# --------------------------------------------------------------------------- collector


@dataclass
class CollectorStats:
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    errors: list = field(default_factory=list)


class BrokerCollector:
    """Stores every report published to ``{prefix}/reports`` (persistent session, QoS 1).

    Messages are acknowledged only after the store has them, so a collector
    that dies mid-way gets them again; the store keeps one row per report id.
    ``on_report(report, new)`` is called for each stored report.
    """

    def __init__(self, broker: Broker, store, *, client_id: str = "edgepipe-collector",
                 session_expiry: int = 7 * 86400, on_report: Optional[Callable[[dict, bool], None]] = None):
        from edgepipe.device.contracts import report_problem

        self.broker, self.store, self.on_report = broker, store, on_report
        self.topics = Topics(broker.prefix)
        self.validate = report_problem
        self.stats = CollectorStats()
        self._queue: "queue.Queue" = queue.Queue()
        self.conn = Connection(broker, client_id, session_expiry=session_expiry, manual_ack=True,
                               on_connect=lambda c: c.client.subscribe(self.topics.reports, qos=1),
                               on_message=lambda m: self._queue.put((m.payload, m.mid, m.qos, self.conn.generation)))
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self.conn.start()
        self._thread = threading.Thread(target=self._loop, name="edgepipe-broker-collector", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(10)
        self.conn.stop()

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            payload, mid, qos, generation = item
            self._store_one(payload)
            if self.conn.generation == generation and self.conn.connected.is_set():
                self.conn.client.ack(mid, qos)

    def _store_one(self, payload: bytes) -> None:
        from edgepipe.pipeline.store import ReportConflict, StoreError

        try:
            doc = loads(payload, "report")
            reason = self.validate(doc) if isinstance(doc, dict) else "report must be a JSON object"
            if reason:
                raise BrokerError(f"report does not match edgepipe.report/1: {reason}")
            new = self._add(doc)
        except (BrokerError, ReportConflict, StoreError) as e:
            self.stats.refused += 1
            self.stats.errors.append(one_line(e))
            print(f"collector: refused a report from the broker: {one_line(e)}", file=sys.stderr)
            return
        if new:
            self.stats.stored += 1
        else:
            self.stats.duplicates += 1
        if self.on_report is not None:
            self.on_report(doc, new)

    def _add(self, doc: dict) -> bool:
        """store.add with a few retries: a busy or briefly unavailable database is not a bad report."""
        from edgepipe.pipeline.store import ReportConflict, StoreError, Unstorable

        for attempt in range(5):
            try:
                return self.store.add(doc)
            except (ReportConflict, Unstorable):
                raise
            except StoreError:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")


__all__ = ["BrokerCollector", "BundleServer", "DeviceStatus", "Roster", "discover", "status_from"]
