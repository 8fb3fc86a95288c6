"""The :class:`Store`: one SQLAlchemy Core engine (SQLite file or PostgreSQL URL) and the queries the
fleet manager needs. No ORM sessions; every write is one short transaction."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    Engine,
    Insert,
    MetaData,
    Table,
    and_,
    bindparam,
    case,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.schema import CreateTable

from agent.contract import Birth, Event, Message, Metrics, Status, UpdateStatus
from agent.errors import UserError
from fleet.store import schema as s
from fleet.store.migrations import migrate

__all__ = ["IngestResult", "Store", "StoreError", "database_url"]

log = logging.getLogger(__name__)

# Member states a forward update status no longer changes: finished, or taken over by a rollback.
_SETTLED = (
    "committed",
    "failed",
    "rolled_back",
    "stuck",
    "superseded",
    "aborted",
    "rollback_sent",
    "rollback_unavailable",
    "reverting",
    "reverted",
)
_DEVICE_FIELDS = (
    "profile",
    "agent_version",
    "backend",
    "model_id",
    "bundle_version",
    "variants",
    "active_variant",
    "budget",
    "battery_pct",
)


_STAGING = {
    name: Table(
        f"{name}_staging",
        MetaData(),
        *(
            Column(c.name, c.type)
            for c in s.metadata.tables[name].c
            if name == "devices" or c.name == "message_id"
        ),
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DELETE ROWS",
    )
    for name in ("devices", "messages_seen")
}
"""PostgreSQL only: temporary tables (one per server connection, emptied at every commit) a batch's
registry rows and message ids are COPY'd into and merged from with one INSERT ... SELECT."""
_STAGING_DDL = {
    table.name: str(CreateTable(table, if_not_exists=True).compile(dialect=postgresql.dialect()))  # type: ignore[no-untyped-call]
    for table in _STAGING.values()
}


class StoreError(UserError):
    """The database cannot be opened or used."""


@dataclass(frozen=True)
class IngestResult:
    """What one batch did: messages stored, and duplicates dropped (already seen message ids)."""

    stored: int
    duplicates: int


def database_url(db: str | Path) -> str:
    """A SQLAlchemy URL from what a user typed: a URL is kept, anything else is a SQLite file path.

    >>> database_url("/tmp/fleet.db")
    'sqlite:////tmp/fleet.db'
    """
    text = str(db)
    if "://" in text:
        return text
    return f"sqlite:///{Path(text).expanduser().resolve()}"


def _sqlite_engine(url: str, *, immediate: bool) -> Engine:
    engine = create_engine(url, pool_size=4, max_overflow=4)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        # The driver's own transaction handling is off; SQLAlchemy's "begin" below emits BEGIN.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA busy_timeout=30000")
        # WAL is a property of the file: switch once. The switch needs the file to itself and SQLite does
        # not wait for that (no busy handler), so several processes opening a new database retry it.
        for attempt in range(100):
            try:
                if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                    cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or attempt == 99:
                    raise
                time.sleep(0.05)
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the lock up front, so two writers never deadlock upgrading a read lock.
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


class Store:
    """The fleet's database. SQLite (a file path or ``sqlite:///...``) or PostgreSQL
    (``postgresql+psycopg://...``); migrations run on open.

    >>> store = Store("/tmp/fleet.db")  # doctest: +SKIP
    >>> store.devices()  # doctest: +SKIP
    []
    """

    def __init__(self, db: str | Path, *, migrate_on_open: bool = True) -> None:
        self.url = database_url(db)
        self._compiled: dict[str, tuple[Any, ...]] = {}
        try:
            if self.url.startswith("sqlite"):
                self.engine = _sqlite_engine(self.url, immediate=True)
                self._reader = _sqlite_engine(self.url, immediate=False)
            elif self.url.startswith("postgresql"):
                self.engine = create_engine(self.url, pool_size=4, max_overflow=4, pool_pre_ping=True)
                self._reader = self.engine
            else:
                raise StoreError(
                    f"database URL {self.url!r} is neither SQLite nor PostgreSQL",
                    hint="use a file path, sqlite:///PATH or postgresql+psycopg://USER@HOST/DB",
                )
            if migrate_on_open:
                migrate(self.engine)
        except SQLAlchemyError as exc:
            self.close()
            raise StoreError(f"cannot open the fleet database {self.url}: {exc}") from exc

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        """Close every pooled connection. Safe to call twice."""
        for engine in {getattr(self, "engine", None), getattr(self, "_reader", None)}:
            if engine is not None:
                engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """One write transaction (committed on exit, rolled back on an exception)."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """One read transaction (never blocks writers on SQLite in WAL mode)."""
        with self._reader.begin() as conn:
            yield conn

    def insert(self, table: Table) -> Insert:
        """A dialect-specific INSERT with ``on_conflict_do_nothing/do_update`` available."""
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def executemany(
        self, conn: Connection, key: str, build: Callable[[], Any], rows: list[dict[str, Any]]
    ) -> None:
        """Run the statement ``build()`` makes once per row of ``rows`` (all with the same keys) as one
        DBAPI ``executemany``.

        ``conn.execute(stmt, rows)`` costs SQLAlchemy tens of microseconds per row building and
        processing parameters, more than the database spends storing it (docs/fleet.md). Here the
        statement is built and compiled once per ``key`` and row layout, each row's values go through
        the columns' own bind processors (JSON, booleans) and straight to the driver. Statements without
        RETURNING only: nothing is read back.
        """
        if not rows:
            return
        names = list(rows[0])
        cached = self._compiled.get(key)
        if cached is None or cached[0] != names:
            dialect = self.engine.dialect
            compiled = build().compile(dialect=dialect, column_keys=names)
            if compiled.returning:
                raise StoreError(f"executemany({key!r}) got a statement with RETURNING")
            # per parameter, in the driver's order: (name, True, bind processor) for a row value, or
            # (name, False, value) for a literal inside the statement (e.g. the 0.0 of a coalesce),
            # processed once here
            plan: list[tuple[str, bool, Any]] = []
            for n in list(compiled.positiontup) if compiled.positional else list(compiled.binds):
                bind = compiled.binds[n]
                proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if n in names:
                    plan.append((n, True, proc))
                else:
                    plan.append((n, False, proc(bind.effective_value) if proc else bind.effective_value))
            cached = (names, str(compiled), plan)
            self._compiled[key] = cached
        _, sql, plan = cached

        # column by column: map/zip run the per-value loops in C (a third of the ingestor's time went
        # into building these tuples row by row)
        columns: list[Iterable[Any]] = []
        for n, from_row, p in plan:
            if from_row:
                column = list(map(itemgetter(n), rows))
                columns.append(list(map(p, column)) if p else column)
            else:
                columns.append(repeat(p, len(rows)))
        if self.engine.dialect.positional:
            params: list[Any] = list(zip(*columns, strict=False))
        else:
            keys = [n for n, _, _ in plan]
            params = [dict(zip(keys, values, strict=True)) for values in zip(*columns, strict=False)]
        conn.exec_driver_sql(sql, params)

    # --- ingestion -----------------------------------------------------------------------------------

    def ingest(
        self,
        items: Sequence[tuple[str, Message]],
        *,
        received: Sequence[float] | None = None,
        now: float | None = None,
    ) -> IngestResult:
        """Store validated device messages (``(fleet, message)`` pairs) in one transaction.

        Messages whose id was seen before (in this batch or any earlier one, by any process) are dropped.
        ``received`` gives the time each message reached the fleet (default ``now``): the online flag
        follows it, not the device's ``sent_at``, because a last will carries the ``sent_at`` of the
        connect it was set at, older than everything the device sent afterwards.
        """
        now = time.time() if now is None else now
        arrivals = received if received is not None else [now] * len(items)
        unique: dict[str, tuple[str, Message, float]] = {}
        for (fleet, message), at in zip(items, arrivals, strict=True):
            unique.setdefault(message.message_id, (fleet, message, at))
        with self.write() as conn:
            # Sorted: concurrent writers (PostgreSQL) then lock rows in one order and cannot deadlock.
            fresh_ids = self._first_seen(conn, sorted(unique), now)
            fresh = [pair for mid, pair in unique.items() if mid in fresh_ids]
            self._apply(conn, fresh, now)
            duplicates = len(items) - len(fresh)
            self._bump(conn, {"stored": len(fresh), "duplicates": duplicates})
        return IngestResult(stored=len(fresh), duplicates=duplicates)

    def _apply(self, conn: Connection, fresh: list[tuple[str, Message, float]], now: float) -> None:  # noqa: PLR0912
        devices: dict[tuple[str, str], dict[str, Any]] = {}
        metric_rows: list[dict[str, Any]] = []
        event_rows: list[dict[str, Any]] = []
        status_rows: list[dict[str, Any]] = []
        for fleet, m, at in sorted(fresh, key=lambda item: item[2]):  # arrival order (stable)
            ts = m.sent_at.timestamp()
            dev = devices.setdefault(
                (fleet, m.device_id),
                {"fleet": fleet, "device_id": m.device_id, "online": None, "online_at": None}
                | dict.fromkeys(_DEVICE_FIELDS)
                | {"first_seen": ts, "last_seen": ts},
            )
            dev["last_seen"] = max(dev["last_seen"], ts)
            if isinstance(m, Birth):
                dev.update(
                    online=True,
                    online_at=at,
                    profile=m.profile,
                    agent_version=m.agent_version,
                    backend=m.backend,
                    model_id=m.bundle.model_id if m.bundle else None,
                    bundle_version=m.bundle.bundle_version if m.bundle else None,
                    variants=list(m.variants),
                )
            elif isinstance(m, Status):
                dev.update(online=m.state == "online", online_at=at)
                if m.active_variant is not None:
                    dev["active_variant"] = m.active_variant
                if m.budget is not None:
                    dev["budget"] = m.budget
            elif isinstance(m, Metrics):
                metric_rows.append(_metric_row(fleet, m, ts))
                for key, value in (
                    ("active_variant", m.active_variant),
                    ("budget", m.budget),
                    ("battery_pct", m.readings.battery_pct),
                ):
                    if value is not None:
                        dev[key] = value
            elif isinstance(m, Event):
                event_rows.append(
                    {
                        "fleet": fleet,
                        "device_id": m.device_id,
                        "ts": ts,
                        "event": m.event,
                        "severity": m.severity,
                        "message": m.message,
                        "data": dict(m.data),
                    }
                )
            elif isinstance(m, UpdateStatus):
                status_rows.append(
                    {
                        "fleet": fleet,
                        "device_id": m.device_id,
                        "ts": ts,
                        "update_id": m.update_id,
                        "model_id": m.target.model_id,
                        "bundle_version": m.target.bundle_version,
                        "state": m.state,
                        "bytes_done": m.bytes_done,
                        "bytes_total": m.bytes_total,
                        "error": m.error,
                    }
                )
                if m.state == "committed":
                    dev.update(model_id=m.target.model_id, bundle_version=m.target.bundle_version)
        if devices:
            self._upsert_devices(conn, [devices[k] for k in sorted(devices)])
        if metric_rows:
            if self.dialect == "postgresql":
                self._copy(conn, s.metrics, metric_rows)
            else:
                self.executemany(conn, "metrics", lambda: s.metrics.insert().inline(), metric_rows)
        if event_rows:
            conn.execute(s.events.insert(), event_rows)
        if status_rows:
            conn.execute(s.update_statuses.insert(), status_rows)
            for row in sorted(status_rows, key=lambda r: (r["update_id"], r["ts"])):
                self._member_progress(conn, row, now)

    def _upsert_devices(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            row.setdefault("tags", {})
            row.setdefault("desired_revision", 0)
        if self.dialect != "postgresql":
            self.executemany(
                conn, "devices.upsert", lambda: self._devices_upsert(self.insert(s.devices)), rows
            )
            return
        self._copy(conn, _STAGING["devices"], rows)
        names = list(rows[0])
        cached = self._compiled.get("devices.upsert.pg")
        if cached is None or cached[0] != names:
            staged = _STAGING["devices"].c
            rows_in_order = select(*[staged[n] for n in names]).order_by(staged.fleet, staged.device_id)
            stmt = postgresql.insert(s.devices).from_select(names, rows_in_order)
            cached = (names, self._devices_upsert(stmt))
            self._compiled["devices.upsert.pg"] = cached
        conn.execute(cached[1])

    def _first_seen(self, conn: Connection, ids: list[str], now: float) -> set[str]:
        """Record message ids as seen; return those no batch recorded before (the ones to store)."""
        if not ids:
            return set()
        seen = s.messages_seen
        if self.dialect == "postgresql":
            self._copy(conn, _STAGING["messages_seen"], [{"message_id": i} for i in ids])
            staged = _STAGING["messages_seen"].c
            stmt = (
                postgresql.insert(seen)
                .from_select(
                    ["message_id", "received_at"],
                    select(staged.message_id, bindparam("now", type_=seen.c.received_at.type)).order_by(
                        staged.message_id
                    ),
                )
                .on_conflict_do_nothing(index_elements=["message_id"])
                .returning(seen.c.message_id)
            )
            return set(conn.execute(stmt, {"now": now}).scalars())
        # executemany + RETURNING: one cached statement, sent in batches ("insertmanyvalues")
        stmt = (
            self.insert(seen)
            .on_conflict_do_nothing(index_elements=["message_id"])  # type: ignore[attr-defined]
            .returning(seen.c.message_id)
        )
        return set(conn.execute(stmt, [{"message_id": i, "received_at": now} for i in ids]).scalars())

    def _copy(self, conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
        """Write ``rows`` (all with the same keys; JSON columns' values serialised here, None as NULL) into
        ``table`` with PostgreSQL's ``COPY``, inside the connection's transaction. psycopg formats COPY
        rows in C: per row a fifth of the client CPU of executemany (or of array parameters, which
        psycopg dumps element by element in Python) and half the server's (docs/fleet.md)."""
        dialect = self.engine.dialect
        dbapi_conn = conn.connection.dbapi_connection
        assert dbapi_conn is not None
        cursor = dbapi_conn.cursor()
        names = list(rows[0])
        json_cols = [i for i, n in enumerate(names) if isinstance(table.c[n].type, JSON)]
        sql = f"COPY {table.name} ({', '.join(names)}) FROM STDIN"
        try:
            if table.name not in s.metadata.tables:
                # A staging table: created where missing, in this transaction. Not once per connection at
                # connect time: behind a pooler in transaction mode each transaction may get another
                # server connection. A no-op (and a notice) where it exists.
                cursor.execute(_STAGING_DDL[table.name])
            with cursor.copy(sql) as copy:
                for row in rows:
                    values = list(row.values())
                    for i in json_cols:
                        if values[i] is not None:
                            values[i] = json.dumps(values[i])
                    copy.write_row(values)
        except dialect.loaded_dbapi.Error as exc:
            # The driver's own error, as SQLAlchemy would have raised it (OperationalError for a lost
            # server, DataError for a refused value...), so the ingestor can tell a retry from a bad row;
            # a lost connection is dropped from the pool.
            lost = dialect.is_disconnect(exc, dbapi_conn, cursor)
            if lost:
                conn.invalidate(exc)
            raise DBAPIError.instance(
                sql, None, exc, dialect.loaded_dbapi.Error, connection_invalidated=lost, dialect=dialect
            ) from exc
        finally:
            cursor.close()

    def _devices_upsert(self, stmt: Any) -> Any:
        """The registry merge on ``stmt`` (an INSERT into ``devices``, from values or a select): insert a
        device, or fold a batch's row into the stored one."""
        d = s.devices.c
        ex = stmt.excluded
        newer_state = and_(ex.online.is_not(None), func.coalesce(d.online_at, 0.0) <= ex.online_at)
        set_: dict[str, Any] = {f: func.coalesce(ex[f], d[f]) for f in _DEVICE_FIELDS}
        set_["online"] = case((newer_state, ex.online), else_=d.online)
        set_["online_at"] = case((newer_state, ex.online_at), else_=d.online_at)
        set_["last_seen"] = case(
            (d.last_seen.is_(None), ex.last_seen),
            (ex.last_seen > d.last_seen, ex.last_seen),
            else_=d.last_seen,
        )
        set_["first_seen"] = case((d.first_seen.is_(None), ex.first_seen), else_=d.first_seen)
        return stmt.on_conflict_do_update(index_elements=["fleet", "device_id"], set_=set_)

    def _member_progress(self, conn: Connection, row: dict[str, Any], now: float) -> None:
        m = s.rollout_members.c
        update_id: str = row["update_id"]
        if update_id.endswith("-rb"):
            state = "reverted" if row["state"] == "committed" else "reverting"
            where = and_(
                m.update_id == update_id[:-3], m.device_id == row["device_id"], m.state != "reverted"
            )
        else:
            state = row["state"]
            where = and_(m.update_id == update_id, m.device_id == row["device_id"], m.state.not_in(_SETTLED))
        conn.execute(
            update(s.rollout_members).where(where).values(state=state, updated_at=now, error=row["error"])
        )

    def _bump(self, conn: Connection, deltas: dict[str, int]) -> None:
        rows = [{"name": k, "value": v} for k, v in sorted(deltas.items()) if v]
        if not rows:
            return
        stmt = self.insert(s.counters)
        conn.execute(
            stmt.on_conflict_do_update(  # type: ignore[attr-defined]
                index_elements=["name"],
                set_={"value": s.counters.c.value + stmt.excluded.value},  # type: ignore[attr-defined]
            ),
            rows,
        )

    def count_rejects(self, reasons: dict[str, int]) -> None:
        """Add to the shared reject counters (``reject.<reason>``)."""
        with self.write() as conn:
            self._bump(conn, {f"reject.{k}": v for k, v in reasons.items()})

    def counters(self) -> dict[str, int]:
        """Every shared counter: ``stored``, ``duplicates``, ``reject.<reason>``."""
        with self.read() as conn:
            return {r.name: int(r.value) for r in conn.execute(select(s.counters))}

    # --- registry ------------------------------------------------------------------------------------

    def devices(self, *, fleet: str | None = None) -> list[dict[str, Any]]:
        """Every registered device, sorted by fleet and id."""
        q = select(s.devices).order_by(s.devices.c.fleet, s.devices.c.device_id)
        if fleet is not None:
            q = q.where(s.devices.c.fleet == fleet)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def device(self, device_id: str, *, fleet: str | None = None) -> dict[str, Any] | None:
        q = select(s.devices).where(s.devices.c.device_id == device_id)
        if fleet is not None:
            q = q.where(s.devices.c.fleet == fleet)
        with self.read() as conn:
            row = conn.execute(q).first()
        return dict(row._mapping) if row else None

    def set_tags(self, device_id: str, tags: dict[str, str], *, fleet: str) -> None:
        """Replace a device's tags (cohorts select on them). Creates the registry row if needed."""
        stmt = self.insert(s.devices).values(fleet=fleet, device_id=device_id, tags=tags, desired_revision=0)
        with self.write() as conn:
            conn.execute(
                stmt.on_conflict_do_update(  # type: ignore[attr-defined]
                    index_elements=["fleet", "device_id"],
                    set_={"tags": stmt.excluded.tags},  # type: ignore[attr-defined]
                )
            )

    def series(self, device_id: str, *, since: float = 0.0, limit: int = 2000) -> list[dict[str, Any]]:
        """A device's metrics over time (oldest first), at most ``limit`` newest rows."""
        c = s.metrics.c
        q = (
            select(s.metrics)
            .where(c.device_id == device_id, c.ts >= since)
            .order_by(c.ts.desc())
            .limit(limit)
        )
        with self.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(q)]
        rows.reverse()
        return rows

    def count(self, table: Table) -> int:
        with self.read() as conn:
            return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

    # --- bundles -------------------------------------------------------------------------------------

    def add_bundle(
        self, *, model_id: str, bundle_version: str, manifest: dict[str, Any], manifest_sha256: str, path: str
    ) -> bool:
        """Record an uploaded bundle; False if this model id and version were already there."""
        stmt = self.insert(s.bundles).values(
            model_id=model_id,
            bundle_version=bundle_version,
            manifest=manifest,
            manifest_sha256=manifest_sha256,
            path=path,
            uploaded_at=time.time(),
        )
        with self.write() as conn:
            done = conn.execute(stmt.on_conflict_do_nothing().returning(s.bundles.c.model_id)).first()  # type: ignore[attr-defined]
        return done is not None

    def bundle(self, model_id: str, bundle_version: str) -> dict[str, Any] | None:
        q = select(s.bundles).where(
            s.bundles.c.model_id == model_id, s.bundles.c.bundle_version == bundle_version
        )
        with self.read() as conn:
            row = conn.execute(q).first()
        return dict(row._mapping) if row else None

    def bundles(self) -> list[dict[str, Any]]:
        q = select(s.bundles).order_by(s.bundles.c.model_id, s.bundles.c.uploaded_at)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # --- leadership ----------------------------------------------------------------------------------

    def acquire_lease(self, name: str, holder: str, *, ttl_s: float, now: float | None = None) -> bool:
        """Take or renew the lease ``name`` for ``holder`` unless another holder's lease is still live.

        Only the holder advances rollouts, so several processes can run the rollout loop safely.
        """
        now = time.time() if now is None else now
        stmt = self.insert(s.leases).values(name=name, holder=holder, expires_at=now + ttl_s)
        c = s.leases.c
        upsert = stmt.on_conflict_do_update(  # type: ignore[attr-defined]
            index_elements=["name"],
            set_={"holder": stmt.excluded.holder, "expires_at": stmt.excluded.expires_at},  # type: ignore[attr-defined]
            where=(c.holder == holder) | (c.expires_at < now),
        )
        with self.write() as conn:
            conn.execute(upsert)
            row = conn.execute(select(c.holder).where(c.name == name)).scalar_one()
        return bool(row == holder)


def _metric_row(fleet: str, m: Metrics, ts: float) -> dict[str, Any]:
    r = m.readings
    return {
        "fleet": fleet,
        "device_id": m.device_id,
        "ts": ts,
        "window_s": m.window_s,
        "inferences": m.inferences,
        "errors": m.errors,
        "p50_ms": m.latency.p50_ms if m.latency else None,
        "p90_ms": m.latency.p90_ms if m.latency else None,
        "p99_ms": m.latency.p99_ms if m.latency else None,
        "mean_macs": m.mean_macs,
        "mean_density": m.mean_density,
        "active_variant": m.active_variant,
        "budget": m.budget,
        "battery_pct": r.battery_pct,
        "charging": r.charging,
        "cpu_load_pct": r.cpu_load_pct,
        "temperature_c": r.temperature_c,
        "agreement": m.agreement,
        "shadow_runs": m.shadow_runs,
    }
