"""Getting reports to the host: an on-disk spool, retries with backoff, exactly once.

Every report is written to the spool *before* it is sent and removed only once
the collector acknowledged it (201 new, 200 duplicate); the collector is
idempotent on the report id, so a report whose reply was lost is stored once.
What an answer does to a spooled report:

* 2xx: delivered, removed. 401/403: the token is wrong; it and every later
  report stay queued (the same token would be refused) until it is fixed.
* 408, 429, 5xx: retried with backoff (a short ``Retry-After`` honoured); one
  that keeps failing stays queued with its own backoff state beside it
  (``<report>.retry``), skipped by later flushes until due, never blocking others.
* any other 4xx: refused for good; moved to ``rejected/`` with the reason.
* no answer (refused, timeout, reply lost): retried; if the next report gets
  no answer either the host is away and the flush stops, keeping the rest.
"""
from __future__ import annotations

import http.client
import json
import os
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

# The spool is its own stage; its names stay importable from here.
from edgepipe.device.spool import (FIRST_DELAY, MAX_DELAY, REJECTED, RETRY_SUFFIX, SPOOL_ENV,  # noqa: F401
                                   RetryState, Spool, default_spool_dir, report_id)

REPORTS_PATH = "/v1/reports"
TOKEN_ENV = "EDGEPIPE_TOKEN"
REPORT_TO_ENV = "EDGERUN_REPORT_TO"
# Attempts per report and flush (default 4: ~3.5 s of backoff).
ATTEMPTS_ENV = "EDGERUN_SEND_ATTEMPTS"
# Seconds one flush may spend sleeping between retries, all reports together.
SLEEP_BUDGET = 30.0
# Largest reply body read (the collector answers a few hundred bytes).
MAX_REPLY = 64 << 10


def reports_url(url: str) -> str:
    """Accept the collector's base URL or the full reports URL."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"the collector URL must be http(s), got {url!r}")
    return url if url.endswith(REPORTS_PATH) else url + REPORTS_PATH


class Verdict(str, Enum):
    """What one answer means for the report that got it."""

    DELIVERED = "delivered"    # 2xx
    TOKEN = "token"            # 401/403: every report would get it; keep them all
    RETRY = "retry"            # 408/429/5xx (or an odd status): try again later
    REJECTED = "rejected"      # any other 4xx: never acceptable, park it
    NO_ANSWER = "no-answer"    # refused, timed out, reply lost: the host or this report?


@dataclass(frozen=True)
class Answer:
    """The collector's answer to one POST (``status`` None when nothing came back)."""

    status: Optional[int]
    reason: str
    retry_after: Optional[float] = None

    @property
    def verdict(self) -> Verdict:
        s = self.status
        if s is None:
            return Verdict.NO_ANSWER
        if 200 <= s < 300:
            return Verdict.DELIVERED
        if s in (401, 403):
            return Verdict.TOKEN
        if 400 <= s < 500 and s not in (408, 429):
            return Verdict.REJECTED
        return Verdict.RETRY  # 408, 429, 5xx; also 1xx/3xx (a proxy in the way is not the report's fault)


def _retry_after(value: Optional[str]) -> Optional[float]:
    """``Retry-After`` as seconds (delta or HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, OverflowError):
        return None


def post_report(url: str, data: bytes, token: Optional[str], timeout: float) -> Answer:
    """POST one spooled report; never raises for HTTP or transport failures."""
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read(MAX_REPLY)
            return Answer(resp.status, "ok")
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read(MAX_REPLY) or b"null")
        except (OSError, ValueError, http.client.HTTPException):
            body = None
        why = body.get("error") if isinstance(body, dict) else None
        reason = " ".join(f"HTTP {e.code}: {why or e.reason}".split())[:300]
        return Answer(e.code, reason, _retry_after(e.headers.get("Retry-After")))
    except urllib.error.URLError as e:
        return Answer(None, str(getattr(e, "reason", e) or e))
    except (OSError, http.client.HTTPException, ValueError) as e:  # timeouts, resets, lost replies
        return Answer(None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


@dataclass
class SendResult:
    sent: list = field(default_factory=list)        # ids newly stored by the host
    duplicates: list = field(default_factory=list)  # ids the host already had
    rejected: list = field(default_factory=list)    # (id, reason): refused for good, parked
    pending: int = 0                                # still in the spool
    error: Optional[str] = None                     # last transient failure (why some are still pending)
    token_error: Optional[str] = None               # the host refused the token: nothing more was sent
    waiting: int = 0                                # skipped: backing off after earlier failures
    next_try: Optional[float] = None                # when the first of those is due (epoch seconds)

    @property
    def delivered(self) -> int:
        return len(self.sent) + len(self.duplicates)


def default_attempts() -> int:
    try:
        return max(1, int(os.environ.get(ATTEMPTS_ENV, "4")))
    except ValueError:
        return 4


@dataclass
class _Pacer:
    """Backoff between attempts, capped per flush so a sick host cannot stall the caller."""

    backoff: float
    max_backoff: float
    budget: float
    sleep: Callable[[float], None]

    def wait(self, attempt: int, retry_after: Optional[float]) -> bool:
        """Sleep before the next attempt; False when that is not worth it within this flush."""
        if retry_after is not None:  # the server said how long: honour it when it is short
            delay = retry_after
            if delay > self.max_backoff:
                return False
        else:
            delay = min(self.max_backoff, self.backoff * (2 ** attempt)) * (0.5 + random.random() / 2)
        if delay > self.budget:
            return False
        self.budget -= delay
        self.sleep(delay)
        return True


def _send_with_retries(url: str, path: Path, token: Optional[str], tries: int, pacer: _Pacer,
                       timeout: float) -> Answer:
    data = path.read_bytes()
    for attempt in range(tries):
        ans = post_report(url, data, token, timeout)
        if ans.verdict not in (Verdict.RETRY, Verdict.NO_ANSWER) or attempt + 1 == tries:
            break
        if not pacer.wait(attempt, ans.retry_after):
            break
    return ans


def deliver(url: str, spool: Spool, *, token: Optional[str] = None, attempts: Optional[int] = None,
            backoff: float = 0.5, max_backoff: float = 8.0, timeout: float = 10.0,
            sleep: Callable[[float], None] = time.sleep, budget: float = SLEEP_BUDGET,
            ignore_backoff: bool = False, clock: Callable[[], float] = time.time) -> SendResult:
    """Send everything due in ``spool`` to the collector at ``url``, oldest first.

    Each report gets up to ``attempts`` tries with exponential backoff and
    jitter (all sleeps of one call together at most ``budget`` seconds); what
    each answer does is in the module docstring. ``ignore_backoff`` also tries
    reports whose per-report backoff is not over yet.
    """
    target = reports_url(url)
    attempts = default_attempts() if attempts is None else max(1, attempts)
    pacer = _Pacer(backoff, max_backoff, budget, sleep)
    res = SendResult()
    with spool.locked():
        silent: Optional[tuple] = None  # (path, reason) of a report that got no answer
        for path in spool.pending():
            state = spool.retry_state(path)
            if not ignore_backoff and state.next_try > clock():
                res.waiting += 1
                res.next_try = min(res.next_try or state.next_try, state.next_try)
                res.error = res.error or state.last_error
                continue
            try:  # after a silence, one probe tells "host away" from "this report upsets it"
                ans = _send_with_retries(target, path, token, 1 if silent else attempts, pacer, timeout)
            except FileNotFoundError:
                continue  # another sender finished it
            except OSError as e:  # unreadable entry: leave it for a person, keep the queue moving
                res.error = f"cannot read {path.name}: {e.strerror or e}"
                continue
            if ans.verdict is Verdict.NO_ANSWER:
                res.error = ans.reason
                if silent:
                    break  # two silences in a row: the host is away; the rest waits for the next flush
                silent = (path, ans.reason)
                continue
            if silent:  # the host answers, so that silence was about that report
                spool.record_failure(silent[0], silent[1], now=clock())
                silent = None
            if not _apply(ans, path, spool, res, token, clock):
                break
    res.pending = len(spool.pending())
    return res


def _apply(ans: Answer, path: Path, spool: Spool, res: SendResult, token: Optional[str],
           clock: Callable[[], float]) -> bool:
    """Act on a report's answer; False when nothing more should be sent in this flush."""
    rid = report_id(path)
    if ans.verdict is Verdict.DELIVERED:
        (res.duplicates if ans.status == 200 else res.sent).append(rid)
        spool.remove(path)
    elif ans.verdict is Verdict.REJECTED:
        spool.reject(path, ans.reason)
        res.rejected.append((rid, ans.reason))
    elif ans.verdict is Verdict.TOKEN:
        res.token_error = f"{'the token was refused' if token else 'no token was given'} ({ans.reason})"
        return False
    else:
        res.error = ans.reason
        spool.record_failure(path, ans.reason, retry_after=ans.retry_after, now=clock())
    return True


def send_report(report: dict, url: str, *, spool: Optional[Spool] = None, **kw) -> SendResult:
    """Spool ``report`` then deliver it (and anything due that was spooled earlier)."""
    spool = spool or Spool()
    spool.put(report)
    return deliver(url, spool, **kw)


def _in(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds} s" if seconds < 120 else f"{round(seconds / 60)} min"


def describe(res: SendResult, url: str, spool: Spool) -> str:
    """One line for people about what happened to the reports."""
    parts = []
    if res.token_error:
        parts.append(f"{url} did not accept the report token: {res.token_error}; {res.pending} report(s) "
                     f"stay in {spool.dir} and go out once the token is right "
                     f"(set {TOKEN_ENV} or --report-token, then `edgerun flush --report-to {url}`)")
    if res.sent:
        parts.append(f"{len(res.sent)} report(s) sent to {url}")
    if res.duplicates:
        parts.append(f"{len(res.duplicates)} already there")
    if res.rejected:
        parts.append(f"{len(res.rejected)} rejected ({res.rejected[0][1]}); kept in {spool.dir / REJECTED}")
    if res.pending and not res.token_error:
        when = f"; next retry in {_in(res.next_try - time.time())}" if res.waiting and res.next_try else ""
        parts.append(f"{res.pending} spooled in {spool.dir} ({res.error or 'not sent'}{when}); "
                     f"they go out on the next run or with `edgerun flush --report-to {url}`")
    return "; ".join(parts) or "nothing to send"


def __getattr__(name: str):
    # The click option and its sender moved to edgepipe.device.cli_report (click stays in cli_* modules);
    # resolved lazily so importing this module never imports click.
    if name in ("report_to_option", "maybe_send"):
        from edgepipe.device import cli_report

        return getattr(cli_report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
