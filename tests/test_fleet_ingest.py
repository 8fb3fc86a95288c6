"""Ingestion against the real broker: shared subscriptions split the load, rejects are counted, the
registry follows births, heartbeats, metrics and last wills of a real agent."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.contract import Metrics, Readings, Status, device_topic, envelope
from fleet.broker import MosquittoBroker
from fleet.ingest import Ingestor, shared_filters
from fleet.store import Store, schema
from tests.fleet_fixtures import db_url, pg_url  # noqa: F401
from tests.helpers import connected_client, wait_for
from tests.samples import sample_messages

pytestmark = pytest.mark.broker


def metrics(device: str, seq: int) -> Metrics:
    return Metrics(
        **envelope(device_id=device, seq=seq),
        window_s=1,
        inferences=seq,
        active_variant="dense",
        readings=Readings(battery_pct=50.0),
    )


def publish_all(broker: MosquittoBroker, items: list[tuple[str, bytes]], name: str) -> None:
    client = connected_client(broker, name)
    infos = [client.publish(topic, payload, qos=1) for topic, payload in items]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_shared_filters_leave_out_desired() -> None:
    filters = shared_filters(group="g")
    assert "$share/g/edgeprune/v1/+/+/metrics" in filters
    assert not any(f.endswith("/desired") for f in filters)


def test_two_ingestors_split_the_load_and_store_each_message_once(
    broker: MosquittoBroker,
    db_url: str,  # noqa: F811
) -> None:
    fleet = "split-" + ("pg" if db_url.startswith("postgresql") else "sqlite")
    sent = [metrics(f"d{i % 20}", i) for i in range(400)]
    items = [(device_topic(fleet, m.device_id, "metrics"), m.to_json().encode()) for m in sent]
    items += items[:50]  # a QoS 1 redelivery / outbox replay: same message ids again
    with Store(db_url) as store:
        a = Ingestor(store, broker_url=broker.url, fleet=fleet, group="split", batch_max=50)
        b = Ingestor(store, broker_url=broker.url, fleet=fleet, group="split", batch_max=50)
        with a, b:
            publish_all(broker, items, f"pub-{fleet}")
            wait_for(lambda: a.stats()["received"] + b.stats()["received"] == 450)
            assert a.wait_idle() and b.wait_idle()
        assert a.stats()["received"] > 0 and b.stats()["received"] > 0
        assert a.stats()["stored"] + b.stats()["stored"] == 400
        assert store.count(schema.metrics) == 400
        assert store.count(schema.messages_seen) == 400
        assert store.counters() == {"stored": 400, "duplicates": 50}
        assert len(store.devices(fleet=fleet)) == 20


def test_malformed_payloads_are_counted_and_nothing_else_is_lost(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    fleet = "rejects"
    good = [m for m in sample_messages("pi-01") if m.kind != "desired"]
    channel = {"birth": "birth", "status": "status", "metrics": "metrics", "event": "events"}
    channel["update_status"] = "update"
    status = Status(**envelope(device_id="pi-01", seq=9), state="online", uptime_s=1).to_json()
    other_device = Status(**envelope(device_id="pi-99", seq=9), state="online", uptime_s=1).to_json()
    wrong_version = json.loads(status) | {"schema_version": 2, "message_id": "f" * 32}
    bad: list[tuple[str, bytes]] = [
        (device_topic(fleet, "pi-01", "status"), b"not json {"),
        (device_topic(fleet, "pi-01", "status"), b"\xff\xfe\x00garbage"),
        (device_topic(fleet, "pi-01", "metrics"), status.encode()),  # a status on the metrics channel
        (device_topic(fleet, "pi-01", "status"), other_device.encode()),  # names another device
        (device_topic(fleet, "pi-01", "status"), json.dumps(wrong_version).encode()),
        (device_topic(fleet, "pi-01", "status"), b'{"kind": "status"}'),
    ]
    items: list[tuple[str, bytes]] = []
    for i, m in enumerate(good):
        items.append((device_topic(fleet, "pi-01", channel[m.kind]), m.to_json().encode()))  # type: ignore[arg-type]
        items.append(bad[i % len(bad)])
    items += bad[len(good) :]
    with Store(tmp_path / "fleet.db") as store, Ingestor(store, broker_url=broker.url, fleet=fleet) as ing:
        publish_all(broker, items, "pub-rejects")
        wait_for(lambda: ing.stats()["received"] == len(items))
        assert ing.wait_idle()
        assert ing.stats()["stored"] == len(good)
        assert store.counters() == {
            "stored": len(good),
            "reject.not_json": 2,
            "reject.wrong_kind": 1,
            "reject.wrong_device": 1,
            "reject.schema_version": 1,
            "reject.invalid": 1,
        }
        assert store.count(schema.metrics) == store.count(schema.events) == 1


@pytest.mark.export
@pytest.mark.slow
def test_a_real_agent_shows_up_online_then_offline(compiled, signing_keys, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from agent.core import Agent, AgentConfig
    from agent.policy import PolicyConfig
    from agent.sensors import StaticSensors

    fleet = "real-agent"
    config = AgentConfig(
        bundle=compiled.out,
        public_key=signing_keys.public,
        broker_url=broker.url,
        device_id="pi-07",
        state_dir=tmp_path / "state",
        fleet=fleet,
        profile="rpi4",
        metrics_period_s=0.3,
        heartbeat_period_s=1.0,
        decide_period_s=0.05,
        policy=PolicyConfig(min_dwell_s=0.0),
        seed=0,
    )
    with Store(tmp_path / "fleet.db") as store, Ingestor(store, broker_url=broker.url, fleet=fleet):
        agent = Agent(config, sensors=StaticSensors(Readings(battery_pct=77.0, charging=False)))
        agent.start()
        try:
            wait_for(lambda: (store.device("pi-07") or {}).get("battery_pct") == 77.0)
            dev = store.device("pi-07")
            assert dev is not None and dev["online"] is True and dev["profile"] == "rpi4"
            assert dev["bundle_version"] == compiled.manifest.bundle_version
            assert set(dev["variants"]) == {v.name for v in compiled.manifest.variants}
        finally:
            agent.stop()
        wait_for(lambda: (store.device("pi-07") or {}).get("online") is False)


def mutations(seed: int, n: int) -> list[tuple[str, bytes]]:
    """Payloads a broken or hostile device might send on its metrics channel: random bytes, invalid
    UTF-8, huge strings, wrong types and versions, valid JSON of the wrong shape."""
    import random

    rng = random.Random(seed)
    base = json.loads(metrics("fz-01", 0).to_json())
    out = []
    for i in range(n):
        choice = i % 6
        if choice == 0:
            payload = rng.randbytes(rng.randint(1, 200))
        elif choice == 1:
            payload = b'{"kind": "metrics", "device_id": "\xff\xfe"}'
        else:
            doc = dict(base, message_id=f"{i:032x}")
            key = rng.choice(sorted(doc))
            doc[key] = rng.choice([None, -1, 1e308, "x" * 100_000, [], {}, True, 2, "metrics", "\u0000"])
            payload = json.dumps(doc).encode()
        out.append((device_topic("fuzz", "fz-01", "metrics"), payload))
    return out


def test_fuzzed_payloads_never_crash_and_every_one_is_accounted_for(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    items = mutations(0, 600)
    with Store(tmp_path / "fleet.db") as store, Ingestor(store, broker_url=broker.url, fleet="fuzz") as ing:
        publish_all(broker, items, "pub-fuzz")
        wait_for(lambda: ing.stats()["received"] == len(items), timeout=60)
        assert ing.wait_idle()
        stats = ing.stats()
        assert stats["write_failures"] == 0
        counters = store.counters()
        rejected = sum(v for k, v in counters.items() if k.startswith("reject."))
        assert rejected + counters.get("stored", 0) + counters.get("duplicates", 0) == len(items)
        assert rejected > 0 and rejected == sum(stats["rejects"].values())


CRASHING_DEVICE = """
import sys, time
from agent.contract import Birth, Status, device_topic, envelope
from agent.mqtt import make_client
host, port = sys.argv[1], int(sys.argv[2])
client = make_client("crash-01")
will = Status(**envelope(device_id="crash-01", seq=0), state="offline", uptime_s=0)
client.will_set(device_topic("crash", "crash-01", "status"), will.to_json(), qos=1, retain=True)
client.connect(host, port, keepalive=1)
client.loop_start()
time.sleep(0.2)  # the birth is sent well after the will was built, as on a real device
birth = Birth(**envelope(device_id="crash-01", seq=1), profile="rpi4", agent_version="0.1.0", backend="onnx")
info = client.publish(device_topic("crash", "crash-01", "birth"), birth.to_json(), qos=1, retain=True)
info.wait_for_publish(5)
print("ready", flush=True)
time.sleep(600)
"""


def test_a_device_that_dies_goes_offline_by_its_last_will(tmp_path: Path, broker: MosquittoBroker) -> None:
    import signal
    import subprocess
    import sys

    with Store(tmp_path / "fleet.db") as store, Ingestor(store, broker_url=broker.url, fleet="crash"):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHING_DEVICE, broker.host, str(broker.port)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            wait_for(lambda: (store.device("crash-01") or {}).get("online") is True)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            assert proc.stdout is not None
            proc.stdout.close()
        wait_for(lambda: (store.device("crash-01") or {}).get("online") is False, timeout=30)


def test_a_manager_that_starts_late_learns_each_device_state_from_the_retained_messages(
    broker: MosquittoBroker, tmp_path: Path
) -> None:
    """MQTT v5 never sends retained messages to a shared subscription (EMQX follows that; Mosquitto sends
    them anyway): without the resync, a manager (re)started after a device's birth and heartbeat showed
    the device unknown, or offline, until its next heartbeat. ``resynced`` counts what came through the
    resync subscription, so this fails without it even on Mosquitto."""
    fleet = "late"
    birth, status = sample_messages("late-01")[:2]
    gone = Status(**envelope(device_id="late-02", seq=5), state="offline", uptime_s=1.0)
    client = connected_client(broker, "pub-late")
    for device, msg in (("late-01", birth), ("late-01", status), ("late-02", gone)):
        channel = "birth" if msg is birth else "status"
        client.publish(
            device_topic(fleet, device, channel), msg.to_json(), qos=1, retain=True
        ).wait_for_publish(10)
    with (
        Store(tmp_path / "fleet.db") as store,
        Ingestor(store, broker_url=broker.url, fleet=fleet, resync_s=1.0) as ing,
    ):
        wait_for(
            lambda: (
                store.device("late-01", fleet=fleet) is not None
                and store.device("late-02", fleet=fleet) is not None
            )
        )
        wait_for(lambda: (store.device("late-01", fleet=fleet) or {}).get("profile") == "rpi4")
        assert store.device("late-01", fleet=fleet)["online"] is True  # type: ignore[index]
        assert store.device("late-02", fleet=fleet)["online"] is False  # type: ignore[index]
        assert ing.stats()["resynced"] == 3
        # after the resync window the plain subscription is gone: a live status is received once
        time.sleep(1.5)
        before, dups = ing.stats()["received"], ing.stats()["duplicates"]
        live = Status(**envelope(device_id="late-01", seq=9), state="online", uptime_s=99.0)
        client.publish(
            device_topic(fleet, "late-01", "status"), live.to_json(), qos=1, retain=True
        ).wait_for_publish(10)
        wait_for(lambda: ing.stats()["received"] == before + 1)
        time.sleep(0.5)
        assert ing.stats()["received"] == before + 1 and ing.stats()["duplicates"] == dups
    for device, channel in (("late-01", "birth"), ("late-01", "status"), ("late-02", "status")):
        client.publish(device_topic(fleet, device, channel), b"", qos=1, retain=True).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


KILLED_MANAGER = """
import sys, time
from fleet.ingest import Ingestor
from fleet.store import Store
url, db, client_id, expiry = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
# batches of 100 or 60 s: of 250 messages, 200 commit at once, the last 50 wait in memory
ing = Ingestor(Store(db), broker_url=url, fleet=client_id, client_id=client_id, session_expiry_s=expiry,
               batch_max=100, batch_interval_s=60)
ing.start()
print("ready", flush=True)
while True:
    print(ing.stats()["queued"], flush=True)
    time.sleep(0.05)
"""


def kill_manager_mid_stream(broker: MosquittoBroker, db: Path, client_id: str, expiry_s: int) -> None:
    """Run a manager in a child process, send it 250 messages, SIGKILL it once 200 are committed and the
    other 50 are in its memory only. The fleet is named after the client id: a share group of its own
    (a cleanly stopped manager's session would otherwise take its share of the next test's messages)."""
    import signal
    import subprocess
    import sys

    Store(db).close()  # migrated before the child and the test open it
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_MANAGER, broker.url, str(db), client_id, str(expiry_s)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    sent = [metrics(f"{client_id}-{i % 10}", i) for i in range(250)]
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        publish_all(
            broker,
            [(device_topic(client_id, m.device_id, "metrics"), m.to_json().encode()) for m in sent],
            f"pub-{client_id}",
        )
        with Store(db) as store:
            wait_for(lambda: store.count(schema.metrics) == 200)
        deadline = time.monotonic() + 20
        while (line := proc.stdout.readline()).strip() != "50":
            assert line and time.monotonic() < deadline, f"the manager never held 50 (last: {line!r})"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()


def test_a_manager_killed_mid_stream_loses_nothing_after_its_restart(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """Messages are acknowledged only after their batch commits, and the manager's session outlives it:
    SIGKILL with 50 messages received but not written, restart with the same client id, and the broker
    redelivers them. (Acknowledging on arrival, as paho does by default, lost those 50.)"""
    db = tmp_path / "fleet.db"
    kill_manager_mid_stream(broker, db, "mgr-kept", 120)
    with Store(db) as store:
        assert store.count(schema.metrics) == 200
        with Ingestor(
            store, broker_url=broker.url, fleet="mgr-kept", client_id="mgr-kept", session_expiry_s=120
        ) as ing:
            wait_for(lambda: store.count(schema.metrics) == 250)
            assert ing.wait_idle()
        assert store.count(schema.messages_seen) == 250
        assert store.counters()["stored"] == 250


def test_a_clean_session_manager_still_loses_what_it_had_not_written(
    tmp_path: Path, broker: MosquittoBroker
) -> None:
    """The same kill with ``session_expiry_s=0``: the broker forgets the unacknowledged messages with the
    connection (this is why ``fleet serve`` keeps a session by default)."""
    db = tmp_path / "fleet.db"
    kill_manager_mid_stream(broker, db, "mgr-clean", 0)
    with Store(db) as store:
        with Ingestor(store, broker_url=broker.url, fleet="mgr-clean", client_id="mgr-clean") as ing:
            time.sleep(2)
            assert ing.wait_idle() and ing.stats()["received"] == 0
        assert store.count(schema.metrics) == 200


def test_receive_maximum_out_of_range_is_refused(tmp_path: Path) -> None:
    from fleet.ingest import IngestError

    with Store(tmp_path / "fleet.db") as store:
        for bad in (0, 65_536):
            with pytest.raises(IngestError, match=r"receive_maximum must be 1\.\.65535"):
                Ingestor(store, broker_url="mqtt://127.0.0.1:1", receive_maximum=bad)
        assert Ingestor(store, broker_url="mqtt://127.0.0.1:1", queue_max=100).receive_maximum == 100


def test_fleet_leave_ends_the_session_of_a_retired_manager(tmp_path: Path, broker: MosquittoBroker) -> None:
    """A cleanly stopped manager's kept session goes on taking its share of the group's traffic (here
    about half) until `edgeprune fleet leave` ends it; then the remaining manager receives everything."""
    import subprocess
    import sys

    received = {}
    with Store(tmp_path / "fleet.db") as store:
        for retire in (False, True):
            group, fleet = f"leave-{retire}", f"leave-{str(retire).lower()}"
            Ingestor(
                store,
                broker_url=broker.url,
                fleet=fleet,
                group=group,
                client_id=f"old-{retire}",
                session_expiry_s=300,
            ).start().stop()
            if retire:
                cmd = ["fleet", "leave", "--client-id", "old-True", "--broker", broker.url]
                out = subprocess.run(
                    [sys.executable, "-m", "edgeprune.cli", *cmd],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=60,
                    cwd=Path(__file__).resolve().parents[1],
                )
                assert out.returncode == 0, out.stderr
                assert out.stdout.startswith("discarded the broker session of old-True on mqtt://")
            with Ingestor(
                store, broker_url=broker.url, fleet=fleet, group=group, client_id=f"new-{retire}"
            ) as ing:
                sent = [metrics(f"{fleet}-{i % 5}", i) for i in range(100)]
                publish_all(
                    broker,
                    [(device_topic(fleet, m.device_id, "metrics"), m.to_json().encode()) for m in sent],
                    f"pub-{fleet}",
                )
                time.sleep(1.0)
                assert ing.wait_idle()
                received[retire] = ing.stats()["received"]
    assert received[True] == 100
    assert received[False] < 100  # the kept session took its share
