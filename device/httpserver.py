"""The HTTP server core of the agent and the collector: slow or idle clients cannot starve it.

One event-loop thread accepts connections and reads request headers without
blocking (``selectors``), each under a deadline. Only a request whose headers
are complete reaches a pooled worker thread, which checks the token before any
body byte is read and reads the body under a deadline scaled from its declared
length. Idle keep-alive connections go back to the event loop, so they never
hold a worker; when the connection table is full the idle ones are dropped
first, then drains, then the slowest header senders. An early answer (413,
401, ...) is sent first and the unread body is then discarded by the event
loop, so the client reads the reason instead of a reset.
"""
from __future__ import annotations

import collections
import logging
import queue
import selectors
import socket
import socketserver
import threading
import time
from typing import Optional

from edgepipe.device.httpconn import HTTPError_, Limits, Reader, Writer

__all__ = ["HTTPError_", "Limits", "Server"]

log = logging.getLogger("edgepipe.http")

# Connection states in the event loop.
_WAIT, _HEAD, _BUSY, _DRAIN = "wait", "head", "busy", "drain"
# Which connections to drop first when the table is full (lower goes first).
_EVICT_ORDER = {_WAIT: 0, _DRAIN: 1, _HEAD: 2}
_TICK = 0.2  # how often deadlines are checked (seconds)
_UNKNOWN_BODY_DRAIN = 64 << 10  # discarded after an answer when the body length is unknown


class _Conn:
    __slots__ = ("sock", "addr", "buf", "state", "since", "deadline", "scanned", "head_len", "budget",
                 "reader", "writer")

    def __init__(self, sock: socket.socket, addr, buf: bytearray = None):
        self.sock, self.addr, self.buf = sock, addr, buf if buf is not None else bytearray()
        self.state, self.since, self.deadline = _WAIT, 0.0, 0.0
        self.scanned = self.head_len = self.budget = 0
        self.reader = self.writer = None


def _fd_budget(wanted: int) -> int:
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(16, min(wanted, soft // 2))


def _header_end(buf: bytearray, start: int) -> int:
    ends = [i + len(t) for t in (b"\r\n\r\n", b"\n\n") if (i := buf.find(t, start)) >= 0]
    return min(ends) if ends else -1


def _canned(status: int, reason: str) -> bytes:
    body = ('{"error":"%s"}' % reason).encode()
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode() + body


class Server(socketserver.TCPServer):
    """HTTP server: one event loop for connections and headers, a worker pool for requests.

    ``handler`` is a :class:`edgepipe.device.http.JSONHandler` subclass; each
    worker runs one request through it, then the connection returns to the
    event loop (keep-alive), is drained (early answer) or is closed.
    """

    allow_reuse_address = True
    # A burst of concurrent reporters must not see connection resets.
    request_queue_size = 256

    def __init__(self, addr, handler, *, token: Optional[str] = None, max_body: int = 1 << 20,
                 limits: Optional[Limits] = None):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.token = token or None
        self.max_body = int(max_body)
        self.limits = limits or Limits()
        self._max_conns = _fd_budget(self.limits.max_conns)
        self._ready: "queue.SimpleQueue" = queue.SimpleQueue()
        self._inbox: collections.deque = collections.deque()
        self._inbox_lock = threading.Lock()
        self._conns: set = set()  # held by the event loop
        self._busy = 0            # held by workers (or waiting for one)
        self._returns_open = False
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        # Workers start only once bound: a failed bind calls server_close(), which must find no pool.
        self._pool: list = []
        self._wake_r = self._wake_w = None
        super().__init__(addr, handler)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pool = [threading.Thread(target=self._worker, daemon=True, name=f"http-{i}")
                      for i in range(self.limits.workers)]
        for t in self._pool:
            t.start()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, embedding); stop with ``shutdown()``."""
        t = threading.Thread(target=self.serve_forever, name=type(self).__name__, daemon=True)
        t.start()
        return t

    # -- event loop ------------------------------------------------------------
    def serve_forever(self, poll_interval: float = _TICK) -> None:
        """Accept and read headers until :meth:`shutdown`."""
        self._stopped.clear()
        sel = selectors.DefaultSelector()
        self._sel = sel
        self.socket.setblocking(False)
        sel.register(self.socket, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._returns_open = True
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(_TICK):
                    self._on_event(key.data)
                now = time.monotonic()
                if now - last >= _TICK:
                    last = now
                    self._expire(now)
        finally:
            with self._inbox_lock:
                self._returns_open = False
                left = [c for c, _ in self._inbox]
                self._inbox.clear()
            for c in list(self._conns) + left:
                self._close(c)
            sel.close()
            self._stopped.set()

    def _on_event(self, data) -> None:
        try:
            if data is None:
                self._accept()
            elif data == "wake":
                self._take_returns()
            else:
                self._on_readable(data)
        except Exception:  # a bug here must cost one connection, never the event loop
            log.error("HTTP event loop error", exc_info=True)
            if isinstance(data, _Conn):
                self._close(data)

    def shutdown(self) -> None:
        """Stop the event loop (requests already with a worker still finish)."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        super().server_close()
        for _ in self._pool:
            self._ready.put(None)
        for s in (self._wake_r, self._wake_w):
            if s is not None:
                s.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (OSError, AttributeError):  # full (a wake-up is pending anyway) or closed
            pass

    def _accept(self) -> None:
        for _ in range(64):
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: shed an idle connection, retry later
                log.warning("accept failed: %s", e)
                self._evict()
                return
            sock.setblocking(False)
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if len(self._conns) + self._busy >= self._max_conns and not self._evict():
                self._refuse(_Conn(sock, addr), 503, "server busy")
                continue
            self._watch(_Conn(sock, addr), time.monotonic() + self.limits.header_secs)

    def _watch(self, conn: _Conn, deadline: float, now: Optional[float] = None) -> None:
        conn.state, conn.since, conn.deadline, conn.scanned = _WAIT, now or time.monotonic(), deadline, 0
        conn.sock.setblocking(False)
        self._conns.add(conn)
        self._sel.register(conn.sock, selectors.EVENT_READ, conn)
        if conn.buf:
            self._advance(conn, conn.since)

    def _evict(self) -> bool:
        """Close the connection that matters least: idle, then draining, then the slowest header sender."""
        if not self._conns:
            return False
        victim = min(self._conns, key=lambda c: (_EVICT_ORDER[c.state], c.since))
        self._close(victim)
        return True

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        if conn.state == _DRAIN:
            conn.budget -= len(data)
            if conn.budget <= 0:
                self._close(conn)
            return
        conn.buf += data
        self._advance(conn, time.monotonic())

    def _advance(self, conn: _Conn, now: float) -> None:
        buf = conn.buf
        if conn.state == _WAIT:
            # Blank lines before a request are allowed (RFC 9112) but do not count as activity.
            i = 0
            while i < len(buf) and buf[i] in b"\r\n":
                i += 1
            del buf[:i]
            if not buf:
                return
            conn.state, conn.since, conn.deadline = _HEAD, now, now + self.limits.header_secs
        end = _header_end(buf, max(0, conn.scanned - 3))
        if end < 0:
            conn.scanned = len(buf)
            if len(buf) > self.limits.max_header_bytes:
                self._refuse(conn, 431, "request headers too large")
            return
        conn.head_len = end
        self._sel.unregister(conn.sock)
        self._conns.discard(conn)
        conn.state = _BUSY
        with self._inbox_lock:
            self._busy += 1
        self._ready.put(conn)

    def _expire(self, now: float) -> None:
        for conn in [c for c in self._conns if now >= c.deadline]:
            if conn.state == _HEAD:
                self._refuse(conn, 408, "request headers not received in time")
            else:
                self._close(conn)

    def _refuse(self, conn: _Conn, status: int, reason: str) -> None:
        try:
            conn.sock.send(_canned(status, reason))
        except OSError:
            pass
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if conn in self._conns:
            self._conns.discard(conn)
            try:
                self._sel.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        try:
            conn.sock.close()
        except OSError:
            pass

    def _take_returns(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        now = time.monotonic()
        while True:
            with self._inbox_lock:
                if not self._inbox:
                    return
                conn, budget = self._inbox.popleft()
            if budget:  # drain the unread body, then close
                self._watch(conn, now + self.limits.body_secs(budget), now)
                conn.state, conn.budget = _DRAIN, budget
            else:
                self._watch(conn, now + self.limits.idle_secs, now)

    # -- workers ---------------------------------------------------------------
    def _worker(self) -> None:
        while True:
            conn = self._ready.get()
            if conn is None:
                return
            try:
                budget = self._serve_one(conn)
            except Exception:  # the client went away mid-answer, or a handler bug: drop the connection
                log.debug("connection from %s dropped", conn.addr, exc_info=True)
                budget = None
            with self._inbox_lock:
                self._busy -= 1
                if budget is not None and self._returns_open:
                    self._inbox.append((conn, budget))
                    conn = None
            if conn is None:
                self._wake()
            else:
                self._close_quietly(conn.sock)

    def _serve_one(self, conn: _Conn) -> Optional[int]:
        """Run one request; None closes, 0 keeps alive, n > 0 drains n unread body bytes."""
        lim = self.limits
        conn.reader = Reader(conn.sock, conn.buf, time.monotonic() + lim.body_min_secs)
        conn.writer = Writer(conn.sock, lim.write_secs)
        handler = self.RequestHandlerClass(conn, conn.addr, self)
        reader = conn.reader
        conn.buf = reader.leftover()
        if reader.timed_out or reader.eof:
            return None
        left = _unread_body(handler, reader.consumed - conn.head_len)
        if left == 0 and not handler.close_connection:
            return 0
        conn.buf = bytearray()
        budget = _UNKNOWN_BODY_DRAIN if left is None else min(left, lim.drain_limit)
        if budget <= 0:
            return None
        try:  # the answer is complete: tell the client, then discard what it still sends
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return None
        return budget

    @staticmethod
    def _close_quietly(sock: socket.socket) -> None:
        try:
            sock.close()
        except OSError:
            pass


def _unread_body(handler, body_read: int) -> Optional[int]:
    """Body bytes the client declared but the handler did not read; None when unknown."""
    headers = getattr(handler, "headers", None)
    if headers is None:
        return None
    if "chunked" in headers.get("Transfer-Encoding", "").lower():
        return None
    raw = headers.get("Content-Length")
    if raw is None:
        return 0
    try:
        n = int(raw)
    except ValueError:
        return None
    return None if n < 0 else max(0, n - body_read)
