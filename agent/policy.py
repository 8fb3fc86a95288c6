"""The variant/budget policy: which variant of the bundle to run, and at which budget, right now.

The bundle's runnable variants form a *ladder* from the most expensive (most accurate) to the cheapest:
by MACs, except that a variant clearly slower on this runtime than a costlier one ranks above it.
Each decision turns the readings into a *pressure level*:

* every stressed sensor adds one level: battery below ``low_battery_pct`` and not charging, CPU load
  above ``cpu_busy_pct``, temperature above ``hot_temperature_c``;
* battery below ``critical_battery_pct`` (not charging) or temperature above ``critical_temperature_c``
  makes the level :data:`CRITICAL`, which selects the cheapest rung;
* an unknown reading (``None``) adds no pressure; charging removes the battery's.

Level ``n`` selects the rung ``n`` steps below the top rung (the most accurate variant that meets
``latency_goal_ms``, if one is set). A gated variant's budget falls from its default at level 0 (its
maximum while charging with no latency goal) towards its minimum at :data:`CRITICAL`.

Two rules keep the choice from flapping: *hysteresis* (a sensor becomes stressed when its value crosses
the threshold, and calm again only once it is past the threshold by ``hysteresis_pct`` points, or
``temperature_hysteresis_c`` degrees) and *minimum dwell* (no variant change within ``min_dwell_s`` of
the last one, unless the level is critical). ``pinned_variant`` overrides all of it.

Everything expensive happens in :class:`Policy`'s constructor; :meth:`Policy.decide` only compares
numbers and formats the reason (a few microseconds; ``bench/policy_decision.py`` measures it).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import model_validator

from agent.contract import BundleManifest, ContractError, ContractModel, Readings, Runtime, Scalar, Variant
from agent.contract._base import Identifier, described
from agent.contract.manifest import Finite

__all__ = ["CRITICAL", "Decision", "Policy", "PolicyConfig"]

CRITICAL = 4
"""The pressure level of a critical condition (battery or temperature); it selects the cheapest rung.

Levels below it count stressed sensors: 0 (none) to 3 (battery, CPU and temperature)."""

_CALM, _STRESSED, _CRIT = 0, 1, 2  # per-sensor states


class PolicyConfig(ContractModel):
    """The thresholds of the policy, as data: device defaults, overridden by the fleet.

    >>> PolicyConfig().low_battery_pct
    20.0
    >>> PolicyConfig().with_overrides({"low_battery_pct": 25}).low_battery_pct
    25.0
    """

    low_battery_pct: Finite = described(
        "Below this charge, not charging, the battery adds one pressure level.", default=20.0, ge=0, le=100
    )
    critical_battery_pct: Finite = described(
        "Below this charge, not charging, the level is critical: cheapest variant.",
        default=10.0,
        ge=0,
        le=100,
    )
    cpu_busy_pct: Finite = described(
        "Above this CPU load the CPU adds one pressure level.", default=85.0, ge=0, le=100
    )
    hot_temperature_c: Finite = described(
        "Above this temperature (Celsius) the heat adds one pressure level.", default=70.0
    )
    critical_temperature_c: Finite = described(
        "Above this temperature (Celsius) the level is critical: cheapest variant.", default=85.0
    )
    latency_goal_ms: Finite | None = described(
        "Serve only variants whose measured median latency for the runtime is at most this; null: no goal.",
        default=None,
        gt=0,
    )
    hysteresis_pct: Finite = described(
        "Battery and CPU go back across a threshold only once past it by this many points.",
        default=5.0,
        ge=0,
        le=100,
    )
    temperature_hysteresis_c: Finite = described(
        "Temperature goes back across a threshold only once past it by this many degrees.", default=3.0, ge=0
    )
    min_dwell_s: Finite = described(
        "No variant change within this many seconds of the last one, unless the level is critical.",
        default=30.0,
        ge=0,
    )
    pinned_variant: Identifier | None = described(
        "Always serve this variant (set by the fleet); null lets the policy choose.", default=None
    )

    @model_validator(mode="after")
    def _ordered(self) -> PolicyConfig:
        if self.critical_battery_pct > self.low_battery_pct:
            raise ValueError(
                f"critical_battery_pct ({self.critical_battery_pct}) must be <= "
                f"low_battery_pct ({self.low_battery_pct})"
            )
        if self.critical_temperature_c < self.hot_temperature_c:
            raise ValueError(
                f"critical_temperature_c ({self.critical_temperature_c}) must be >= "
                f"hot_temperature_c ({self.hot_temperature_c})"
            )
        return self

    def with_overrides(self, overrides: dict[str, Scalar]) -> PolicyConfig:
        """A copy with ``overrides`` applied and validated.

        Raises :class:`ContractError` on an unknown key or a bad value, leaving ``self`` as it was.

        >>> PolicyConfig().with_overrides({"min_dwell_s": 10, "pinned_variant": "static-50"}).min_dwell_s
        10.0
        """
        return PolicyConfig.from_obj({**self.model_dump(), **overrides})


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy chose, and why.

    ``budget`` is set only for a gated variant. ``at`` is the monotonic time given to
    :meth:`Policy.decide`; ``pressure`` the level (0..:data:`CRITICAL`); ``changed`` whether the variant
    differs from the previous decision's (true for the first).

    >>> Decision(variant="dense", budget=None, reason="no pressure: dense", at=0.0).variant
    'dense'
    """

    variant: str
    budget: float | None
    reason: str
    at: float
    pressure: int = 0
    changed: bool = False


@dataclass(frozen=True, slots=True)
class _Rung:
    name: str
    latency_ms: float | None
    budgets: tuple[float, ...] | None  # gated only: budget per pressure level 0..CRITICAL
    charging_budget: float | None  # gated only: budget at level 0 while charging


def _cost_macs(variant: Variant) -> int:
    """MACs at the operating point: for a gated variant, at its default budget when the curve has it."""
    if variant.budget is not None:
        for point in variant.budget_curve:
            if point.budget == variant.budget.default:
                return point.macs
    return variant.macs


CLEARLY_SLOWER = 1.25
"""A variant ranks above one with more MACs only if its median latency is this many times that one's,
and above that one's p90 too: closer latencies are within a shared machine's noise."""


def _clearly_slower(a: Variant, b: Variant, runtime: Runtime) -> bool:
    la, lb = a.latency.get(runtime), b.latency.get(runtime)
    if la is None or lb is None:
        return False
    return la.median_ms > CLEARLY_SLOWER * lb.median_ms and la.median_ms > lb.p90_ms


def _ladder_order(runnable: list[tuple[int, Variant]], runtime: Runtime) -> list[Variant]:
    """Most expensive first: by MACs (then accuracy, then manifest order), except that a variant whose
    measured latency on ``runtime`` is clearly above a costlier one's moves above it (a gated variant's
    dispatch overhead can make it slower than a static one with more MACs). Latencies within noise
    never reorder the ladder: on a small model 20 timed runs on a busy machine can rank them either way.
    """

    def by_macs(item: tuple[int, Variant]) -> tuple[int, float, int]:
        index, v = item
        return (-_cost_macs(v), -(v.accuracy if v.accuracy is not None else -1.0), index)

    order: list[Variant] = []
    for _, v in sorted(runnable, key=by_macs):  # insertion: move up past every rung it is clearly slower than
        at = len(order)
        while at > 0 and _clearly_slower(v, order[at - 1], runtime):
            at -= 1
        order.insert(at, v)
    return order


def _num(value: float) -> str:
    """A reading or threshold for a reason: ``18``, ``18.5``, ``72.3`` (one decimal at most)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def _budget_text(budget: float | None) -> str:
    return "" if budget is None else f" budget {budget:.2f}"


class Policy:
    """Chooses a variant (and a budget for a gated one) from sensor readings.

    Stateful: it remembers the variant in use, when it last changed, and each sensor's hysteresis state.
    Only variants with a file for ``runtime`` are considered; :class:`ContractError` if there is none,
    or if ``pinned_variant`` is not one of them.

    >>> from tests.samples import sample_manifest  # doctest: +SKIP
    >>> policy = Policy(sample_manifest(), PolicyConfig())  # doctest: +SKIP
    >>> policy.ladder  # doctest: +SKIP
    ('dense', 'gated', 'static-50')
    >>> policy.decide(Readings(battery_pct=8.0, charging=False), now=0.0).reason  # doctest: +SKIP
    'critical: battery 8% < 10% and not charging: static-50'
    """

    def __init__(self, manifest: BundleManifest, config: PolicyConfig, *, runtime: Runtime = "onnx") -> None:
        runnable = [(i, v) for i, v in enumerate(manifest.variants) if v.file_for(runtime) is not None]
        if not runnable:
            raise ContractError(
                f"bundle {manifest.model_id} {manifest.bundle_version} has no {runtime} variant",
                hint="serve it with a runtime its variants were exported for",
            )
        self.runtime: Runtime = runtime
        self._rungs = tuple(self._rung(v, runtime) for v in _ladder_order(runnable, runtime))
        self._accuracy = {v.name: v.accuracy for _, v in runnable}
        self._current: int | None = None
        self._last_change: float | None = None
        self._battery = self._cpu = self._temp = _CALM
        self._last_decision: Decision | None = None
        self.reconfigure(config)

    @staticmethod
    def _rung(variant: Variant, runtime: Runtime) -> _Rung:
        latency = variant.latency.get(runtime)
        budgets: tuple[float, ...] | None = None
        charging: float | None = None
        if variant.budget is not None:
            lo, default = variant.budget.minimum, variant.budget.default
            steps = [default - (default - lo) * level / CRITICAL for level in range(CRITICAL)]
            budgets = (*(min(max(b, lo), default) for b in steps), lo)
            charging = variant.budget.maximum
        return _Rung(variant.name, latency.median_ms if latency else None, budgets, charging)

    @property
    def ladder(self) -> tuple[str, ...]:
        """Names of the runnable variants, most expensive first."""
        return tuple(r.name for r in self._rungs)

    @property
    def config(self) -> PolicyConfig:
        """The configuration in force."""
        return self._config

    @property
    def last_decision(self) -> Decision | None:
        """The latest decision, or ``None`` before the first."""
        return self._last_decision

    def reconfigure(self, config: PolicyConfig) -> None:
        """Put ``config`` in force, keeping the current variant, its dwell clock and the hysteresis state.

        >>> policy.reconfigure(policy.config.with_overrides({"low_battery_pct": 25}))  # doctest: +SKIP
        """
        names = self.ladder
        if config.pinned_variant is not None and config.pinned_variant not in names:
            raise ContractError(
                f"pinned variant {config.pinned_variant!r} is not a {self.runtime} variant of this bundle",
                hint=f"pin one of {list(names)}",
            )
        self._config = config
        self._pinned = None if config.pinned_variant is None else names.index(config.pinned_variant)
        h, ht = config.hysteresis_pct, config.temperature_hysteresis_c
        self._low, self._low_up = config.low_battery_pct, config.low_battery_pct + h
        self._bcrit, self._bcrit_up = config.critical_battery_pct, config.critical_battery_pct + h
        self._busy, self._busy_down = config.cpu_busy_pct, config.cpu_busy_pct - h
        self._hot, self._hot_down = config.hot_temperature_c, config.hot_temperature_c - ht
        self._tcrit, self._tcrit_down = config.critical_temperature_c, config.critical_temperature_c - ht
        self._dwell = config.min_dwell_s
        self._top, self._goal_note = self._top_rung(config.latency_goal_ms)
        self._bottom = len(self._rungs) - 1

    def _top_rung(self, goal: float | None) -> tuple[int, str]:
        """The rung level 0 selects, and the note the reason carries about the latency goal."""
        if goal is None:
            return 0, ""
        measured = [(i, r) for i, r in enumerate(self._rungs) if r.latency_ms is not None]
        if not measured:
            return 0, f"; latency goal {_num(goal)} ms ignored: no {self.runtime} latency in the bundle"
        meeting = [(i, r) for i, r in measured if r.latency_ms is not None and r.latency_ms <= goal]
        if not meeting:
            i, fastest = min(measured, key=lambda item: (item[1].latency_ms, -item[0]))
            return i, f"; no variant meets latency goal {_num(goal)} ms, fastest is {fastest.name}"

        def accuracy(item: tuple[int, _Rung]) -> tuple[float, int]:
            acc = self._accuracy[item[1].name]
            return (acc if acc is not None else -1.0, -item[0])

        i, best = max(meeting, key=accuracy)
        note = (
            f"; latency goal {_num(goal)} ms"
            if i == 0
            else f"; latency goal {_num(goal)} ms: top {best.name}"
        )
        return i, note

    def decide(self, readings: Readings, now: float) -> Decision:
        """The variant and budget for ``readings`` at monotonic time ``now`` (seconds); updates the state.

        >>> policy.decide(Readings(battery_pct=80.0, cpu_load_pct=5.0), now=0.0).reason  # doctest: +SKIP
        'no pressure (battery 80%, cpu 5%, temperature unknown): dense'
        """
        charging = readings.charging
        battery_level, battery_text = self._battery_pressure(readings.battery_pct, charging)
        cpu_text = self._cpu_pressure(readings.cpu_load_pct)
        temp_level, temp_text = self._temp_pressure(readings.temperature_c)
        causes = [text for text in (battery_text, cpu_text, temp_text) if text]
        if _CRIT in (battery_level, temp_level):
            level, cause = CRITICAL, "critical: " + "; ".join(causes)
        elif causes:
            level, cause = len(causes), "; ".join(causes)
        else:
            level, cause = 0, self._calm_text(readings)
        if causes and readings.battery_pct is None and charging is not True:
            cause += "; battery unknown"

        previous, goal_note = self._current, self._goal_note
        if self._pinned is not None:
            target, goal_note = self._pinned, ""
            cause = f"pinned by fleet ({cause})" if causes else "pinned by fleet"
        elif level == CRITICAL:
            target = self._bottom
        else:
            target = min(self._top + level, self._bottom)
            since = now - self._last_change if self._last_change is not None else self._dwell
            if previous is not None and target != previous and since < self._dwell:
                cause = (
                    f"holding {self._rungs[previous].name} for min dwell ({_num(since)}s < "
                    f"{_num(self._dwell)}s), wanted {self._rungs[target].name}: {cause}"
                )
                target = previous

        rung = self._rungs[target]
        budget: float | None = None
        if rung.budgets is not None:
            budget = rung.budgets[level]
            if level == 0 and charging is True and self._config.latency_goal_ms is None:
                budget = rung.charging_budget
        changed = target != previous
        if changed:
            self._current, self._last_change = target, now
        decision = Decision(
            variant=rung.name,
            budget=budget,
            reason=f"{cause}: {rung.name}{_budget_text(budget)}{goal_note}",
            at=now,
            pressure=level,
            changed=changed,
        )
        self._last_decision = decision
        return decision

    def _battery_pressure(self, battery: float | None, charging: bool | None) -> tuple[int, str]:
        """Lower is worse: a state is entered below its threshold and left above threshold + h."""
        if battery is None:
            return _CALM, ""
        entered = _CRIT if battery < self._bcrit else _STRESSED if battery < self._low else _CALM
        held = _CRIT if battery <= self._bcrit_up else _STRESSED if battery <= self._low_up else _CALM
        self._battery = state = max(entered, min(self._battery, held))
        if state == _CALM or charging is True:
            return _CALM, ""
        limit = self._bcrit if state == _CRIT else self._low
        text = (
            f"battery {_num(battery)}% < {_num(limit)}%"
            if battery < limit
            else f"battery {_num(battery)}% not yet > {_num(limit + self._config.hysteresis_pct)}%"
        )
        return state, text + (" and not charging" if charging is False else " (charging unknown)")

    def _cpu_pressure(self, cpu: float | None) -> str:
        """Higher is worse; one state only (busy)."""
        if cpu is None:
            return ""
        if cpu > self._busy:
            self._cpu = _STRESSED
            return f"cpu {_num(cpu)}% > {_num(self._busy)}%"
        if self._cpu and cpu >= self._busy_down:
            return f"cpu {_num(cpu)}% not yet < {_num(self._busy_down)}%"
        self._cpu = _CALM
        return ""

    def _temp_pressure(self, temp: float | None) -> tuple[int, str]:
        """Higher is worse: a state is entered above its threshold and left below threshold - h."""
        if temp is None:
            return _CALM, ""
        entered = _CRIT if temp > self._tcrit else _STRESSED if temp > self._hot else _CALM
        held = _CRIT if temp >= self._tcrit_down else _STRESSED if temp >= self._hot_down else _CALM
        self._temp = state = max(entered, min(self._temp, held))
        if state == _CALM:
            return _CALM, ""
        limit = self._tcrit if state == _CRIT else self._hot
        if temp > limit:
            return state, f"temperature {_num(temp)}°C > {_num(limit)}°C"
        back = limit - self._config.temperature_hysteresis_c
        return state, f"temperature {_num(temp)}°C not yet < {_num(back)}°C"

    @staticmethod
    def _calm_text(readings: Readings) -> str:
        battery, charging = readings.battery_pct, readings.charging
        cpu, temp = readings.cpu_load_pct, readings.temperature_c
        if battery is None:
            power = "charging, battery unknown" if charging else "battery unknown"
        else:
            power = f"battery {_num(battery)}%" + (", charging" if charging else "")
        load = "cpu unknown" if cpu is None else f"cpu {_num(cpu)}%"
        heat = "temperature unknown" if temp is None else f"{_num(temp)}°C"
        return f"no pressure ({power}, {load}, {heat})"
