"""MQTT plumbing shared by the broker agent and the host: broker URLs, topics, clients.

Boards behind NAT cannot accept connections, so in broker mode both sides dial
out to an MQTT broker (Mosquitto or a managed one). Topics, under a prefix
(default ``edgepipe``)::

    {p}/devices/{id}/status   retained: identity, runtimes, online/offline (the last will)
    {p}/devices/{id}/seen     retained: heartbeat time and queue length
    {p}/devices/{id}/jobs     host -> board, QoS 1: job requests (idempotent on the job id)
    {p}/devices/{id}/events   board -> host: progress (QoS 0) and final results (QoS 1)
    {p}/reports               board -> collectors, QoS 1: every report (idempotent on the report id)

MQTT 5 with persistent sessions (clean start off, a session expiry), so jobs
sent to a board that is away wait at the broker. paho-mqtt is imported only
when a client is made: the rest of the device package works without it.
"""
from __future__ import annotations

import json
import re
import ssl
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from edgepipe.device.errors import EdgepipeError, one_line

PREFIX = "edgepipe"
DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
# Managed brokers cap a message near 128 KiB (Mosquitto allows far more); a job
# message stays under this, larger bundles travel over HTTP by sha256.
SAFE_MESSAGE = 128 << 10
MAX_MESSAGE = 4 << 20  # anything larger received is refused unread
KEEPALIVE = 30
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class BrokerError(EdgepipeError):
    """The broker cannot be used (bad URL, unreachable, refused credentials) or sent something unusable."""


@dataclass(frozen=True)
class Broker:
    """Where and how to connect; ``password`` is never shown by :meth:`label`."""

    host: str
    port: int
    tls: bool = False
    ca_file: Optional[str] = None
    username: Optional[str] = None
    password: Optional[str] = None
    prefix: str = PREFIX

    def label(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker(url: str, *, username: Optional[str] = None, password: Optional[str] = None,
                 ca_file: Optional[str] = None, tls: Optional[bool] = None, prefix: str = PREFIX) -> Broker:
    """``mqtt://[user[:password]@]HOST[:PORT]`` or ``mqtts://…`` (TLS) -> :class:`Broker`.

    Explicit ``username``/``password`` win over the URL's; a CA file implies TLS.
    """
    parts, port = _split(url)
    if not _PREFIX_RE.match(prefix or ""):
        raise BrokerError(f"topic prefix {prefix!r} must be plain words separated by /")
    user = _given_or_url(username, parts.username)
    pw = _given_or_url(password, parts.password)
    use_tls = bool(tls) or parts.scheme.lower() == "mqtts" or bool(ca_file)
    return Broker(parts.hostname, port, use_tls, ca_file, user or None, pw or None, prefix)


def _split(url: str) -> tuple:
    """(the URL's parts, its port or the scheme's default); BrokerError for anything else in it."""
    parts = urllib.parse.urlsplit(url or "")
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise BrokerError(f"broker URL must start with mqtt:// or mqtts://, got {url!r}")
    if not parts.hostname:
        raise BrokerError(f"broker URL {url!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerError(f"broker URL {url!r}: only mqtt[s]://[user[:password]@]HOST[:PORT] is understood")
    try:
        return parts, parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise BrokerError(f"broker URL {url!r} has a bad port") from None


def _given_or_url(given: Optional[str], in_url: Optional[str]) -> Optional[str]:
    if given is not None:
        return given
    return urllib.parse.unquote(in_url) if in_url else None


@dataclass(frozen=True)
class Topics:
    prefix: str = PREFIX

    def device(self, device_id: str, leaf: str) -> str:
        return f"{self.prefix}/devices/{device_id}/{leaf}"

    def status(self, device_id: str) -> str:
        return self.device(device_id, "status")

    def seen(self, device_id: str) -> str:
        return self.device(device_id, "seen")

    def jobs(self, device_id: str) -> str:
        return self.device(device_id, "jobs")

    def events(self, device_id: str) -> str:
        return self.device(device_id, "events")

    @property
    def reports(self) -> str:
        return f"{self.prefix}/reports"

    def every(self, leaf: str) -> str:
        return f"{self.prefix}/devices/+/{leaf}"

    def device_of(self, topic: str) -> Optional[str]:
        """The device id in ``{prefix}/devices/{id}/…``, or None."""
        head = f"{self.prefix}/devices/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):].split("/")
        return rest[0] if len(rest) == 2 and rest[0] else None


def dumps(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


def loads(payload: bytes, what: str = "message"):
    """Decode a JSON payload, bounded; :class:`BrokerError` with one line otherwise."""
    if len(payload) > MAX_MESSAGE:
        raise BrokerError(f"{what} of {len(payload)} bytes is larger than {MAX_MESSAGE} bytes")
    from edgepipe.device.http import HTTPError_, parse_json  # depth-bounded, finite numbers only

    try:
        return parse_json(payload)
    except HTTPError_ as e:
        raise BrokerError(f"{what}: {e.reason}") from None


def _paho():
    try:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties
    except ImportError:
        raise BrokerError("broker mode needs paho-mqtt (pip install 'edgepipe[device]' or paho-mqtt)") from None
    return mqtt, CallbackAPIVersion, PacketTypes, Properties


def properties(packet: str, **values):
    """MQTT 5 properties, e.g. ``properties("CONNECT", SessionExpiryInterval=3600)``."""
    _, _, PacketTypes, Properties = _paho()
    props = Properties(getattr(PacketTypes, packet))
    for k, v in values.items():
        setattr(props, k, v)
    return props


class Connection:
    """A paho client that reconnects by itself, with the first connection checked.

    ``on_connect(client)`` runs after every (re)connection, e.g. to subscribe;
    ``on_message(msg)`` for every message (in paho's network thread).
    """

    def __init__(self, broker: Broker, client_id: str, *, session_expiry: int, on_connect=None,
                 on_message=None, will: Optional[tuple] = None, manual_ack: bool = False):
        mqtt, api, _, _ = _paho()
        self.broker, self.session_expiry = broker, int(session_expiry)
        self.client = mqtt.Client(api.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(1, 10)
        if broker.username:
            self.client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self.client.tls_set_context(ssl.create_default_context(cafile=broker.ca_file))
        if will:
            topic, payload = will
            self.client.will_set(topic, payload, qos=1, retain=True)
        self._user_connect, self._user_message = on_connect, on_message
        self.connected = threading.Event()
        self.generation = 0  # bumped on every connection (acks of an older one are stale)
        self._first = threading.Event()
        self._refusal: Optional[str] = None
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        if on_message is not None:
            self.client.on_message = lambda c, u, msg: on_message(msg)

    def _on_connect(self, client, userdata, flags, reason_code, props) -> None:
        if reason_code.is_failure:
            self._refusal = str(reason_code)
            self._first.set()
            return
        self.generation += 1
        self.connected.set()
        self._first.set()
        if self._user_connect is not None:
            self._user_connect(self)

    def _on_disconnect(self, client, userdata, flags, reason_code, props) -> None:
        self.connected.clear()

    def start(self, timeout: float = 15.0) -> None:
        """Connect (raising :class:`BrokerError` with the reason) and keep reconnecting in the background."""
        props = properties("CONNECT", SessionExpiryInterval=self.session_expiry)
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=KEEPALIVE, clean_start=False,
                                properties=props)
        except (OSError, ssl.SSLError) as e:
            raise BrokerError(f"cannot reach the broker at {self.broker.label()}: {one_line(e)}") from None
        self.client.loop_start()
        if not self._first.wait(timeout) or self._refusal:
            self.client.loop_stop()
            self.client.disconnect()
            why = self._refusal or f"no answer within {timeout:g} s"
            raise BrokerError(f"the broker at {self.broker.label()} refused the connection: {why}")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, expiry: Optional[int] = None):
        props = properties("PUBLISH", MessageExpiryInterval=int(expiry)) if expiry else None
        return self.client.publish(topic, payload, qos=qos, retain=retain, properties=props)

    def stop(self, *, end_session: bool = False, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no last will); ``end_session`` drops the broker-side session too."""
        props = properties("DISCONNECT", SessionExpiryInterval=0) if end_session else None
        try:
            self.client.disconnect(properties=props)
        finally:
            self.client.loop_stop()


__all__ = ["Broker", "BrokerError", "Connection", "PREFIX", "SAFE_MESSAGE", "Topics", "dumps", "loads",
           "parse_broker", "properties"]
