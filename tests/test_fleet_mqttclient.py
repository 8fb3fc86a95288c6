"""fleet.mqttclient.BatchingClient against paho's plain client: the same messages, on a real Mosquitto
(plain and TLS) and for fuzzed PUBLISH packets, and PUBACKs in batches that acknowledge exactly what
they name."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.mqtt import BrokerAddress, make_client
from fleet.broker import MosquittoBroker
from fleet.ingest import _sub_id
from fleet.mqttclient import BatchingClient
from fleet.security import make_tls
from tests.helpers import connected_client, wait_for

Received = tuple[bytes, bytes, int, bool, str]


def _record(msg: mqtt.MQTTMessage) -> Received:
    # the raw topic bytes (``msg.topic`` raises on invalid UTF-8), and the properties as paho prints them
    return (msg._topic, msg.payload, msg.qos, msg.retain, str(msg.properties))


class Collector:
    """A subscriber (either client class) that records every message it gets, in order."""

    def __init__(self, cls: type[mqtt.Client], address: BrokerAddress, client_id: str, topic: str) -> None:
        self.got: list[Received] = []
        self.mids: list[int] = []
        self.address = address
        self.client = make_client(client_id, address, cls=cls)
        self.subscribed = threading.Event()
        self.client.on_message = lambda c, u, m: (self.got.append(_record(m)), self.mids.append(m.mid))
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.topic = topic

    def connect(self, *, sub_id: int | None = None, **kw: Any) -> Collector:
        self.client.connect(self.address.host, self.address.port, **kw)
        props = None if sub_id is None else _sub_id(sub_id)
        self.client.subscribe(self.topic, qos=1, properties=props)
        self.client.loop_start()
        assert self.subscribed.wait(10), "no SUBACK"
        return self

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _user_props(i: int) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    props.UserProperty = ("n", str(i))
    return props


def _publish_mix(address: BrokerAddress, topic: str, collectors: list[Collector]) -> int:
    """Small QoS 1 and QoS 0 messages, a payload many read chunks long, empty payloads and 100 distinct
    property blocks (more than the client caches), published in rounds the subscribers keep up with (the
    broker queues at most 1000 messages per subscriber). Returns how many were published."""
    ct = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    ct.ContentType = "application/json"
    ct.PayloadFormatIndicator = 1
    rounds: list[list[tuple[str, bytes, int, Properties | None]]] = [
        [(f"{topic}/a", f"m{i}".encode() * (1 + i % 40), 1, None) for i in range(j, j + 500)]
        for j in range(0, 3000, 500)
    ]
    rounds.append(
        [(f"{topic}/b", b"q0-%d" % i, 0, None) for i in range(200)]
        + [(f"{topic}/big", bytes(range(256)) * 1200, 1, None)]  # 300 KiB
        + [(f"{topic}/empty", b"", 1, None)] * 20
        + [(f"{topic}/props", b"p", 1, _user_props(i)) for i in range(100)]
        + [(f"{topic}/ct", b'{"i": %d}' % i, 1, ct) for i in range(50)]
    )
    pub = make_client(f"pub-{time.monotonic_ns()}", address)
    pub.connect(address.host, address.port)
    pub.loop_start()
    sent = 0
    try:
        for messages in rounds:
            infos = [pub.publish(t, p, qos=q, properties=props) for t, p, q, props in messages]
            for info in infos:
                info.wait_for_publish(30)
            sent += len(messages)
            try:
                wait_for(lambda n=sent: all(len(c.got) >= n for c in collectors), 30)
            except AssertionError as exc:
                got = [len(c.got) for c in collectors]
                raise AssertionError(f"sent {sent}, received {got}") from exc
    finally:
        pub.disconnect()
        pub.loop_stop()
    return sent


def _same_messages_through_both_clients(address: BrokerAddress, topic: str) -> None:
    fast = Collector(BatchingClient, address, f"fast-{topic}", f"{topic}/#").connect(sub_id=7)
    plain = Collector(mqtt.Client, address, f"plain-{topic}", f"{topic}/#").connect(sub_id=7)
    try:
        sent = _publish_mix(address, topic, [fast, plain])
        time.sleep(0.2)  # nothing more may come
    finally:
        fast.close()
        plain.close()
    assert len(plain.got) == sent
    assert fast.got == plain.got  # same topics, payloads, QoS, retain flags and properties, same order
    assert isinstance(fast.client, BatchingClient)
    assert 1 <= len(fast.client._properties) <= 64  # the cache is bounded; the rest went through paho
    assert any("UserProperty" in r[4] for r in fast.got)


@pytest.mark.broker
def test_batching_client_receives_exactly_what_paho_receives(broker: MosquittoBroker) -> None:
    address = BrokerAddress(host=broker.host, port=broker.port)
    _same_messages_through_both_clients(address, "mqttclient-plain")


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path]]:
    tls = make_tls(tmp_path_factory.mktemp("mqttclient-tls"), hosts=["127.0.0.1"])
    with MosquittoBroker(certfile=tls.certfile, keyfile=tls.keyfile) as running:
        yield running, tls.cafile


@pytest.mark.broker
def test_batching_client_over_tls(tls_broker: tuple[MosquittoBroker, Path]) -> None:
    """TLS delivers records, not the byte stream paho's reads were written for: same messages still."""
    broker, ca = tls_broker
    address = BrokerAddress(host=broker.host, port=broker.port, tls=True, ca_file=ca)
    _same_messages_through_both_clients(address, "mqttclient-tls")


@pytest.mark.broker
def test_ack_many_acknowledges_exactly_the_messages_it_names() -> None:
    """A kept session: what ack_many acknowledged is gone, everything else comes again after a reconnect."""
    # all 300 in flight at once (Mosquitto's default window is 20 unacknowledged messages)
    with MosquittoBroker(extra_config="max_inflight_messages 1000") as broker:
        _ack_many_round_trip(broker)


def _ack_many_round_trip(broker: MosquittoBroker) -> None:
    address = BrokerAddress(host=broker.host, port=broker.port)
    topic = "mqttclient-ack/x"
    expiry = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    expiry.SessionExpiryInterval = 60

    def subscriber() -> Collector:
        sub = Collector(BatchingClient, address, "mqttclient-acker", topic)
        sub.client.manual_ack_set(True)
        return sub

    first = subscriber().connect(clean_start=True, properties=expiry)
    pub = connected_client(broker, "mqttclient-ack-pub")
    for info in [pub.publish(topic, b"%d" % i, qos=1) for i in range(300)]:
        info.wait_for_publish(10)
    wait_for(lambda: len(first.got) == 300)
    assert isinstance(first.client, BatchingClient)
    acked = [mid for mid, got in zip(first.mids, first.got, strict=True) if int(got[1]) % 3 != 0]
    first.client.ack_many(acked)
    first.client.ack_many([])  # nothing to send: a no-op
    time.sleep(0.5)  # the PUBACKs reach the broker before the connection drops
    first.client._sock_close()  # a lost connection: no DISCONNECT, unacknowledged messages stay queued
    first.client.loop_stop()

    again = subscriber()
    again.client.connect(address.host, address.port, clean_start=False, properties=expiry)
    again.client.loop_start()
    wait_for(lambda: len(again.got) >= 100)
    time.sleep(0.5)
    again.close()
    pub.disconnect()
    pub.loop_stop()
    assert sorted(int(p) for _, p, *_ in again.got) == list(range(0, 300, 3))


# --- the PUBLISH decoder, packet by packet ------------------------------------------------------------


def _handle(cls: type[mqtt.Client], header: int, packet: bytes) -> Any:
    """What ``cls`` makes of one PUBLISH packet: the message it delivers, or the exception it raises."""
    client = make_client("decoder", cls=cls)
    client.manual_ack_set(True)
    got: list[Received] = []
    client.on_message = lambda c, u, m: got.append((*_record(m), m.mid, m.dup))  # type: ignore[arg-type]
    client._in_packet["command"] = header
    client._in_packet["packet"] = bytearray(packet)
    try:
        rc = client._handle_publish()
    except Exception as exc:  # the outcome under comparison
        return ("raised", type(exc).__name__)
    return (rc, got)


def _publish_packet(topic: bytes, mid: int, props: bytes, payload: bytes, qos: int) -> bytes:
    return struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + props + payload


PROPERTY_BLOCKS = [
    b"\x00",
    b"\x02\x0b\x07",  # subscription identifier 7
    b"\x05\x02\x00\x00\x00\x3c",  # message expiry 60 s
    b"\x02\x01\x01",  # payload format indicator
    b"\x08\x26\x00\x01k\x00\x01v",  # a user property... one byte short: reads into the payload
    b"\x09\x26\x00\x01k\x00\x02vv",
    b"\x01\x0b",  # truncated
    b"\x03\x0b\x80\x80",  # variable byte integer running past the block
    b"\x02\xff\x00",  # unknown property
    b"\x04\x0b\x01\x0b\x02",  # two subscription identifiers
    b"\x80\x01" + b"\x26\x00\x01k\x00\x79" + b"v" * 121,  # a block longer than the cache takes
]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.integers(0x30, 0x3F),
    topic=st.binary(max_size=40) | st.sampled_from([b"edgeprune/v1/f/d/metrics", b""]),
    mid=st.integers(0, 0xFFFF),
    props=st.sampled_from(PROPERTY_BLOCKS) | st.binary(max_size=12),
    payload=st.binary(max_size=64),
    cut=st.integers(0, 300),
)
def test_publish_decoder_matches_paho_on_any_packet(
    *, header: int, topic: bytes, mid: int, props: bytes, payload: bytes, cut: int
) -> None:
    """Well-formed or not, truncated anywhere: the same message (or the same error) as paho's decoder."""
    qos = (header >> 1) & 3
    packet = _publish_packet(topic, mid, props, payload, qos)[: max(cut, 0) or None]
    assert _handle(BatchingClient, header, packet) == _handle(mqtt.Client, header, packet)


def test_publish_decoder_matches_paho_on_random_bytes() -> None:
    import random

    rng = random.Random(7)
    for _ in range(3000):
        header = 0x30 | rng.randrange(16)
        packet = rng.randbytes(rng.randrange(0, 40))
        assert _handle(BatchingClient, header, packet) == _handle(mqtt.Client, header, packet)
