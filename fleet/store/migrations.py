"""Ordered schema migrations with a version table, applied at start.

Idempotent, and safe when several fleet-manager processes start at once: the whole check-and-apply
runs in one transaction that holds a lock first (``pg_advisory_xact_lock`` on PostgreSQL, ``BEGIN
IMMEDIATE`` on SQLite, see :mod:`fleet.store`), so the second process waits and then finds nothing to do.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import Connection, Engine, inspect, select, text

from fleet.store import schema as s

__all__ = ["MIGRATIONS", "Migration", "migrate"]

log = logging.getLogger(__name__)

Migration = tuple[int, str, Callable[[Connection], None]]

_LOCK_KEY = 0x65646770  # "edgp": one advisory lock for the whole migration


def _v1_initial(conn: Connection) -> None:
    tables = [
        s.devices,
        s.messages_seen,
        s.metrics,
        s.events,
        s.update_statuses,
        s.bundles,
        s.rollouts,
        s.rollout_members,
        s.counters,
        s.leases,
    ]
    s.metadata.create_all(conn, tables=tables)


def _v2_desired_config(conn: Connection) -> None:
    # v1 creates tables from the current schema, so a new database already has these columns
    have = {c["name"] for c in inspect(conn).get_columns("devices")}
    for name in ("desired_config", "desired_update"):
        if name not in have:
            column = s.devices.c[name]
            conn.execute(text(f"ALTER TABLE devices ADD COLUMN {name} {column.type.compile(conn.dialect)}"))


MIGRATIONS: list[Migration] = [
    (1, "initial schema: registry, telemetry, bundles, rollouts, counters, leases", _v1_initial),
    (2, "per-device desired configuration kept across rollouts", _v2_desired_config),
]
"""Append only; never edit a migration that has shipped."""


def migrate(engine: Engine) -> list[int]:
    """Apply the migrations this database lacks; return the versions applied (empty when up to date)."""
    applied: list[int] = []
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        s.schema_version.create(conn, checkfirst=True)
        done = set(conn.execute(select(s.schema_version.c.version)).scalars())
        for version, name, step in MIGRATIONS:
            if version in done:
                continue
            log.info("applying fleet store migration %d: %s", version, name)
            step(conn)
            conn.execute(s.schema_version.insert().values(version=version, applied_at=time.time()))
            applied.append(version)
    return applied
