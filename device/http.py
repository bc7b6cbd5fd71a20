"""Tiny stdlib HTTP helpers shared by the device agent and the host collector.

Only ``http.server`` and ``urllib``: a Pi needs nothing extra to run the agent
or to send a report. The host's collector reuses the server side of this
module (``pipeline`` may import ``device``, never the other way round).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import signal
import socket
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional
from edgepipe.device.errors import EdgepipeError

JSON_TYPE = "application/json"
# Largest unwanted body we still read (and discard) before answering an error.
DRAIN_LIMIT = 64 << 20


class HTTPError_(EdgepipeError):
    """Raised inside a handler to answer with ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_loopback(host: str) -> bool:
    """True when binding ``host`` only exposes the server to this machine."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse to expose an unauthenticated server beyond loopback."""
    if not token and not is_loopback(host):
        raise ValueError(
            f"refusing to listen on {host} without a token: anyone on the network could use it; "
            "pass --token (or set the token environment variable) or bind to 127.0.0.1")


class Server(ThreadingHTTPServer):
    """HTTP server with a fixed pool of handler threads, a token and a body limit.

    The stock ThreadingHTTPServer starts a thread per connection and its
    accept loop waits for each new thread to get scheduled; under a burst of
    reporters on a busy 2-core box that handshake, not the work, capped the
    ingest rate. Pre-started workers pull accepted connections from a queue.
    """

    daemon_threads = True
    # A burst of concurrent reporters must not see connection resets.
    request_queue_size = 256
    workers = 32

    def __init__(self, addr, handler, *, token: Optional[str] = None, max_body: int = 1 << 20):
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        self.token = token or None
        self.max_body = int(max_body)
        self._conns: "queue.SimpleQueue" = queue.SimpleQueue()
        # Workers start only once bound: a failed bind calls server_close(), which must find no pool.
        self._pool: list = []
        super().__init__(addr, handler)
        self._pool = [threading.Thread(target=self._worker, daemon=True, name=f"http-{i}")
                      for i in range(self.workers)]
        for t in self._pool:
            t.start()

    def process_request(self, request, client_address):
        self._conns.put((request, client_address))

    def _worker(self) -> None:
        while True:
            item = self._conns.get()
            if item is None:
                return
            self.process_request_thread(*item)

    def server_close(self) -> None:
        super().server_close()
        for _ in self._pool:
            self._conns.put(None)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (tests, embedding); stop with ``shutdown()``."""
        t = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                             name=type(self).__name__, daemon=True)
        t.start()
        return t


def serve_until_stopped(server: ThreadingHTTPServer, on_close: Callable[[], None]) -> None:
    """Serve until Ctrl-C or SIGTERM (systemd's stop), then close the server and call ``on_close``."""

    def _term(signum, frame):
        # shutdown() waits for serve_forever() to return, so it cannot run on this (the serving) thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _term)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        on_close()


class JSONHandler(BaseHTTPRequestHandler):
    """Base request handler: bearer auth, bounded bodies, JSON answers.

    Subclasses implement ``route(method, path, query) -> (status, payload)``
    and raise :class:`HTTPError_` for client errors.
    """

    server: Server
    protocol_version = "HTTP/1.1"
    # A silent client frees its worker after this long (socket timeout).
    timeout = 30
    # Paths answered without a token (liveness probes).
    public_paths: tuple = ("/healthz",)
    server_version = "edgepipe"

    def log_message(self, fmt, *args):  # quiet: the CLI prints its own lines
        pass

    # -- helpers ---------------------------------------------------------
    def send_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload, separators=(",", ":")).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def check_token(self) -> None:
        token = self.server.token
        if not token:
            return
        got = self.headers.get("Authorization", "")
        if not got.startswith("Bearer "):
            raise HTTPError_(401, "missing bearer token (Authorization: Bearer ...)")
        if not hmac.compare_digest(got[7:].strip().encode(), token.encode()):
            raise HTTPError_(403, "wrong token")

    def body_length(self, limit: Optional[int] = None) -> int:
        limit = self.server.max_body if limit is None else limit
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            raise HTTPError_(411, "chunked bodies are not accepted; send Content-Length")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HTTPError_(411, "Content-Length required")
        try:
            n = int(raw)
        except ValueError:
            raise HTTPError_(400, "bad Content-Length") from None
        if n < 0:
            raise HTTPError_(400, "bad Content-Length")
        if n > limit:
            raise HTTPError_(413, f"body of {n} bytes exceeds the limit of {limit} bytes")
        return n

    def read_body(self, limit: Optional[int] = None) -> bytes:
        n = self.body_length(limit)
        data = self.rfile.read(n)
        self._body_done = True
        if len(data) != n:
            raise HTTPError_(400, "body shorter than Content-Length")
        return data

    def read_json(self, limit: Optional[int] = None) -> Any:
        data = self.read_body(limit)
        try:
            return json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HTTPError_(400, f"malformed JSON: {e}") from None

    # -- dispatch --------------------------------------------------------
    def _dispatch(self) -> None:
        self._body_done = False
        path, _, query = self.path.partition("?")
        try:
            if path not in self.public_paths:
                self.check_token()
            status, payload = self.route(self.command, path, query)
        except HTTPError_ as e:
            self._finish_error(e.status, e.reason)
            return
        except Exception as e:  # the server must keep serving
            self._finish_error(500, f"internal error: {type(e).__name__}: {e}")
            return
        self.send_json(status, payload)

    def _finish_error(self, status: int, reason: str) -> None:
        # An unread body would be parsed as the next request, so close the
        # connection; drain a moderate body first so the client, still
        # sending, reads our answer instead of a connection reset.
        self.close_connection = True
        if not self._body_done:
            try:
                left = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                left = 0
            if 0 < left <= DRAIN_LIMIT:
                try:
                    self.connection.settimeout(5)
                    while left > 0:
                        chunk = self.rfile.read(min(left, 1 << 16))
                        if not chunk:
                            break
                        left -= len(chunk)
                except OSError:
                    pass
        try:
            self.send_json(status, {"error": reason})
        except OSError:
            pass

    def route(self, method: str, path: str, query: str):  # pragma: no cover - abstract
        raise HTTPError_(404, f"no route for {method} {path}")

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _dispatch


# -- client side -----------------------------------------------------------

class ClientError(EdgepipeError):
    """An HTTP exchange that failed; ``status`` is None when nothing came back."""

    def __init__(self, message: str, status: Optional[int] = None, payload: Any = None):
        super().__init__(message)
        self.status = status
        self.payload = payload

    @property
    def transient(self) -> bool:
        """Worth retrying later: no answer, a timeout, or a server-side hiccup."""
        return self.status is None or self.status in (408, 429) or self.status >= 500


def request(method: str, url: str, *, body: Any = None, data: Optional[bytes] = None,
            token: Optional[str] = None, timeout: float = 10.0,
            content_type: str = JSON_TYPE) -> tuple:
    """One HTTP request; returns ``(status, decoded JSON or None)``.

    ``body`` is JSON-encoded; ``data`` is sent raw. Raises :class:`ClientError`
    for any non-2xx answer or transport failure, with the server's reason.
    """
    if body is not None:
        data = json.dumps(body, separators=(",", ":")).encode("utf-8")
    headers = {"Accept": JSON_TYPE}
    if data is not None:
        headers["Content-Type"] = content_type
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            return resp.status, _decode(raw)
    except urllib.error.HTTPError as e:
        payload = _decode(e.read() or b"")
        reason = payload.get("error") if isinstance(payload, dict) else None
        raise ClientError(f"{method} {url}: HTTP {e.code}: {reason or e.reason}", e.code, payload) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        why = getattr(e, "reason", None) or e
        raise ClientError(f"{method} {url}: {why}") from None
    except Exception as e:  # http.client.RemoteDisconnected and friends
        raise ClientError(f"{method} {url}: {type(e).__name__}: {e}") from None


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {"error": raw[:200].decode("utf-8", "replace")}
