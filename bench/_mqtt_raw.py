"""Raw-socket MQTT v5 packets for load generators: a few microseconds per message instead of paho's tens.

The benchmarks measure the broker and the fleet manager, so the simulated devices must cost as little CPU
as possible on the same 2 cores. Only what a publishing device needs: CONNECT (optionally with a
retained QoS 1 last will), PUBLISH QoS 1, and reading CONNACK / PUBACK / PINGRESP / DISCONNECT.
:class:`BlockingPublisher` sends a prepared list of messages with at most ``window`` unacknowledged and
counts the PUBACKs; ``bench/fleet_connections.py`` drives the same packets from asyncio.

>>> publish_packet("t", b"x", packet_id=1)
b'2\\x07\\x00\\x01t\\x00\\x01\\x00x'
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Sequence

CONNACK, PUBLISH, PUBACK, PINGRESP, DISCONNECT = 2, 3, 4, 13, 14
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"  # reason 0 (normal): the broker discards the will


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def utf8(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def connect_packet(
    client_id: str, *, keepalive: int, will_topic: str | None = None, will_payload: bytes = b""
) -> bytes:
    """CONNECT, clean start, no properties; with ``will_topic`` a retained QoS 1 last will."""
    flags = 0x02 | ((0x04 | (1 << 3) | 0x20) if will_topic is not None else 0)
    header = utf8(b"MQTT") + bytes([5, flags]) + keepalive.to_bytes(2, "big") + b"\x00"
    payload = utf8(client_id.encode())
    if will_topic is not None:
        payload += b"\x00" + utf8(will_topic.encode()) + utf8(will_payload)
    body = header + payload
    return b"\x10" + varint(len(body)) + body


def publish_packet(topic: str, payload: bytes, *, packet_id: int, retain: bool = False) -> bytes:
    """PUBLISH at QoS 1 with no properties."""
    body = utf8(topic.encode()) + packet_id.to_bytes(2, "big") + b"\x00" + payload
    return bytes([0x30 | 0x02 | int(retain)]) + varint(len(body)) + body


def packets(buf: bytearray) -> Iterator[tuple[int, bytes]]:
    """Complete packets ``(type, body)`` at the front of ``buf``, removed from it as they are read."""
    while len(buf) >= 2:
        length, shift, pos = 0, 0, 1
        while True:
            if pos >= len(buf):
                return
            byte = buf[pos]
            length |= (byte & 0x7F) << shift
            pos += 1
            if not byte & 0x80:
                break
            shift += 7
        if len(buf) < pos + length:
            return
        kind, body = buf[0] >> 4, bytes(buf[pos : pos + length])
        del buf[: pos + length]
        yield kind, body


class BlockingPublisher:
    """One plain socket connection that publishes prepared ``(topic, payload)`` pairs at QoS 1."""

    def __init__(self, host: str, port: int, client_id: str, *, keepalive: int = 60) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.acked = 0
        self.nacked = 0
        self.sock.sendall(connect_packet(client_id, keepalive=keepalive))
        while True:
            for kind, body in self._read():
                if kind == CONNACK:
                    if body[1] != 0:
                        raise ConnectionError(f"broker refused the connection: reason {body[1]:#x}")
                    return

    def _read(self) -> Iterator[tuple[int, bytes]]:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("broker closed the connection")
        self.buf += data
        yield from packets(self.buf)

    def publish_all(self, items: Sequence[tuple[str, bytes]], *, window: int = 1000, chunk: int = 100) -> int:
        """Send every item (``chunk`` packets per write) with at most ``window`` unacknowledged; return
        once all are acknowledged. Returns the number of PUBACKs with a success reason."""
        pending, sent, next_id = 0, 0, 0
        while sent < len(items) or pending:
            if sent < len(items) and pending + chunk <= window:
                out = []
                for topic, payload in items[sent : sent + chunk]:
                    next_id = next_id % 65535 + 1
                    out.append(publish_packet(topic, payload, packet_id=next_id))
                self.sock.sendall(b"".join(out))
                pending += len(out)
                sent += len(out)
                continue
            for kind, body in self._read():
                if kind == PUBACK:
                    pending -= 1
                    if len(body) > 2 and body[2] >= 0x80:
                        self.nacked += 1
                    else:
                        self.acked += 1
                elif kind == DISCONNECT:
                    raise ConnectionError(f"broker disconnected: {body[:1].hex()}")
        return self.acked

    def close(self) -> None:
        try:
            self.sock.sendall(DISCONNECT_PACKET)
        finally:
            self.sock.close()
