"""The device's on-disk report spool: written before sending, removed once acknowledged.

Each report is one file ``<time_ns>-<id>.json`` (oldest first); a report the
host keeps failing has its backoff state beside it (``<report>.retry``), and
one the host refused for good is parked in ``rejected/`` with the reason.
Sending and retrying is edgepipe.device.send.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edgepipe.device.contracts import validate_report
from edgepipe.device.paths import user_dir
from edgepipe.device.report import dumps

SPOOL_ENV = "EDGERUN_SPOOL"
REJECTED = "rejected"
RETRY_SUFFIX = ".retry"
# Between flushes a failing report waits 30 s, then 1, 2, 4 ... minutes, at most an hour.
FIRST_DELAY = 30.0
MAX_DELAY = 3600.0


def default_spool_dir() -> Path:
    """``$EDGERUN_SPOOL``, else ``$XDG_STATE_HOME/edgerun/spool`` (~/.local/state)."""
    return user_dir("state", "edgerun", "spool", env=SPOOL_ENV)



@dataclass(frozen=True)
class RetryState:
    """How often the host failed one report across flushes, and when to try it next (epoch seconds)."""

    failures: int = 0
    next_try: float = 0.0
    last_error: str = ""


def report_id(path: Path) -> str:
    """The report id in a spool file name (``<time_ns>-<id>.json``)."""
    return path.name.split("-", 1)[-1][:-5]


class Spool:
    """A directory of reports waiting to be acknowledged, oldest first."""

    def __init__(self, directory: Optional[os.PathLike] = None):
        self.dir = Path(directory) if directory else default_spool_dir()

    def put(self, report: dict) -> Path:
        """Write ``report`` durably (temp file, fsync, rename); a report that breaks the schema is refused."""
        validate_report(report)  # never queue what the collector would refuse for good
        self.dir.mkdir(parents=True, exist_ok=True)
        rid = str(report["id"])
        final = self.dir / f"{time.time_ns():020d}-{rid}.json"
        tmp = self.dir / f".tmp-{rid}-{os.getpid()}"
        # NaN/inf become null: the collector refuses non-finite numbers for good.
        data = dumps(report, indent=None).encode("utf-8", "surrogatepass")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def pending(self) -> list:
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.json") if not p.name.startswith("."))

    def remove(self, path: Path) -> None:
        """Forget a delivered report and its retry state."""
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._retry_file(path).unlink(missing_ok=True)

    def reject(self, path: Path, reason: str) -> Path:
        """Park a report the host refused for good, with the reason beside it."""
        rej = self.dir / REJECTED
        rej.mkdir(exist_ok=True)
        dest = rej / path.name
        os.replace(path, dest)
        self._retry_file(path).unlink(missing_ok=True)
        dest.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        return dest

    def requeue_rejected(self) -> int:
        """Move parked reports back into the queue (e.g. after the host was fixed); returns how many."""
        rej = self.dir / REJECTED
        moved = 0
        for path in sorted(rej.glob("*.json")) if rej.is_dir() else []:
            os.replace(path, self.dir / path.name)
            path.with_suffix(".reason.txt").unlink(missing_ok=True)
            moved += 1
        return moved

    def _retry_file(self, path: Path) -> Path:
        return path.with_name(path.name + RETRY_SUFFIX)

    def retry_state(self, path: Path) -> RetryState:
        """The backoff state beside ``path``; a missing or unreadable one means "due now"."""
        try:
            with open(self._retry_file(path), "rb") as f:
                doc = json.loads(f.read(4096))
            return RetryState(int(doc["failures"]), float(doc["next_try"]), str(doc.get("last_error", "")))
        except (OSError, ValueError, TypeError, KeyError):
            return RetryState()

    def record_failure(self, path: Path, error: str, *, retry_after: Optional[float] = None,
                       now: Optional[float] = None) -> RetryState:
        """Note one more flush that could not deliver ``path``; later flushes skip it until it is due."""
        old = self.retry_state(path)
        failures = old.failures + 1
        delay = retry_after if retry_after is not None else FIRST_DELAY * 2 ** min(failures - 1, 16)
        now = time.time() if now is None else now
        state = RetryState(failures, now + min(MAX_DELAY, delay), error[:500])
        target = self._retry_file(path)
        tmp = target.with_name("." + target.name + ".tmp")
        tmp.write_text(json.dumps(state.__dict__), encoding="utf-8")
        os.replace(tmp, target)
        return state

    @contextlib.contextmanager
    def locked(self, timeout: float = 60.0):
        """One sender at a time per spool (a run and a flush may overlap)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not a Linux device
            yield
            return
        with open(self.dir / ".lock", "w") as f:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"spool {self.dir} is locked by another sender") from None
                    time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
