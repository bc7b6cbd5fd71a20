"""`--report-to` for `edgerun bench` / `edgerun run`: the click option and what the command says after sending.

A report handed to ``--report-to`` ends one of five ways (:class:`Outcome`).
Delivered, or spooled because the host is away or busy: the command succeeds
and prints one line. Token refused (it stays spooled), refused for good, or
neither sent nor spooled (no usable spool and no host): the user must act, so
the command exits non-zero with one line saying what happened and what to do.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Optional

import click

from edgepipe.device.errors import EdgepipeError, one_line
from edgepipe.device.send import (REPORT_TO_ENV, TOKEN_ENV, SendResult, Spool, Verdict, deliver, describe,
                                  post_report, reports_url)

_META_KEY = "edgerun.report_to"


class Outcome(str, Enum):
    DELIVERED = "delivered"
    SPOOLED = "spooled"              # goes out on a later run or flush by itself
    TOKEN_REFUSED = "token-refused"  # stays spooled until the token is fixed
    REJECTED = "rejected"            # parked in spool/rejected/
    LOST = "lost"                    # neither sent nor spooled


@dataclass(frozen=True)
class Delivery:
    """What became of one report, and the one line that says so."""

    outcome: Outcome
    line: str
    result: Optional[SendResult] = None

    @property
    def failed(self) -> bool:
        return self.outcome not in (Outcome.DELIVERED, Outcome.SPOOLED)


def report_to_option(f):
    """Decorator adding ``--report-to URL`` and ``--report-token`` to a command.

    The values go into the click context (the command's signature does not
    change); call :func:`send_reports` with the finished reports.
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


def _options(ctx: Optional[click.Context]) -> dict:
    ctx = ctx or click.get_current_context(silent=True)
    return (ctx.meta.get(_META_KEY) if ctx else None) or {}


def maybe_send(report: dict, ctx: Optional[click.Context] = None) -> Optional[Delivery]:
    """Send ``report`` if the command got ``--report-to``; None when it did not.

    Prints nothing: :func:`send_reports` prints the lines and tells the command whether to fail.
    """
    opts = _options(ctx)
    url = opts.get("report_to")
    if not url:
        return None
    spool, token, rid = Spool(), opts.get("report_token"), str(report.get("id"))
    try:
        spool.put(report)
    except OSError as e:
        return _send_direct(report, url, token, f"cannot write the report spool {spool.dir}: {e}")
    except EdgepipeError as e:  # e.g. the report breaks its contract: the host would refuse it too
        return Delivery(Outcome.LOST, f"report {rid} not sent: {one_line(e)}")
    try:
        res = deliver(reports_url(url), spool, token=token)
    except (OSError, TimeoutError) as e:  # spooled, but the spool could not be worked now (lock, disk)
        return Delivery(Outcome.SPOOLED, f"report {rid} spooled in {spool.dir} but not sent now ({e}); "
                                         f"it goes out with `edgerun flush --report-to {url}`")
    return Delivery(_outcome(res, rid), describe(res, url, spool), res)


def _outcome(res: SendResult, rid: str) -> Outcome:
    if rid in res.sent or rid in res.duplicates:
        return Outcome.DELIVERED
    if any(r == rid for r, _ in res.rejected):
        return Outcome.REJECTED
    return Outcome.TOKEN_REFUSED if res.token_error else Outcome.SPOOLED


def _send_direct(report: dict, url: str, token: Optional[str], why: str) -> Delivery:
    """No usable spool: one direct attempt, and say plainly if the report did not make it."""
    import json

    rid = str(report.get("id"))
    data = json.dumps(report, separators=(",", ":")).encode("utf-8")
    ans = post_report(reports_url(url), data, token, timeout=10.0)
    if ans.verdict is Verdict.DELIVERED:
        return Delivery(Outcome.DELIVERED, f"report {rid} sent to {url} directly ({why})")
    hint = f"; set {TOKEN_ENV} or --report-token" if ans.verdict is Verdict.TOKEN else ""
    return Delivery(Outcome.LOST, f"report {rid} neither sent nor spooled: {why}; "
                                  f"{url} did not take it ({ans.reason}){hint}")


def send_reports(reports: Iterable[dict], ctx: Optional[click.Context] = None) -> Optional[str]:
    """Send each report (if ``--report-to`` was given) and print one line on stderr for each.

    Returns None when every report was delivered or safely spooled, else the
    line for the command to fail with (the user must act: fix the token, the
    spool directory or the report); that line is not printed here.
    """
    problems = []
    for report in reports:
        d = maybe_send(report, ctx)
        if d is None:
            continue
        if d.failed:
            problems.append(d.line)
        else:
            click.echo(d.line, err=True)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more report(s) not delivered)" if len(problems) > 1 else ""
    return problems[0] + more
