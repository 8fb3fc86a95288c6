"""The on-disk telemetry outbox: real SQLite files, real crashes, a real Mosquitto."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.contract import Channel, device_topic
from agent.outbox import Outbox, OutboxError
from fleet.broker import MosquittoBroker
from tests.helpers import Inbox, connected_client


def topic(channel: str, device: str = "pi-01") -> str:
    return f"edgeprune/v1/t-outbox/{device}/{channel}"


def put(box: Outbox, channel: str, message_id: str, payload: bytes = b"{}") -> None:
    box.put(topic(channel), payload, qos=1, retain=channel == "status", message_id=message_id)


def ids(box: Outbox) -> list[str]:
    return [item.message_id for item in box.peek(1000)]


def test_seq_counts_on_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        assert [box.next_seq() for _ in range(3)] == [0, 1, 2]
    with Outbox(path) as box:
        assert box.next_seq() == 3


def test_put_peek_ack_in_order(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        put(box, "metrics", "a", b"12345")
        put(box, "status", "b", b"xy")
        put(box, "events", "c")
        assert box.pending() == 3
        assert box.pending_bytes() == 9
        items = box.peek(2)
        assert [(i.message_id, i.topic, i.payload, i.qos, i.retain) for i in items] == [
            ("a", topic("metrics"), b"12345", 1, False),
            ("b", topic("status"), b"xy", 1, True),
        ]
        box.mark_attempt(items[0].rowid)
        box.mark_attempt(items[0].rowid)
        assert box.peek(1)[0].attempts == 2
        box.ack(items[0].rowid)
        box.ack(items[0].rowid)  # acking twice is harmless
        assert ids(box) == ["b", "c"]
        assert box.pending_bytes() == 4


def test_duplicate_message_id_is_ignored(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        put(box, "events", "same", b"first")
        put(box, "events", "same", b"second")
        assert [i.payload for i in box.peek(10)] == [b"first"]
        assert box.dropped == 0


def test_full_outbox_drops_oldest_metrics_first_and_counts_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path, max_messages=5) as box:
        for channel, mid in [("events", "e0"), ("metrics", "m1"), ("metrics", "m2"), ("update", "u3")]:
            put(box, channel, mid)
        put(box, "metrics", "m4")
        assert box.dropped == 0
        put(box, "events", "e5")  # full: the oldest metrics go first
        assert ids(box) == ["e0", "m2", "u3", "m4", "e5"]
        put(box, "status", "s6")
        put(box, "status", "s7")
        assert ids(box) == ["e0", "u3", "e5", "s6", "s7"]
        put(box, "metrics", "m8")  # no older metrics left: the oldest of anything, never the new one
        assert ids(box) == ["u3", "e5", "s6", "s7", "m8"]
        assert box.dropped == 4
    with Outbox(path, max_messages=5) as box:
        assert box.dropped == 4
        assert box.pending() == 5


def test_byte_bound(tmp_path: Path) -> None:
    with Outbox(tmp_path / "outbox.db", max_bytes=100) as box:
        put(box, "events", "e0", b"x" * 40)
        put(box, "metrics", "m1", b"x" * 40)
        put(box, "events", "e2", b"x" * 40)
        assert ids(box) == ["e0", "e2"]
        assert box.pending_bytes() == 80
        with pytest.raises(OutboxError, match="exceeds the outbox limit"):
            put(box, "events", "big", b"x" * 101)
        assert ids(box) == ["e0", "e2"]
        assert box.dropped == 1


@pytest.mark.parametrize(("where", "qos"), [("a/+/metrics", 1), ("", 1), ("a/#", 0), ("a/events", 3)])
def test_unpublishable_message_is_refused(tmp_path: Path, where: str, qos: int) -> None:
    with Outbox(tmp_path / "outbox.db") as box:
        with pytest.raises(OutboxError, match="cannot publish"):
            box.put(where, b"{}", qos=qos, retain=False, message_id="x")
        assert box.pending() == 0


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from agent.outbox import Outbox
    box = Outbox(Path(sys.argv[1]))
    for i in range(int(sys.argv[2])):
        seq = box.next_seq()
        box.put(f"edgeprune/v1/t/pi/events", str(seq).encode(), qos=1, retain=False, message_id=f"m{i}")
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(0)
""")


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_nothing_put_is_lost_when_the_process_dies(tmp_path: Path, how: str) -> None:
    path = tmp_path / "outbox.db"
    n = 50
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_SCRIPT, str(path), str(n), how],
        capture_output=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == (-signal.SIGKILL if how == "kill" else 0), proc.stderr.decode()
    assert Path(f"{path}-wal").exists()  # not checkpointed: the reopen below recovers from the WAL
    with Outbox(path) as box:
        items = box.peek(n + 1)
        assert [i.message_id for i in items] == [f"m{i}" for i in range(n)]
        assert [i.payload for i in items] == [str(i).encode() for i in range(n)]
        assert box.next_seq() == n


def _filled(path: Path) -> None:
    with Outbox(path) as box:
        for i in range(60):
            put(box, "events", f"e{i}", bytes(1000))


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(
            lambda p: p.write_bytes(b"this is not an sqlite database at all" * 100), id="not-sqlite"
        ),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[:50]), id="truncated-header"),
        pytest.param(lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), id="truncated-half"),
    ],
)
def test_corrupt_file_gives_a_clear_error(tmp_path: Path, damage: Callable[[Path], object]) -> None:
    path = tmp_path / "outbox.db"
    _filled(path)
    damage(path)
    with pytest.raises(OutboxError, match="corrupt or not an SQLite file") as info:
        Outbox(path)
    assert str(path) in str(info.value)
    assert info.value.hint


def test_full_disk_raises_and_keeps_what_was_stored(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    stored: list[str] = []
    with Outbox(path, max_page_count=12) as box, pytest.raises(OutboxError, match="full") as info:
        for i in range(1000):
            put(box, "events", f"e{i}", bytes(500))
            stored.append(f"e{i}")
    assert "free disk space" in info.value.hint
    assert 5 < len(stored) < 1000
    with Outbox(path) as box:
        assert ids(box) == stored
        assert box.dropped == 0
        put(box, "events", "after", bytes(500))  # without the cap the same file takes more
        assert box.pending() == len(stored) + 1


def test_closed_outbox_raises(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db")
    box.close()
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        box.pending()


def test_acks_from_another_thread_while_putting(tmp_path: Path) -> None:
    n = 150
    with Outbox(tmp_path / "outbox.db") as box:
        acked: list[str] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def consume() -> None:
            try:
                while len(acked) < n:
                    items = box.peek(10)
                    for item in items:
                        box.ack(item.rowid)
                        acked.append(item.message_id)
                    if not items:
                        time.sleep(0.001)
                    if done.is_set() and not box.pending() and len(acked) < n:
                        raise AssertionError("messages vanished")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=consume)
        thread.start()
        for i in range(n):
            put(box, "events", f"e{i}")
        done.set()
        thread.join(30)
        assert not thread.is_alive() and not errors
        assert acked == [f"e{i}" for i in range(n)]
        assert box.pending() == 0


@pytest.mark.broker
def test_drain_publishes_in_order_and_acks(tmp_path: Path, broker: MosquittoBroker) -> None:
    inbox = Inbox(broker, "edgeprune/v1/t-drain/#", client_id="fleet-drain")
    client = connected_client(broker, "pi-drain")
    try:
        with Outbox(tmp_path / "outbox.db") as box:
            sent = []
            for i in range(30):
                channel: Channel = "metrics" if i % 3 else "events"
                payload = f"message {i}".encode()
                where = device_topic("t-drain", "pi-drain", channel)
                box.put(where, payload, qos=1, retain=False, message_id=f"d{i}")
                sent.append((where, payload))
            assert box.drain(client, timeout_s=10, max_messages=10) == 10
            assert box.pending() == 20
            assert box.drain(client, timeout_s=10) == 20
            assert box.pending() == 0
            assert box.drain(client, timeout_s=1) == 0
            assert [inbox.get()[:2] for _ in sent] == sent
    finally:
        client.disconnect()
        client.loop_stop()
        inbox.close()


@pytest.mark.broker
@pytest.mark.usefixtures("broker")  # skips where mosquitto is not installed
def test_drain_against_a_stopped_broker_keeps_the_rest(tmp_path: Path) -> None:
    own = MosquittoBroker().start()
    client = connected_client(own, "pi-gone")
    try:
        with Outbox(tmp_path / "outbox.db") as box:
            for i in range(5):
                put(box, "events", f"g{i}")
            assert box.drain(client, timeout_s=5, max_messages=2) == 2
            own.stop()
            for i in range(5, 8):
                put(box, "events", f"g{i}")
            assert box.drain(client, timeout_s=1) == 0
            assert ids(box) == [f"g{i}" for i in range(2, 8)]
            assert all(item.attempts == 1 for item in box.peek(10))
    finally:
        client.disconnect()
        client.loop_stop()
        own.stop()
