"""What the edgerun commands share at the click boundary: one-line errors, report output."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, TypeVar

import click


def fail(msg: str) -> click.ClickException:
    """A one-line error for the user (newlines from lower layers folded into spaces)."""
    return click.ClickException(" ".join(str(msg).split()))


S = TypeVar("S")


def start_server(make: Callable[[], S], host: str, port: int) -> S:
    """Build a server (agent or collector); refusals and bind failures become one-line errors."""
    try:
        return make()
    except ValueError as e:  # e.g. bound beyond loopback without a token
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def save_and_echo(payload: Any, path: Optional[os.PathLike], as_json: bool) -> None:
    """Write a report (or list of reports) to ``path`` if given, and print it as JSON if asked."""
    from edgepipe.device.report import check_reports, dumps, write_json

    check_reports(payload)  # never write or print a report that breaks edgepipe.report/1
    if path:
        try:
            write_json(payload, path)
        except OSError as e:
            raise fail(f"cannot write {path}: {e.strerror or e}") from None
    if as_json:
        click.echo(dumps(payload))
