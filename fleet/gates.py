"""Health gates of a rollout, evaluated from the update statuses and telemetry in the store.

A gate compares one number with a limit; a gate with no data yet passes (``value`` is ``None``) and a
gate whose limit is ``None`` is off. Latency and battery are judged per device against that device's own
data: the p90 latency after the update over its p90 before it; the battery drain while not charging.

>>> Gates(max_failure_rate=0.1).limits()["max_failure_rate"]
0.1
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import fmean
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Connection, select

from fleet.store import schema as s

__all__ = ["FAILED_STATES", "GateResult", "Gates", "evaluate_gates"]

FAILED_STATES = ("failed", "rolled_back")
"""Member states that count as a failed update."""

_BASELINE_ROWS = 20


class Gates(BaseModel):
    """Limits a rollout must stay within; ``None`` turns a gate off."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_failure_rate: float | None = Field(0.1, ge=0, le=1, description="Failed updates / updates sent.")
    max_error_rate: float | None = Field(
        0.05, ge=0, le=1, description="Inference errors / inferences after the update, all devices."
    )
    max_p90_ratio: float | None = Field(
        1.5, gt=0, description="Worst device's mean p90 latency after the update over its own before."
    )
    max_battery_drain_pct_per_h: float | None = Field(
        None, gt=0, description="Worst device's battery drain after the update while not charging, %/h."
    )
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="Mean agreement with dense after the update, all devices."
    )

    def limits(self) -> dict[str, float | None]:
        return self.model_dump()


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict."""

    name: str
    value: float | None
    limit: float | None
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "limit": self.limit,
            "ok": self.ok,
            "detail": self.detail,
        }


def _check(
    name: str, value: float | None, limit: float | None, *, upper: bool, detail: str = ""
) -> GateResult:
    if limit is None or value is None:
        return GateResult(name, value, limit, True, detail)
    ok = value <= limit if upper else value >= limit
    return GateResult(name, value, limit, ok, detail)


def evaluate_gates(conn: Connection, gates: Gates, members: Iterable[dict[str, Any]]) -> list[GateResult]:
    """Every gate over ``members`` (rollout member rows) that were sent the update."""
    sent = [m for m in members if m["sent_at"] is not None and m["state"] not in ("pending", "superseded")]
    failed = [m for m in sent if m["state"] in FAILED_STATES]
    failure_rate = len(failed) / len(sent) if sent else None
    results = [
        _check(
            "max_failure_rate",
            failure_rate,
            gates.max_failure_rate,
            upper=True,
            detail=f"{len(failed)} of {len(sent)} updates failed"
            + (f": {failed[0]['device_id']}" if failed else ""),
        )
    ]
    inferences = errors = 0
    worst_ratio: tuple[float, str] | None = None
    worst_drain: tuple[float, str] | None = None
    agreements: list[float] = []
    c = s.metrics.c
    for m in sent:
        if m["state"] != "committed":
            continue
        base = select(c.ts, c.inferences, c.errors, c.p90_ms, c.battery_pct, c.charging, c.agreement).where(
            c.fleet == m["fleet"], c.device_id == m["device_id"]
        )
        before = conn.execute(
            base.where(c.ts < m["sent_at"]).order_by(c.ts.desc()).limit(_BASELINE_ROWS)
        ).all()
        after = conn.execute(base.where(c.ts >= m["sent_at"]).order_by(c.ts)).all()
        inferences += sum(r.inferences + r.errors for r in after)
        errors += sum(r.errors for r in after)
        p90_before = [r.p90_ms for r in before if r.p90_ms]
        p90_after = [r.p90_ms for r in after if r.p90_ms is not None]
        if p90_before and p90_after:
            ratio = fmean(p90_after) / fmean(p90_before)
            if worst_ratio is None or ratio > worst_ratio[0]:
                worst_ratio = (ratio, m["device_id"])
        battery = [
            (r.ts, r.battery_pct) for r in after if r.battery_pct is not None and r.charging is not True
        ]
        if len(battery) >= 2 and battery[-1][0] > battery[0][0]:
            drain = (battery[0][1] - battery[-1][1]) / ((battery[-1][0] - battery[0][0]) / 3600)
            if worst_drain is None or drain > worst_drain[0]:
                worst_drain = (drain, m["device_id"])
        agreements += [r.agreement for r in after if r.agreement is not None]
    results.append(
        _check(
            "max_error_rate",
            errors / inferences if inferences else None,
            gates.max_error_rate,
            upper=True,
            detail=f"{errors} errors in {inferences} inferences",
        )
    )
    results.append(
        _check(
            "max_p90_ratio",
            worst_ratio[0] if worst_ratio else None,
            gates.max_p90_ratio,
            upper=True,
            detail=f"worst device {worst_ratio[1]}" if worst_ratio else "no baseline yet",
        )
    )
    results.append(
        _check(
            "max_battery_drain_pct_per_h",
            worst_drain[0] if worst_drain else None,
            gates.max_battery_drain_pct_per_h,
            upper=True,
            detail=f"worst device {worst_drain[1]}" if worst_drain else "",
        )
    )
    results.append(
        _check(
            "min_agreement",
            fmean(agreements) if agreements else None,
            gates.min_agreement,
            upper=False,
            detail=f"{len(agreements)} windows with shadow runs",
        )
    )
    return results
