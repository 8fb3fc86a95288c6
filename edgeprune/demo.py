"""``edgeprune demo`` -- today: the foundation path, end to end on real components.

What runs: the Fashion-MNIST files are loaded and checked; a private Mosquitto starts on a free port;
N device clients connect with MQTT v5 and a last will, publish a retained birth, an online status and
metrics (real CPU and memory readings of this machine), one device sends a malformed payload, and one
drops off with its will; a fleet-side collector validates every message against the contract and
counts what it accepted and rejected. The full demo (compile, agents serving bundles, staged rollouts)
replaces this as issues #3-#8 land; the output says so.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import psutil
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from agent import __version__
from agent.contract import (
    CHANNELS,
    Birth,
    Channel,
    ContractError,
    Message,
    Metrics,
    Readings,
    Status,
    device_topic,
    envelope,
    parse_message,
    parse_topic,
    subscription,
)
from agent.data import fashion_mnist_dir, load_fashion_mnist
from agent.errors import InternalError, UserError
from agent.mqtt import make_client
from fleet.broker import MosquittoBroker

__all__ = ["Collector", "run_demo"]


@dataclass
class Collector:
    """Fleet-side subscriber: validates each payload against the contract, keeps the last of each kind."""

    accepted: Counter[str] = field(default_factory=Counter)
    rejected: list[str] = field(default_factory=list)
    latest: dict[tuple[str, str], Message] = field(default_factory=dict)
    seen_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    changed: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.changed = threading.Condition(self.lock)

    def on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        try:
            parts = parse_topic(msg.topic)
            message = parse_message(
                msg.payload, expect_kind=CHANNELS[parts.channel].kind, expect_device=parts.device
            )
        except ContractError as exc:
            with self.changed:
                self.rejected.append(f"{msg.topic}: {exc.message}")
                self.changed.notify_all()
            return
        with self.changed:
            if message.message_id not in self.seen_ids:  # a QoS 1 redelivery is counted once
                self.seen_ids.add(message.message_id)
                self.accepted[message.kind] += 1
                self.latest[(message.device_id, message.kind)] = message
            self.changed.notify_all()

    def wait_for(self, predicate: object, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout=timeout_s)  # type: ignore[arg-type]


def _readings() -> Readings:
    battery = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    return Readings(
        battery_pct=None if battery is None else battery.percent,
        charging=None if battery is None else battery.power_plugged,
        cpu_load_pct=psutil.cpu_percent(interval=None),
        free_memory_mb=psutil.virtual_memory().available / 2**20,
    )


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _start_collector(broker: MosquittoBroker, fleet: str, timeout_s: float) -> tuple[Collector, mqtt.Client]:
    collector = Collector()
    client = make_client(f"{fleet}-collector")
    client.on_message = collector.on_message
    subscribed = threading.Event()
    client.on_subscribe = lambda *args: subscribed.set()
    client.connect(broker.host, broker.port)
    client.subscribe(subscription(fleet=fleet), qos=1)
    client.loop_start()
    if not subscribed.wait(timeout_s):
        raise InternalError("the collector's subscription was not acknowledged")
    return collector, client


def _connect_device(broker: MosquittoBroker, fleet: str, device: str, timeout_s: float) -> mqtt.Client:
    """A device client: last will first, then a retained birth, an online status and one metrics window."""
    client = make_client(device)
    will = Status(**envelope(device_id=device, seq=0), state="offline", uptime_s=0)
    client.will_set(device_topic(fleet, device, "status"), will.to_json(), qos=1, retain=True)
    client.connect(broker.host, broker.port)
    client.loop_start()
    messages: list[tuple[Channel, Message]] = [
        (
            "birth",
            Birth(
                **envelope(device_id=device, seq=1), profile="host", agent_version=__version__, backend="onnx"
            ),
        ),
        ("status", Status(**envelope(device_id=device, seq=2), state="online", uptime_s=0.1)),
        (
            "metrics",
            Metrics(**envelope(device_id=device, seq=3), window_s=1.0, inferences=0, readings=_readings()),
        ),
    ]
    for channel, message in messages:
        spec = CHANNELS[channel]
        client.publish(
            device_topic(fleet, device, channel), message.to_json(), qos=spec.qos, retain=spec.retained
        ).wait_for_publish(timeout_s)
    return client


def _print_summary(collector: Collector) -> None:
    states = {device: m.state for (device, _), m in collector.latest.items() if isinstance(m, Status)}
    print(f"    {'device':<10} {'last status':<12}")
    for device, state in sorted(states.items()):
        print(f"    {device:<10} {state:<12}")
    print(f"    accepted: {dict(sorted(collector.accepted.items()))}")
    print(f"    rejected: {len(collector.rejected)} -> {collector.rejected[0]}")


def run_demo(*, data_root: Path | None, devices: int, fleet: str, timeout_s: float = 20.0) -> None:
    """Run the foundation demo; raises a :class:`~agent.errors.UserError` subclass on a missing part."""
    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    started = time.monotonic()
    print(
        "edgeprune demo -- foundation path. Compiling, serving bundles, adaptive policy and rollouts are\n"
        "not built yet (issues #3-#8); this runs every part that exists, on real components.\n"
    )

    _step(f"loading Fashion-MNIST from {fashion_mnist_dir(data_root)}")
    test = load_fashion_mnist("test", root=data_root)
    counts = np.bincount(test.labels, minlength=len(test.class_names))
    print(
        f"    {len(test)} test images of {test.images.shape[1]}x{test.images.shape[2]}, "
        f"{len(test.class_names)} classes, {counts.min()}-{counts.max()} per class"
    )

    _step("starting a private Mosquitto broker")
    clients: list[mqtt.Client] = []
    with MosquittoBroker() as broker:
        print(f"    {broker.url} (pid {broker.pid})")
        try:
            collector, fleet_client = _start_collector(broker, fleet, timeout_s)
            clients.append(fleet_client)
            _step(f"connecting {devices} simulated device(s) with MQTT v5, a retained birth and a last will")
            psutil.cpu_percent(interval=None)  # prime the CPU counter so the first reading means something
            names = [f"dev-{i:03d}" for i in range(devices)]
            for name in names:
                clients.append(_connect_device(broker, fleet, name, timeout_s))

            _step("sending one malformed payload; the collector must reject it, not crash")
            clients[1].publish(
                device_topic(fleet, names[0], "metrics"), b'{"kind": "metrics", "inferences": -1}', qos=1
            ).wait_for_publish(timeout_s)

            _step(f"dropping {names[-1]} without a clean goodbye; the broker must publish its last will")
            # MQTT v5 reason 0x04: disconnect, but have the broker send the will, as on a lost link.
            clients[-1].disconnect(
                reasoncode=ReasonCode(PacketTypes.DISCONNECT, "Disconnect with will message")
            )

            def done() -> bool:
                last = collector.latest.get((names[-1], "status"))
                return (
                    collector.accepted["metrics"] >= devices
                    and len(collector.rejected) >= 1
                    and isinstance(last, Status)
                    and last.state == "offline"
                )

            if not collector.wait_for(done, timeout_s):
                raise InternalError(
                    f"the collector did not see every message within {timeout_s}s: "
                    f"{dict(collector.accepted)}, {len(collector.rejected)} rejected"
                )
        finally:
            for client in clients:
                client.disconnect()
                client.loop_stop()

    _step("summary")
    _print_summary(collector)
    print(
        f"\ndone in {time.monotonic() - started:.1f}s. Next: docs/architecture.md, docs/protocol.md; "
        "the compiler (issue #3) is the next part to land."
    )
