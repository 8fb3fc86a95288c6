"""Persistent on-disk telemetry outbox of the device agent (one SQLite file, stdlib :mod:`sqlite3`).

Every message the agent sends goes through :meth:`Outbox.put` first and leaves the file only when the
broker has acknowledged it (:meth:`Outbox.drain`, QoS 1), so telemetry survives a broker outage, a
lost link and an agent restart. Delivery is at least once: a message published just before a crash,
or queued by paho when the link dropped, is published again later; consumers drop duplicates by
``message_id`` (``docs/protocol.md``).

The same database holds the device's sequence counter (:meth:`Outbox.next_seq`), so ``seq`` keeps
rising across restarts, and the count of dropped messages (:attr:`Outbox.dropped`).

Drop policy. The outbox holds at most ``max_messages`` messages and ``max_bytes`` payload bytes. When
a new message would exceed either bound, room is made before it is stored, in this order:

1. the oldest messages on a ``metrics`` channel (topics ending in ``/metrics``): periodic summaries,
   the next one says nearly as much;
2. then the oldest messages of any other channel (events, update status, birth, status).

The new message itself is never dropped; a single payload larger than ``max_bytes`` is refused with
:class:`OutboxError`. Every dropped message adds one to ``dropped``, a counter kept in the database
since it was created (reported as ``outbox_dropped`` in metrics). Retention is ignored by the policy.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt

from agent.errors import UserError

__all__ = ["Outbox", "OutboxError", "OutboxItem"]

log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: a dropped row's id is never reused
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    attempts INTEGER NOT NULL DEFAULT 0,
    metrics INTEGER NOT NULL,  -- 1: dropped first when full
    size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_by_class ON messages (metrics, id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('next_seq', 0), ('dropped', 0);
"""
_DRAIN_BATCH = 100


class OutboxError(UserError):
    """The outbox file cannot be used: corrupt, not SQLite, disk full, unwritable, or closed."""


@dataclass(frozen=True)
class OutboxItem:
    """One stored message, as returned by :meth:`Outbox.peek`."""

    rowid: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    message_id: str
    attempts: int


class Outbox:
    """A bounded FIFO of MQTT messages in an SQLite file, safe to use from several threads.

    ``max_page_count`` caps the database size in pages (``PRAGMA max_page_count``); it exists so tests
    can simulate a full disk and is not meant for production use.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_messages: int = 10_000,
        max_bytes: int = 20 * 2**20,
        max_page_count: int | None = None,
    ) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise OutboxError("outbox bounds must be positive", hint="max_messages >= 1, max_bytes >= 1")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._drain_lock = threading.Lock()
        self._closed = False
        try:
            # One connection shared by the agent's threads (the MQTT network thread acks while the
            # main thread puts); self._lock serialises every use. Autocommit: transactions are explicit.
            self._db = sqlite3.connect(self.path, timeout=5.0, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox database {self.path}: {exc}") from exc
        try:
            self._open(max_page_count)
        except sqlite3.OperationalError as exc:  # locked, read-only, disk full: not the file's fault
            self._db.close()
            raise OutboxError(f"cannot open the outbox database {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:  # SQLITE_CORRUPT, SQLITE_NOTADB, or quick_check findings
            self._db.close()
            raise OutboxError(
                f"the outbox database {self.path} is corrupt or not an SQLite file: {exc}",
                hint="move the file away; the agent then starts with an empty outbox",
            ) from exc
        except OutboxError:
            self._db.close()
            raise

    def _open(self, max_page_count: int | None) -> None:
        mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            log.warning("outbox %s: journal mode is %s, not wal", self.path, mode)
        # FULL, not NORMAL: in WAL mode NORMAL already keeps every commit through a process crash (the
        # WAL write is in the OS cache), but a battery device usually dies by losing power, and then
        # NORMAL may roll back the last commits -- telemetry and, worse, the seq counter, which would
        # hand out the same numbers again. FULL fsyncs the WAL at each commit: one fsync per put or
        # next_seq at telemetry rates (seconds apart), and drain acks in batches.
        self._db.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("; ".join(problems[:5]))
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, _SCHEMA_VERSION):
            raise OutboxError(
                f"the outbox database {self.path} has schema version {version}, this agent knows "
                f"{_SCHEMA_VERSION}",
                hint="it was written by a newer agent: upgrade, or move the file away",
            )
        self._db.executescript(f"BEGIN; {_SCHEMA} PRAGMA user_version={_SCHEMA_VERSION}; COMMIT;")
        if max_page_count is not None:
            self._db.execute(f"PRAGMA max_page_count={int(max_page_count)}")

    @contextmanager
    def _use(self, what: str, *, write: bool = True) -> Iterator[sqlite3.Connection]:
        """Hold the lock (and for ``write`` one transaction); sqlite errors become :class:`OutboxError`."""
        with self._lock:
            if self._closed:
                raise OutboxError(f"the outbox {self.path} is closed")
            try:
                if write:
                    self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                if write:
                    self._db.execute("COMMIT")
            except BaseException as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")  # a failed put leaves the stored messages as they were
                if isinstance(exc, sqlite3.Error):
                    raise OutboxError(
                        f"outbox {self.path}: {what} failed: {exc}",
                        hint="free disk space on the device" if "full" in str(exc) else "",
                    ) from exc
                raise

    def _one(self, sql: str) -> int:
        with self._use("read", write=False) as db:
            return int(db.execute(sql).fetchone()[0])

    def next_seq(self) -> int:
        """The next sequence number of this device: 0, 1, 2, ... and on across restarts."""
        with self._use("next_seq") as db:
            (seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
            db.execute("UPDATE meta SET value = value + 1 WHERE key = 'next_seq'")
        return int(seq)

    def put(self, topic: str, payload: bytes, *, qos: int, retain: bool, message_id: str) -> None:
        """Store one message durably (it is on disk when this returns), dropping old ones if full.

        A ``message_id`` already in the outbox is ignored. Raises :class:`OutboxError` when the disk is
        full or the payload alone exceeds ``max_bytes``; the stored messages are then left unchanged.
        """
        if qos not in (0, 1, 2) or not topic or "+" in topic or "#" in topic:
            # paho would refuse it at every drain, blocking everything behind it: refuse it here.
            raise OutboxError(f"cannot publish qos={qos} on topic {topic!r}", hint="QoS 0-2, no wildcards")
        size = len(payload)
        if size > self.max_bytes:
            raise OutboxError(
                f"a {size}-byte payload for {topic} exceeds the outbox limit of {self.max_bytes} bytes",
                hint="send smaller messages or raise max_bytes",
            )
        metrics = topic.rsplit("/", 1)[-1] == "metrics"
        with self._use("put") as db:
            if db.execute("SELECT 1 FROM messages WHERE message_id = ?", (message_id,)).fetchone():
                log.debug("outbox: message %s is already stored", message_id)
                return
            count, total = db.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
            dropped = 0
            while count + 1 > self.max_messages or total + size > self.max_bytes:
                rowid, old_size = db.execute(
                    "SELECT id, size FROM messages ORDER BY metrics DESC, id LIMIT 1"
                ).fetchone()
                db.execute("DELETE FROM messages WHERE id = ?", (rowid,))
                count, total, dropped = count - 1, total - old_size, dropped + 1
            if dropped:
                db.execute("UPDATE meta SET value = value + ? WHERE key = 'dropped'", (dropped,))
            db.execute(
                "INSERT INTO messages (topic, payload, qos, retain, message_id, metrics, size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (topic, payload, qos, int(retain), message_id, int(metrics), size),
            )
        if dropped:
            log.warning("outbox %s full: dropped %d old message(s) to store %s", self.path, dropped, topic)

    def peek(self, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` stored messages, oldest first, without removing them."""
        with self._use("peek", write=False) as db:
            rows = db.execute(
                "SELECT id, topic, payload, qos, retain, message_id, attempts FROM messages"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [OutboxItem(r[0], r[1], bytes(r[2]), r[3], bool(r[4]), r[5], r[6]) for r in rows]

    def ack(self, rowid: int) -> None:
        """Remove a delivered message; an unknown (already acked or dropped) rowid is ignored."""
        self._ack_many([rowid])

    def _ack_many(self, rowids: list[int]) -> None:
        with self._use("ack") as db:
            db.executemany("DELETE FROM messages WHERE id = ?", [(r,) for r in rowids])

    def mark_attempt(self, rowid: int) -> None:
        """Count one more publish attempt of a message."""
        self._mark_attempts([rowid])

    def _mark_attempts(self, rowids: list[int]) -> None:
        with self._use("mark_attempt") as db:
            db.executemany("UPDATE messages SET attempts = attempts + 1 WHERE id = ?", [(r,) for r in rowids])

    def pending(self) -> int:
        """How many messages wait to be delivered."""
        return self._one("SELECT COUNT(*) FROM messages")

    def pending_bytes(self) -> int:
        """Payload bytes of the waiting messages (what ``max_bytes`` bounds)."""
        return self._one("SELECT COALESCE(SUM(size), 0) FROM messages")

    @property
    def dropped(self) -> int:
        """Messages dropped by the drop policy since the database was created."""
        return self._one("SELECT value FROM meta WHERE key = 'dropped'")

    def drain(self, client: mqtt.Client, *, timeout_s: float, max_messages: int | None = None) -> int:
        """Publish waiting messages in order through a connected client; return how many were acked.

        Messages go out in batches (paho pipelines them); each is acked once the broker confirmed it
        (QoS 1 PUBACK, or written to the socket for QoS 0). The first one not confirmed before the
        ``timeout_s`` deadline of the whole call stops the drain, leaving it and the rest for later.
        Only one drain runs at a time; concurrent calls wait for each other.
        """
        deadline = time.monotonic() + timeout_s
        acked = 0
        with self._drain_lock:
            while max_messages is None or acked < max_messages:
                want = _DRAIN_BATCH if max_messages is None else min(_DRAIN_BATCH, max_messages - acked)
                batch = self.peek(want)
                if not batch:
                    break
                self._mark_attempts([item.rowid for item in batch])
                infos = [client.publish(i.topic, i.payload, qos=i.qos, retain=i.retain) for i in batch]
                done: list[int] = []
                for item, info in zip(batch, infos, strict=True):
                    if not _published(info, deadline):
                        log.info("outbox drain stopped at %s (rc %d)", item.message_id, info.rc)
                        break
                    done.append(item.rowid)
                if done:
                    self._ack_many(done)
                    acked += len(done)
                if len(done) < len(batch):
                    break
        return acked

    def close(self) -> None:
        """Close the database (safe to call twice); later calls raise :class:`OutboxError`."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _published(info: mqtt.MQTTMessageInfo, deadline: float) -> bool:
    """Wait until ``deadline`` for ``info`` to be published; False if it failed or is still pending."""
    if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_AGAIN):
        return False  # e.g. MQTT_ERR_NO_CONN: paho holds it for a reconnect; we keep our copy too
    try:
        info.wait_for_publish(max(0.0, deadline - time.monotonic()))
    except (RuntimeError, ValueError):
        return False
    return info.is_published()
