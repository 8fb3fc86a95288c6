"""``edgeprune demo`` -- today: compile a real bundle, then real agents serve it and adapt to their batteries.

What runs: the reference bundle is compiled (or reused from ``out/demo/bundle``; the dense checkpoint is
cached, so only the first run trains); a private Mosquitto starts on a free port; N real agents
(:class:`agent.core.Agent`, onnxruntime backend) serve Fashion-MNIST test images from the bundle while
their simulated batteries drain, so the policy steps each one down the ladder of variants, with a reason,
and every message goes through each agent's on-disk outbox to the broker; a fleet-side collector
validates every message against the contract (a malformed payload is rejected, not fatal). Gating, the
fleet manager, rollouts and the energy model of the simulator arrive with issues #4 and #6-#8; the output
says so.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

from agent.contract import (
    CHANNELS,
    ContractError,
    Event,
    Message,
    Readings,
    Status,
    device_topic,
    parse_message,
    parse_topic,
    subscription,
)
from agent.core import Agent, AgentConfig
from agent.data import ImageDataset, fashion_mnist_dir, load_fashion_mnist
from agent.errors import InternalError, UserError
from agent.mqtt import make_client
from agent.policy import PolicyConfig
from agent.sensors import StaticSensors
from fleet.broker import MosquittoBroker

__all__ = ["Collector", "run_demo"]


@dataclass
class Collector:
    """Fleet-side subscriber: validates each payload against the contract, keeps the last of each kind."""

    accepted: Counter[str] = field(default_factory=Counter)
    rejected: list[str] = field(default_factory=list)
    latest: dict[tuple[str, str], Message] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
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
                if isinstance(message, Event):
                    self.events.append(message)
            self.changed.notify_all()

    def wait_for(self, predicate: object, timeout_s: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout=timeout_s)  # type: ignore[arg-type]


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


def _ensure_bundle(
    *, out: Path, data_root: Path | None, model: str, epochs: float | None
) -> tuple[Path, Path]:
    """The demo's bundle and public key under ``out``: reused when present and intact, else compiled."""
    from agent.bundle import BundleError, open_bundle
    from agent.signing import generate_keys, load_public_key
    from compiler.pipeline import CompileOptions, compile_bundle
    from compiler.train import TrainConfig

    keys, bundle = out / "keys", out / "bundle"
    if not (keys / "edgeprune.key").exists():
        generate_keys(keys)
        print(f"    made a demo signing key in {keys}")
    public = keys / "edgeprune.pub"
    if bundle.exists():
        try:
            open_bundle(bundle, public_key=load_public_key(public))
            print(f"    reusing {bundle} (delete it to compile again)")
            return bundle, public
        except (BundleError, UserError) as exc:
            print(f"    {bundle} is unusable ({exc}); compiling it again")
    print(
        "    the first run trains the dense model (about 25-40 minutes on 2 cores); later runs reuse the\n"
        "    cached checkpoint, and a complete bundle is reused as is"
    )
    train = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    compile_bundle(
        CompileOptions(
            out=bundle,
            key=keys / "edgeprune.key",
            model=model,
            data=str(data_root) if data_root else "fashion-mnist",
            train=train,
            force=True,
        )
    )
    return bundle, public


@dataclass
class _Device:
    """One simulated device: a real agent, a fake battery, and what it served."""

    name: str
    agent: Agent
    sensors: StaticSensors
    battery: float
    drain: float
    served: int = 0
    correct: int = 0
    macs: int = 0


def _make_devices(
    *, n: int, bundle: Path, public: Path, broker: MosquittoBroker, fleet: str, state: Path, steps: int
) -> list[_Device]:
    devices = []
    for i in range(n):
        # Batteries start spread between 100% and 30% and lose 60 points over the run, so each device
        # crosses the policy's low (20%) and critical (10%) thresholds at a different moment.
        start = 100.0 - 70.0 * i / max(n - 1, 1)
        sensors = StaticSensors(Readings(battery_pct=start, charging=False))
        config = AgentConfig(
            bundle=bundle,
            public_key=public,
            broker_url=broker.url,
            device_id=f"dev-{i:03d}",
            state_dir=state / f"dev-{i:03d}",
            fleet=fleet,
            profile="demo",
            metrics_period_s=1.0,
            heartbeat_period_s=2.0,
            decide_period_s=0.1,
            policy=PolicyConfig(min_dwell_s=0.5),
        )
        devices.append(_Device(f"dev-{i:03d}", Agent(config, sensors=sensors), sensors, start, 60.0 / steps))
    return devices


def _print_summary(collector: Collector, devices: list[_Device], dense_macs: int) -> None:
    print(f"    {'device':<9}{'battery':>9}{'served':>8}{'accuracy':>10}{'compute':>9}  variants (why)")
    for d in devices:
        switches = [e for e in collector.events if e.device_id == d.name and e.event == "variant_switch"]
        path = (
            " -> ".join(
                [str(switches[0].data["from_variant"])] + [str(e.data["to_variant"]) for e in switches]
            )
            if switches
            else d.agent.server.active
        )
        compute = d.macs / max(d.served * dense_macs, 1)
        accuracy = d.correct / max(d.served, 1)
        print(f"    {d.name:<9}{d.battery:>8.0f}%{d.served:>8}{accuracy:>10.3f}{compute:>8.0%}  {path}")
        for e in switches:
            print(f"    {'':<9}{'':>9}{'':>8}{'':>10}{'':>9}    - {e.message}")
    print(f"    compute = mean MACs per inference relative to always-dense ({dense_macs / 1e6:.2f}M MACs)")
    print(f"    collector accepted: {dict(sorted(collector.accepted.items()))}")
    print(f"    collector rejected: {len(collector.rejected)} -> {collector.rejected[0][:140]}")


def _send_malformed(broker: MosquittoBroker, fleet: str, device: str, timeout_s: float) -> mqtt.Client:
    rogue = make_client(f"{fleet}-rogue")
    rogue.connect(broker.host, broker.port)
    rogue.loop_start()
    payload = b'{"kind": "metrics", "inferences": -1}'
    rogue.publish(device_topic(fleet, device, "metrics"), payload, qos=1).wait_for_publish(timeout_s)
    return rogue


def _wait_offline(collector: Collector, names: list[str], timeout_s: float) -> None:
    def done() -> bool:
        states = [collector.latest.get((name, "status")) for name in names]
        offline = sum(1 for m in states if isinstance(m, Status) and m.state == "offline")
        return offline == len(names) and len(collector.rejected) >= 1

    if not collector.wait_for(done, timeout_s):
        raise InternalError(
            f"the collector did not see every device stop within {timeout_s}s: "
            f"{dict(collector.accepted)}, {len(collector.rejected)} rejected"
        )


def _drive(devices: list[_Device], test: ImageDataset, *, steps: int, batch: int) -> None:
    """Serve ``steps`` rounds of ``batch`` test images per device; each round drains the batteries."""
    cursor = 0
    for step in range(steps):
        for d in devices:
            for _ in range(batch):
                i = cursor % len(test)
                cursor += 1
                result = d.agent.infer(test.images[i])
                d.served += 1
                d.correct += int(result.label == test.labels[i])
                d.macs += result.macs
            d.battery = max(1.0, d.battery - d.drain)
            d.sensors.readings = Readings(battery_pct=d.battery, charging=False)
        time.sleep(0.15)  # let each agent's loop read its sensors and decide
        if step % 10 == 9:
            state = ", ".join(f"{d.name} {d.battery:.0f}% {d.agent.server.active}" for d in devices)
            print(f"    step {step + 1}/{steps}: {state}", flush=True)


def run_demo(
    *,
    data_root: Path | None,
    devices: int,
    fleet: str,
    out: Path,
    model: str = "reference",
    epochs: float | None = None,
    timeout_s: float = 20.0,
    steps: int = 40,
    batch: int = 10,
) -> None:
    """Run the demo; a missing part raises a :class:`~agent.errors.UserError` subclass."""
    from agent.bundle import open_bundle
    from agent.signing import load_public_key

    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    started = time.monotonic()
    print(
        "edgeprune demo -- what works today: compile a signed bundle of pruned variants, then real agents\n"
        "serve it and step down as their batteries drain, reporting over MQTT. Gating, the fleet manager,\n"
        "rollouts and the simulator's energy model are issues #4 and #6-#8, not part of this run yet.\n"
    )

    _step(f"loading Fashion-MNIST from {fashion_mnist_dir(data_root)}")
    test = load_fashion_mnist("test", root=data_root)
    counts = np.bincount(test.labels, minlength=len(test.class_names))
    print(
        f"    {len(test)} test images of {test.images.shape[1]}x{test.images.shape[2]}, "
        f"{len(test.class_names)} classes, {counts.min()}-{counts.max()} per class"
    )

    _step(f"compiling the {model} bundle into {out / 'bundle'}")
    bundle, public = _ensure_bundle(out=out, data_root=data_root, model=model, epochs=epochs)
    manifest = open_bundle(bundle, public_key=load_public_key(public))
    dense_macs = max(v.macs for v in manifest.variants)
    print(
        f"    {manifest.model_id} {manifest.bundle_version}: "
        + ", ".join(
            f"{v.name} ({v.macs / 1e6:.1f}M MACs, {100 * (v.accuracy or 0):.1f}%)" for v in manifest.variants
        )
        + "; signature verified"
    )

    _step("starting a private Mosquitto broker")
    state = out / "state"
    shutil.rmtree(state, ignore_errors=True)  # a fresh fleet each run; the bundle is what is reused
    with MosquittoBroker() as broker:
        print(f"    {broker.url} (pid {broker.pid})")
        clients: list[mqtt.Client] = []
        fleet_devices: list[_Device] = []
        try:
            collector, fleet_client = _start_collector(broker, fleet, timeout_s)
            clients.append(fleet_client)
            _step(
                f"starting {devices} agent(s); batteries drain as each serves {steps} x {batch} test images"
            )
            fleet_devices = _make_devices(
                n=devices, bundle=bundle, public=public, broker=broker, fleet=fleet, state=state, steps=steps
            )
            for d in fleet_devices:
                d.agent.start()
            _drive(fleet_devices, test, steps=steps, batch=batch)

            _step("sending one malformed payload; the collector must reject it, not crash")
            clients.append(_send_malformed(broker, fleet, fleet_devices[0].name, timeout_s))

            _step("stopping the agents cleanly: last metrics, offline status, outboxes flushed")
            for d in fleet_devices:
                d.agent.stop()

            _wait_offline(collector, [d.name for d in fleet_devices], timeout_s)
        except BaseException:
            for d in fleet_devices:
                with contextlib.suppress(Exception):
                    d.agent.stop(flush_timeout_s=0.5)
            raise
        finally:
            for client in clients:
                client.disconnect()
                client.loop_stop()

    _step("summary")
    _print_summary(collector, fleet_devices, dense_macs)
    report = bundle / "report"
    print(f"\nbundle report: {report / 'report.md'}  (Pareto plot: {report / 'pareto.png'})")
    docs = "docs/compiler.md, docs/agent.md, docs/protocol.md, docs/architecture.md"
    print(f"done in {time.monotonic() - started:.1f}s. Docs: {docs}")
