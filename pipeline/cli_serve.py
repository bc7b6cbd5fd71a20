"""`edgepipe serve`: run the collector that devices send their reports to."""
from __future__ import annotations

import datetime as _dt

import click

from edgepipe.pipeline.collector import DEFAULT_MAX_BODY, DEFAULT_PORT


@click.command(epilog="""\b
Examples:
  edgepipe serve --port 8750
  edgepipe serve --host 0.0.0.0 --token "$EDGEPIPE_TOKEN" --db results.db
  edgerun bench bundle/ --report-to http://HOST:8750     # on the device
""")
@click.option("--db", "db_path", type=click.Path(dir_okay=False), default=None,
              help="Results database (SQLite). Default: $EDGEPIPE_DB or ~/.local/share/edgepipe/results.db.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything beyond loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port (0 picks a free one and prints it).")
@click.option("--token", envvar="EDGEPIPE_TOKEN", default=None,
              help="Bearer token devices must send [env: EDGEPIPE_TOKEN].")
@click.option("--max-body-kb", type=click.IntRange(1, 1 << 20), default=DEFAULT_MAX_BODY // 1024,
              show_default=True, help="Largest accepted report body.")
@click.option("--quiet", is_flag=True, help="Do not print a line per received report.")
def serve(db_path, host, port, token, max_body_kb, quiet):
    """Collect reports from devices into the results database.

    Devices POST to /v1/reports (idempotent on the report id); GET /v1/reports
    lists them with filters (kind, device, model, recipe, delegate, threads,
    since, limit); GET /healthz answers liveness probes.
    """
    from edgepipe.device.cliout import start_server
    from edgepipe.device.http import serve_until_stopped
    from edgepipe.pipeline.collector import CollectorServer
    from edgepipe.pipeline.store import Store, default_db_path

    path = db_path or default_db_path()

    def on_report(rep, new):
        if quiet:
            return
        lat = (rep.get("latency_ms") or {}).get("p50")
        when = _dt.datetime.now().strftime("%H:%M:%S")
        model = rep.get("model") or {}
        click.echo(f"{when} {'new ' if new else 'dup '} {rep.get('kind')} "
                   f"{(rep.get('device') or {}).get('hostname')} {model.get('name')}"
                   + (f" p50={lat:.2f}ms" if isinstance(lat, (int, float)) else ""))

    try:
        store = Store(path)
    except Exception as e:  # sqlite3.Error, OSError
        raise click.ClickException(f"cannot open results database {path}: {e}") from None
    server = start_server(lambda: CollectorServer(store, host, port, token=token, max_body=max_body_kb * 1024,
                                                  on_report=on_report), host, port)

    click.echo(f"collector listening on {server.url}  db={path}  "
               f"auth={'token' if token else 'none (loopback only)'}")
    serve_until_stopped(server, on_close=store.close)
    click.echo("collector stopped")
