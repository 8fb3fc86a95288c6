"""``edgeprune demo`` -- today: compile a real bundle, then run devices that serve it and report over MQTT.

What runs: the reference bundle is compiled (or reused from ``out/demo/bundle``; the dense checkpoint is
cached, so only the first run trains); a private Mosquitto starts on a free port; N device clients
connect with MQTT v5 and a last will, each serving one variant of the bundle with onnxruntime on
Fashion-MNIST test images and publishing a retained birth, an online status and a metrics window with
the real latency percentiles, accuracy and this machine's CPU and memory readings; one device sends a
malformed payload and one drops off with its will; a fleet-side collector validates every message against
the contract. The adaptive agent, the fleet manager and rollouts replace the hand-rolled parts as issues
#4-#8 land; the output says so.
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
    BundleManifest,
    BundleRef,
    Channel,
    ContractError,
    Message,
    Metrics,
    Percentiles,
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


@dataclass(frozen=True)
class _Served:
    """What one simulated device measured serving its variant."""

    variant: str
    inferences: int
    accuracy: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    macs: int


def _serve(
    bundle: Path, manifest: BundleManifest, variant: str, images: np.ndarray, labels: np.ndarray
) -> _Served:
    """Run ``variant``'s ONNX file on each image at batch 1, as a device would."""
    import onnxruntime as ort

    v = manifest.variant(variant)
    file = v.file_for("onnx")
    if file is None:
        raise InternalError(f"variant {variant} has no ONNX file")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(str(bundle / file.path), opts, providers=["CPUExecutionProvider"])
    norm = manifest.input.normalization
    x = ((images.astype(np.float32) / norm.scale - norm.mean[0]) / norm.std[0])[:, None]
    times, correct = [], 0
    for i in range(len(x)):
        start = time.perf_counter()
        logits = session.run(None, {manifest.input.name: x[i : i + 1]})[0]
        times.append((time.perf_counter() - start) * 1e3)
        correct += int(logits.argmax() == labels[i])
    p50, p90, p99 = (float(v) for v in np.percentile(times, [50, 90, 99]))
    return _Served(variant, len(x), correct / len(x), p50, p90, p99, v.macs)


def _connect_device(
    broker: MosquittoBroker,
    fleet: str,
    device: str,
    timeout_s: float,
    *,
    manifest: BundleManifest,
    served: _Served,
) -> mqtt.Client:
    """A device client: last will first, then a retained birth, an online status and one metrics window."""
    client = make_client(device)
    will = Status(**envelope(device_id=device, seq=0), state="offline", uptime_s=0)
    client.will_set(device_topic(fleet, device, "status"), will.to_json(), qos=1, retain=True)
    client.connect(broker.host, broker.port)
    client.loop_start()
    ref = BundleRef(model_id=manifest.model_id, bundle_version=manifest.bundle_version)
    birth = Birth(
        **envelope(device_id=device, seq=1),
        profile="host",
        agent_version=__version__,
        backend="onnx",
        bundle=ref,
        variants=tuple(v.name for v in manifest.variants),
    )
    metrics = Metrics(
        **envelope(device_id=device, seq=3),
        window_s=1.0,
        inferences=served.inferences,
        latency=Percentiles(p50_ms=served.p50_ms, p90_ms=served.p90_ms, p99_ms=served.p99_ms),
        mean_macs=float(served.macs),
        mean_density=1.0,
        active_variant=served.variant,
        readings=_readings(),
    )
    messages: list[tuple[Channel, Message]] = [
        ("birth", birth),
        (
            "status",
            Status(
                **envelope(device_id=device, seq=2),
                state="online",
                uptime_s=0.1,
                active_variant=served.variant,
            ),
        ),
        ("metrics", metrics),
    ]
    for channel, message in messages:
        spec = CHANNELS[channel]
        client.publish(
            device_topic(fleet, device, channel), message.to_json(), qos=spec.qos, retain=spec.retained
        ).wait_for_publish(timeout_s)
    return client


def _print_summary(collector: Collector) -> None:
    print(f"    {'device':<9} {'variant':<11} {'status':<8} {'inferences':>10} {'p50 ms':>8} {'MACs':>8}")
    devices = sorted({device for device, _ in collector.latest})
    for device in devices:
        status = collector.latest.get((device, "status"))
        metrics = collector.latest.get((device, "metrics"))
        state = status.state if isinstance(status, Status) else "-"
        if isinstance(metrics, Metrics) and metrics.latency is not None:
            print(
                f"    {device:<9} {metrics.active_variant or '-':<11} {state:<8} {metrics.inferences:>10} "
                f"{metrics.latency.p50_ms:>8.3f} {(metrics.mean_macs or 0) / 1e6:>7.2f}M"
            )
    print(f"    accepted: {dict(sorted(collector.accepted.items()))}")
    print(f"    rejected: {len(collector.rejected)} -> {collector.rejected[0][:150]}")


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


def run_demo(
    *,
    data_root: Path | None,
    devices: int,
    fleet: str,
    out: Path,
    model: str = "reference",
    epochs: float | None = None,
    timeout_s: float = 20.0,
    samples: int = 200,
) -> None:
    """Run the demo; a missing part raises a :class:`~agent.errors.UserError` subclass."""
    from agent.bundle import open_bundle
    from agent.signing import load_public_key

    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    started = time.monotonic()
    print(
        "edgeprune demo -- what works today: compile a signed bundle of pruned variants, serve it on\n"
        "simulated devices, report over MQTT. The adaptive agent, gating, fleet manager and rollouts are\n"
        "issues #4-#8 and not part of this run yet.\n"
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
    print(
        f"    {manifest.model_id} {manifest.bundle_version}: {', '.join(v.name for v in manifest.variants)} "
        f"(signature verified)"
    )

    _step("starting a private Mosquitto broker")
    clients: list[mqtt.Client] = []
    with MosquittoBroker() as broker:
        print(f"    {broker.url} (pid {broker.pid})")
        try:
            collector, fleet_client = _start_collector(broker, fleet, timeout_s)
            clients.append(fleet_client)
            _step(
                f"{devices} simulated device(s): each serves one variant on {samples} test images with "
                "onnxruntime, then reports over MQTT v5 (retained birth, last will)"
            )
            psutil.cpu_percent(interval=None)  # prime the CPU counter so the first reading means something
            names = [f"dev-{i:03d}" for i in range(devices)]
            n = min(samples, len(test))
            for i, name in enumerate(names):
                variant = manifest.variants[i % len(manifest.variants)].name
                served = _serve(bundle, manifest, variant, test.images[:n], test.labels[:n])
                clients.append(
                    _connect_device(broker, fleet, name, timeout_s, manifest=manifest, served=served)
                )
                print(
                    f"    {name}: {variant}, accuracy {served.accuracy:.3f} on {n} images, "
                    f"p50 {served.p50_ms:.3f} ms"
                )

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
    report = bundle / "report"
    print(f"\nbundle report: {report / 'report.md'}  (Pareto plot: {report / 'pareto.png'})")
    print(
        f"done in {time.monotonic() - started:.1f}s. Docs: docs/compiler.md, docs/protocol.md, "
        "docs/architecture.md"
    )
