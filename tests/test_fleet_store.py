"""The fleet store against SQLite and PostgreSQL: migrations, dedup, registry upserts, counters, leases."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

from agent.contract import Birth, BundleRef, Metrics, Percentiles, Readings, Status, envelope
from fleet.store import MIGRATIONS, Store, database_url, migrate, schema
from tests.fleet_fixtures import db_url, pg_url  # noqa: F401
from tests.samples import sample_messages

T0 = datetime(2026, 11, 27, 8, 0, tzinfo=UTC)


def at(seconds: float, **env: object) -> dict[str, object]:
    e = envelope(device_id=str(env.pop("device_id", "pi-01")), seq=int(env.pop("seq", 0)))  # type: ignore[call-overload]
    e["sent_at"] = T0 + timedelta(seconds=seconds)
    return e


def test_database_url_accepts_a_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    assert database_url(tmp_path / "x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_migrations_apply_once(db_url: str) -> None:  # noqa: F811
    with Store(db_url) as store:
        assert store.count(schema.schema_version) == len(MIGRATIONS)
        assert migrate(store.engine) == []
    with Store(db_url) as again:
        assert again.count(schema.schema_version) == len(MIGRATIONS)


def test_a_database_of_the_first_schema_is_upgraded_in_place(db_url: str) -> None:  # noqa: F811
    """A fleet database made before migration 2 (devices without the desired-config columns) keeps its
    rows and gains the columns when a newer manager opens it."""
    from sqlalchemy import create_engine, inspect, text

    engine = create_engine(db_url)
    try:
        with engine.begin() as conn:  # the first schema: today's devices table less the two columns
            schema.schema_version.create(conn)
            schema.devices.create(conn)
            for column in ("desired_config", "desired_update"):
                conn.execute(text(f"ALTER TABLE devices DROP COLUMN {column}"))
            conn.execute(
                text("INSERT INTO devices (fleet, device_id, desired_revision) VALUES ('f', 'kept', 4)")
            )
            conn.execute(schema.schema_version.insert().values(version=1, applied_at=0.0))
    finally:
        engine.dispose()
    with Store(db_url) as store:
        assert store.count(schema.schema_version) == len(MIGRATIONS)
        columns = {c["name"] for c in inspect(store.engine).get_columns("devices")}
        assert {"desired_config", "desired_update"} <= columns
        kept = store.device("kept", fleet="f")
        assert kept is not None and kept["desired_revision"] == 4 and kept["desired_config"] is None


def test_migrations_from_several_processes_at_once(db_url: str) -> None:  # noqa: F811
    errors: list[BaseException] = []

    def open_one() -> None:
        try:
            Store(db_url).close()
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with Store(db_url, migrate_on_open=False) as store:
        assert store.count(schema.schema_version) == len(MIGRATIONS)


def test_every_kind_is_stored_and_duplicates_dropped(db_url: str) -> None:  # noqa: F811
    msgs = [m for m in sample_messages() if m.kind != "desired"]
    with Store(db_url) as store:
        first = store.ingest([("lab", m) for m in msgs])
        assert (first.stored, first.duplicates) == (5, 0)
        again = store.ingest([("lab", m) for m in msgs] + [("lab", msgs[0])])
        assert (again.stored, again.duplicates) == (0, 6)
        assert store.count(schema.metrics) == 1
        assert store.count(schema.events) == 1
        assert store.count(schema.update_statuses) == 1
        assert store.count(schema.messages_seen) == 5
        assert store.counters() == {"stored": 5, "duplicates": 6}


def test_birth_fills_the_registry(db_url: str) -> None:  # noqa: F811
    birth = Birth(
        **at(0),
        profile="rpi4",
        agent_version="0.1.0",
        backend="onnx",
        bundle=BundleRef(model_id="m", bundle_version="1.0.0"),
        variants=("dense", "static-50"),
    )
    with Store(db_url) as store:
        store.ingest([("lab", birth)])
        dev = store.device("pi-01")
        assert dev is not None
        assert dev["online"] is True
        assert (dev["profile"], dev["model_id"], dev["bundle_version"]) == ("rpi4", "m", "1.0.0")
        assert dev["variants"] == ["dense", "static-50"]
        assert dev["first_seen"] == dev["last_seen"] == T0.timestamp()


def test_metrics_update_variant_battery_and_last_seen(db_url: str) -> None:  # noqa: F811
    m = Metrics(
        **at(10),
        window_s=10,
        inferences=5,
        latency=Percentiles(p50_ms=1, p90_ms=2, p99_ms=3),
        active_variant="static-50",
        readings=Readings(battery_pct=55.0),
    )
    with Store(db_url) as store:
        store.ingest([("lab", Status(**at(0), state="online", uptime_s=1, active_variant="dense"))])
        store.ingest([("lab", m)])
        dev = store.device("pi-01")
        assert dev is not None
        assert (dev["active_variant"], dev["battery_pct"], dev["online"]) == ("static-50", 55.0, True)
        assert dev["last_seen"] == T0.timestamp() + 10
        assert [r["p90_ms"] for r in store.series("pi-01")] == [2.0]


def test_a_batch_keeps_every_metrics_column_and_registry_field(db_url: str) -> None:  # noqa: F811
    # PostgreSQL takes these rows, the registry rows and the message ids through COPY (the last two via
    # staging tables), SQLite through executemany: both must store the same values, NULLs and JSON included.
    full = Metrics(
        **at(5, device_id="pi-02"),
        window_s=10,
        inferences=7,
        errors=1,
        latency=Percentiles(p50_ms=1.5, p90_ms=2.5, p99_ms=3.5),
        mean_macs=1.25e6,
        mean_density=0.5,
        active_variant="gated",
        budget=0.25,
        readings=Readings(battery_pct=40.0, charging=True, cpu_load_pct=12.5, temperature_c=51.0),
        agreement=0.96,
        shadow_runs=25,
    )
    bare = Metrics(**at(6, device_id="pi-03"), window_s=10, inferences=0, readings=Readings())
    birth = Birth(**at(1, device_id="pi-03"), profile="rpi4", agent_version="0.1.0", backend="onnx")
    with Store(db_url) as store:
        assert store.ingest([("lab", full), ("lab", bare), ("lab", birth), ("lab", full)]).stored == 3
        (row,) = store.series("pi-02")
        assert {k: row[k] for k in ("ts", "window_s", "inferences", "errors", "p50_ms", "p99_ms")} == {
            "ts": T0.timestamp() + 5,
            "window_s": 10.0,
            "inferences": 7,
            "errors": 1,
            "p50_ms": 1.5,
            "p99_ms": 3.5,
        }
        assert (row["mean_macs"], row["mean_density"], row["active_variant"], row["budget"]) == (
            1.25e6,
            0.5,
            "gated",
            0.25,
        )
        assert (row["battery_pct"], row["charging"], row["cpu_load_pct"], row["temperature_c"]) == (
            40.0,
            True,
            12.5,
            51.0,
        )
        assert (row["agreement"], row["shadow_runs"]) == (0.96, 25)
        (empty,) = store.series("pi-03")
        assert [
            empty[k] for k in ("p50_ms", "mean_macs", "budget", "battery_pct", "charging", "agreement")
        ] == [None] * 6
        dev2, dev3 = store.device("pi-02"), store.device("pi-03")
        assert dev2 is not None and dev3 is not None
        assert (dev2["online"], dev2["variants"], dev2["tags"], dev2["budget"]) == (None, None, {}, 0.25)
        assert (dev3["online"], dev3["variants"], dev3["profile"], dev3["last_seen"]) == (
            True,
            [],
            "rpi4",
            T0.timestamp() + 6,
        )


def test_a_last_will_with_an_old_sent_at_still_marks_the_device_offline(db_url: str) -> None:  # noqa: F811
    # The will is built at connect: its sent_at is older than the birth sent after connecting.
    will = Status(**at(0), state="offline", uptime_s=0)
    birth = Birth(**at(1), profile="rpi4", agent_version="0.1.0", backend="onnx")
    with Store(db_url) as store:
        store.ingest([("lab", birth)], received=[100.0])
        store.ingest([("lab", will)], received=[200.0])
        dev = store.device("pi-01")
        assert dev is not None and dev["online"] is False


def test_online_follows_arrival_even_when_processed_out_of_order(db_url: str) -> None:  # noqa: F811
    will = Status(**at(0), state="offline", uptime_s=0)
    birth = Birth(**at(1), profile="rpi4", agent_version="0.1.0", backend="onnx")
    with Store(db_url) as store:
        # two ingestors: the will (arrived later) is written before the birth (arrived earlier)
        store.ingest([("lab", will)], received=[200.0])
        store.ingest([("lab", birth)], received=[100.0])
        dev = store.device("pi-01")
        assert dev is not None and dev["online"] is False and dev["profile"] == "rpi4"
        again = Birth(**at(2), profile="rpi4", agent_version="0.1.0", backend="onnx")
        store.ingest([("lab", again)], received=[300.0])
        dev = store.device("pi-01")
        assert dev is not None and dev["online"] is True


def test_reject_counters_add_up(db_url: str) -> None:  # noqa: F811
    with Store(db_url) as store:
        store.count_rejects({"not_json": 2, "wrong_kind": 1})
        store.count_rejects({"not_json": 3})
        assert store.counters() == {"reject.not_json": 5, "reject.wrong_kind": 1}


def test_lease_has_one_holder_until_it_expires(db_url: str) -> None:  # noqa: F811
    with Store(db_url) as store:
        assert store.acquire_lease("rollouts", "a", ttl_s=10, now=100)
        assert not store.acquire_lease("rollouts", "b", ttl_s=10, now=105)
        assert store.acquire_lease("rollouts", "a", ttl_s=10, now=106)
        assert store.acquire_lease("rollouts", "b", ttl_s=10, now=117)
        assert not store.acquire_lease("rollouts", "a", ttl_s=10, now=118)


def test_tags_and_bundles(db_url: str) -> None:  # noqa: F811
    with Store(db_url) as store:
        store.set_tags("pi-02", {"site": "north"}, fleet="lab")
        dev = store.device("pi-02")
        assert dev is not None and dev["tags"] == {"site": "north"}
        kw = dict(model_id="m", bundle_version="1", manifest={"a": 1}, manifest_sha256="0" * 64, path="/x")
        assert store.add_bundle(**kw)  # type: ignore[arg-type]
        assert not store.add_bundle(**kw)  # type: ignore[arg-type]
        assert [b["bundle_version"] for b in store.bundles()] == ["1"]


def test_public_surface_is_pinned() -> None:
    import fleet

    assert fleet.__all__ == [
        "BundleUploadError",
        "Cohort",
        "FleetServer",
        "GateResult",
        "Gates",
        "Ingestor",
        "RolloutError",
        "RolloutManager",
        "RolloutSpec",
        "ServeConfig",
        "Store",
        "StoreError",
        "create_app",
        "upload_bundle",
    ]
    for name in fleet.__all__:
        assert getattr(fleet, name).__name__ == name


def test_postgresql_staging_survives_a_rolled_back_batch_and_a_lost_connection(pg_url: str) -> None:  # noqa: F811
    # PostgreSQL batches go through per-connection temporary tables (COPY, then one INSERT ... SELECT).
    # Rows staged by a batch that rolled back must not leak into the next one, and a connection the server
    # dropped is replaced by one that has its staging tables again.
    import sqlalchemy

    from fleet.store.core import _STAGING

    msgs = [m for m in sample_messages() if m.kind != "desired"]
    with Store(pg_url) as store:
        try:
            with store.write() as conn:
                store._copy(conn, _STAGING["messages_seen"], [{"message_id": "f" * 32}])
                raise RuntimeError("the batch fails after staging")
        except RuntimeError:
            pass
        assert store.ingest([("lab", msgs[0])]).stored == 1
        assert store.count(schema.messages_seen) == 1
        other = sqlalchemy.create_engine(pg_url)
        with other.connect() as admin:
            pids = admin.execute(
                sqlalchemy.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            ).all()
        other.dispose()
        assert pids, "the store held no connection to drop"
        result = store.ingest([("lab", m) for m in msgs])
        assert (result.stored, result.duplicates) == (len(msgs) - 1, 1)
        assert store.count(schema.messages_seen) == len(msgs)


def test_postgresql_copy_on_a_lost_connection_is_a_retryable_error(pg_url: str) -> None:  # noqa: F811
    # COPY runs on the driver's cursor: a server that goes away mid-batch must still surface as the
    # OperationalError the ingestor retries (not as a refused row it would count as unstorable), and the
    # dead connection must not come back from the pool.
    import pytest
    import sqlalchemy

    from fleet.ingest import _transient
    from fleet.store.core import _STAGING

    msgs = [m for m in sample_messages() if m.kind != "desired"]
    with Store(pg_url) as store:
        other = sqlalchemy.create_engine(pg_url)
        conn = store.engine.connect()
        try:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar_one()
            with other.connect() as admin:
                admin.execute(sqlalchemy.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            with pytest.raises(sqlalchemy.exc.OperationalError) as caught:
                store._copy(conn, _STAGING["messages_seen"], [{"message_id": "f" * 32}])
            assert conn.invalidated
        finally:
            conn.close()
        other.dispose()
        assert _transient(caught.value)
        assert store.ingest([("lab", m) for m in msgs]).stored == len(msgs)
