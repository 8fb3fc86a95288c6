"""Staged rollouts: a bundle to a cohort, stage by stage, behind health gates, with automatic rollback.

All state lives in the store (rollouts and rollout_members tables), so a restarted manager carries on
where it stopped, and several managers may run :meth:`RolloutManager.tick`: only the holder of the
``rollouts`` lease advances anything. Each device gets its instruction as its retained ``desired`` state.

>>> manager = RolloutManager(store, data_dir=Path("/srv/fleet"), public_url="http://fleet:8080",
...                          publish=publish)  # doctest: +SKIP
>>> manager.create(RolloutSpec(fleet="lab", model_id="m", bundle_version="1.1.0"))  # doctest: +SKIP
>>> manager.tick()  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy import Connection, and_, insert, select, update
from sqlalchemy import update as sa_update

from agent.contract import BundleRef, DesiredState, UpdateInstruction, device_topic, envelope
from agent.contract.messages import Scalar
from agent.errors import ContractError, UserError
from fleet.gates import FAILED_STATES, Gates, evaluate_gates
from fleet.registry import bundle_dir, update_dir
from fleet.store import Store
from fleet.store import schema as s

__all__ = ["Cohort", "Publish", "RolloutError", "RolloutManager", "RolloutSpec", "stage_sizes"]

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]
"""Publishes one retained QoS 1 message: ``publish(topic, payload)``."""

IN_FLIGHT = (
    "sent",
    "idle",
    "downloading",
    "verifying",
    "staged",
    "activating",
    "health_check",
    "rolling_back",
)
STAGE_DONE = ("committed", "stuck", "superseded", *FAILED_STATES)
LEASE = "rollouts"


class RolloutError(UserError):
    """A rollout cannot be created or changed as asked."""


class Cohort(BaseModel):
    """Which devices of the fleet a rollout targets: all filters apply together."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tags: dict[str, str] = Field(default_factory=dict, description="Every tag must match.")
    profile: str | None = Field(None, description="Only devices of this profile.")
    percentage: float = Field(100.0, gt=0, le=100, description="A stable random share of the matches.")
    devices: tuple[str, ...] = Field((), description="Only these devices (empty: no such filter).")


class RolloutSpec(BaseModel):
    """What to roll out where, in which stages, behind which gates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fleet: str = Field("default", description="Fleet id.")
    model_id: str
    bundle_version: str
    cohort: Cohort = Field(default_factory=Cohort)
    stages: tuple[float, ...] = Field(
        (1.0, 10.0, 50.0, 100.0), description="Cumulative percent of the cohort per stage (1 device minimum)."
    )
    gates: Gates = Field(default_factory=Gates)
    soak_s: float = Field(300.0, ge=0, description="Seconds a stage must stay healthy before the next.")
    stuck_timeout_s: float = Field(900.0, gt=0, description="No progress for this long: the device is stuck.")
    health_window_s: float = Field(60.0, gt=0, description="Seconds a device checks the new bundle.")

    @field_validator("stages")
    @classmethod
    def _increasing(cls, stages: tuple[float, ...]) -> tuple[float, ...]:
        if not stages or any(not 0 < p <= 100 for p in stages) or list(stages) != sorted(set(stages)):
            raise ValueError("stages must be increasing percentages in (0, 100]")
        return stages


def stage_sizes(n: int, stages: tuple[float, ...]) -> list[int]:
    """Cumulative member counts per stage: at least one device each, the last stage takes everyone.

    >>> stage_sizes(200, (1, 10, 50, 100))
    [2, 20, 100, 200]
    >>> stage_sizes(3, (1, 10, 50, 100))
    [1, 1, 2, 3]
    """
    sizes = [min(n, max(1, math.ceil(n * p / 100))) for p in stages]
    sizes[-1] = n
    return sizes


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class RolloutManager:
    """Creates rollouts and advances them; see the module docstring."""

    def __init__(
        self,
        store: Store,
        *,
        data_dir: Path,
        public_url: str,
        publish: Publish,
        holder: str | None = None,
        lease_ttl_s: float = 15.0,
    ) -> None:
        self.store = store
        self.data_dir = data_dir
        self.base_url = public_url.rstrip("/") + "/artifacts"
        self.publish = publish
        self.holder = holder or f"fleet-{uuid.uuid4().hex[:8]}"
        self.lease_ttl_s = lease_ttl_s

    # --- create and change ---------------------------------------------------------------------------

    def create(self, spec: RolloutSpec, *, now: float | None = None) -> dict[str, Any]:
        """Resolve the cohort now and record the rollout; devices hear of it at the next tick."""
        now = _now(now)
        if self.store.bundle(spec.model_id, spec.bundle_version) is None:
            raise RolloutError(
                f"bundle {spec.model_id} {spec.bundle_version} has not been uploaded",
                hint="upload it first: POST /api/bundles or `edgeprune fleet bundles upload`",
            )
        rid = "r" + uuid.uuid4().hex[:10]
        chosen = self._cohort(spec, rid)
        if not chosen:
            raise RolloutError(
                f"no device of fleet {spec.fleet!r} matches the cohort and still needs "
                f"{spec.model_id} {spec.bundle_version}",
                hint="check the cohort's tags, profile and device list: GET /api/devices",
            )
        sizes = stage_sizes(len(chosen), spec.stages)
        rows = []
        for i, dev in enumerate(chosen):
            rows.append(
                {
                    "rollout_id": rid,
                    "device_id": dev["device_id"],
                    "fleet": spec.fleet,
                    "stage": next(k for k, size in enumerate(sizes) if i < size),
                    "state": "pending",
                    "update_id": f"{rid}-{i:05d}",
                    "from_model_id": dev["model_id"],
                    "from_version": dev["bundle_version"],
                    "sent_at": None,
                    "updated_at": now,
                    "error": None,
                }
            )
        with self.store.write() as conn:
            conn.execute(
                insert(s.rollouts).values(
                    id=rid,
                    fleet=spec.fleet,
                    model_id=spec.model_id,
                    bundle_version=spec.bundle_version,
                    cohort=spec.cohort.model_dump(mode="json"),
                    stages=list(spec.stages),
                    gates=spec.gates.model_dump(mode="json"),
                    gate_status=[],
                    soak_s=spec.soak_s,
                    stuck_timeout_s=spec.stuck_timeout_s,
                    health_window_s=spec.health_window_s,
                    state="running",
                    stage=0,
                    stage_started_at=now,
                    stage_done_at=None,
                    reason=None,
                    created_at=now,
                    updated_at=now,
                )
            )
            conn.execute(insert(s.rollout_members), rows)
        log.info(
            "rollout %s: %s %s to %d devices in stages %s",
            rid,
            spec.model_id,
            spec.bundle_version,
            len(rows),
            sizes,
        )
        got = self.get(rid)
        assert got is not None
        return got

    def _cohort(self, spec: RolloutSpec, rid: str) -> list[dict[str, Any]]:
        c = spec.cohort
        picked = []
        for dev in self.store.devices(fleet=spec.fleet):
            if c.devices and dev["device_id"] not in c.devices:
                continue
            if c.profile is not None and dev["profile"] != c.profile:
                continue
            tags = dev["tags"] or {}
            if any(tags.get(k) != v for k, v in c.tags.items()):
                continue
            if (dev["model_id"], dev["bundle_version"]) == (spec.model_id, spec.bundle_version):
                continue
            picked.append(dev)
        picked.sort(key=lambda d: hashlib.sha256(f"{rid}:{d['device_id']}".encode()).hexdigest())
        keep = len(picked) if c.percentage >= 100 else max(1, math.ceil(len(picked) * c.percentage / 100))
        return picked[:keep] if picked else []

    def _set_state(
        self, rollout_id: str, allowed: tuple[str, ...], state: str, reason: str
    ) -> dict[str, Any]:
        now = time.time()
        with self.store.write() as conn:
            row = conn.execute(select(s.rollouts.c.state).where(s.rollouts.c.id == rollout_id)).first()
            if row is None:
                raise RolloutError(f"no rollout {rollout_id!r}")
            if row.state not in allowed:
                raise RolloutError(
                    f"rollout {rollout_id} is {row.state}; "
                    f"only a rollout that is {'/'.join(allowed)} can become {state}"
                )
            conn.execute(
                update(s.rollouts)
                .where(s.rollouts.c.id == rollout_id)
                .values(state=state, reason=reason or None, updated_at=now)
            )
            if state == "aborted":
                m = s.rollout_members.c
                conn.execute(
                    update(s.rollout_members)
                    .where(m.rollout_id == rollout_id, m.state == "pending")
                    .values(state="aborted", updated_at=now)
                )
        log.info("rollout %s %s by hand%s", rollout_id, state, f": {reason}" if reason else "")
        got = self.get(rollout_id)
        assert got is not None
        return got

    def pause(self, rollout_id: str, *, reason: str = "") -> dict[str, Any]:
        return self._set_state(rollout_id, ("running",), "paused", reason)

    def resume(self, rollout_id: str, *, reason: str = "") -> dict[str, Any]:
        return self._set_state(rollout_id, ("paused", "halted"), "running", reason)

    def abort(self, rollout_id: str, *, reason: str = "") -> dict[str, Any]:
        return self._set_state(rollout_id, ("running", "paused", "halted"), "aborted", reason)

    # --- read ----------------------------------------------------------------------------------------

    def set_config(self, device_id: str, config: DeviceConfig, *, fleet: str) -> dict[str, Any]:
        """Replace a device's desired configuration and publish its desired state (kept by every later
        rollout message; an update instruction in flight is re-sent with it). Returns the device."""
        with self.store.write() as conn:
            row = (
                conn.execute(
                    select(s.devices).where(s.devices.c.fleet == fleet, s.devices.c.device_id == device_id)
                )
                .mappings()
                .first()
            )
            if row is None:
                raise UserError(
                    f"no device {device_id!r} in fleet {fleet!r}", hint="see `edgeprune fleet devices`"
                )
            variants = row["variants"] or []
            if config.pinned_variant is not None and variants and config.pinned_variant not in variants:
                raise UserError(
                    f"device {device_id} serves {sorted(variants)}, not {config.pinned_variant!r}",
                    hint="pin one of the variants of the bundle it runs",
                )
            topic, payload = desired_message(conn, fleet, device_id, config=config)
        self.publish(topic, payload)
        found = self.store.device(device_id, fleet=fleet)
        assert found is not None
        return found

    def rollouts(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            rows = conn.execute(select(s.rollouts).order_by(s.rollouts.c.created_at.desc())).all()
            return [self._view(conn, dict(r._mapping), members=False) for r in rows]

    def get(self, rollout_id: str) -> dict[str, Any] | None:
        with self.store.read() as conn:
            row = conn.execute(select(s.rollouts).where(s.rollouts.c.id == rollout_id)).first()
            return self._view(conn, dict(row._mapping), members=True) if row else None

    def _view(self, conn: Connection, r: dict[str, Any], *, members: bool) -> dict[str, Any]:
        m = s.rollout_members.c
        rows = [
            dict(x._mapping) for x in conn.execute(select(s.rollout_members).where(m.rollout_id == r["id"]))
        ]
        progress = []
        for k, pct in enumerate(r["stages"]):
            in_stage = [x for x in rows if x["stage"] == k]
            counts: dict[str, int] = {}
            for x in in_stage:
                counts[x["state"]] = counts.get(x["state"], 0) + 1
            progress.append({"stage": k, "percent": pct, "devices": len(in_stage), "states": counts})
        r["progress"] = progress
        if members:
            r["members"] = sorted(rows, key=lambda x: (x["stage"], x["update_id"]))
        return r

    # --- advance -------------------------------------------------------------------------------------

    def tick(self, now: float | None = None) -> bool:
        """Advance every running rollout once; False when another process holds the lease."""
        now = _now(now)
        if not self.store.acquire_lease(LEASE, self.holder, ttl_s=self.lease_ttl_s, now=now):
            return False
        with self.store.read() as conn:
            ids = (
                conn.execute(
                    select(s.rollouts.c.id)
                    .where(s.rollouts.c.state == "running")
                    .order_by(s.rollouts.c.created_at)
                )
                .scalars()
                .all()
            )
        for rid in ids:
            self._prepare_updates(rid)
            outbox = self._advance(rid, now)
            for topic, payload in outbox:
                self.publish(topic, payload)
        return True

    def _prepare_updates(self, rid: str) -> None:
        """Make the delta artifacts (each version about to be updated -> target), outside a transaction."""
        r = self.get(rid)
        if r is None:
            return
        froms = {
            x["from_version"]
            for x in r["members"]
            if x["state"] == "pending" and x["stage"] <= r["stage"] and x["from_model_id"] == r["model_id"]
        }
        for version in sorted(v for v in froms if v):
            self._ensure_update(r["model_id"], version, r["bundle_version"])

    def _ensure_update(self, model_id: str, from_version: str, to_version: str) -> None:
        out = update_dir(self.data_dir, model_id, from_version, to_version)
        old, new = (bundle_dir(self.data_dir, model_id, v) for v in (from_version, to_version))
        if out.exists() or not old.is_dir() or not new.is_dir():
            return  # done already, or no old bundle here: the device fetches full files
        try:
            from agent.delta import make_update
        except ImportError:
            log.info("agent.delta is not available: devices fetch full files")
            return
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:6]}")
        try:
            make_update(old, new, tmp)
            if out.exists():  # another process made it meanwhile
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, out)
            log.info("made update %s %s -> %s", model_id, from_version, to_version)
        except Exception:  # a failed delta must not stop the rollout: full files still work
            log.exception(
                "making the update %s %s -> %s failed; devices fetch full files",
                model_id,
                from_version,
                to_version,
            )
            shutil.rmtree(tmp, ignore_errors=True)

    def _advance(self, rid: str, now: float) -> list[tuple[str, bytes]]:
        outbox: list[tuple[str, bytes]] = []
        with self.store.write() as conn:
            row = conn.execute(select(s.rollouts).where(s.rollouts.c.id == rid)).first()
            if row is None or row.state != "running":
                return []
            r = dict(row._mapping)
            mc = s.rollout_members.c
            members = [
                dict(x._mapping) for x in conn.execute(select(s.rollout_members).where(mc.rollout_id == rid))
            ]
            target = self._bundle_row(conn, r["model_id"], r["bundle_version"])
            stage = r["stage"]
            for m in members:
                if m["state"] in IN_FLIGHT and now - m["updated_at"] > r["stuck_timeout_s"]:
                    self._member(
                        conn, m, state="stuck", now=now, error=f"no progress for {r['stuck_timeout_s']:.0f}s"
                    )
                    log.warning("rollout %s: device %s is stuck", rid, m["device_id"])
            for m in members:
                if m["stage"] <= stage and m["state"] == "pending":
                    outbox.append(self._send(conn, m, target, update_id=m["update_id"], health=r, now=now))
                    self._member(conn, m, state="sent", now=now, sent_at=now)
                    self._supersede(conn, m, now)
            current = [m for m in members if m["stage"] <= stage]
            results = evaluate_gates(conn, _gates(r["gates"]), current)
            values: dict[str, Any] = {"gate_status": [g.as_dict() for g in results], "updated_at": now}
            failed = [g for g in results if not g.ok]
            if failed:
                reason = "; ".join(
                    f"gate {g.name}: {g.value:.3g} vs limit {g.limit} ({g.detail})" for g in failed
                )
                values.update(state="halted", reason=reason)
                log.warning("rollout %s halted: %s", rid, reason)
                outbox += self._roll_back(conn, r, current, now)
            elif all(m["state"] in STAGE_DONE for m in current):
                if r["stage_done_at"] is None:
                    values["stage_done_at"] = now
                if now - (r["stage_done_at"] or now) >= r["soak_s"]:
                    if stage + 1 < len(r["stages"]):
                        values.update(stage=stage + 1, stage_started_at=now, stage_done_at=None)
                        log.info("rollout %s: stage %d", rid, stage + 1)
                    else:
                        values.update(state="completed")
                        log.info("rollout %s completed", rid)
            conn.execute(update(s.rollouts).where(s.rollouts.c.id == rid).values(**values))
        return outbox

    def _bundle_row(self, conn: Connection, model_id: str, version: str) -> dict[str, Any] | None:
        b = s.bundles.c
        row = conn.execute(
            select(s.bundles).where(b.model_id == model_id, b.bundle_version == version)
        ).first()
        return dict(row._mapping) if row else None

    def _member(self, conn: Connection, m: dict[str, Any], *, state: str, now: float, **values: Any) -> None:
        mc = s.rollout_members.c
        conn.execute(
            update(s.rollout_members)
            .where(mc.rollout_id == m["rollout_id"], mc.device_id == m["device_id"])
            .values(state=state, updated_at=now, **values)
        )
        m.update(state=state, updated_at=now, **values)

    def _supersede(self, conn: Connection, m: dict[str, Any], now: float) -> None:
        """A newer rollout's instruction replaces an older one's: that device no longer counts there."""
        mc = s.rollout_members.c
        conn.execute(
            update(s.rollout_members)
            .where(
                mc.device_id == m["device_id"],
                mc.fleet == m["fleet"],
                mc.rollout_id != m["rollout_id"],
                mc.state.in_((*IN_FLIGHT, "pending", "stuck")),
            )
            .values(state="superseded", updated_at=now)
        )

    def _send(
        self,
        conn: Connection,
        m: dict[str, Any],
        bundle: dict[str, Any] | None,
        *,
        update_id: str,
        health: dict[str, Any],
        now: float,
    ) -> tuple[str, bytes]:
        instruction = None
        if bundle is not None:
            instruction = UpdateInstruction(
                update_id=update_id,
                target=BundleRef(model_id=bundle["model_id"], bundle_version=bundle["bundle_version"]),
                base_url=self.base_url,
                manifest_sha256=bundle["manifest_sha256"],
                health_window_s=float(health["health_window_s"]),
            )
        return desired_message(conn, m["fleet"], m["device_id"], update=instruction)

    def _roll_back(
        self, conn: Connection, r: dict[str, Any], current: list[dict[str, Any]], now: float
    ) -> list[tuple[str, bytes]]:
        outbox = []
        for m in current:
            if m["state"] not in (*IN_FLIGHT, "committed", "stuck"):
                continue
            previous = None
            if m["from_model_id"] and m["from_version"]:
                previous = self._bundle_row(conn, m["from_model_id"], m["from_version"])
            if previous is None:
                self._member(
                    conn,
                    m,
                    state="rollback_unavailable",
                    now=now,
                    error="the previous bundle is not stored here",
                )
                continue
            outbox.append(self._send(conn, m, previous, update_id=m["update_id"] + "-rb", health=r, now=now))
            self._member(conn, m, state="rollback_sent", now=now)
        return outbox


class DeviceConfig(BaseModel):
    """What the fleet sets on one device besides updates: the fields of :class:`DesiredState` that a
    person chooses. Sent in the device's retained desired state and kept there by every rollout."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pinned_variant: str | None = Field(default=None, description="Serve only this variant; null: the policy")
    policy_overrides: dict[str, Scalar] = Field(default={}, description="Policy settings (agent.policy)")
    metrics_period_s: float | None = Field(default=None, gt=0, description="Seconds between metrics")
    heartbeat_period_s: float | None = Field(default=None, gt=0, description="Seconds between heartbeats")

    @field_validator("policy_overrides")
    @classmethod
    def _known(cls, overrides: dict[str, Scalar]) -> dict[str, Scalar]:
        from agent.policy import PolicyConfig

        try:
            PolicyConfig().with_overrides(overrides)
        except ContractError as exc:
            raise ValueError(exc.message) from exc
        return overrides


_KEEP: Any = object()


def desired_message(
    conn: Connection,
    fleet: str,
    device_id: str,
    *,
    config: DeviceConfig = _KEEP,
    update: UpdateInstruction | None = _KEEP,
) -> tuple[str, bytes]:
    """Bump the device's desired revision, store what changed, and build its desired state from both
    halves: the configuration a person set and the last update instruction a rollout sent."""
    d = s.devices.c
    values: dict[str, Any] = {"desired_revision": d.desired_revision + 1}
    if config is not _KEEP:
        values["desired_config"] = config.model_dump(mode="json")
    if update is not _KEEP:
        values["desired_update"] = None if update is None else update.model_dump(mode="json")
    row = (
        conn.execute(
            sa_update(s.devices)
            .where(and_(d.fleet == fleet, d.device_id == device_id))
            .values(**values)
            .returning(d.desired_revision, d.desired_config, d.desired_update)
        )
        .mappings()
        .one()
    )
    revision = row["desired_revision"]
    desired = DesiredState(
        **envelope(device_id=device_id, seq=revision),
        revision=revision,
        **DeviceConfig.model_validate(row["desired_config"] or {}).model_dump(),
        update=None
        if row["desired_update"] is None
        else UpdateInstruction.model_validate(row["desired_update"]),
    )
    return device_topic(fleet, device_id, "desired"), desired.to_json().encode()


def _gates(data: dict[str, Any]) -> Gates:
    return Gates.model_validate(data)
