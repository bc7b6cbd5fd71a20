"""Getting reports to the host: an on-disk spool, retries with backoff, exactly once.

Every report is written to the spool *before* it is sent and removed only
after the collector acknowledged it (201 new or 200 duplicate). A report whose
reply was lost stays in the spool and is sent again later; the collector is
idempotent on the report id, so it is stored exactly once. A host that is down
just leaves the reports in the spool for the next run or `edgerun flush`.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click

from edgepipe.device.http import ClientError, request
from edgepipe.device.paths import user_dir

REPORTS_PATH = "/v1/reports"
TOKEN_ENV = "EDGEPIPE_TOKEN"
REPORT_TO_ENV = "EDGERUN_REPORT_TO"
SPOOL_ENV = "EDGERUN_SPOOL"
# Attempts per report before a host counts as away (default 4: ~3.5 s of backoff).
ATTEMPTS_ENV = "EDGERUN_SEND_ATTEMPTS"
REJECTED = "rejected"


def default_spool_dir() -> Path:
    """``$EDGERUN_SPOOL``, else ``$XDG_STATE_HOME/edgerun/spool`` (~/.local/state)."""
    return user_dir("state", "edgerun", "spool", env=SPOOL_ENV)


def reports_url(url: str) -> str:
    """Accept the collector's base URL or the full reports URL."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--report-to must be an http(s) URL, got {url!r}")
    return url if url.endswith(REPORTS_PATH) else url + REPORTS_PATH


class Spool:
    """A directory of reports waiting to be acknowledged, oldest first."""

    def __init__(self, directory: Optional[os.PathLike] = None):
        self.dir = Path(directory) if directory else default_spool_dir()

    def put(self, report: dict) -> Path:
        """Write ``report`` durably (temp file, fsync, rename)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        rid = str(report["id"])
        final = self.dir / f"{time.time_ns():020d}-{rid}.json"
        tmp = self.dir / f".tmp-{rid}-{os.getpid()}"
        data = json.dumps(report, separators=(",", ":")).encode("utf-8")
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

    def reject(self, path: Path, reason: str) -> Path:
        """Park a report the host refused for good, with the reason beside it."""
        rej = self.dir / REJECTED
        rej.mkdir(exist_ok=True)
        dest = rej / path.name
        os.replace(path, dest)
        dest.with_suffix(".reason.txt").write_text(reason + "\n", encoding="utf-8")
        return dest

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


@dataclass
class SendResult:
    sent: list = field(default_factory=list)        # ids newly stored by the host
    duplicates: list = field(default_factory=list)  # ids the host already had
    rejected: list = field(default_factory=list)    # (id, reason): refused for good, parked
    pending: int = 0                                # still in the spool
    error: Optional[str] = None                     # why delivery stopped early

    @property
    def delivered(self) -> int:
        return len(self.sent) + len(self.duplicates)


def _post(url: str, path: Path, token: Optional[str], timeout: float) -> int:
    data = path.read_bytes()
    status, _ = request("POST", url, data=data, token=token, timeout=timeout)
    return status


def default_attempts() -> int:
    try:
        return max(1, int(os.environ.get(ATTEMPTS_ENV, "4")))
    except ValueError:
        return 4


def deliver(url: str, spool: Spool, *, token: Optional[str] = None, attempts: Optional[int] = None,
            backoff: float = 0.5, max_backoff: float = 8.0, timeout: float = 10.0,
            sleep: Callable[[float], None] = time.sleep) -> SendResult:
    """Send everything in ``spool`` to the collector at ``url``, oldest first.

    A transient failure (no answer, timeout, 5xx, 429) is retried ``attempts``
    times with exponential backoff and jitter; if it persists, delivery stops
    and the rest stays spooled. A permanent refusal (other 4xx) parks that
    report under ``rejected/`` so it cannot block the queue forever.
    """
    target = reports_url(url)
    attempts = default_attempts() if attempts is None else max(1, attempts)
    res = SendResult()
    with spool.locked():
        for path in spool.pending():
            rid = path.name.split("-", 1)[-1][:-5]
            for attempt in range(attempts):
                try:
                    status = _post(target, path, token, timeout)
                except FileNotFoundError:
                    break  # another sender finished it
                except ClientError as e:
                    if not e.transient:
                        spool.reject(path, str(e))
                        res.rejected.append((rid, str(e)))
                        break
                    res.error = str(e)
                    if attempt + 1 < attempts:
                        delay = min(max_backoff, backoff * (2 ** attempt))
                        sleep(delay * (0.5 + random.random() / 2))
                    continue
                (res.sent if status == 201 else res.duplicates).append(rid)
                res.error = None
                path.unlink()
                break
            else:
                break  # host unreachable: keep the rest for later
    res.pending = len(spool.pending())
    return res


def send_report(report: dict, url: str, *, spool: Optional[Spool] = None, **kw) -> SendResult:
    """Spool ``report`` then deliver it (and anything spooled earlier)."""
    spool = spool or Spool()
    spool.put(report)
    return deliver(url, spool, **kw)


def describe(res: SendResult, url: str, spool: Spool) -> str:
    """One line for people about what happened to the reports."""
    parts = []
    if res.sent:
        parts.append(f"{len(res.sent)} report(s) sent to {url}")
    if res.duplicates:
        parts.append(f"{len(res.duplicates)} already there")
    if res.rejected:
        parts.append(f"{len(res.rejected)} rejected ({res.rejected[0][1]}); kept in {spool.dir / REJECTED}")
    if res.pending:
        parts.append(f"{res.pending} spooled in {spool.dir} ({res.error or 'not sent'}); "
                     f"they go out on the next run or with `edgerun flush --report-to {url}`")
    return "; ".join(parts) or "nothing to send"


# -- the shared `--report-to` option for `edgerun bench` / `edgerun run` ---------

_META_KEY = "edgerun.report_to"


def report_to_option(f):
    """Decorator adding ``--report-to URL`` and ``--report-token`` to a command.

    The values go into the click context (the command's signature does not
    change); call :func:`maybe_send` with the finished report.
    """
    def store(ctx, param, value):
        if param.name == "report_to" and value:
            try:
                reports_url(value)
            except ValueError as e:  # fail before measuring, not after
                raise click.BadParameter(str(e)) from None
        ctx.meta.setdefault(_META_KEY, {})[param.name] = value
        return value

    f = click.option("--report-token", envvar=TOKEN_ENV, default=None, expose_value=False,
                     callback=store, metavar="TOKEN",
                     help=f"Bearer token for --report-to [env: {TOKEN_ENV}].")(f)
    f = click.option("--report-to", envvar=REPORT_TO_ENV, default=None, expose_value=False,
                     callback=store, metavar="URL",
                     help="Send the report to an `edgepipe serve` collector (spooled on disk "
                          f"when it is unreachable) [env: {REPORT_TO_ENV}].")(f)
    return f


def maybe_send(report: dict, ctx: Optional[click.Context] = None) -> Optional[SendResult]:
    """Send ``report`` if the command got ``--report-to``; prints one line to stderr.

    Never fails the command: a report that cannot be sent now is safe in the spool.
    """
    ctx = ctx or click.get_current_context(silent=True)
    opts = (ctx.meta.get(_META_KEY) if ctx else None) or {}
    url = opts.get("report_to")
    if not url:
        return None
    spool = Spool()
    token = opts.get("report_token")
    try:
        res = send_report(report, reports_url(url), spool=spool, token=token)
    except (OSError, TimeoutError) as e:
        # No usable spool (read-only home, full disk, stuck lock): one direct
        # attempt, and say plainly if the report did not make it.
        click.echo(f"warning: cannot use the report spool {spool.dir}: {e}", err=True)
        try:
            status, _ = request("POST", reports_url(url), body=report, token=token)
        except ClientError as ce:
            click.echo(f"warning: report {report.get('id')} NOT sent and not spooled: {ce}", err=True)
            return None
        res = SendResult()
        (res.sent if status == 201 else res.duplicates).append(str(report.get("id")))
    click.echo(describe(res, url, spool), err=True)
    return res
