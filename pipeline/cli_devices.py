"""`edgepipe devices --broker …`: the boards on a broker; and the broker options bench/serve share."""
from __future__ import annotations

import datetime as _dt
import json
import sys
from typing import Optional

import click

BROKER_ENV, USER_ENV, PASSWORD_ENV = "EDGEPIPE_BROKER", "EDGEPIPE_MQTT_USERNAME", "EDGEPIPE_MQTT_PASSWORD"
DEFAULT_USER = "edgepipe"


def broker_options(required: bool = False):
    """``--broker``, ``--username``, ``--password``, ``--ca-file`` (keyword arguments of the command)."""
    def deco(f):
        opts = [
            click.option("--broker", envvar=BROKER_ENV, required=required, default=None,
                         metavar="mqtt[s]://HOST[:PORT]",
                         help=f"MQTT broker the boards dial out to [env: {BROKER_ENV}]."),
            click.option("--username", envvar=USER_ENV, default=None,
                         help=f"Broker user name (default {DEFAULT_USER} when a password is given) [env: {USER_ENV}]."),
            click.option("--password", envvar=PASSWORD_ENV, default=None,
                         help=f"Broker password [env: {PASSWORD_ENV}]."),
            click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
                         help="CA certificate for a TLS broker (implies TLS; mqtts:// uses the system CAs)."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def broker_from(broker: str, username: Optional[str], password: Optional[str], ca_file: Optional[str]):
    """The :class:`~edgepipe.device.mqtt.Broker` the options describe (click errors for a bad URL)."""
    from edgepipe.device.mqtt import BrokerError, parse_broker

    try:
        cfg = parse_broker(broker, username=username, password=password, ca_file=ca_file)
        if cfg.password and not cfg.username:
            cfg = parse_broker(broker, username=DEFAULT_USER, password=cfg.password, ca_file=ca_file)
    except BrokerError as e:
        raise click.BadParameter(str(e), param_hint="--broker") from None
    return cfg


def ago(stamp: Optional[str], now: Optional[_dt.datetime] = None) -> str:
    """``12s ago`` / ``3m ago`` / ``2h ago`` / ``4d ago`` for an ISO time; ``-`` when unknown."""
    if not stamp:
        return "-"
    try:
        t = _dt.datetime.fromisoformat(stamp)
    except ValueError:
        return "-"
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    secs = max(0.0, ((now or _dt.datetime.now(_dt.timezone.utc)) - t).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


def devices_table(devices: list) -> str:
    """One line per board: id, name, tags, hostname, state, last seen, queued, runtime, delegates."""
    from edgepipe.device.tables import format_table

    rows = [[d.id, d.name or "-", ",".join(d.tags) or "-", d.hostname or "-", "online" if d.online else "offline",
             ago(d.last_seen), "-" if d.queued is None else str(d.queued), d.runtime, ",".join(d.delegates) or "-"]
            for d in devices]
    heads = ["ID", "NAME", "TAGS", "HOSTNAME", "STATE", "LAST SEEN", "QUEUED", "RUNTIME", "DELEGATES"]
    return format_table(heads, rows)


@click.command(epilog="""\b
Examples:
  edgepipe devices --broker mqtt://broker.lan:1883 --password "$EDGEPIPE_MQTT_PASSWORD"
  edgepipe devices --broker mqtts://broker.example:8883 --online --json
""")
@broker_options(required=True)
@click.option("--online", "online_only", is_flag=True, help="Only boards that are online now.")
@click.option("--tag", default=None, help="Only boards with this tag.")
@click.option("--json", "as_json", is_flag=True, help="Print the boards as JSON.")
def devices(broker, username, password, ca_file, online_only, tag, as_json):
    """List the boards that announced themselves on an MQTT broker.

    Boards started with `edgerun agent --broker` keep a retained status on the
    broker (online, or offline once they stop or their connection dies) and a
    heartbeat; this reads both. Exit code 1 when no board matches.
    """
    from edgepipe.device.mqtt import BrokerError
    from edgepipe.pipeline.broker import discover

    cfg = broker_from(broker, username, password, ca_file)
    try:
        found = discover(cfg)
    except BrokerError as e:
        raise click.ClickException(str(e)) from None
    found = [d for d in found if (d.online or not online_only) and (tag is None or tag in d.tags)]
    if as_json:
        click.echo(json.dumps({"broker": cfg.label(), "devices": [d.to_dict() for d in found]}, indent=2))
    elif found:
        click.echo(devices_table(found))
        click.echo(f"{sum(d.online for d in found)} online, {sum(not d.online for d in found)} offline "
                   f"on {cfg.label()}")
    else:
        click.echo(f"no boards on {cfg.label()}" + (" match" if online_only or tag else ""))
    sys.exit(0 if found else 1)


def collect_from_broker(store, on_report, server, *, broker: str, username: Optional[str],
                        password: Optional[str], ca_file: Optional[str]):
    """`edgepipe serve --broker`: also store the reports boards publish; returns the close callback."""
    import socket

    from edgepipe.device.mqtt import BrokerError
    from edgepipe.pipeline.broker import BrokerCollector

    cfg = broker_from(broker, username, password, ca_file)
    collector = BrokerCollector(cfg, store, client_id=f"edgepipe-collector-{socket.gethostname()}"[:64],
                                on_report=on_report)
    try:
        collector.start()
    except BrokerError as e:
        server.server_close()
        store.close()
        raise click.ClickException(f"{e} (--broker)") from None
    click.echo(f"collecting reports from {cfg.label()} ({collector.topics.reports}, QoS 1, persistent session)")

    def close() -> None:
        collector.close()
        store.close()
    return close
