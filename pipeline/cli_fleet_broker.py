"""The broker half of `edgepipe bench`: ``--broker … --devices all|ID…|tag:TAG`` (see fleet_broker)."""
from __future__ import annotations

from typing import Callable, Optional

import click

from edgepipe.pipeline.cli_devices import broker_from, broker_options


def broker_bench_options(f):
    """The options `edgepipe bench` adds for boards behind a broker (keyword arguments)."""
    opts = [
        broker_options(),
        click.option("--devices", "selection", default=None, metavar="all|ID[,ID...]|tag:TAG",
                     help="With --broker: which boards (online ones for all and tag:TAG; ids or names). "
                          "Default all."),
        click.option("--serve-bundles", default=None, metavar="HOST:PORT",
                     help="With --broker: serve bundles too large for a message over HTTP here for the boards "
                          "to fetch (by sha256, with a per-run token). Default 127.0.0.1 on a free port."),
        click.option("--bundle-url", default=None, metavar="URL",
                     help="How the boards reach --serve-bundles (e.g. http://workstation.example:8752) when "
                          "that differs from HOST:PORT."),
        click.option("--offline-grace", type=click.FloatRange(0, 86400), default=30, show_default=True,
                     help="With --broker: fail a board's unfinished jobs once it has been offline this long."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _bundle_server(serve: Optional[str], public_url: Optional[str]):
    from edgepipe.device.cliout import start_server
    from edgepipe.pipeline.broker import BundleServer

    host, port = "127.0.0.1", 0
    if serve:
        host, _, p = serve.rpartition(":")
        try:
            port = int(p)
        except ValueError:
            raise click.BadParameter(f"{serve!r} is not HOST:PORT", param_hint="--serve-bundles") from None
        host = host.strip("[]") or "127.0.0.1"
    return start_server(lambda: BundleServer(host, port, public_url=public_url), host, port)


def bench_over_broker(packed: list, settings: list, *, store, job_timeout: float,
                      progress: Callable[[str, str, str, str], None], broker: str, username: Optional[str],
                      password: Optional[str], ca_file: Optional[str], selection: Optional[str],
                      serve_bundles: Optional[str], bundle_url: Optional[str], offline_grace: float):
    """Run the bench through the broker; returns ``(FleetResult, number of boards)``."""
    from edgepipe.device.mqtt import BrokerError
    from edgepipe.pipeline.fleet_broker import INLINE_LIMIT, bench_broker

    cfg = broker_from(broker, username, password, ca_file)
    wanted = [w.strip() for w in (selection or "all").split(",") if w.strip()] or ["all"]
    server = None
    if any(len(pb.data) > INLINE_LIMIT for pb in packed) or serve_bundles:
        server = _bundle_server(serve_bundles, bundle_url)
        server.start_background()
        click.echo(f"serving bundles larger than {INLINE_LIMIT >> 10} KiB at {server.public_url}", err=True)
    try:
        result = bench_broker(packed, cfg, wanted, settings=settings, store=store, job_timeout=job_timeout,
                              offline_grace=offline_grace, bundle_server=server, on_event=progress)
    except BrokerError as e:
        raise click.ClickException(str(e)) from None
    finally:
        if server is not None:
            server.close()
    return result, len({o.device for o in result.outcomes})
