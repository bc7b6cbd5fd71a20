"""`edgepipe serve`: run the collector that devices send their reports to."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

import click

from edgepipe.pipeline.cli_devices import broker_options, collect_from_broker
from edgepipe.pipeline.collector import DEFAULT_MAX_BODY, DEFAULT_PORT


@click.command(epilog="""\b
Examples:
  edgepipe serve --port 8750
  edgepipe serve --host 0.0.0.0 --token "$EDGEPIPE_TOKEN" --db results.db
  edgerun bench bundle/ --report-to http://HOST:8750     # on the device
  edgepipe serve --broker mqtt://broker.lan:1883 --password "$EDGEPIPE_MQTT_PASSWORD"   # boards that dial out
""")
@click.option("--db", "db_path", default=None,
              help="Results database: a SQLite file, or postgresql://user@host/db for a team's shared store. "
                   "Default: $EDGEPIPE_DB or ~/.local/share/edgepipe/results.db.")
@click.option("--baseline", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Report set from `edgepipe report --save`: the dashboard's history charts show its p50 "
                   "band (--tolerance wide).")
@click.option("--tolerance", type=click.FloatRange(0, 100), default=0.10, show_default=True,
              help="Width of the baseline band, as a fraction of the baseline p50.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything beyond loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="TCP port (0 picks a free one and prints it).")
@click.option("--token", envvar="EDGEPIPE_TOKEN", default=None,
              help="Bearer token devices must send [env: EDGEPIPE_TOKEN].")
@click.option("--max-body-kb", type=click.IntRange(1, 1 << 20), default=DEFAULT_MAX_BODY // 1024,
              show_default=True, help="Largest accepted report body.")
@click.option("--quiet", is_flag=True, help="Do not print a line per received report.")
@broker_options()
def serve(db_path, baseline, tolerance, host, port, token, max_body_kb, quiet, **broker_kw):
    """Collect reports from devices into the results database.

    Devices POST to /v1/reports (idempotent on the report id); GET /v1/reports
    lists them with filters (kind, device, model, recipe, delegate, threads,
    since, limit); GET /healthz answers liveness probes.
    """
    from edgepipe.device.cliout import start_server
    from edgepipe.device.http import serve_until_stopped
    from edgepipe.pipeline.collector import CollectorServer
    from edgepipe.pipeline.dashboard import Dashboard
    from edgepipe.pipeline.reporting import load_baseline
    from edgepipe.pipeline.store import StoreError, default_db, open_store
    from edgepipe.pipeline.store_pg import redact

    path = db_path or default_db()
    base_rows = None
    if baseline:
        try:
            base_rows = load_baseline(Path(baseline))
        except ValueError as e:
            raise click.ClickException(f"{e} (--baseline)") from None

    def on_report(rep, new):
        if quiet:
            return
        lat = (rep.get("latency_ms") or {}).get("p50")
        when = _dt.datetime.now().strftime("%H:%M:%S")
        model, device = rep.get("model") or {}, rep.get("device") or {}
        click.echo(f"{when} {'new ' if new else 'dup '} {rep.get('kind')} "
                   f"{device.get('name') or device.get('hostname')} {model.get('name')}"
                   + (f" p50={lat:.2f}ms" if isinstance(lat, (int, float)) else ""))

    try:
        store = open_store(path)
    except StoreError as e:
        raise click.ClickException(f"{e} (--db)") from None
    except Exception as e:  # sqlite3.Error, OSError
        raise click.ClickException(f"cannot open results database {redact(str(path))}: {e}") from None
    dash = Dashboard(store, baseline=base_rows, tolerance=tolerance)
    server = start_server(lambda: CollectorServer(store, host, port, token=token, max_body=max_body_kb * 1024,
                                                  on_report=on_report, dashboard=dash), host, port)

    click.echo(f"collector listening on {server.url}  db={redact(str(path))}  "
               f"auth={'token' if token else 'none (loopback only)'}")
    click.echo(f"dashboard {server.url}/" + ("  (sign in with the token, or open "
                                              f"{server.url}/#token=TOKEN)" if token else ""))
    on_close = store.close
    if broker_kw["broker"]:
        on_close = collect_from_broker(store, on_report, server, **broker_kw)
    serve_until_stopped(server, on_close=on_close)
    click.echo("collector stopped")
