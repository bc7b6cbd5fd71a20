"""`edgerun agent --broker …`: the options and the loop of the broker mode (see agent_mqtt)."""
from __future__ import annotations

import signal
import threading
from typing import Callable, Optional

import click

BROKER_ENV, USER_ENV, PASSWORD_ENV = "EDGERUN_BROKER", "EDGERUN_MQTT_USERNAME", "EDGERUN_MQTT_PASSWORD"
DEFAULT_USER = "edgerun"


def broker_options(f):
    """The broker-mode options of `edgerun agent` (passed on as keyword arguments)."""
    opts = [
        click.option("--broker", envvar=BROKER_ENV, default=None, metavar="mqtt[s]://HOST[:PORT]",
                     help="Dial out to this MQTT broker instead of listening (boards behind NAT) "
                          f"[env: {BROKER_ENV}]. --token is then the broker password."),
        click.option("--username", envvar=USER_ENV, default=None,
                     help=f"Broker user name (default {DEFAULT_USER} when a password or token is given) "
                          f"[env: {USER_ENV}]."),
        click.option("--password", envvar=PASSWORD_ENV, default=None,
                     help=f"Broker password [env: {PASSWORD_ENV}]."),
        click.option("--ca-file", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="CA certificate for a TLS broker (implies TLS; mqtts:// uses the system CAs)."),
        click.option("--name", default=None, help="A name for people (kept with the device id; '' clears it)."),
        click.option("--tag", "tags", multiple=True, metavar="TAG",
                     help="Tag this device (repeat); `edgepipe bench --devices tag:TAG` picks by tag."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def apply_identity(name: Optional[str], tags: tuple):
    """Load (or make) this device's identity, saving a new name/tags; one-line error when it cannot."""
    from edgepipe.device.identity import IdentityError, load_identity

    try:
        return load_identity(name=name, tags=list(tags) if tags else None)
    except IdentityError as e:
        raise click.ClickException(str(e)) from None


def serve_broker(store, *, broker: str, username: Optional[str], password: Optional[str], ca_file: Optional[str],
                 name: Optional[str], tags: tuple, token: Optional[str], keep_warm: int, job_timeout: float,
                 on_report: Optional[Callable[[dict], None]], info: Callable[[], dict]) -> None:
    """Run the agent against a broker until SIGTERM/Ctrl-C."""
    from edgepipe.device.agent_mqtt import MqttAgent
    from edgepipe.device.http import is_loopback
    from edgepipe.device.jobs import JobCore
    from edgepipe.device.mqtt import BrokerError, parse_broker

    try:
        cfg = parse_broker(broker, username=username, password=password or token, ca_file=ca_file)
    except BrokerError as e:
        raise click.BadParameter(str(e), param_hint="--broker") from None
    if cfg.password and not cfg.username:
        cfg = parse_broker(broker, username=DEFAULT_USER, password=cfg.password, ca_file=ca_file)
    if not cfg.password and not is_loopback(cfg.host):
        raise click.UsageError("refusing to take jobs from a broker beyond loopback without credentials: "
                               "pass --token or --username/--password")
    identity = apply_identity(name, tags)
    front = MqttAgent(cfg, identity, store.root, info=info)
    try:
        core = JobCore(store, keep_warm=keep_warm, on_report=on_report, on_change=front.job_changed,
                       default_timeout=job_timeout)
    except OSError as e:
        raise click.ClickException(f"cannot keep job states in {store.root}: {e}") from None
    front.attach(core)
    try:
        front.start()
    except BrokerError as e:
        core.close()
        raise click.ClickException(f"{e} (check --broker, --username/--password or --token)") from None
    click.echo(f"agent {identity.id}{f' ({identity.name})' if identity.name else ''} connected to "
               f"{cfg.label()} as {cfg.username or 'anonymous'}; jobs on {front.topics.jobs(identity.id)}")
    _wait_for_stop()
    front.close()
    core.close()
    click.echo("agent stopped")


def _wait_for_stop() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
