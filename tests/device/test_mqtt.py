"""Broker plumbing that needs no broker: URLs, topics, the agent's outbox and ledger."""
from __future__ import annotations

import pytest

from edgepipe.device.agent_mqtt import Ledger, Outbox
from edgepipe.device.mqtt import BrokerError, Topics, loads, parse_broker


def test_broker_urls():
    b = parse_broker("mqtt://user:p%40ss@broker.lan")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker.lan", 1883, False, "user", "p@ss")
    assert b.label() == "mqtt://broker.lan:1883" and "p@ss" not in repr(b.label())
    t = parse_broker("mqtts://broker.example", username="u", password="x")
    assert (t.port, t.tls, t.username) == (8883, True, "u")
    assert parse_broker("mqtt://h:1999", ca_file="/ca.pem").tls
    for bad in ("http://h", "mqtt://", "mqtt://h/x", "mqtt://h:99999", "h:1883"):
        with pytest.raises(BrokerError):
            parse_broker(bad)
    with pytest.raises(BrokerError, match="prefix"):
        parse_broker("mqtt://h", prefix="a/+/b")


def test_topics():
    t = Topics("fleet/a")
    assert t.jobs("ep-1") == "fleet/a/devices/ep-1/jobs" and t.reports == "fleet/a/reports"
    assert t.device_of("fleet/a/devices/ep-1/status") == "ep-1"
    assert t.device_of("fleet/a/devices/ep-1/x/y") is None and t.device_of("other/devices/ep-1/status") is None


def test_payloads_are_bounded_and_json():
    assert loads(b'{"a": 1}') == {"a": 1}
    for bad in (b"{nope", b'{"a": NaN}', b"[" * 100 + b"]" * 100):
        with pytest.raises(BrokerError):
            loads(bad)
    with pytest.raises(BrokerError, match="larger"):
        loads(b" " * (5 << 20))


def test_outbox_keeps_entries_until_done(tmp_path):
    box = Outbox(tmp_path / "out")
    a = box.put("t/1", {"n": 1})
    box.put("t/2", {"n": 2})
    (tmp_path / "out" / "junk.json").write_text("{broken")
    again = Outbox(tmp_path / "out")  # a restarted agent sees what was not acknowledged
    assert [(t, p) for _, t, p in again.pending()] == [("t/1", b'{"n":1}'), ("t/2", b'{"n":2}')]
    again.done(a)
    assert [t for _, t, _ in again.pending()] == ["t/2"]


def test_ledger(tmp_path):
    led = Ledger(tmp_path / "jobs")
    led.mark("job-00000001", "accepted")
    led.mark("job-00000002", "final")
    assert led.state("job-00000001") == "accepted" and led.state("nope") is None
    led.prune({"job-00000002"})
    assert led.state("job-00000001") is None and led.state("job-00000002") == "final"
