"""Telemetry ingestion: an MQTT v5 shared subscription feeding batched writes into the store.

Several fleet-manager processes in the same share group split the device traffic (the broker hands each
message to one of them); nothing here is kept in memory between batches that another process would
need: duplicates are dropped by the store's ``messages_seen`` table, counters live in the store.

>>> with Ingestor(Store("fleet.db"), broker_url="mqtt://127.0.0.1:1883") as ingest:  # doctest: +SKIP
...     time.sleep(60)
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections import Counter
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from agent.contract import CHANNELS, Channel, Message, parse_message, parse_topic, subscription
from agent.errors import ContractError, UserError
from agent.mqtt import BrokerAddress, make_client, parse_broker_url
from fleet.mqttclient import BatchingClient
from fleet.store import Store

__all__ = [
    "DEFAULT_BATCH_MAX",
    "DEVICE_CHANNELS",
    "IngestError",
    "Ingestor",
    "classify_reject",
    "discard_session",
    "shared_filters",
]

log = logging.getLogger(__name__)

DEVICE_CHANNELS = tuple(name for name, spec in CHANNELS.items() if spec.publisher == "device")
"""Channels devices publish on (everything but ``desired``, which the fleet itself publishes)."""


class IngestError(UserError):
    """Ingestion cannot start (broker unreachable, bad URL)."""


def shared_filters(*, group: str, fleet: str | None = None) -> list[str]:
    """MQTT v5 shared-subscription filters for the device channels of ``fleet`` (``None``: every fleet).

    >>> shared_filters(group="fm", fleet="lab")[0]
    '$share/fm/edgeprune/v1/lab/+/birth'
    """
    return [f"$share/{group}/{subscription(fleet=fleet, channel=ch)}" for ch in DEVICE_CHANNELS]


_Item = tuple[str, bytes, float, int, int]
"""A received message on its way to the store: topic, payload, arrival time, MQTT packet id, QoS."""

DEFAULT_BATCH_MAX = 2000
"""Messages per write transaction at most (each batch also ends after ``batch_interval_s``)."""

_SHARED_ID, _RESYNC_ID = 1, 2  # MQTT v5 subscription identifiers: which subscription delivered a message

RETAINED_CHANNELS: tuple[Channel, ...] = ("birth", "status")
"""Channels devices publish retained: the broker holds each device's latest birth and status."""


def retained_filters(*, fleet: str | None = None) -> list[str]:
    """Plain (not shared) filters for the retained channels. MQTT v5 never sends retained messages to a
    shared subscription, so a manager that starts (or reconnects) after a device's last birth/status would
    not learn its state until the next heartbeat; subscribing these for a moment fetches them.

    >>> retained_filters(fleet="lab")
    ['edgeprune/v1/lab/+/birth', 'edgeprune/v1/lab/+/status']
    """
    return [subscription(fleet=fleet, channel=ch) for ch in RETAINED_CHANNELS]


def _sub_id(value: int) -> Properties:
    props = Properties(PacketTypes.SUBSCRIBE)  # type: ignore[no-untyped-call]
    props.SubscriptionIdentifier = value
    return props


def _transient(exc: BaseException) -> bool:
    """Whether a failed write may succeed when retried: the database was unreachable, restarting, locked
    or timed out (not: it refused a value)."""
    return isinstance(exc, OperationalError | InterfaceError | DisconnectionError | SATimeoutError) or bool(
        getattr(exc, "connection_invalidated", False)
    )


def classify_reject(exc: ContractError) -> str:
    """A short reason for a rejected payload: ``not_json``, ``wrong_kind``, ``wrong_device``, ``invalid``."""
    cause = exc.__cause__
    if isinstance(cause, ValidationError):
        types = {e["type"] for e in cause.errors()}
        if "json_invalid" in types or "json_type" in types:
            return "not_json"
        if any("schema_version" in e["loc"] for e in cause.errors()):
            return "schema_version"
        return "invalid"
    text = str(exc)
    if "arrived where" in text:
        return "wrong_kind"
    if "arrived on the topic of" in text:
        return "wrong_device"
    return "invalid"


def discard_session(address: BrokerAddress, client_id: str, *, timeout_s: float = 10.0) -> None:
    """End the broker session a manager kept under ``client_id`` (``session_expiry_s > 0``), so the broker
    stops routing a share of the group's traffic into it: connect with that id and a clean start, which
    discards the old session, then disconnect with a session expiry of 0. For a manager retired for good;
    a running manager with the same id is disconnected by the broker (session takeover)."""
    connected = threading.Event()
    refused: list[str] = []
    client = make_client(client_id, address)

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            refused.append(str(reason))
        connected.set()

    client.on_connect = on_connect
    try:
        client.connect(address.host, address.port, keepalive=15, clean_start=True)
    except OSError as exc:
        raise IngestError(f"cannot connect to the broker at {address.host}:{address.port}: {exc}") from exc
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            raise IngestError(f"no CONNACK from the broker within {timeout_s}s")
        if refused:
            raise IngestError(f"the broker refused {client_id!r}: {refused[0]}")
    finally:
        client.disconnect()
        client.loop_stop()


class Ingestor:
    """Subscribe to the device channels and write what arrives into ``store`` in batches.

    ``broker_url`` is a URL or a :class:`agent.mqtt.BrokerAddress` (credentials, TLS). ``on_message`` only
    enqueues; one writer thread validates each payload against its topic
    (:func:`agent.contract.parse_message`), counts and logs rejects, and writes up to ``batch_max``
    messages or ``batch_interval_s`` worth per transaction.

    The MQTT client is a :class:`fleet.mqttclient.BatchingClient` (paho's, reading in chunks, decoding
    PUBLISH packets in a fast path and acknowledging a batch in one write: 25-50% less CPU per
    message than paho's plain client, docs/fleet.md); ``client_class=paho.mqtt.client.Client`` uses
    paho's plain client.

    A message is acknowledged (PUBACK) only once the transaction holding it has committed, or it has been
    counted as a reject. With ``session_expiry_s > 0`` and a ``client_id`` that stays the same across
    restarts, the broker keeps this manager's session while it is gone and redelivers what was received
    but not yet committed, so a manager killed mid-stream and restarted loses nothing (what it had
    committed but not yet acknowledged comes again and is dropped as a duplicate). ``session_expiry_s=0``
    is a clean session: the broker forgets the unacknowledged messages with the connection.
    """

    def __init__(
        self,
        store: Store,
        *,
        broker_url: str | BrokerAddress,
        fleet: str | None = None,
        group: str = "edgeprune-fleet",
        client_id: str | None = None,
        batch_max: int = DEFAULT_BATCH_MAX,
        batch_interval_s: float = 0.2,
        queue_max: int = 200_000,
        keepalive_s: int = 15,
        resync_s: float = 3.0,
        session_expiry_s: int = 0,
        receive_maximum: int = 65_535,
        client_class: type[mqtt.Client] = BatchingClient,
    ) -> None:
        self.store = store
        self.address = parse_broker_url(broker_url) if isinstance(broker_url, str) else broker_url
        self.fleet = fleet
        self.group = group
        self.client_id = client_id or f"edgeprune-fleet-{uuid.uuid4().hex[:8]}"
        self.batch_max = batch_max
        self.batch_interval_s = batch_interval_s
        self.keepalive_s = keepalive_s
        self.resync_s = resync_s
        self.session_expiry_s = session_expiry_s
        self._resync_mid: int | None = None
        self._resync_timer: threading.Timer | None = None
        self._queue: queue.Queue[_Item | None] = queue.Queue(maxsize=queue_max)
        # the broker sends at most this many unacknowledged messages (MQTT v5 Receive Maximum, 1..65535),
        # so the queue cannot overflow; the rest wait in the broker's queue for this session
        if not 1 <= receive_maximum <= 65_535:
            raise IngestError(f"receive_maximum must be 1..65535, got {receive_maximum}")
        self.receive_maximum = min(queue_max, receive_maximum)
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.received = 0
        self.stored = 0
        self.duplicates = 0
        self.rejects: Counter[str] = Counter()
        self.write_failures = 0
        self.resynced = 0
        self._thread: threading.Thread | None = None
        self.client = make_client(self.client_id, self.address, cls=client_class)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.reconnect_delay_set(min_delay=1, max_delay=30)

    # --- lifecycle -----------------------------------------------------------------------------------

    def start(self, *, timeout_s: float = 10.0) -> Ingestor:
        """Connect, subscribe and start the writer; wait for the SUBACK so nothing sent after is missed."""
        self._thread = threading.Thread(target=self._writer, name="fleet-ingest-writer", daemon=True)
        self._thread.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.ReceiveMaximum = self.receive_maximum
        if self.session_expiry_s > 0:
            props.SessionExpiryInterval = self.session_expiry_s
        try:
            self.client.connect(
                self.address.host,
                self.address.port,
                keepalive=self.keepalive_s,
                clean_start=self.session_expiry_s == 0,
                properties=props,
            )
        except OSError as exc:
            self.stop()
            raise IngestError(
                f"cannot connect to the broker at {self.address.host}:{self.address.port}: {exc}",
                hint="start mosquitto, or pass --broker mqtt://HOST:PORT",
            ) from exc
        self.client.loop_start()
        if not self._subscribed.wait(timeout_s):
            self.stop()
            raise IngestError(f"no SUBACK from the broker within {timeout_s}s")
        return self

    def stop(self, *, drain_timeout_s: float = 10.0) -> None:
        """Write and acknowledge what is queued, disconnect, stop the writer. Safe to call twice."""
        if self._resync_timer is not None:
            self._resync_timer.cancel()
        if self._thread is not None and self._thread.is_alive():
            self.wait_idle(timeout_s=drain_timeout_s)  # acknowledged while still connected
        self.client.disconnect()
        self.client.loop_stop()
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(drain_timeout_s)
        self._thread = None

    def __enter__(self) -> Ingestor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stats(self) -> dict[str, Any]:
        """This process's counters (the store holds the fleet-wide ones)."""
        with self._lock:
            return {
                "received": self.received,
                "stored": self.stored,
                "duplicates": self.duplicates,
                "rejects": dict(self.rejects),
                "write_failures": self.write_failures,
                "resynced": self.resynced,
                "queued": self._queue.unfinished_tasks,  # received, not yet written (or counted)
            }

    def wait_idle(self, *, timeout_s: float = 10.0) -> bool:
        """Block until the queue is empty and the last batch is written (for tests and shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.unfinished_tasks == 0:
                return True
            time.sleep(0.02)
        return False

    # --- MQTT callbacks: enqueue only ----------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        shared = shared_filters(group=self.group, fleet=self.fleet)
        result, _ = client.subscribe([(f, 1) for f in shared], properties=_sub_id(_SHARED_ID))
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("subscribe failed: %s", result)
        if self.resync_s > 0:  # the retained births and statuses, for resync_s seconds (see retained_filters)
            result, self._resync_mid = client.subscribe(
                [(f, 1) for f in retained_filters(fleet=self.fleet)], properties=_sub_id(_RESYNC_ID)
            )
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
                log.warning("subscribing to the retained device states failed: %s", result)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        bad = [r for r in reasons if r.is_failure]
        if mid == self._resync_mid:
            if bad:
                log.warning("broker refused the retained-state subscription: %s", bad)
            # the broker sends the retained messages right after this SUBACK; afterwards the plain
            # subscription would only double the shared one's live traffic (duplicates are dropped by id)
            timer = threading.Timer(self.resync_s, self._end_resync, args=(client,))
            timer.daemon = True
            self._resync_timer = timer
            timer.start()
            return
        if bad:
            log.error("broker refused the subscription: %s", bad)
            return
        self._subscribed.set()

    def _end_resync(self, client: mqtt.Client) -> None:
        client.unsubscribe(retained_filters(fleet=self.fleet))

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        ids = getattr(msg.properties, "SubscriptionIdentifier", None) or ()
        if _RESYNC_ID in ids and _SHARED_ID not in ids:
            if not msg.retain:
                # a live message through the resync subscription: the shared one delivers it (once)
                client.ack(msg.mid, msg.qos)
                return
            with self._lock:
                self.resynced += 1
        try:
            self._queue.put((msg.topic, bytes(msg.payload), time.time(), msg.mid, msg.qos), timeout=5)
        except queue.Full:  # left unacknowledged: a persistent session gets it again after a reconnect
            with self._lock:
                self.rejects["queue_full"] += 1

    # --- writer --------------------------------------------------------------------------------------

    def _next_batch(self) -> tuple[list[_Item], bool]:
        batch: list[_Item] = []
        item = self._queue.get()
        if item is None:
            return batch, True
        batch.append(item)
        deadline = time.monotonic() + self.batch_interval_s
        while len(batch) < self.batch_max:
            remaining = deadline - time.monotonic()
            try:
                item = (
                    self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _writer(self) -> None:
        done = False
        while not done:
            batch, done = self._next_batch()
            try:
                if batch:
                    self._ack(self._write_with_retries(batch))
            finally:
                for _ in range(len(batch) + (1 if done else 0)):
                    self._queue.task_done()

    def _ack(self, handled: list[_Item]) -> None:
        """PUBACK the messages that are committed or counted as rejects, never before (with a
        :class:`BatchingClient`, in one write for the batch)."""
        client = self.client
        if isinstance(client, BatchingClient):
            client.ack_many(mid for _topic, _payload, _at, mid, qos in handled if qos == 1)
            handled = [item for item in handled if item[4] > 1]
        for _topic, _payload, _at, mid, qos in handled:
            if qos:
                client.ack(mid, qos)

    def _write_with_retries(self, batch: list[_Item], *, attempts: int = 4) -> list[_Item]:
        """A database hiccup (restart, lock timeout) must not lose a batch: retry with backoff; a retried
        batch is harmless because message ids already stored count as duplicates.

        Any other failure comes from what the batch holds: a contract-valid value the database cannot
        take (an integer beyond 64 bits on SQLite, beyond the column on PostgreSQL, a NUL character
        PostgreSQL refuses). Retrying cannot help and dropping the batch would lose every other message in
        it, so the batch is split in halves until the messages that cannot be stored are alone; each is
        logged and counted as an ``unstorable`` reject.

        Returns the messages that were handled (stored, duplicates or counted rejects); those of a batch
        dropped after ``attempts`` failed writes are not, and stay unacknowledged."""
        for attempt in range(attempts):
            try:
                self._write(batch)
                return batch
            except Exception as exc:  # the daemon's top loop: log, count, keep ingesting
                if not _transient(exc):
                    return self._isolate(batch, exc, attempts=attempts)
                log.exception("writing a batch of %d messages failed (attempt %d)", len(batch), attempt + 1)
                with self._lock:
                    self.write_failures += 1
                if attempt + 1 < attempts and not self._stop.wait(0.5 * 2**attempt):
                    continue
                log.error(
                    "dropped a batch of %d messages after %d attempts; left unacknowledged, so a "
                    "persistent session receives them again after a reconnect",
                    len(batch),
                    attempt + 1,
                )
        return []

    def _isolate(self, batch: list[_Item], exc: Exception, *, attempts: int) -> list[_Item]:
        if len(batch) > 1:
            half = len(batch) // 2
            return self._write_with_retries(batch[:half], attempts=attempts) + self._write_with_retries(
                batch[half:], attempts=attempts
            )
        topic = batch[0][0]
        log.warning("cannot store a valid message on %s: %s: %s", topic, type(exc).__name__, exc)
        try:
            self.store.count_rejects({"unstorable": 1})
        except Exception:  # counted in this process's stats all the same
            log.exception("counting an unstorable message failed")
        with self._lock:
            self.received += 1
            self.rejects["unstorable"] += 1
        return batch

    def _write(self, batch: list[_Item]) -> None:
        good: list[tuple[str, Message]] = []
        received: list[float] = []
        rejects: Counter[str] = Counter()
        for topic, payload, at, _mid, _qos in batch:
            reason, parsed = self._parse(topic, payload)
            if parsed is not None:
                good.append(parsed)
                received.append(at)
            else:
                rejects[reason] += 1
        result = self.store.ingest(good, received=received) if good else None
        if rejects:
            self.store.count_rejects(dict(rejects))
        with self._lock:
            self.received += len(batch)
            self.rejects.update(rejects)
            if result is not None:
                self.stored += result.stored
                self.duplicates += result.duplicates

    def _parse(self, topic: str, payload: bytes) -> tuple[str, tuple[str, Message] | None]:
        try:
            parts = parse_topic(topic)
        except ContractError as exc:
            log.warning("rejected a message on %s: %s", topic, exc)
            return "bad_topic", None
        if not payload:
            return "empty", None
        try:
            message = parse_message(
                payload, expect_kind=CHANNELS[parts.channel].kind, expect_device=parts.device
            )
        except ContractError as exc:
            reason = classify_reject(exc)
            log.warning("rejected a message on %s (%s): %s", topic, reason, exc)
            return reason, None
        return "", (parts.fleet, message)
