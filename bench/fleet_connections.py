"""Hold many simulated device connections on one Mosquitto and one fleet manager, and measure the cost.

Each simulated device is a few kilobytes of asyncio state, not an agent: a raw-socket MQTT v5 client
(asyncio.Protocol over epoll, so no select() limit of 1024 descriptors) that connects with a last will
(``status`` offline, retained), publishes its birth and an online status (retained, QoS 1) once
connected, then a status heartbeat every ``--heartbeat-period`` s and a metrics message every
``--metrics-period`` s (QoS 1), and a PINGREQ when it has been quiet for half its keepalive. It counts
CONNACKs, PUBACKs and PINGRESPs. Every message is built with the contract's models, so the manager
stores it. ``--procs`` load-generator processes share the devices.

The fleet manager is one process running the ingestion of ``bench/fleet_ingest.py`` (an
:class:`fleet.ingest.Ingestor` in a shared-subscription group) into SQLite, or PostgreSQL with
``--db postgresql+psycopg://...`` (a fresh database, dropped after). The bench reports connections held
(by the load generators and by the broker's ``$SYS/broker/clients/connected``), the time to connect them
all, the registry's count of online devices (must reach ``--devices``), messages stored against messages
acknowledged, and the RSS and CPU of mosquitto, the manager and the load generators. Exit 1 unless every
device connected and stayed connected through ``--hold`` s, the registry showed all of them online, and
every acknowledged message was stored with no rejects.

    .venv/bin/python bench/fleet_connections.py --devices 10000 --json-out out/bench/fleet-connections.json
    .venv/bin/python bench/fleet_connections.py --devices 50 --hold 3 --metrics-period 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import resource
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from _mqtt_raw import (
    CONNACK,
    DISCONNECT,
    DISCONNECT_PACKET,
    PINGREQ_PACKET,
    PINGRESP,
    PUBACK,
    connect_packet,
    packets,
    publish_packet,
)
from _report import finish, fresh_database
from fleet_ingest import FLEET, _ingestor
from sqlalchemy import func, select

from agent.contract import Birth, BundleRef, Metrics, Percentiles, Readings, Status, device_topic, envelope
from agent.mqtt import make_client
from fleet.broker import MosquittoBroker
from fleet.store import Store, schema

MB = 2**20


class Counters:
    """What one load generator has seen; copied into shared memory for the orchestrator."""

    FIELDS = ("connected", "failed", "lost", "sent", "acked", "nacked", "pings", "connect_done")

    def __init__(self) -> None:
        self.values = dict.fromkeys(self.FIELDS, 0)

    def __getitem__(self, key: str) -> int:
        return self.values[key]

    def add(self, key: str, n: int = 1) -> None:
        self.values[key] += n


class Device(asyncio.Protocol):
    """One simulated device's connection."""

    def __init__(self, index: int, counters: Counters, *, keepalive: int) -> None:
        self.device_id = f"sim-{index:05d}"
        self.client_id = f"bench-{index:05d}"
        self.counters = counters
        self.keepalive = keepalive
        self.seq = 0
        self.next_id = 0
        self.pending: set[int] = set()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.connack: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.online = False
        self.closing = False
        self.last_tx = 0.0

    def topic(self, channel: str) -> str:
        return device_topic(FLEET, self.device_id, channel)  # type: ignore[arg-type]

    def envelope(self) -> dict[str, Any]:
        self.seq += 1
        return envelope(device_id=self.device_id, seq=self.seq)

    # protocol callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        will = Status(**self.envelope(), state="offline", uptime_s=0.0)
        self.send(
            connect_packet(
                self.client_id,
                keepalive=self.keepalive,
                will_topic=self.topic("status"),
                will_payload=will.to_json().encode(),
            )
        )

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        for kind, body in packets(self.buffer):
            self.handle(kind, body)

    def handle(self, kind: int, body: bytes) -> None:
        if kind == PUBACK:
            packet_id = int.from_bytes(body[:2], "big")
            if packet_id in self.pending:
                self.pending.discard(packet_id)
                reason = body[2] if len(body) > 2 else 0
                self.counters.add("nacked" if reason >= 0x80 else "acked")
        elif kind == CONNACK:
            if not self.connack.done():
                self.connack.set_result(body[1])
        elif kind == PINGRESP:
            self.counters.add("pings")
        elif kind == DISCONNECT and self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError("closed before CONNACK"))
        if self.online and not self.closing:
            self.counters.add("lost")
        self.online = False

    # sending
    def send(self, packet: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(packet)
            self.last_tx = time.monotonic()

    def publish(self, channel: str, payload: bytes, *, retain: bool = False) -> None:
        if not self.online:
            return
        self.next_id = self.next_id % 65535 + 1
        self.pending.add(self.next_id)
        self.send(publish_packet(self.topic(channel), payload, packet_id=self.next_id, retain=retain))
        self.counters.add("sent")

    def birth(self) -> None:
        birth = Birth(
            **self.envelope(),
            profile="rpi4",
            agent_version="0.1.0",
            backend="onnx",
            bundle=BundleRef(model_id="fmnist-resnet", bundle_version="1.0.0"),
            variants=("dense", "static-50"),
        )
        self.publish("birth", birth.to_json().encode(), retain=True)
        self.heartbeat()

    def heartbeat(self) -> None:
        status = Status(**self.envelope(), state="online", uptime_s=time.monotonic() % 1e6)
        self.publish("status", status.to_json().encode(), retain=True)

    def metrics(self, window_s: float) -> None:
        m = Metrics(
            **self.envelope(),
            window_s=window_s,
            inferences=100,
            latency=Percentiles(p50_ms=3.0, p90_ms=4.5, p99_ms=7.0),
            active_variant="static-50",
            budget=0.5,
            readings=Readings(battery_pct=80.0 - self.seq % 50, charging=False, cpu_load_pct=20.0),
        )
        self.publish("metrics", m.to_json().encode())

    def ping_if_quiet(self) -> None:
        if self.online and time.monotonic() - self.last_tx > self.keepalive / 2:
            self.send(PINGREQ_PACKET)


async def _connect(
    index: int, counters: Counters, *, args: argparse.Namespace, port: int, gate: asyncio.Semaphore
) -> tuple[Device | None, float]:
    loop = asyncio.get_running_loop()
    async with gate:
        for attempt in range(args.connect_retries + 1):
            t0 = time.monotonic()
            device = None
            try:
                _, device = await loop.create_connection(
                    lambda: Device(index, counters, keepalive=args.keepalive), "127.0.0.1", port
                )
                reason = await asyncio.wait_for(device.connack, 30)
                if reason != 0:
                    raise ConnectionError(f"CONNACK reason {reason:#x}")
                device.online = True
                counters.add("connected")
                device.birth()
                return device, time.monotonic() - t0
            except (OSError, TimeoutError) as exc:
                if device is not None and device.transport is not None:
                    device.transport.close()
                if attempt == args.connect_retries:
                    print(f"{index}: cannot connect: {exc}", file=sys.stderr, flush=True)
                else:
                    await asyncio.sleep(args.retry_delay)
    counters.add("failed")
    return None, 0.0


async def _every(period: float, devices: list[Device], action: Any, stop: asyncio.Event) -> None:
    """Call ``action(device)`` for every device once per ``period``, spread evenly over it."""
    n = len(devices)
    if not n:
        return
    loop = asyncio.get_running_loop()
    start, k, cycle = loop.time(), 0, 1  # the first round is one period after connecting
    while not stop.is_set():
        now = loop.time()
        while start + cycle * period + k * period / n <= now:
            action(devices[k])
            k += 1
            if k == n:
                k, cycle = 0, cycle + 1
        await asyncio.sleep(0.05)


async def _generate(
    args: argparse.Namespace, start: int, n: int, *, shared: Any, stop_flag: Any, report: Any
) -> None:
    counters = Counters()
    stop = asyncio.Event()

    async def publish_counters() -> None:
        while True:
            for i, key in enumerate(Counters.FIELDS):
                shared[i] = counters[key]
            if stop_flag.is_set():
                stop.set()
            await asyncio.sleep(0.25)

    mirror = asyncio.create_task(publish_counters())
    gate = asyncio.Semaphore(args.connect_concurrency)
    t0 = time.time()
    results = await asyncio.gather(
        *(_connect(i, counters, args=args, port=args.port, gate=gate) for i in range(start, start + n))
    )
    t_connected = time.time()
    counters.add("connect_done")
    devices = [d for d, _ in results if d is not None]
    latencies = sorted(lat for d, lat in results if d is not None)
    tasks = [
        asyncio.create_task(_every(args.heartbeat_period, devices, Device.heartbeat, stop)),
        asyncio.create_task(
            _every(args.metrics_period, devices, lambda d: d.metrics(args.metrics_period), stop)
        ),
        asyncio.create_task(_every(args.keepalive / 4, devices, Device.ping_if_quiet, stop)),
    ]
    await stop.wait()
    await asyncio.gather(*tasks)
    deadline = time.monotonic() + 15
    while any(d.pending for d in devices) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    held = sum(1 for d in devices if d.online)
    for d in devices:
        d.closing = True
        d.send(DISCONNECT_PACKET)
        if d.transport is not None:
            d.transport.close()
    await asyncio.sleep(0.5)
    mirror.cancel()
    for i, key in enumerate(Counters.FIELDS):
        shared[i] = counters[key]

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    report.put(
        {
            "start": start,
            "devices": n,
            "t0": t0,
            "t_connected": t_connected,
            "held_at_stop": held,
            "connect_p50_ms": pct(0.5) * 1000,
            "connect_p99_ms": pct(0.99) * 1000,
            **counters.values,
        }
    )


def _load_generator(
    *, args: argparse.Namespace, start: int, n: int, shared: Any, go: Any, stop: Any, report: Any
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    go.wait()
    asyncio.run(_generate(args, start, n, shared=shared, stop_flag=stop, report=report))


# --- orchestration -------------------------------------------------------------------------------------


class SysMonitor:
    """Follows the broker's own count of connected clients ($SYS, published every sys_interval)."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.connected = 0
        self.peak = 0
        self.client = make_client(f"bench-sys-{uuid.uuid4().hex[:6]}")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("$SYS/broker/clients/connected", qos=0)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with contextlib.suppress(ValueError):
            self.connected = int(msg.payload)
            self.peak = max(self.peak, self.connected)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Sampler:
    """RSS (current and peak) and CPU seconds of named processes, sampled from a thread."""

    def __init__(self, pids: dict[str, list[int]], period_s: float = 1.0) -> None:
        self.procs = {name: [psutil.Process(p) for p in ps] for name, ps in pids.items()}
        self.peak = dict.fromkeys(pids, 0)
        self.last = dict.fromkeys(pids, 0)
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def rss(self, name: str) -> int:
        total = 0
        for p in self.procs[name]:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def cpu(self) -> dict[str, float]:
        out = {}
        for name, ps in self.procs.items():
            total = 0.0
            for p in ps:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
            out[name] = total
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def sample(self) -> None:
        for name in self.procs:
            self.last[name] = self.rss(name)
            self.peak[name] = max(self.peak[name], self.last[name])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def registry(store: Store) -> tuple[int, int]:
    """(devices online, devices known) in the manager's registry for the bench fleet."""
    d = schema.devices.c
    with store.read() as conn:
        online = conn.execute(
            select(func.count()).select_from(schema.devices).where(d.fleet == FLEET, d.online.is_(True))
        ).scalar_one()
        known = conn.execute(
            select(func.count()).select_from(schema.devices).where(d.fleet == FLEET)
        ).scalar_one()
    return int(online), int(known)


def run(args: argparse.Namespace, db: str, broker: MosquittoBroker) -> dict[str, Any]:  # noqa: PLR0915
    Store(db).close()  # migrate once, before the manager starts
    ctx = mp.get_context("spawn")
    ready, report = ctx.Queue(), ctx.Queue()
    go, stop, stop_manager = ctx.Event(), ctx.Event(), ctx.Event()
    manager = ctx.Process(
        target=_ingestor,
        kwargs=dict(
            db=db,
            broker_url=broker.url,
            group=f"conn-{uuid.uuid4().hex[:6]}",
            batch=args.batch,
            ready=ready,
            stop=stop_manager,
        ),
        name="fleet-manager",
    )
    manager.start()
    ready.get(timeout=60)
    args.port = broker.port
    shares = [args.devices // args.procs + (k < args.devices % args.procs) for k in range(args.procs)]
    starts = [sum(shares[:k]) for k in range(args.procs)]
    shared = [ctx.Array("q", len(Counters.FIELDS)) for _ in shares]
    gens = [
        ctx.Process(
            target=_load_generator,
            kwargs=dict(args=args, start=s, n=n, shared=shared[k], go=go, stop=stop, report=report),
            name=f"load-generator-{k}",
        )
        for k, (s, n) in enumerate(zip(starts, shares, strict=True))
    ]
    for p in gens:
        p.start()
    sysmon = SysMonitor(broker)
    assert broker.pid is not None and manager.pid is not None
    sampler = Sampler(
        {
            "mosquitto": [broker.pid],
            "manager": [manager.pid],
            "load_generators": [p.pid for p in gens if p.pid is not None],
            "orchestrator": [os.getpid()],
        }
    )
    time.sleep(1.0)  # the generators import and raise their fd limit
    sampler.sample()
    rss_idle = dict(sampler.last)

    def total(key: str) -> int:
        return sum(a[Counters.FIELDS.index(key)] for a in shared)

    result: dict[str, Any] = {"devices": args.devices}
    store = Store(db, migrate_on_open=False)
    try:
        cpu0, t0 = sampler.cpu(), time.time()
        go.set()
        next_print, online, known, peak_online = 0.0, 0, 0, 0
        t_connected = t_online = None

        def progress(phase: str) -> None:
            nonlocal next_print, online, known, peak_online
            online, known = registry(store)
            peak_online = max(peak_online, online)
            now = time.monotonic()
            if now >= next_print:
                counters = store.counters()
                print(
                    f"[{time.time() - t0:6.1f} s] {phase}: connected {total('connected') - total('lost'):,}"
                    f"/{args.devices:,} (failed {total('failed')}, lost {total('lost')}); broker sees "
                    f"{sysmon.connected:,} clients; registry online {online:,}; published {total('sent'):,}, "
                    f"acked {total('acked'):,}, stored {counters.get('stored', 0):,}; rss mosquitto "
                    f"{sampler.last['mosquitto'] / MB:.0f} MiB, manager "
                    f"{sampler.last['manager'] / MB:.0f} MiB, load "
                    f"{sampler.last['load_generators'] / MB:.0f} MiB",
                    flush=True,
                )
                next_print = now + args.progress_s

        deadline = time.monotonic() + args.connect_timeout
        while total("connect_done") < len(gens) and time.monotonic() < deadline:
            if not all(p.is_alive() for p in gens):
                break
            progress("connecting")
            time.sleep(0.5)
        t_connected = time.time()
        cpu1 = sampler.cpu()
        connected = total("connected")
        # the registry: every connected device online
        deadline = time.monotonic() + args.online_timeout
        while time.monotonic() < deadline:
            progress("registering")
            if online >= connected:
                t_online = time.time()
                break
            time.sleep(0.5)
        # hold every connection while heartbeats and metrics flow
        hold_until = t_connected + args.hold
        while time.time() < hold_until:
            progress("holding")
            time.sleep(0.5)
        sampler.sample()
        cpu2, t2 = sampler.cpu(), time.time()
        held = total("connected") - total("lost")
        broker_clients = sysmon.connected
        rss_held = dict(sampler.last)
        stop.set()
        finals = [report.get(timeout=60) for _ in gens]
        # wait for the manager to store everything acknowledged
        acked = sum(f["acked"] for f in finals)
        deadline = time.monotonic() + args.drain_timeout
        while time.monotonic() < deadline and store.counters().get("stored", 0) < acked:
            progress("draining")
            time.sleep(0.5)
        manager_alive = manager.is_alive()
        counters = store.counters()
        online, known = registry(store)
    finally:
        sampler.close()
        sysmon.close()
        stop.set()
        stop_manager.set()
        for p in [*gens, manager]:
            p.join(30)
            if p.is_alive():
                p.kill()
        store.close()

    connect_s = (max(f["t_connected"] for f in finals) - t0) if finals else None
    hold_s = t2 - t_connected

    def cpu_pct(a: dict[str, float], b: dict[str, float], seconds: float) -> dict[str, float]:
        return {k: round(100 * (b[k] - a[k]) / seconds, 1) for k in a} if seconds > 0 else {}

    result.update(
        {
            "procs": args.procs,
            "connected": sum(f["connected"] for f in finals),
            "failed": sum(f["failed"] for f in finals),
            "lost": sum(f["lost"] for f in finals),
            "held_at_end_of_hold": held,
            "broker_clients_connected": broker_clients,
            "broker_clients_peak": sysmon.peak,
            "connect_all_s": round(connect_s, 2) if connect_s is not None else None,
            "connect_p50_ms": round(max(f["connect_p50_ms"] for f in finals), 1),
            "connect_p99_ms": round(max(f["connect_p99_ms"] for f in finals), 1),
            "registry_online_peak": peak_online,
            "registry_known": known,
            "all_online_after_s": round(t_online - t0, 2) if t_online else None,
            "hold_s": round(hold_s, 1),
            "published": sum(f["sent"] for f in finals),
            "acked": acked,
            "nacked": sum(f["nacked"] for f in finals),
            "pings": sum(f["pings"] for f in finals),
            "stored": counters.get("stored", 0),
            "duplicates": counters.get("duplicates", 0),
            "rejected": sum(v for k, v in counters.items() if k.startswith("reject.")),
            "manager_alive": manager_alive,
            "rss_mib_idle": {k: round(v / MB, 1) for k, v in rss_idle.items()},
            "rss_mib_held": {k: round(v / MB, 1) for k, v in rss_held.items()},
            "rss_mib_peak": {k: round(v / MB, 1) for k, v in sampler.peak.items()},
            "cpu_pct_connect": cpu_pct(cpu0, cpu1, t_connected - t0),
            "cpu_pct_hold": cpu_pct(cpu1, cpu2, hold_s),
            "load_average": os.getloadavg(),
        }
    )
    return result


def check(r: dict[str, Any]) -> list[str]:
    n = r["devices"]
    problems = []
    if r["connected"] != n or r["failed"]:
        problems.append(f"{r['connected']} of {n} devices connected ({r['failed']} failed)")
    if r["held_at_end_of_hold"] != n or r["lost"]:
        problems.append(f"{r['held_at_end_of_hold']} of {n} connections held to the end ({r['lost']} lost)")
    if r["registry_online_peak"] != n:
        problems.append(f"the registry showed {r['registry_online_peak']} of {n} devices online")
    if r["stored"] != r["acked"] or r["rejected"] or r["nacked"]:
        problems.append(
            f"stored {r['stored']} of {r['acked']} acknowledged messages "
            f"({r['rejected']} rejected, {r['nacked']} refused by the broker)"
        )
    if not r["manager_alive"]:
        problems.append("the fleet manager process died")
    return problems


def print_table(args: argparse.Namespace, result: dict[str, Any]) -> None:
    print()
    print(
        f"{args.devices:,} simulated devices in {args.procs} load-generator process(es), one mosquitto, one "
        f"fleet manager ({result['store']}), {os.cpu_count()} CPUs, metrics every {args.metrics_period:g} s, "
        f"heartbeat every {args.heartbeat_period:g} s"
    )
    rows = [
        ("connections held (load generators)", f"{result['held_at_end_of_hold']:,} of {args.devices:,}"),
        (
            "clients connected (broker $SYS)",
            f"{result['broker_clients_connected']:,} (manager + monitor incl.)",
        ),
        ("time to connect all", f"{result['connect_all_s']} s"),
        ("connect latency p50 / p99", f"{result['connect_p50_ms']} / {result['connect_p99_ms']} ms"),
        ("registry: devices online (peak)", f"{result['registry_online_peak']:,}"),
        ("all online in the registry after", f"{result['all_online_after_s']} s"),
        ("held for", f"{result['hold_s']} s"),
        (
            "messages published / acked / stored",
            f"{result['published']:,} / {result['acked']:,} / {result['stored']:,}",
        ),
        ("rejected / duplicates", f"{result['rejected']} / {result['duplicates']}"),
    ]
    for name in ("mosquitto", "manager", "load_generators", "orchestrator"):
        rows.append(
            (
                f"{name}: RSS idle / held / peak",
                f"{result['rss_mib_idle'][name]} / {result['rss_mib_held'][name]} / "
                f"{result['rss_mib_peak'][name]} MiB",
            )
        )
        rows.append(
            (
                f"{name}: CPU connect / hold",
                f"{result['cpu_pct_connect'].get(name)} % / {result['cpu_pct_hold'].get(name)} %",
            )
        )
    width = max(len(k) for k, _ in rows)
    for name, value in rows:
        print(f"{name:{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=1, help="load-generator processes")
    parser.add_argument("--heartbeat-period", type=float, default=30.0, help="seconds between statuses")
    parser.add_argument("--metrics-period", type=float, default=10.0, help="seconds between metrics")
    parser.add_argument("--keepalive", type=int, default=15, help="MQTT keepalive of each device, seconds")
    parser.add_argument("--hold", type=float, default=60.0, help="seconds to hold every connection")
    parser.add_argument("--connect-concurrency", type=int, default=200, help="connects in flight per process")
    parser.add_argument("--connect-retries", type=int, default=2)
    parser.add_argument("--retry-delay", type=float, default=0.5)
    parser.add_argument("--connect-timeout", type=float, default=300.0)
    parser.add_argument("--online-timeout", type=float, default=120.0)
    parser.add_argument("--drain-timeout", type=float, default=60.0)
    parser.add_argument("--batch", type=int, default=500, help="the manager's batch size")
    parser.add_argument("--db", default="", help="'' (a temporary SQLite file) or postgresql+psycopg://...")
    parser.add_argument(
        "--max-connections", type=int, default=-1, help="mosquitto's max_connections (-1: no limit)"
    )
    parser.add_argument("--progress-s", type=float, default=5.0)
    parser.add_argument("--json-out", type=Path, default=Path("out/bench/fleet-connections.json"))
    args = parser.parse_args(argv)

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # mosquitto inherits it
    if hard < args.devices // args.procs + 100 or hard < args.devices + 100:
        print(f"the open-file limit {hard} is too low for {args.devices} connections", file=sys.stderr)
        return 2
    config = (
        "max_queued_messages 0\nmax_inflight_messages 0\nsys_interval 1\n"
        f"max_connections {args.max_connections}\n"  # after the listener line: applies to it
    )
    with fresh_database(args.db, prefix="fleet-conn-") as db, MosquittoBroker(extra_config=config) as broker:
        result = run(args, db, broker)
    result["store"] = "postgresql" if args.db.startswith("postgresql") else "sqlite"
    result["fd_limit"] = hard
    problems = check(result)
    result["problems"] = problems
    result["ok"] = not problems

    print_table(args, result)
    return finish(result, args, argv, problems, ok="OK")


if __name__ == "__main__":
    sys.exit(main())
