"""paho's MQTT client, tuned for a subscriber that receives many small messages and acknowledges them in
batches (the fleet's ingestion).

paho 2.x reads one packet per ``select()``: a one-byte ``recv`` for the packet type, one per byte of
the remaining length, one for the rest, and then waits in ``select()`` again; with manual
acknowledgements each PUBACK is its own ``send`` plus a byte on paho's wake-up socket pair. At
thousands of messages a second those syscalls were about a third of an ingestion process's CPU
(docs/fleet.md, "Ingestion rate"). :class:`BatchingClient` changes only the I/O around paho's own
packet handling:

- the socket is read in 64 KiB chunks and every complete packet in a chunk is handled before paho
  goes back to ``select()`` (a buffered ``_sock_recv`` and a ``loop_read`` that drains the buffer);
- a QoS 0/1 PUBLISH is decoded in a few struct calls instead of paho's general decoder, which builds
  and fills a ``Properties`` object per message (10-15 us in all): the property bytes of the messages
  a subscriber receives repeat (the ingestion's carry only a subscription identifier), so each
  distinct short property block is unpacked once by paho and the same (read-only) ``Properties``
  object is given to every message that carries it; a long or new-beyond-the-cache block, QoS 2,
  MQTT 3.1.1 and a client with paho's logging on take paho's own ``_handle_publish``;
- :meth:`BatchingClient.ack_many` queues the PUBACKs of a whole committed batch as one write.

These override private paho methods (``_sock_recv``, ``_handle_publish``; ``_packet_queue`` and
``_handle_on_message`` are called), so the paho version
is bounded in ``pyproject.toml`` and ``tests/test_fleet_mqttclient.py`` runs them against a real
Mosquitto, TLS included.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

__all__ = ["BatchingClient"]

_PUBACK = 0x40
_PUBACK_PACKET = struct.Struct("!BBH")  # type, remaining length 2, packet id (v5: reason 0 omitted)
_READ_SIZE = 65536
_U16 = struct.Struct("!H")
_CACHED_PROPERTIES_MAX = 32  # bytes of a property block worth caching (a subscription id takes 2)
_CACHED_BLOCKS_MAX = 64  # distinct blocks kept; more (e.g. a varying expiry interval) go to paho


class BatchingClient(mqtt.Client):
    """A paho ``Client`` that reads in chunks and can acknowledge many QoS 1 messages in one write."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._rbuf = b""
        self._rpos = 0
        self._rsock: object = None
        # property block bytes -> the Properties paho unpacked from them once (see _handle_publish)
        self._properties: dict[bytes, Properties] = {}

    def _sock_recv(self, bufsize: int) -> bytes:
        sock = self._sock
        if sock is not self._rsock:  # a new connection: nothing of the old one's bytes may carry over
            self._rbuf, self._rpos, self._rsock = b"", 0, sock
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(max(bufsize, _READ_SIZE))  # BlockingIOError when nothing is there
            if not data:
                return data  # the broker closed the connection
            self._rbuf, self._rpos = data, 0
        start = self._rpos
        self._rpos = min(start + bufsize, len(self._rbuf))
        return self._rbuf[start : self._rpos]

    def buffered(self) -> int:
        """Bytes read from the socket and not yet handed to paho's packet reader."""
        return len(self._rbuf) - self._rpos if self._sock is self._rsock else 0

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        # select() cannot see bytes already in the buffer, so handle every packet they hold now; each
        # round consumes buffered bytes, and a partial packet ends in MQTT_ERR_AGAIN (reported as
        # success) once the buffer is empty and the socket has no more yet
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self.buffered():
            rc = super().loop_read(max_packets)
        return rc

    def _handle_publish(self) -> MQTTErrorCode:
        header: int = self._in_packet["command"]
        packet: bytearray = self._in_packet["packet"]
        qos = (header & 0x06) >> 1
        if self._protocol != mqtt.MQTTv5 or qos > 1 or self.on_log is not None or self._logger is not None:
            return super()._handle_publish()  # (paho's debug log line for each PUBLISH comes from there)
        try:
            (topic_len,) = _U16.unpack_from(packet, 0)
            pos = 2 + topic_len
            mid = 0
            if qos:
                (mid,) = _U16.unpack_from(packet, pos)
                pos += 2
            props_len = packet[pos]  # a one-byte variable length when < 128
        except (struct.error, IndexError):
            return super()._handle_publish()  # paho reports the malformed packet its own way
        if props_len >= _CACHED_PROPERTIES_MAX:
            return super()._handle_publish()
        end = pos + 1 + props_len
        block = bytes(packet[pos:end])
        properties = self._properties.get(block)
        if properties is None:
            if len(self._properties) >= _CACHED_BLOCKS_MAX or end > len(packet):
                return super()._handle_publish()
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            try:
                properties.unpack(block)  # type: ignore[no-untyped-call]
            except Exception:  # a malformed block: paho's decoder raises the error it handles
                return super()._handle_publish()
            self._properties[block] = properties
        message = mqtt.MQTTMessage(mid=mid, topic=bytes(packet[2 : 2 + topic_len]))
        message.dup = bool(header & 0x08)
        message.qos = qos
        message.retain = bool(header & 0x01)
        message.properties = properties
        message.payload = bytes(packet[end:])
        message.timestamp = time.monotonic()
        self._handle_on_message(message)
        if qos == 1 and not self._manual_ack:
            return self._send_puback(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def ack_many(self, mids: Iterable[int]) -> MQTTErrorCode:
        """PUBACK every QoS 1 message in ``mids`` (with ``manual_ack_set(True)``), in one write.

        Equivalent to ``ack(mid, 1)`` for each, which queues one packet (one ``send``) per message."""
        data = b"".join(_PUBACK_PACKET.pack(_PUBACK, 2, mid) for mid in mids)
        if not data:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._packet_queue(_PUBACK, data, 0, 0)
