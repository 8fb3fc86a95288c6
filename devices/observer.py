"""The fleet side of a simulation: one MQTT subscriber that counts what reaches the broker."""

from __future__ import annotations

import queue
import random
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt

from agent.contract import ContractError, Event, Status, parse_message, subscription
from agent.mqtt import make_client, parse_broker_url
from devices.sim import SimClock
from devices.simtypes import SimulatorError, Switch

__all__ = ["FleetObserver"]


class FleetObserver:
    """The fleet side of the run: one subscriber counting births, online devices, messages, switches.

    paho's network thread only queues what arrives (so the broker never has to drop messages for a slow
    subscriber); a thread of its own parses the few kinds the report needs.
    """

    def __init__(self, broker_url: str, fleet: str, clock: SimClock) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.messages = 0
        self.born: set[str] = set()
        self.online: set[str] = set()
        self.peak_online = 0
        self.switches: dict[str, list[Switch]] = {}
        self.rejected = 0
        self._queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._subscribed = threading.Event()
        address = parse_broker_url(broker_url)
        self.client = make_client(f"sim-observer-{fleet}-{random.getrandbits(24):06x}", address)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.topic = subscription(fleet=fleet)
        self._thread = threading.Thread(target=self._work, name="sim-observer", daemon=True)
        self._thread.start()
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            self.close()
            raise SimulatorError(f"the observer could not subscribe at {address.url}")

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put((msg.topic, bytes(msg.payload)))  # only enqueue

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            self._handle(*item)

    def _handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        device, channel = parts[-2], parts[-1]
        with self.lock:
            self.messages += 1
        if not payload or channel not in ("birth", "status", "events"):
            return
        if channel == "birth":
            with self.lock:
                self.born.add(device)
            return
        if channel == "events" and b"variant_switch" not in payload:
            return
        try:
            message = parse_message(payload)
        except ContractError:
            with self.lock:
                self.rejected += 1
            return
        with self.lock:
            if isinstance(message, Status):
                (self.online.add if message.state == "online" else self.online.discard)(device)
                self.peak_online = max(self.peak_online, len(self.online))
            elif isinstance(message, Event) and message.event == "variant_switch":
                battery = message.data.get("battery_pct")
                self.switches.setdefault(device, []).append(
                    Switch(
                        t_h=self.clock.now() / 3600.0,
                        from_variant=str(message.data.get("from_variant")),
                        to_variant=str(message.data.get("to_variant")),
                        reason=message.message,
                        battery_pct=float(battery) if isinstance(battery, int | float) else None,
                    )
                )

    def drain(self, timeout_s: float = 5.0) -> None:
        """Wait until what has arrived so far is handled."""
        deadline = time.monotonic() + timeout_s
        while not self._queue.empty() and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self._queue.put(None)
        self._thread.join(timeout=10)
