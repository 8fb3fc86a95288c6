"""Small test helpers around real paho clients."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.mqtt import make_client
from fleet.broker import MosquittoBroker


class Inbox:
    """A connected subscriber that queues every (topic, payload, retain) it receives."""

    def __init__(self, broker: MosquittoBroker, topic: str, *, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._subscribed = threading.Event()
        self.client = make_client(client_id)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(topic, qos=1)
        self.client.loop_start()
        assert self._subscribed.wait(5), "SUBACK not received"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, msg.payload, bool(msg.retain)))

    def get(self, timeout: float = 5.0) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connected_client(broker: MosquittoBroker, client_id: str) -> mqtt.Client:
    client = make_client(client_id)
    client.connect(broker.host, broker.port)
    client.loop_start()
    return client


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, *, poll_s: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned) or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"condition not met within {timeout}s")
