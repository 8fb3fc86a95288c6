"""Benchmark: device messages per second stored by the fleet manager, SQLite and PostgreSQL side by side.

A private Mosquitto, ``--publishers`` processes each publishing its share of ``--messages`` Metrics
messages (QoS 1, payloads serialised beforehand), and ``--ingestors`` fleet-manager ingestion processes in
one MQTT v5 shared-subscription group writing into the store. The rate is messages stored (rows in
``messages_seen``) over the time from the first publish to the last row. To show where the limit is, the
same messages are also pushed through each stage alone: the broker alone (the same publishers to a
subscriber that only counts), contract parsing only (``parse_message``, one process), and store writes
only (``Store.ingest`` of parsed batches, no broker).

``--client`` picks the manager's MQTT client, and runs each one named side by side: ``batching`` (the
default, :class:`fleet.mqttclient.BatchingClient`: chunked reads, a fast PUBLISH decoder, one write
per batch of PUBACKs) and ``paho`` (paho's plain ``Client``, one PUBACK per message).

    python bench/fleet_ingest.py --messages 60000 --devices 20000 --publishers 2 --ingestors 2
    python bench/fleet_ingest.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/test

PostgreSQL: a database named ``edgeprune_bench_<random>`` is created from ``--pg`` and dropped after.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil

from agent.contract import Metrics, Percentiles, Readings, device_topic, envelope, parse_message
from agent.mqtt import make_client, parse_broker_url
from fleet.broker import MosquittoBroker
from fleet.ingest import DEFAULT_BATCH_MAX, Ingestor
from fleet.mqttclient import BatchingClient
from fleet.store import Store, schema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _mqtt_raw import BlockingPublisher

FLEET = "bench"
CLIENTS = {"batching": BatchingClient, "paho": mqtt.Client}


def payloads(start: int, n: int, devices: int) -> list[tuple[str, bytes]]:
    out = []
    for i in range(start, start + n):
        device = f"dev-{i % devices:05d}"
        m = Metrics(
            **envelope(device_id=device, seq=i),
            window_s=10,
            inferences=100,
            errors=0,
            latency=Percentiles(p50_ms=1.2, p90_ms=2.0, p99_ms=3.1),
            active_variant="static-50",
            budget=0.5,
            readings=Readings(battery_pct=50.0, charging=False, cpu_load_pct=10.0),
        )
        out.append((device_topic(FLEET, device, "metrics"), m.to_json().encode()))
    return out


def _publisher(
    *, broker_url: str, start: int, n: int, devices: int, go: Any, done: Any, paho: bool = False
) -> None:
    items = payloads(start, n, devices)
    address = parse_broker_url(broker_url)
    if paho:
        client = make_client(f"bench-pub-{start}")
        client.max_inflight_messages_set(1000)
        client.connect(address.host, address.port)
        client.loop_start()
        go.wait()
        c0 = time.process_time()  # this thread only; paho's network thread is not counted
        infos = [client.publish(topic, payload, qos=1) for topic, payload in items]
        for info in infos:
            info.wait_for_publish(120)
        done.put((time.time(), time.process_time() - c0))
        client.disconnect()
        client.loop_stop()
        return
    raw = BlockingPublisher(address.host, address.port, f"bench-pub-{start}")
    go.wait()
    c0 = time.process_time()
    raw.publish_all(items)
    done.put((time.time(), time.process_time() - c0))
    raw.close()


def _ingestor(
    *, db: str, broker_url: str, group: str, batch: int, ready: Any, stop: Any, client: str = "batching"
) -> None:
    with Store(db, migrate_on_open=False) as store:
        ing = Ingestor(
            store,
            broker_url=broker_url,
            fleet=FLEET,
            group=group,
            batch_max=batch,
            client_class=CLIENTS[client],
        )
        ing.start()
        ready.put(os.getpid())
        stop.wait()
        ing.stop()


def _counter(*, broker_url: str, group: str, total: int, client: str, ready: Any, done: Any) -> None:
    """A subscriber with the manager's MQTT client in the same kind of share group that only counts (and
    acknowledges as the manager does: in batches with ``batching``): the broker + MQTT ceiling."""
    import threading

    from fleet.ingest import shared_filters

    address = parse_broker_url(broker_url)
    client = make_client(f"bench-count-{uuid.uuid4().hex[:6]}", cls=CLIENTS[client])
    batching = isinstance(client, BatchingClient)
    client.manual_ack_set(batching)
    got = [0]
    unacked: list[int] = []
    finished = threading.Event()

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        got[0] += 1
        if batching:
            unacked.append(msg.mid)
            if len(unacked) >= 500 or got[0] >= total:
                client.ack_many(unacked)
                unacked.clear()
        if got[0] >= total:
            finished.set()

    client.on_message = on_message
    client.on_subscribe = lambda *a: ready.put(os.getpid())
    client.connect(address.host, address.port)
    client.subscribe([(f, 1) for f in shared_filters(group=group, fleet=FLEET)])
    client.loop_start()
    finished.wait(300)
    done.put((time.time(), got[0]))
    client.disconnect()
    client.loop_stop()


def _publishers(
    ctx: Any, broker: MosquittoBroker, args: argparse.Namespace, *, share: int, go: Any, done: Any
) -> list[Any]:
    """``args.publishers`` load-generator processes (not started), each publishing ``share`` messages."""
    return [
        ctx.Process(
            target=_publisher,
            kwargs=dict(
                broker_url=broker.url,
                start=k * share,
                n=share,
                devices=args.devices,
                go=go,
                done=done,
                paho=args.paho_publishers,
            ),
        )
        for k in range(args.publishers)
    ]


def broker_rate(broker: MosquittoBroker, args: argparse.Namespace, client: str) -> float:
    """Messages/s from the publishers to one subscriber that parses and stores nothing."""
    ctx = mp.get_context("spawn")
    ready, done, counted = ctx.Queue(), ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    share = args.messages // args.publishers
    total = share * args.publishers
    counter = ctx.Process(
        target=_counter,
        kwargs=dict(
            broker_url=broker.url,
            group=f"count-{uuid.uuid4().hex[:6]}",
            total=total,
            client=client,
            ready=ready,
            done=counted,
        ),
    )
    counter.start()
    ready.get(timeout=60)
    pubs = _publishers(ctx, broker, args, share=share, go=go, done=done)
    for p in pubs:
        p.start()
    time.sleep(2.0)
    t0 = time.time()
    go.set()
    t1, got = counted.get(timeout=args.timeout + 60)
    for p in [*pubs, counter]:
        p.join(60)
    return float(got / (t1 - t0))


def _cpu_s(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def live_rate(db: str, broker: MosquittoBroker, args: argparse.Namespace, client: str) -> dict[str, Any]:
    Store(db).close()  # migrate once, before the processes start
    ctx = mp.get_context("spawn")
    ready, done = ctx.Queue(), ctx.Queue()
    go, stop = ctx.Event(), ctx.Event()
    group = f"bench-{uuid.uuid4().hex[:6]}"
    ingestors = [
        ctx.Process(
            target=_ingestor,
            kwargs=dict(
                db=db,
                broker_url=broker.url,
                group=group,
                batch=args.batch,
                client=client,
                ready=ready,
                stop=stop,
            ),
        )
        for _ in range(args.ingestors)
    ]
    for p in ingestors:
        p.start()
    for _ in ingestors:
        ready.get(timeout=60)
    share = args.messages // args.publishers
    pubs = _publishers(ctx, broker, args, share=share, go=go, done=done)
    for p in pubs:
        p.start()
    time.sleep(2.0)  # let publishers connect and serialise their payloads
    total = share * args.publishers

    def pids() -> dict[str, list[int]]:
        return {
            "manager": [p.pid for p in ingestors if p.pid is not None],
            "broker": [broker.pid] if broker.pid is not None else [],
            # PostgreSQL's server processes, the connections' backends included (SQLite works inside
            # the manager's process)
            "database": [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "postgres"]
            if db.startswith("postgresql")
            else [],
        }

    cpu0 = {k: _cpu_s(v) for k, v in pids().items()}
    with Store(db, migrate_on_open=False) as store:
        t0 = time.time()
        go.set()
        deadline = time.monotonic() + args.timeout
        stored = 0
        while time.monotonic() < deadline:
            stored = store.count(schema.messages_seen)
            if stored >= total:
                break
            time.sleep(0.05)
        t1 = time.time()
    cpu = {k: _cpu_s(v) - cpu0[k] for k, v in pids().items()}
    finished = [done.get(timeout=60) for _ in pubs]
    published = max(at for at, _ in finished)
    cpu["publishers"] = sum(c for _, c in finished)
    stop.set()
    for p in [*pubs, *ingestors]:
        p.join(60)
    if stored < total:
        print(f"    only {stored} of {total} messages stored within {args.timeout:.0f} s", flush=True)
    return {
        "messages": total,
        "stored": stored,
        "seconds": t1 - t0,
        "stored_per_s": stored / (t1 - t0),
        "published_per_s": total / (published - t0),
        # CPU time per stored message, microseconds: where the 2 cores went
        "cpu_us_per_msg": {k: v / max(stored, 1) * 1e6 for k, v in cpu.items()},
    }


def parse_rate(items: list[tuple[str, bytes]]) -> float:
    t0 = time.perf_counter()
    for _, payload in items:
        parse_message(payload, expect_kind="metrics")
    return len(items) / (time.perf_counter() - t0)


def store_rate(db: str, items: list[tuple[str, bytes]], batch: int) -> float:
    parsed = [(FLEET, parse_message(p)) for _, p in items]
    with Store(db) as store:
        t0 = time.perf_counter()
        for i in range(0, len(parsed), batch):
            store.ingest(parsed[i : i + batch])
        return len(parsed) / (time.perf_counter() - t0)


class PgDatabases:
    """Fresh PostgreSQL databases created from an admin URL, all dropped on exit."""

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy import create_engine

        self.admin_url = admin_url
        self.engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.names: list[str] = []

    def new(self) -> str:
        from sqlalchemy import text

        name = f"edgeprune_bench_{uuid.uuid4().hex[:10]}"
        with self.engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return self.admin_url.rsplit("/", 1)[0] + "/" + name

    def close(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            for name in self.names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


def _print_header(header: str) -> None:
    print(header)
    print("-" * len(header))


def ratios_over_paho(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per store, the batching client's stored rate and manager CPU per message over paho's plain client's
    (when both ran)."""
    ratios = {}
    for name, r in results.items():
        plain = results.get(f"{name} (paho)")
        if r["client"] == "batching" and plain is not None:
            ratios[name] = {
                "stored_per_s": r["stored_per_s"] / plain["stored_per_s"],
                "manager_cpu_per_msg": r["cpu_us_per_msg"]["manager"] / plain["cpu_us_per_msg"]["manager"],
            }
    return ratios


def print_report(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    """Print the tables (and add ``cores_for_20k`` to each result)."""
    print()
    print(
        f"{args.messages} Metrics messages, {args.devices} devices, {args.publishers} publisher processes, "
        f"{args.ingestors} ingestor process(es), batches of {args.batch}, {os.cpu_count()} CPUs"
    )
    _print_header(
        f"{'store (client)':20} {'stored msg/s':>13} {'published msg/s':>16} {'broker only/s':>14} "
        f"{'parse only/s':>13} {'store only/s':>13}"
    )
    for name, r in results.items():
        print(
            f"{name:20} {r['stored_per_s']:13,.0f} {r['published_per_s']:16,.0f} "
            f"{r['broker_only_per_s']:14,.0f} "
            f"{r['parse_only_per_s']:13,.0f} {r['store_only_per_s']:13,.0f}"
        )
    print()
    print("CPU time per stored message during the live run (microseconds), and what it allows:")
    _print_header(
        f"{'store (client)':20} {'manager':>8} {'broker':>7} {'database':>9} {'publishers':>11} {'total':>7} "
        f"{'msg/s per core':>15} {'cores for 20k/s':>16}"
    )
    for name, r in results.items():
        c = r["cpu_us_per_msg"]
        total = sum(c.values())
        r["cores_for_20k"] = total * 20000 / 1e6
        print(
            f"{name:20} {c['manager']:8.1f} {c['broker']:7.1f} {c['database']:9.1f} {c['publishers']:11.1f} "
            f"{total:7.1f} {1e6 / total:15,.0f} {r['cores_for_20k']:16.2f}"
        )
    ratios = ratios_over_paho(results)
    if ratios:
        print()
        print("batching client / paho's plain client, same run:")
        for name, q in ratios.items():
            print(
                f"  {name}: stored msg/s x{q['stored_per_s']:.2f}, "
                f"manager CPU per message x{q['manager_cpu_per_msg']:.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=60000)
    parser.add_argument(
        "--devices",
        type=int,
        default=20000,
        help="devices the messages come from; with few, a batch holds each device many times and folds "
        "its registry updates into one, which a real fleet (a message per device every 10 s) rarely does",
    )
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--ingestors", type=int, default=1)
    parser.add_argument(
        "--batch", type=int, default=DEFAULT_BATCH_MAX, help="the ingestors' batch_max (default: theirs)"
    )
    parser.add_argument(
        "--paho-publishers",
        action="store_true",
        help="publish with paho clients instead of raw-socket ones (paho costs ~10x the CPU per message)",
    )
    parser.add_argument(
        "--client",
        default="batching,paho",
        help="the manager's MQTT client(s), side by side: batching (the default one), paho (plain)",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="give up waiting for the store after")
    parser.add_argument(
        "--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/test", help="'' skips PostgreSQL"
    )
    parser.add_argument("--json", type=Path, default=Path("out/bench-fleet-ingest.json"))
    args = parser.parse_args(argv)
    clients = [c.strip() for c in args.client.split(",") if c.strip()]
    if not clients or any(c not in CLIENTS for c in clients):
        parser.error(f"--client takes a comma-separated list of {', '.join(CLIENTS)}, got {args.client!r}")

    items = payloads(0, min(args.messages, 20000), args.devices)
    results: dict[str, dict[str, Any]] = {}
    pg = PgDatabases(args.pg) if args.pg else None
    try:
        with (
            tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp,
            # Mosquitto drops QoS 1 messages for a subscriber beyond 1000 queued by default; the bench
            # measures the manager, so the broker may queue without bound (see docs/fleet.md).
            MosquittoBroker(extra_config="max_queued_messages 0\nmax_inflight_messages 0") as broker,
        ):
            backends = [("sqlite", lambda: f"sqlite:///{Path(tmp) / uuid.uuid4().hex}.db")]
            if pg is not None:
                backends.append(("postgresql", pg.new))
            parse = parse_rate(items)
            mqtt_only = {}
            for client in clients:
                print(f"==> broker alone: publishers to a {client} subscriber that only counts", flush=True)
                mqtt_only[client] = broker_rate(broker, args, client)
            for name, fresh in backends:
                print(f"==> {name}: store writes alone", flush=True)
                writes = store_rate(fresh(), items, args.batch)
                for client in clients:
                    print(f"==> {name}: live ingestion through the broker, {client} client", flush=True)
                    live = live_rate(fresh(), broker, args, client)
                    key = name if client == "batching" else f"{name} ({client})"
                    results[key] = {
                        "client": client,
                        "parse_only_per_s": parse,
                        "store_only_per_s": writes,
                        "broker_only_per_s": mqtt_only[client],
                        **live,
                    }
    finally:
        if pg is not None:
            pg.close()

    print_report(results, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "args": {
                    k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "pg"
                },
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                "results": results,
                "batching_over_paho": ratios_over_paho(results),
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
