"""Staged rollouts on a real store: stages, gates, halt and rollback, stuck devices, leadership."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.bundle import BundleError
from agent.contract import (
    Birth,
    BundleRef,
    DesiredState,
    Metrics,
    Percentiles,
    UpdateState,
    UpdateStatus,
    envelope,
    parse_message,
    parse_topic,
)
from agent.errors import UserError
from agent.signing import KeyPair, PublicKey, SignatureError, load_public_key
from fleet.gates import Gates
from fleet.registry import BundleUploadError, upload_bundle
from fleet.rollouts import Cohort, DeviceConfig, RolloutError, RolloutManager, RolloutSpec, stage_sizes
from fleet.store import Store
from tests.fleet_fixtures import db_url, make_bundle, pg_url  # noqa: F401

MODEL = "fmnist-resnet"
FLEET = "lab"


class Fleet:
    """A store: devices on 1.0.0, bundles 1.0.0 and 1.1.0 uploaded, a manager publishing into a list."""

    def __init__(self, url: str, data: Path, keys: KeyPair, *, devices: int = 10) -> None:
        self.store = Store(url)
        self.data = data
        self.key: PublicKey = load_public_key(keys.public)
        for version in ("1.0.0", "1.1.0"):
            make_bundle(data / "src" / version, keys, version=version)
            upload_bundle(self.store, data_dir=data, source=data / "src" / version, public_key=self.key)
        self.sent: list[tuple[str, bytes]] = []
        self.manager = self.new_manager("a")
        self.t = time.time()
        births = []
        for i in range(devices):
            births.append(
                Birth(
                    **self.env(f"d{i:02d}"),
                    profile="rpi4" if i % 2 == 0 else "jetson",
                    agent_version="0.1.0",
                    backend="onnx",
                    bundle=BundleRef(model_id=MODEL, bundle_version="1.0.0"),
                    variants=("dense",),
                )
            )
        self.store.ingest([(FLEET, b) for b in births])

    def new_manager(self, holder: str) -> RolloutManager:
        return RolloutManager(
            self.store,
            data_dir=self.data,
            public_url="http://127.0.0.1:8080",
            publish=lambda topic, payload: self.sent.append((topic, payload)),
            holder=holder,
        )

    def env(self, device: str, at: float | None = None) -> dict[str, Any]:
        e = envelope(device_id=device, seq=0)
        if at is not None:
            e["sent_at"] = datetime.fromtimestamp(at, UTC)
        return e

    def desired(self) -> list[DesiredState]:
        out = []
        for topic, payload in self.sent:
            msg = parse_message(payload, expect_kind="desired", expect_device=parse_topic(topic).device)
            assert isinstance(msg, DesiredState)
            out.append(msg)
        self.sent.clear()
        return out

    def report(self, desired: DesiredState, state: UpdateState, **kw: Any) -> None:
        assert desired.update is not None
        msg = UpdateStatus(
            **self.env(desired.device_id),
            update_id=desired.update.update_id,
            target=desired.update.target,
            state=state,
            **kw,
        )
        self.store.ingest([(FLEET, msg)])

    def metrics(self, device: str, at: float, *, p90: float, errors: int = 0) -> None:
        msg = Metrics(
            **self.env(device, at),
            window_s=10,
            inferences=100,
            errors=errors,
            latency=Percentiles(p50_ms=p90 / 2, p90_ms=p90, p99_ms=p90 * 2),
        )
        self.store.ingest([(FLEET, msg)])

    def spec(self, **kw: Any) -> RolloutSpec:
        base: dict[str, Any] = dict(fleet=FLEET, model_id=MODEL, bundle_version="1.1.0", soak_s=0)
        return RolloutSpec(**(base | kw))

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def fleet(db_url: str, tmp_path: Path, signing_keys: KeyPair):  # type: ignore[no-untyped-def]  # noqa: F811
    f = Fleet(db_url, tmp_path / "data", signing_keys)
    yield f
    f.close()


@pytest.fixture
def lite(tmp_path: Path, signing_keys: KeyPair):  # type: ignore[no-untyped-def]
    f = Fleet(f"sqlite:///{tmp_path / 'fleet.db'}", tmp_path / "data", signing_keys)
    yield f
    f.close()


def test_stage_sizes_have_one_device_minimum() -> None:
    assert stage_sizes(1000, (1, 10, 50, 100)) == [10, 100, 500, 1000]
    assert stage_sizes(2, (1, 10, 50, 100)) == [1, 1, 1, 2]


def test_bundles_are_stored_immutably(lite: Fleet, signing_keys: KeyPair) -> None:
    stored = lite.store.bundle(MODEL, "1.1.0")
    assert stored is not None and Path(stored["path"]) == lite.data / "bundles" / MODEL / "1.1.0"
    assert (Path(stored["path"]) / "manifest.json").is_file()
    other = lite.data / "other"
    make_bundle(other, signing_keys, version="1.1.0")
    (other / "dense.onnx").write_bytes(b"changed")
    with pytest.raises(BundleError, match=r"has 7 bytes"):
        upload_bundle(lite.store, data_dir=lite.data, source=other, public_key=lite.key)


def test_a_bundle_signed_by_another_key_is_refused(lite: Fleet, tmp_path: Path) -> None:
    from agent.signing import generate_keys

    stranger = generate_keys(tmp_path / "stranger")
    make_bundle(tmp_path / "evil", stranger, version="9.9.9")
    with pytest.raises(SignatureError):
        upload_bundle(lite.store, data_dir=lite.data, source=tmp_path / "evil", public_key=lite.key)
    assert lite.store.bundle(MODEL, "9.9.9") is None


def test_a_packed_bundle_uploads(lite: Fleet, signing_keys: KeyPair, tmp_path: Path) -> None:
    from agent.bundle import pack_bundle

    make_bundle(tmp_path / "b2", signing_keys, version="2.0.0")
    archive = pack_bundle(tmp_path / "b2", tmp_path / "b2.tar")
    row = upload_bundle(lite.store, data_dir=lite.data, source=archive, public_key=lite.key)
    assert row["bundle_version"] == "2.0.0" and len(row["manifest_sha256"]) == 64
    assert upload_bundle(lite.store, data_dir=lite.data, source=archive, public_key=lite.key) == row


def test_same_version_with_another_manifest_is_refused(
    lite: Fleet, signing_keys: KeyPair, tmp_path: Path
) -> None:
    make_bundle(tmp_path / "again", signing_keys, version="1.1.0")
    import json

    raw = json.loads((tmp_path / "again" / "manifest.json").read_text())
    raw["created"]["seed"] = 99
    from agent.contract import BundleManifest
    from agent.signing import load_private_key, sign_manifest

    m = sign_manifest(
        BundleManifest.from_obj(raw | {"signature": None}), load_private_key(signing_keys.private)
    )
    (tmp_path / "again" / "manifest.json").write_text(m.model_dump_json())
    with pytest.raises(BundleUploadError, match=r"already stored with another manifest"):
        upload_bundle(lite.store, data_dir=lite.data, source=tmp_path / "again", public_key=lite.key)


def test_cohort_by_profile_tags_and_percentage(lite: Fleet) -> None:
    lite.store.set_tags("d00", {"site": "north"}, fleet=FLEET)
    lite.store.set_tags("d02", {"site": "north"}, fleet=FLEET)
    lite.store.set_tags("d01", {"site": "north"}, fleet=FLEET)
    r = lite.manager.create(lite.spec(cohort=Cohort(profile="rpi4", tags={"site": "north"})))
    assert sorted(m["device_id"] for m in r["members"]) == ["d00", "d02"]
    half = lite.manager.create(lite.spec(cohort=Cohort(percentage=50)))
    assert len(half["members"]) == 5
    explicit = lite.manager.create(lite.spec(cohort=Cohort(devices=("d03", "d07"))))
    assert sorted(m["device_id"] for m in explicit["members"]) == ["d03", "d07"]
    with pytest.raises(RolloutError, match="no device"):
        lite.manager.create(lite.spec(cohort=Cohort(profile="pixel")))
    with pytest.raises(RolloutError, match="not been uploaded"):
        lite.manager.create(lite.spec(bundle_version="7.7.7"))


def test_a_healthy_rollout_goes_through_every_stage(fleet: Fleet) -> None:
    r = fleet.manager.create(fleet.spec(stages=(10, 50, 100)))
    assert [p["devices"] for p in r["progress"]] == [1, 4, 5]
    seen: set[str] = set()
    revisions: dict[str, int] = {}
    for round_ in range(10):
        # a fresh manager now and then: all state is in the store
        manager = fleet.new_manager("a") if round_ % 2 else fleet.manager
        assert manager.tick()
        for d in fleet.desired():
            assert d.update is not None and d.update.target.bundle_version == "1.1.0"
            assert d.update.base_url == "http://127.0.0.1:8080/artifacts"
            assert d.revision > revisions.get(d.device_id, 0)
            revisions[d.device_id] = d.revision
            seen.add(d.device_id)
            fleet.report(d, "downloading")
            fleet.report(d, "committed")
        got = fleet.manager.get(r["id"])
        assert got is not None
        if got["state"] == "completed":
            break
    assert got["state"] == "completed"
    assert len(seen) == 10
    assert {d["bundle_version"] for d in fleet.store.devices()} == {"1.1.0"}
    assert all(g["ok"] for g in got["gate_status"])


def test_canary_failures_halt_and_roll_back(fleet: Fleet) -> None:
    r = fleet.manager.create(fleet.spec(stages=(20, 100)))
    fleet.manager.tick()
    first = fleet.desired()
    assert len(first) == 2
    fleet.report(first[0], "committed")
    fleet.report(first[1], "failed", error="sha256 mismatch")
    fleet.manager.tick()
    got = fleet.manager.get(r["id"])
    assert got is not None and got["state"] == "halted"
    assert "max_failure_rate" in got["reason"] and first[1].device_id in got["reason"]
    rollback = fleet.desired()
    assert [d.device_id for d in rollback] == [first[0].device_id]
    assert rollback[0].update is not None and rollback[0].update.target.bundle_version == "1.0.0"
    assert rollback[0].revision > first[0].revision
    fleet.report(first[0], "health_check")  # a late status of the forward update changes nothing now
    states = {m["device_id"]: m["state"] for m in fleet.manager.get(r["id"])["members"]}  # type: ignore[index]
    assert states[first[0].device_id] == "rollback_sent"
    fleet.report(rollback[0], "committed")
    states = {m["device_id"]: m["state"] for m in fleet.manager.get(r["id"])["members"]}  # type: ignore[index]
    assert states[first[0].device_id] == "reverted" and states[first[1].device_id] == "failed"
    assert list(states.values()).count("pending") == 8
    fleet.manager.tick()
    assert fleet.desired() == []  # a halted rollout sends nothing more


def test_latency_gate_compares_each_device_with_its_own_baseline(lite: Fleet) -> None:
    now = time.time()
    for device in ("d00", "d01"):
        lite.metrics(device, now - 100, p90=2.0)
    r = lite.manager.create(lite.spec(cohort=Cohort(devices=("d00", "d01")), stages=(50, 100)))
    lite.manager.tick(now)
    (d,) = lite.desired()
    lite.report(d, "committed")
    lite.metrics(d.device_id, now + 10, p90=2.2)
    lite.manager.tick(now + 11)
    got = lite.manager.get(r["id"])
    assert got is not None and got["state"] == "running"
    lite.metrics(d.device_id, now + 20, p90=8.0)
    lite.manager.tick(now + 21)
    got = lite.manager.get(r["id"])
    assert got is not None and got["state"] == "halted" and "max_p90_ratio" in got["reason"]


def test_error_rate_gate(lite: Fleet) -> None:
    now = time.time()
    r = lite.manager.create(lite.spec(cohort=Cohort(devices=("d00",)), gates=Gates(max_error_rate=0.01)))
    lite.manager.tick(now)
    (d,) = lite.desired()
    lite.report(d, "committed")
    lite.metrics("d00", now + 5, p90=1.0, errors=10)
    lite.manager.tick(now + 6)
    got = lite.manager.get(r["id"])
    assert got is not None and got["state"] == "halted" and "max_error_rate" in got["reason"]


def test_a_stuck_device_blocks_neither_the_stage_nor_the_next_rollout(lite: Fleet) -> None:
    now = time.time()
    spec = lite.spec(cohort=Cohort(devices=("d00", "d01", "d02")), stages=(60, 100), stuck_timeout_s=60)
    r = lite.manager.create(spec)
    lite.manager.tick(now)
    first = lite.desired()
    assert len(first) == 2
    lite.report(first[0], "committed")
    lite.report(first[1], "downloading")  # ... and then nothing
    lite.manager.tick(now + 30)
    assert lite.manager.get(r["id"])["stage"] == 0  # type: ignore[index]
    lite.manager.tick(now + 120)
    got = lite.manager.get(r["id"])
    assert got is not None
    states = {m["device_id"]: m["state"] for m in got["members"]}
    assert states[first[1].device_id] == "stuck"
    lite.manager.tick(now + 121)
    (third,) = lite.desired()
    assert third.device_id not in {first[0].device_id, first[1].device_id}
    # the next rollout to the stuck device goes ahead and replaces the old instruction
    make = lite.manager.create(lite.spec(cohort=Cohort(devices=(first[1].device_id,))))
    lite.manager.tick(now + 122)
    (again,) = lite.desired()
    assert again.device_id == first[1].device_id and again.update is not None
    assert again.update.update_id.startswith(make["id"])


def test_pause_resume_abort(lite: Fleet) -> None:
    r = lite.manager.create(lite.spec(stages=(10, 100)))
    lite.manager.pause(r["id"], reason="lunch")
    lite.manager.tick()
    assert lite.desired() == []
    with pytest.raises(RolloutError, match="paused"):
        lite.manager.pause(r["id"])
    lite.manager.resume(r["id"])
    lite.manager.tick()
    assert len(lite.desired()) == 1
    got = lite.manager.abort(r["id"], reason="wrong bundle")
    assert got["state"] == "aborted" and got["reason"] == "wrong bundle"
    assert sum(1 for m in got["members"] if m["state"] == "aborted") == 9
    lite.manager.tick()
    assert lite.desired() == []
    with pytest.raises(RolloutError, match="no rollout"):
        lite.manager.resume("nope")


def test_only_the_lease_holder_advances(fleet: Fleet) -> None:
    other = fleet.new_manager("b")
    fleet.manager.create(fleet.spec())
    now = time.time()
    assert fleet.manager.tick(now)
    assert not other.tick(now + 1)
    assert len(fleet.desired()) == 1
    assert other.tick(now + 100)  # the first holder's lease ran out


def test_the_update_artifact_is_made_before_devices_are_told(lite: Fleet) -> None:
    pytest.importorskip("agent.delta")
    lite.manager.create(lite.spec())
    lite.manager.tick()
    assert (lite.data / "updates" / MODEL / "1.0.0" / "1.1.0" / "update.json").is_file()


# ---- per-device configuration ---------------------------------------------------------------------------


def test_a_device_config_is_published_and_every_rollout_keeps_it(fleet: Fleet) -> None:
    """Pins and policy overrides set by a person survive rollouts, and a config change made while an
    update is in flight re-sends that update (the retained desired state is the device's whole truth)."""
    cfg = DeviceConfig(pinned_variant="dense", policy_overrides={"low_battery_pct": 30}, metrics_period_s=5)
    device = fleet.manager.set_config("d00", cfg, fleet=FLEET)
    (first,) = fleet.desired()
    assert first.revision == device["desired_revision"] == 1
    assert (first.pinned_variant, first.policy_overrides, first.metrics_period_s) == (
        "dense",
        {"low_battery_pct": 30},
        5,
    )
    assert first.update is None

    fleet.manager.create(fleet.spec(cohort=Cohort(devices=("d00",))))
    fleet.manager.tick(fleet.t)
    (sent,) = fleet.desired()
    assert sent.update is not None and sent.update.target.bundle_version == "1.1.0"
    assert (
        sent.revision == 2
        and sent.pinned_variant == "dense"
        and sent.policy_overrides == {"low_battery_pct": 30}
    )

    fleet.manager.set_config("d00", DeviceConfig(heartbeat_period_s=60), fleet=FLEET)
    (again,) = fleet.desired()
    assert again.revision == 3 and again.pinned_variant is None and again.heartbeat_period_s == 60
    assert again.update == sent.update  # still in flight: re-sent with the new config


def test_a_device_config_is_checked_before_anything_is_sent(lite: Fleet) -> None:
    with pytest.raises(UserError, match="no device 'ghost'"):
        lite.manager.set_config("ghost", DeviceConfig(), fleet=FLEET)
    with pytest.raises(UserError, match="not 'static-50'"):
        lite.manager.set_config("d01", DeviceConfig(pinned_variant="static-50"), fleet=FLEET)
    with pytest.raises(ValidationError, match="warp_speed"):
        DeviceConfig(policy_overrides={"warp_speed": 9})
    assert lite.desired() == []
