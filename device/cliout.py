"""What the edgerun commands share at the click boundary: one-line errors, report output."""
from __future__ import annotations

import os
from typing import Any, Callable, Optional, Sequence, TypeVar

import click


def fail(msg, command: Optional[click.Command] = None) -> click.ClickException:
    """A one-line error for the user (newlines from lower layers folded into spaces).

    ``msg`` may be an exception: when it names the library parameter at fault
    (``EdgepipeError.param``), the running command's own flag for it is put
    in front (``--data: ...``); the library itself never names flags.
    """
    if isinstance(msg, BaseException):
        from edgepipe.device.errors import cli_hint

        return click.ClickException(cli_hint(msg, lambda p: flag_for(p, command)))
    return click.ClickException(" ".join(str(msg).split()))


def flag_for(param: str, command: Optional[click.Command] = None):
    """The flag for parameter ``param`` (``--min-secs``) of ``command`` or the running commands, else ``None``."""
    ctx = click.get_current_context(silent=True)
    commands = [command] if command is not None else []
    while ctx is not None:
        commands.append(ctx.command)
        ctx = ctx.parent
    for cmd in commands:
        for p in cmd.params:
            if p.name == param and isinstance(p, click.Option):
                longs = [o for o in p.opts if o.startswith("--")]
                return (longs or p.opts)[0]
    return None


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


def isolate_option(f):
    """`--isolate/--no-isolate` for the commands that load a model (bench, run)."""
    return click.option(
        "--isolate/--no-isolate", "isolate", default=None,
        help="Load the model in a child process first, so a model that crashes the runtime gives a one-line "
             "error instead of killing edgerun (costs one extra model load). Default: only for models whose "
             "graph looks malformed.")(f)


def preflight(bundle_path: os.PathLike, *, isolate: Optional[bool], delegates: Sequence[str],
              threads: Optional[int], backend: Optional[str], edgetpu_device: Optional[str]) -> None:
    """Keep fault dumps on the real stderr, then probe the model(s) in a child as ``isolate`` says.

    Bundle and probe failures are left to the caller's one-line error handling (they are EdgepipeErrors).
    """
    from edgepipe.device import isolate as iso
    from edgepipe.device.bench import model_for
    from edgepipe.device.bundle import load_bundle

    iso.keep_fault_reports()
    if isolate is False:
        return
    bundle = load_bundle(bundle_path)
    paths: dict = {}
    for d in delegates:  # one probe per model file, with the first delegate that uses it
        paths.setdefault(model_for(bundle, d), d)
    for path, d in paths.items():
        iso.preflight(path, isolate=isolate, backend=backend, delegate=d, threads=threads,
                      edgetpu_device=edgetpu_device)
