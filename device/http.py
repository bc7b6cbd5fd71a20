"""Tiny stdlib HTTP helpers shared by the device agent and the host collector.

Only the standard library: a Pi needs nothing extra to run the agent or to
send a report. The server core (:mod:`edgepipe.device.httpserver`: event loop,
deadlines, worker pool) is re-exported here with the request handler; the
host's collector reuses both (``pipeline`` may import ``device``, never the
other way round).
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import math
import re
import signal
import threading
import urllib.error
import urllib.request
from itertools import accumulate
from http.server import BaseHTTPRequestHandler
from typing import Any, Callable, Optional

from edgepipe.device.errors import EdgepipeError
from edgepipe.device.httpserver import HTTPError_, Limits, Server

__all__ = ["HTTPError_", "Limits", "Server", "JSONHandler", "ClientError", "request", "parse_json",
           "check_bind", "is_loopback", "serve_until_stopped"]

JSON_TYPE = "application/json"
# Deepest JSON a request body may nest: reports and jobs need a handful of levels,
# and a bound keeps the parser and validators far from Python's recursion limit.
MAX_JSON_DEPTH = 64
log = logging.getLogger("edgepipe.http")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPENERS_CLOSERS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


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


def serve_until_stopped(server: Server, on_close: Callable[[], None]) -> None:
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


# -- JSON bodies -------------------------------------------------------------

class _NonFinite(ValueError):
    pass


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):
        raise _NonFinite(text)
    return x


def _refuse_constant(name: str):
    raise _NonFinite(name)


def json_depth(data: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in a JSON text (strings skipped), without recursing."""
    brackets = _JSON_STRING.sub(b"", data).translate(_OPENERS_CLOSERS, _NOT_BRACKETS)
    if len(brackets) < 2:
        return len(brackets)
    return max(accumulate(92 - b for b in brackets))  # "[" is 91, "]" is 93


def parse_json(data: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body: strict UTF-8 JSON, nesting bounded, finite numbers only.

    Raises :class:`HTTPError_` 400 with a one-line reason otherwise.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HTTPError_(400, f"malformed JSON: {e}") from None
    # Fewer openers than the bound cannot nest beyond it: typical bodies skip the scan.
    if data.count(b"[") + data.count(b"{") > max_depth and json_depth(data) > max_depth:
        raise HTTPError_(400, f"malformed JSON: nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_float=_finite_float, parse_constant=_refuse_constant)
    except _NonFinite as e:
        raise HTTPError_(400, f"malformed JSON: {e} is not a finite number (JSON has no NaN or Infinity)") \
            from None
    except json.JSONDecodeError as e:
        raise HTTPError_(400, f"malformed JSON: {e}") from None
    except RecursionError:  # belt and braces: the depth check should make this unreachable
        raise HTTPError_(400, "malformed JSON: nested too deeply") from None


def _finite(obj: Any) -> Any:
    """``obj`` with NaN and infinities as null, so an answer is always valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


class JSONHandler(BaseHTTPRequestHandler):
    """Base request handler: bearer auth, bounded bodies, JSON answers.

    Subclasses implement ``route(method, path, query) -> (status, payload)``
    and raise :class:`HTTPError_` for client errors. The token is checked
    before ``route`` runs, so no body byte is read for an unauthorized client.
    Bodies are read through ``read_json``/``read_body``, or streamed from
    ``self.rfile`` after ``body_length()`` (which sets the body deadline).
    """

    server: Server
    protocol_version = "HTTP/1.1"
    # Paths answered without a token (liveness probes).
    public_paths: tuple = ("/healthz",)
    server_version = "edgepipe"

    def log_message(self, fmt, *args):  # quiet: the CLI prints its own lines
        pass

    # -- one request per call: the server owns the connection -------------
    def setup(self) -> None:
        conn = self.request
        self.connection = conn.sock
        self.rfile = conn.reader
        self.wfile = conn.writer
        self._expect_100 = False

    def handle(self) -> None:
        self.close_connection = True
        self.handle_one_request()

    def finish(self) -> None:
        pass

    def handle_expect_100(self) -> bool:
        # "100 Continue" only once the token and the length are accepted (body_length).
        self._expect_100 = True
        return True

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """Protocol errors (bad request line, oversized headers) as JSON, then close."""
        self.close_connection = True
        try:
            self.send_json(code, {"error": message or explain or "bad request"})
        except OSError:
            pass

    # -- helpers ---------------------------------------------------------
    def send_json(self, status: int, payload: Any) -> None:
        try:
            text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
        except ValueError:
            text = json.dumps(_finite(payload), separators=(",", ":"))
        body = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", JSON_TYPE)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()  # two writes; the server sets TCP_NODELAY, so no delayed-ACK stall
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
        """The declared body length, refused (411/400/413) before any byte is read.

        Also starts the body deadline (scaled from the length) and sends
        ``100 Continue`` to a client that asked for it.
        """
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
        self.rfile.extend_deadline(self.server.limits.body_secs(n))
        if self._expect_100:
            self._expect_100 = False
            self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return n

    def read_body(self, limit: Optional[int] = None) -> bytes:
        n = self.body_length(limit)
        data = self.rfile.read(n)
        self._body_done = True
        if len(data) != n:
            raise HTTPError_(400, "body shorter than Content-Length")
        return data

    def read_json(self, limit: Optional[int] = None) -> Any:
        return parse_json(self.read_body(limit))

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
        except Exception as e:  # a bug: keep serving, and keep tracebacks and paths out of the answer
            log.error("%s %s failed", self.command, path, exc_info=True)
            self._finish_error(500, f"internal error ({type(e).__name__}); the server log has the details")
            return
        self.send_json(status, payload)

    def _finish_error(self, status: int, reason: str) -> None:
        # The server discards any unread body after this answer (see Server), so the
        # client, possibly still sending, reads the reason instead of a reset.
        self.close_connection = True
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
