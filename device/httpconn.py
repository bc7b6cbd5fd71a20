"""Per-connection HTTP I/O for :mod:`edgepipe.device.httpserver`: limits, deadline-bound reads, bounded writes.

A handler's ``rfile`` first serves the bytes the event loop already buffered
(the headers, perhaps the start of the body), then reads the socket, never
past a deadline; its ``wfile`` gives each write a bounded time.
"""
from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from edgepipe.device.errors import StatusError


class HTTPError_(StatusError):
    """Raised inside a handler to answer with ``status`` and a one-line ``reason``."""


@dataclass(frozen=True)
class Limits:
    """Time and size bounds per connection (all configurable)."""

    header_secs: float = 10.0      # request line + headers, from the first byte (or from accept)
    idle_secs: float = 60.0        # a keep-alive connection waiting for its next request
    body_min_secs: float = 10.0    # every body gets at least this long...
    body_min_rate: int = 32 << 10  # ...or its declared length at this many bytes/s, whichever is longer
    write_secs: float = 30.0       # sending one answer
    max_header_bytes: int = 32 << 10
    max_conns: int = 512           # open connections in every state (capped by the fd limit)
    workers: int = 32
    drain_limit: int = 64 << 20    # unread body discarded after an early answer

    def body_secs(self, n: int) -> float:
        """Deadline for receiving a body of ``n`` bytes."""
        return max(self.body_min_secs, n / max(1, self.body_min_rate))


class Reader:
    """The handler's ``rfile``: bytes the event loop buffered first, then the socket, under a deadline."""

    def __init__(self, sock: socket.socket, buf: bytearray, deadline: float):
        self._sock, self._buf = sock, buf
        self.deadline = deadline  # time.monotonic() value
        self.consumed = 0
        self.timed_out = self.eof = False

    def extend_deadline(self, secs: float) -> None:
        self.deadline = time.monotonic() + secs

    def _recv(self, n: int) -> bytes:
        left = self.deadline - time.monotonic()
        if left <= 0:
            self._timeout()
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(n)
        except socket.timeout:
            self._timeout()
        except OSError:  # reset by the peer: the body simply ends here
            data = b""
        if not data:
            self.eof = True
        return data

    def _timeout(self):
        self.timed_out = True
        raise HTTPError_(408, "the request did not arrive in time")

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self.consumed += len(out)
        return out

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes, short only at the end of the stream."""
        if n is None or n < 0:
            raise ValueError("unbounded reads are not allowed; pass a length")
        if len(self._buf) >= n:
            return self._take(n)
        parts = [self._take(len(self._buf))]
        have = len(parts[0])
        while have < n and not self.eof:
            chunk = self._recv(min(n - have, 1 << 18))
            parts.append(chunk)
            have += len(chunk)
        self.consumed += have - len(parts[0])
        return b"".join(parts)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def readline(self, limit: int = -1) -> bytes:
        while True:
            i = self._buf.find(b"\n")
            if i >= 0 and (limit < 0 or i < limit):
                return self._take(i + 1)
            if 0 <= limit <= len(self._buf) or self.eof:
                return self._take(len(self._buf) if limit < 0 else min(limit, len(self._buf)))
            self._buf += self._recv(1 << 16)

    def leftover(self) -> bytearray:
        """Bytes received beyond what was read (a pipelined next request)."""
        return self._buf


class Writer:
    """The handler's ``wfile``: each write must complete within ``secs``."""

    def __init__(self, sock: socket.socket, secs: float):
        self._sock, self._secs = sock, secs

    def write(self, data: bytes) -> int:
        self._sock.settimeout(self._secs)
        self._sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        pass
