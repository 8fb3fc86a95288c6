"""Real publish/subscribe of contract messages through a private Mosquitto."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from agent.contract import (
    CHANNELS,
    Birth,
    Status,
    channel_for_kind,
    device_topic,
    parse_message,
    parse_topic,
    subscription,
)
from fleet.broker import BrokerError, MosquittoBroker
from tests.helpers import Inbox, connected_client
from tests.samples import sample_messages

pytestmark = pytest.mark.broker


def test_every_message_kind_crosses_the_broker(broker: MosquittoBroker) -> None:
    inbox = Inbox(broker, subscription(fleet="t-all"), client_id="fleet-all")
    device = connected_client(broker, "pi-01")
    sent = sample_messages("pi-01")
    try:
        for message in sent:
            channel = channel_for_kind(message.kind)
            spec = CHANNELS[channel]
            device.publish(
                device_topic("t-all", "pi-01", channel), message.to_json(), qos=spec.qos, retain=False
            ).wait_for_publish(5)
        received = []
        for _ in sent:
            topic, payload, _retain = inbox.get()
            parts = parse_topic(topic)
            received.append(
                parse_message(payload, expect_kind=CHANNELS[parts.channel].kind, expect_device=parts.device)
            )
        assert received == sent  # same order, same content, validated on the way in
    finally:
        device.disconnect()
        device.loop_stop()
        inbox.close()


def test_retained_birth_reaches_a_late_subscriber(broker: MosquittoBroker) -> None:
    birth = sample_messages("pi-late")[0]
    assert isinstance(birth, Birth)
    topic = device_topic("t-retain", "pi-late", "birth")
    device = connected_client(broker, "pi-late")
    device.publish(topic, birth.to_json(), qos=1, retain=True).wait_for_publish(5)
    device.disconnect()
    device.loop_stop()

    inbox = Inbox(broker, subscription(fleet="t-retain"), client_id="fleet-late")
    try:
        got_topic, payload, retained = inbox.get()
        assert got_topic == topic
        assert retained
        assert parse_message(payload) == birth
    finally:
        inbox.close()


DEVICE_SCRIPT = textwrap.dedent("""
    import sys, time
    from agent.contract import Status, device_topic, envelope
    from agent.mqtt import make_client
    host, port = sys.argv[1], int(sys.argv[2])
    client = make_client("pi-dies")
    will = Status(**envelope(device_id="pi-dies", seq=0), state="offline", uptime_s=0)
    client.will_set(device_topic("t-will", "pi-dies", "status"), will.to_json(), qos=1, retain=True)
    client.connect(host, port, keepalive=5)
    client.loop_start()
    online = Status(**envelope(device_id="pi-dies", seq=1), state="online", uptime_s=0.5)
    topic = device_topic("t-will", "pi-dies", "status")
    client.publish(topic, online.to_json(), qos=1, retain=True).wait_for_publish(5)
    print("up", flush=True)
    time.sleep(60)
""")


def test_last_will_when_the_device_process_is_killed(broker: MosquittoBroker) -> None:
    inbox = Inbox(broker, device_topic("t-will", "pi-dies", "status"), client_id="fleet-will")
    with subprocess.Popen(
        [sys.executable, "-c", DEVICE_SCRIPT, broker.host, str(broker.port)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
            first = parse_message(inbox.get()[1])
            assert isinstance(first, Status) and first.state == "online"
            os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the broker must send the will
            will = parse_message(inbox.get(timeout=10)[1])
            assert isinstance(will, Status) and will.state == "offline" and will.device_id == "pi-dies"
        finally:
            proc.kill()
            inbox.close()


def test_broker_stops_by_pid_and_frees_its_port() -> None:
    broker = MosquittoBroker().start()
    pid, port = broker.pid, broker.port
    assert pid is not None
    assert broker.log_path.exists()  # log_dest stdout goes to a file of ours, shown if start fails
    broker.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0
    broker.stop()  # idempotent


def test_busy_fixed_port_gives_a_clear_error(broker: MosquittoBroker) -> None:
    with pytest.raises(BrokerError, match="already in use"):
        MosquittoBroker(port=broker.port).start()
