"""The fleet store's tables (SQLAlchemy Core), one schema for SQLite and PostgreSQL.

Times are float seconds since the Unix epoch (UTC): the same type in both dialects, cheap to compare,
and what the charts plot. JSON columns hold small documents (tags, variants, manifests, gates).
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

__all__ = [
    "bundles",
    "counters",
    "devices",
    "events",
    "leases",
    "messages_seen",
    "metadata",
    "metrics",
    "rollout_members",
    "rollouts",
    "schema_version",
    "update_statuses",
]

metadata = MetaData()

ID = 64

schema_version = Table(
    "schema_version",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("applied_at", Float, nullable=False),
)

devices = Table(
    "devices",
    metadata,
    Column("fleet", String(ID), primary_key=True),
    Column("device_id", String(ID), primary_key=True),
    Column("online", Boolean),
    Column("online_at", Float),
    Column("profile", String(ID)),
    Column("agent_version", String(ID)),
    Column("backend", String(ID)),
    Column("model_id", String(ID)),
    Column("bundle_version", String(ID)),
    Column("variants", JSON(none_as_null=True)),
    Column("active_variant", String(ID)),
    Column("budget", Float),
    Column("battery_pct", Float),
    Column("tags", JSON(none_as_null=True)),
    Column("desired_revision", Integer, nullable=False, default=0),
    Column("desired_config", JSON(none_as_null=True)),  # pins, policy overrides, periods (fleet.desired)
    Column("desired_update", JSON(none_as_null=True)),  # the last update instruction sent, for re-sends
    Column("first_seen", Float),
    Column("last_seen", Float),
)

messages_seen = Table(
    "messages_seen",
    metadata,
    Column("message_id", String(32), primary_key=True),
    Column("received_at", Float, nullable=False),
)

metrics = Table(
    "metrics",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("fleet", String(ID), nullable=False),
    Column("device_id", String(ID), nullable=False),
    Column("ts", Float, nullable=False),
    Column("window_s", Float, nullable=False),
    Column("inferences", Integer, nullable=False),
    Column("errors", Integer, nullable=False),
    Column("p50_ms", Float),
    Column("p90_ms", Float),
    Column("p99_ms", Float),
    Column("mean_macs", Float),
    Column("mean_density", Float),
    Column("active_variant", String(ID)),
    Column("budget", Float),
    Column("battery_pct", Float),
    Column("charging", Boolean),
    Column("cpu_load_pct", Float),
    Column("temperature_c", Float),
    Column("agreement", Float),
    Column("shadow_runs", Integer, nullable=False),
    Index("ix_metrics_device_ts", "fleet", "device_id", "ts"),
)

events = Table(
    "events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("fleet", String(ID), nullable=False),
    Column("device_id", String(ID), nullable=False),
    Column("ts", Float, nullable=False),
    Column("event", String(ID), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("data", JSON),
    Index("ix_events_device_ts", "fleet", "device_id", "ts"),
)

update_statuses = Table(
    "update_statuses",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("fleet", String(ID), nullable=False),
    Column("device_id", String(ID), nullable=False),
    Column("ts", Float, nullable=False),
    Column("update_id", String(ID), nullable=False),
    Column("model_id", String(ID), nullable=False),
    Column("bundle_version", String(ID), nullable=False),
    Column("state", String(32), nullable=False),
    Column("bytes_done", BigInteger, nullable=False),
    Column("bytes_total", BigInteger),
    Column("error", Text),
    Index("ix_update_statuses_update", "update_id"),
)

bundles = Table(
    "bundles",
    metadata,
    Column("model_id", String(ID), primary_key=True),
    Column("bundle_version", String(ID), primary_key=True),
    Column("manifest", JSON, nullable=False),
    Column("manifest_sha256", String(64), nullable=False),
    Column("path", Text, nullable=False),
    Column("uploaded_at", Float, nullable=False),
)

rollouts = Table(
    "rollouts",
    metadata,
    Column("id", String(ID), primary_key=True),
    Column("fleet", String(ID), nullable=False),
    Column("model_id", String(ID), nullable=False),
    Column("bundle_version", String(ID), nullable=False),
    Column("cohort", JSON, nullable=False),
    Column("stages", JSON, nullable=False),
    Column("gates", JSON, nullable=False),
    Column("gate_status", JSON),
    Column("soak_s", Float, nullable=False),
    Column("stuck_timeout_s", Float, nullable=False),
    Column("health_window_s", Float, nullable=False),
    Column("state", String(16), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("stage_started_at", Float),
    Column("stage_done_at", Float),
    Column("reason", Text),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
)

rollout_members = Table(
    "rollout_members",
    metadata,
    Column("rollout_id", String(ID), primary_key=True),
    Column("device_id", String(ID), primary_key=True),
    Column("fleet", String(ID), nullable=False),
    Column("stage", Integer, nullable=False),
    Column("state", String(32), nullable=False),
    Column("update_id", String(ID), nullable=False),
    Column("from_model_id", String(ID)),
    Column("from_version", String(ID)),
    Column("sent_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("error", Text),
    Index("ix_rollout_members_update", "update_id"),
)

counters = Table(
    "counters",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    Column("name", String(ID), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
)
