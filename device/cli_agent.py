"""`edgerun agent` (serve bundles/jobs to `edgepipe bench`) and `edgerun flush`."""
from __future__ import annotations

import os
import platform
import socket
import sys
from pathlib import Path

import click

from edgepipe.device import __version__
from edgepipe.device.cli_agent_mqtt import apply_identity, broker_options, serve_broker
from edgepipe.device.identity import STATE_ENV
from edgepipe.device.paths import user_dir
from edgepipe.device.send import REPORT_TO_ENV, TOKEN_ENV

AGENT_TOKEN_ENV = "EDGERUN_TOKEN"


def default_store_dir() -> Path:
    """``$EDGERUN_STORE``, else ``$XDG_DATA_HOME/edgerun/bundles`` (~/.local/share)."""
    return user_dir("data", "edgerun", "bundles", env="EDGERUN_STORE")


def parse_size(text: str) -> int:
    """``500M``, ``2G``, ``1.5G``, ``300`` (MiB) -> bytes; click.BadParameter otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = units.get(t[-1:], None)
    try:
        value = float(t[:-1] if mult else t) * (mult or 1 << 20)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size such as 500M or 2G", param_hint="--store-quota") from None
    if not 1 << 20 <= value <= 1 << 50:
        raise click.BadParameter("the store quota must be between 1M and 1024T", param_hint="--store-quota")
    return int(value)


def device_info() -> dict:
    """What `GET /v1/info` answers: what `edgerun info --json` prints, plus the version."""
    try:
        from edgepipe.device.sysinfo import info

        data = info()
    except Exception as e:  # never fail /v1/info; say what went wrong instead
        data = {"hostname": socket.gethostname(), "machine": platform.machine(),
                "python": platform.python_version(), "error": f"{type(e).__name__}: {e}"}
    data["edgerun"] = __version__
    return data


@click.command(epilog="""\b
Examples:
  edgerun agent                                   # loopback only, no token needed
  edgerun agent --host 0.0.0.0 --token "$EDGERUN_TOKEN" --store /var/lib/edgerun/bundles
  edgepipe bench out/*/ --device http://pi.local:8751 --token "$EDGERUN_TOKEN"   # on the workstation
  edgerun agent --broker mqtts://broker.example:8883 --token "$EDGERUN_TOKEN" --name pi-07 --tag lab
""")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; anything beyond loopback needs --token.")
@click.option("--port", type=click.IntRange(0, 65535), default=8751, show_default=True,
              help="TCP port (0 picks a free one and prints it).")
@click.option("--token", envvar=AGENT_TOKEN_ENV, default=None,
              help=f"Bearer token clients must send [env: {AGENT_TOKEN_ENV}].")
@click.option("--store", "store_dir", type=click.Path(file_okay=False), default=None,
              help="Bundle store. Default: $EDGERUN_STORE or ~/.local/share/edgerun/bundles.")
@click.option("--max-bundle-mb", type=click.IntRange(1, 1 << 16), default=512, show_default=True,
              help="Largest bundle upload (tar) and unpacked size.")
@click.option("--store-quota", default="2G", show_default=True, metavar="SIZE",
              help="Total size of the bundle store (e.g. 500M, 2G; a plain number is MiB); the least "
                   "recently used bundles no job needs are evicted to make room.")
@click.option("--job-timeout", type=click.FloatRange(1, 4 * 3600), default=600, show_default=True,
              help="Seconds a job may run (plus its min_secs) unless it asks for its own timeout; "
                   "a job over it is killed with its worker and fails.")
@click.option("--keep-warm", type=click.IntRange(0, 64), default=2, show_default=True,
              help="Loaded interpreters kept between jobs (0 = always cold).")
@click.option("--report-to", envvar=REPORT_TO_ENV, default=None, metavar="URL",
              help=f"Also send every job's report to a collector (spooled when away) [env: {REPORT_TO_ENV}].")
@click.option("--report-token", envvar=TOKEN_ENV, default=None, metavar="TOKEN",
              help=f"Bearer token for --report-to [env: {TOKEN_ENV}].")
@broker_options
def agent(host, port, token, store_dir, max_bundle_mb, store_quota, job_timeout, keep_warm, report_to,
          report_token, **broker_kw):
    """Serve this device to `edgepipe bench`: receive bundles, run bench/run jobs.

    Jobs run one at a time in a worker process; interpreters stay warm there
    between jobs for the same bundle and settings. A model that crashes or
    hangs the runtime fails its job and the worker is replaced. Stop with
    Ctrl-C or SIGTERM (systemd).
    """
    from edgepipe.device.agent import Agent, AgentServer
    from edgepipe.device.cliout import start_server
    from edgepipe.device.http import serve_until_stopped
    from edgepipe.device.bundle_store import BundleStore
    from edgepipe.device.send import Spool, describe, reports_url, send_report

    store_path = Path(store_dir) if store_dir else default_store_dir()
    if store_dir and not os.environ.get(STATE_ENV):
        # An agent with a store of its own is a device of its own (two agents on one machine are two
        # devices): its identity lives with that store, and its job worker inherits the setting.
        os.environ[STATE_ENV] = str(store_path)
    quota = parse_size(store_quota)
    try:
        store = BundleStore(store_path, max_bytes=max_bundle_mb << 20, quota_bytes=quota)
    except OSError as e:
        raise click.ClickException(f"cannot use bundle store {store_path}: {e}") from None

    on_report = None
    if report_to:
        try:
            url = reports_url(report_to)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--report-to") from None
        spool = Spool()

        def on_report(rep):
            res = send_report(rep, url, spool=spool, token=report_token)
            click.echo(describe(res, report_to, spool), err=True)

    if broker_kw["broker"]:
        serve_broker(store, token=token, keep_warm=keep_warm, job_timeout=job_timeout, on_report=on_report,
                     info=device_info, **broker_kw)
        return
    if broker_kw["name"] is not None or broker_kw["tags"]:
        apply_identity(broker_kw["name"], broker_kw["tags"])
    try:
        worker = Agent(store, keep_warm=keep_warm, on_report=on_report, default_timeout=job_timeout)
    except OSError as e:
        raise click.ClickException(f"cannot keep job states in {store_path}: {e}") from None
    try:
        server = start_server(lambda: AgentServer(worker, host, port, token=token, info=device_info), host, port)
    except click.ClickException:
        worker.close()
        raise

    click.echo(f"agent listening on {server.url}  store={store_path} (quota {quota >> 20} MiB)  "
               f"auth={'token' if token else 'none (loopback only)'}")
    serve_until_stopped(server, on_close=worker.close)
    click.echo("agent stopped")


@click.command(epilog="""\b
Examples:
  edgerun flush --report-to http://HOST:8750
  EDGERUN_REPORT_TO=http://HOST:8750 edgerun flush --json
  edgerun flush --report-to http://HOST:8750 --now --requeue-rejected   # after fixing the host
""")
@click.option("--report-to", envvar=REPORT_TO_ENV, required=True, metavar="URL",
              help=f"Collector (`edgepipe serve`) to send to [env: {REPORT_TO_ENV}].")
@click.option("--report-token", envvar=TOKEN_ENV, default=None, metavar="TOKEN",
              help=f"Bearer token [env: {TOKEN_ENV}].")
@click.option("--spool", "spool_dir", type=click.Path(file_okay=False), default=None,
              help="Spool directory. Default: $EDGERUN_SPOOL or ~/.local/state/edgerun/spool.")
@click.option("--now", "now", is_flag=True,
              help="Also try reports still backing off after earlier server errors.")
@click.option("--requeue-rejected", is_flag=True,
              help="Move reports the host refused for good (spool/rejected/) back into the queue first.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def flush(report_to, report_token, spool_dir, now, requeue_rejected, as_json):
    """Send reports spooled while the host was unreachable.

    \b
    What the host's answer does to a report:
      2xx                 delivered, removed from the spool
      401/403             kept; nothing more is sent (the token is wrong)
      408/429/5xx, none   retried with backoff; one that keeps failing waits
                          (30 s, 1 min, ... 1 h) without holding up the others
      other 4xx           moved to spool/rejected/ with the reason
    Exits 0 when the spool is empty afterwards, 1 when reports are still
    waiting, were rejected, or the host refused the token.
    """
    import json

    from edgepipe.device.send import Spool, deliver, describe, reports_url

    try:
        url = reports_url(report_to)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--report-to") from None
    spool = Spool(spool_dir)
    try:
        requeued = spool.requeue_rejected() if requeue_rejected else 0
        res = deliver(url, spool, token=report_token, ignore_backoff=now)
    except (OSError, TimeoutError) as e:
        raise click.ClickException(f"cannot use the spool {spool.dir}: {e}") from None
    if as_json:
        click.echo(json.dumps({"sent": res.sent, "duplicates": res.duplicates,
                               "rejected": [{"id": i, "reason": r} for i, r in res.rejected],
                               "pending": res.pending, "waiting": res.waiting, "requeued": requeued,
                               "error": res.error, "token_error": res.token_error, "spool": str(spool.dir)}))
    elif res.token_error:
        click.echo(f"Error: {describe(res, report_to, spool)}", err=True)
    else:
        click.echo(describe(res, report_to, spool))
    sys.exit(0 if res.pending == 0 and not res.rejected and not res.token_error else 1)
