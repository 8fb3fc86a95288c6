"""The variant/budget policy: ladder, pressure levels, hysteresis, dwell, latency goal, pinning, budget."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pytest

from agent.contract import BudgetInput, BundleManifest, ContractError, Latency, Readings, Variant
from agent.policy import CRITICAL, Decision, Policy, PolicyConfig
from tests.samples import sample_manifest

CALM = Readings(battery_pct=90.0, charging=False, cpu_load_pct=10.0, temperature_c=45.0)
NO_DWELL = PolicyConfig(min_dwell_s=0)


def calm(**changes: Any) -> Readings:
    return CALM.model_copy(update=changes)


def manifest_with(*variants: Variant) -> BundleManifest:
    return sample_manifest().model_copy(update={"variants": variants})


def variant(
    name: str,
    *,
    macs: int,
    accuracy: float | None,
    latency_ms: float | None = None,
    kind: str = "static",
    runtimes: tuple[str, ...] = ("onnx",),
    budget: BudgetInput | None = None,
) -> Variant:
    base = sample_manifest().variant("static-50")
    return Variant.model_validate(
        {
            "name": name,
            "kind": kind,
            "files": [
                f.model_copy(update={"path": f"{name}.{f.runtime}"})
                for f in base.files
                if f.runtime in runtimes
            ],
            "macs": macs,
            "params": 1000,
            "accuracy": accuracy,
            "latency": {}
            if latency_ms is None
            else {"onnx": Latency(median_ms=latency_ms, p90_ms=latency_ms * 1.2, threads=2, runs=100)},
            "budget": budget,
        }
    )


def gated_only() -> BundleManifest:
    return manifest_with(sample_manifest().variant("gated"))


# ---- ladder ---------------------------------------------------------------------------------------------


def test_ladder_of_the_sample_runs_from_dense_to_static() -> None:
    assert Policy(sample_manifest(), PolicyConfig()).ladder == ("dense", "gated", "static-50")


def test_ladder_ranks_by_macs_without_latency() -> None:
    m = manifest_with(
        variant("s75", macs=5, accuracy=0.80),
        variant("s25", macs=30, accuracy=0.92),
        variant("s50", macs=20, accuracy=0.90),
    )
    assert Policy(m, PolicyConfig()).ladder == ("s25", "s50", "s75")


def test_ladder_ranks_a_clearly_slower_variant_above_a_costlier_one() -> None:
    # s50 has fewer MACs than s25 but is clearly slower on this runtime: latency decides.
    m = manifest_with(
        variant("s25", macs=30, accuracy=0.92, latency_ms=1.0),
        variant("s50", macs=20, accuracy=0.90, latency_ms=2.0),
    )
    assert Policy(m, PolicyConfig()).ladder == ("s50", "s25")


@pytest.mark.parametrize("slower", [1.0, 1.1, 1.2, 1.24])
def test_latencies_within_noise_do_not_reorder_the_ladder(slower: float) -> None:
    # A tiny model timed 20 times on a busy machine: s50's median above s25's is noise, MACs decide.
    m = manifest_with(
        variant("dense", macs=40, accuracy=0.93, latency_ms=0.020),
        variant("s25", macs=30, accuracy=0.92, latency_ms=0.020),
        variant("s50", macs=20, accuracy=0.90, latency_ms=0.020 * slower),
    )
    assert Policy(m, PolicyConfig()).ladder == ("dense", "s25", "s50")


def test_a_clearly_slower_variant_moves_past_every_rung_it_is_slower_than() -> None:
    # A gated variant with few MACs but a large fixed dispatch cost: slower than s25 and s50, not dense.
    m = manifest_with(
        variant("dense", macs=40, accuracy=0.93, latency_ms=3.0),
        variant("s25", macs=30, accuracy=0.92, latency_ms=1.0),
        variant("s50", macs=20, accuracy=0.90, latency_ms=0.5),
        variant("gated", macs=10, accuracy=0.91, latency_ms=2.0),
    )
    assert Policy(m, PolicyConfig()).ladder == ("dense", "gated", "s25", "s50")


def test_ladder_breaks_cost_ties_by_accuracy() -> None:
    m = manifest_with(variant("b", macs=10, accuracy=0.8), variant("a", macs=10, accuracy=0.9))
    assert Policy(m, PolicyConfig()).ladder == ("a", "b")


def test_ladder_skips_variants_without_a_file_for_the_runtime() -> None:
    m = manifest_with(
        variant("both", macs=30, accuracy=0.9, runtimes=("onnx", "executorch")),
        variant("onnx-only", macs=10, accuracy=0.8),
    )
    assert Policy(m, PolicyConfig(), runtime="executorch").ladder == ("both",)


def test_no_variant_for_the_runtime_is_a_contract_error() -> None:
    m = manifest_with(variant("onnx-only", macs=10, accuracy=0.8))
    with pytest.raises(ContractError, match="no executorch variant"):
        Policy(m, PolicyConfig(), runtime="executorch")


def test_a_single_variant_is_served_even_when_critical() -> None:
    policy = Policy(manifest_with(variant("only", macs=10, accuracy=0.8)), PolicyConfig())
    assert policy.decide(calm(battery_pct=3.0), 0.0).variant == "only"


# ---- pressure --------------------------------------------------------------------------------------------


def test_calm_readings_serve_the_top_variant() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(CALM, 0.0)
    assert (d.variant, d.budget, d.pressure, d.at) == ("dense", None, 0, 0.0)
    assert d.reason == "no pressure (battery 90%, cpu 10%, 45°C): dense"


def test_unknown_readings_add_no_pressure_and_say_battery_unknown() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(Readings(), 0.0)
    assert (d.variant, d.pressure) == ("dense", 0)
    assert "battery unknown" in d.reason


def test_unknown_battery_is_mentioned_when_another_sensor_steps_down() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(Readings(cpu_load_pct=95.0), 0.0)
    assert d.variant == "gated"
    assert "battery unknown" in d.reason


def test_low_battery_steps_down_one_rung() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(battery_pct=18.0), 0.0)
    assert (d.variant, d.pressure) == ("gated", 1)
    assert d.reason.startswith("battery 18% < 20% and not charging: gated")


def test_low_battery_with_unknown_charging_still_steps_down() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(battery_pct=18.0, charging=None), 0.0)
    assert d.variant == "gated"
    assert "charging unknown" in d.reason


def test_critical_battery_selects_the_cheapest() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(battery_pct=8.0), 0.0)
    assert (d.variant, d.pressure) == ("static-50", CRITICAL)
    assert d.reason == "critical: battery 8% < 10% and not charging: static-50"


def test_charging_removes_battery_pressure() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(battery_pct=5.0, charging=True), 0.0)
    assert (d.variant, d.pressure) == ("dense", 0)
    assert "charging" in d.reason


@pytest.mark.parametrize(
    ("temperature", "variant", "pressure"),
    [(70.0, "dense", 0), (75.0, "gated", 1), (85.0, "gated", 1), (85.5, "static-50", CRITICAL)],
)
def test_hot_temperature(temperature: float, variant: str, pressure: int) -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(temperature_c=temperature), 0.0)
    assert (d.variant, d.pressure) == (variant, pressure)
    if pressure:
        assert "temperature" in d.reason


def test_temperature_hysteresis_is_in_degrees() -> None:
    policy = Policy(sample_manifest(), NO_DWELL)
    seen = [policy.decide(calm(temperature_c=t), i).variant for i, t in enumerate((72.0, 67.5, 66.9))]
    assert seen == ["gated", "gated", "dense"]


@pytest.mark.parametrize(("cpu", "variant"), [(85.0, "dense"), (85.1, "gated"), (100.0, "gated")])
def test_busy_cpu(cpu: float, variant: str) -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(cpu_load_pct=cpu), 0.0)
    assert d.variant == variant
    if variant == "gated":
        assert f"cpu {cpu:g}% > 85%" in d.reason


def test_pressures_add_up_one_rung_each() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(calm(cpu_load_pct=95.0, temperature_c=75.0), 0.0)
    assert (d.variant, d.pressure) == ("static-50", 2)
    assert "cpu 95% > 85%" in d.reason and "temperature 75°C > 70°C" in d.reason


def test_more_pressure_than_rungs_stays_on_the_cheapest() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(
        calm(battery_pct=15.0, cpu_load_pct=95.0, temperature_c=75.0), 0.0
    )
    assert (d.variant, d.pressure) == ("static-50", 3)


# ---- hysteresis ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sequence",
    [
        # down at the threshold (strictly below 20), back up only above 20 + 5
        [(50, "dense"), (20, "dense"), (19.9, "gated"), (22, "gated"), (25, "gated"), (25.1, "dense")],
        # flickering around the threshold does not flap
        [(21, "dense"), (19, "gated"), (21, "gated"), (19, "gated"), (24, "gated"), (26, "dense")],
        # critical: down below 10, out of critical above 15, out of low above 25
        [
            (50, "dense"),
            (9, "static-50"),
            (12, "static-50"),
            (15, "static-50"),
            (15.5, "gated"),
            (25.5, "dense"),
        ],
        # from critical straight back to calm
        [(9, "static-50"), (40, "dense"), (19, "gated")],
        # going up from low never enters critical
        [(12, "gated"), (11, "gated"), (14, "gated"), (9.9, "static-50")],
    ],
    ids=["low", "flicker", "critical", "critical-to-calm", "low-not-critical"],
)
def test_battery_steps_down_at_the_threshold_and_back_up_with_hysteresis(
    sequence: list[tuple[float, str]],
) -> None:
    policy = Policy(sample_manifest(), NO_DWELL)
    seen = [policy.decide(calm(battery_pct=float(b)), float(i)).variant for i, (b, _) in enumerate(sequence)]
    assert seen == [v for _, v in sequence]


def test_hysteresis_hold_is_explained() -> None:
    policy = Policy(sample_manifest(), NO_DWELL)
    policy.decide(calm(battery_pct=19.0), 0.0)
    d = policy.decide(calm(battery_pct=23.0), 1.0)
    assert d.variant == "gated"
    assert "battery 23% not yet > 25%" in d.reason


def test_cpu_hysteresis() -> None:
    policy = Policy(sample_manifest(), NO_DWELL)
    seen = [policy.decide(calm(cpu_load_pct=c), i).variant for i, c in enumerate((90.0, 81.0, 80.0, 79.9))]
    assert seen == ["gated", "gated", "gated", "dense"]


def test_zero_hysteresis_switches_back_at_the_threshold() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=0, hysteresis_pct=0))
    seen = [policy.decide(calm(battery_pct=b), i).variant for i, b in enumerate((19.0, 20.0, 20.1))]
    assert seen == ["gated", "gated", "dense"]


# ---- dwell -----------------------------------------------------------------------------------------------


def test_dwell_blocks_a_change_within_min_dwell() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    assert policy.decide(CALM, 0.0).variant == "dense"
    held = policy.decide(calm(cpu_load_pct=95.0), 10.0)
    assert (held.variant, held.changed) == ("dense", False)
    assert "min dwell" in held.reason and "wanted gated" in held.reason
    moved = policy.decide(calm(cpu_load_pct=95.0), 30.0)
    assert (moved.variant, moved.changed) == ("gated", True)


def test_dwell_stops_flapping_of_a_load_that_comes_and_goes() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30, hysteresis_pct=0))
    loads = itertools.cycle((95.0, 10.0))
    decisions = [policy.decide(calm(cpu_load_pct=next(loads)), t) for t in range(0, 120, 2)]
    changes = [d.at for d in decisions if d.changed]
    assert changes[0] == 0.0
    assert all(b - a >= 30 for a, b in itertools.pairwise(changes))
    assert len(changes) <= 5


def test_critical_overrides_dwell() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    policy.decide(CALM, 0.0)
    d = policy.decide(calm(battery_pct=5.0), 1.0)
    assert (d.variant, d.changed, d.pressure) == ("static-50", True, CRITICAL)


def test_leaving_critical_waits_for_dwell() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    policy.decide(calm(temperature_c=90.0), 0.0)
    assert policy.decide(CALM, 5.0).variant == "static-50"
    assert policy.decide(CALM, 30.0).variant == "dense"


def test_charging_returns_to_the_top_variant_after_dwell() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    assert policy.decide(calm(battery_pct=15.0), 0.0).variant == "gated"
    held = policy.decide(calm(battery_pct=15.0, charging=True), 10.0)
    assert held.variant == "gated" and "wanted dense" in held.reason
    back = policy.decide(calm(battery_pct=15.5, charging=True), 31.0)
    assert (back.variant, back.changed) == ("dense", True)


def test_budget_follows_pressure_even_while_dwell_holds_a_gated_variant() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    assert policy.decide(calm(battery_pct=15.0), 0.0).budget == 0.375
    d = policy.decide(calm(battery_pct=15.0, cpu_load_pct=95.0), 5.0)
    assert (d.variant, d.budget) == ("gated", 0.25)


# ---- latency goal ----------------------------------------------------------------------------------------


def timed_ladder() -> BundleManifest:
    return manifest_with(
        variant("dense", macs=40, accuracy=0.935, latency_ms=3.0, kind="dense"),
        variant("s25", macs=30, accuracy=0.93, latency_ms=2.0),
        variant("s50", macs=20, accuracy=0.925, latency_ms=1.0),
    )


@pytest.mark.parametrize(("goal", "variant"), [(5.0, "dense"), (3.0, "dense"), (2.5, "s25"), (1.0, "s50")])
def test_latency_goal_picks_the_most_accurate_variant_that_meets_it(goal: float, variant: str) -> None:
    d = Policy(timed_ladder(), PolicyConfig(latency_goal_ms=goal)).decide(CALM, 0.0)
    assert d.variant == variant
    assert "latency goal" in d.reason


def test_latency_goal_prefers_accuracy_over_cost() -> None:
    # 'slow-worse' costs more yet is less accurate: the goal still starts at the more accurate one.
    m = manifest_with(
        variant("slow-worse", macs=30, accuracy=0.88, latency_ms=1.2),
        variant("fast-better", macs=20, accuracy=0.92, latency_ms=1.0),
    )
    assert Policy(m, PolicyConfig(latency_goal_ms=1.5)).decide(CALM, 0.0).variant == "fast-better"


def test_pressure_steps_down_from_the_latency_goal() -> None:
    d = Policy(timed_ladder(), PolicyConfig(latency_goal_ms=2.5)).decide(calm(cpu_load_pct=95.0), 0.0)
    assert d.variant == "s50"


def test_no_variant_meets_the_latency_goal_serves_the_fastest() -> None:
    d = Policy(timed_ladder(), PolicyConfig(latency_goal_ms=0.5)).decide(CALM, 0.0)
    assert d.variant == "s50"
    assert "no variant meets latency goal 0.5 ms" in d.reason


def test_latency_goal_without_measured_latency_is_ignored() -> None:
    d = Policy(sample_manifest(), PolicyConfig(latency_goal_ms=1.0), runtime="executorch").decide(CALM, 0.0)
    assert d.variant == "dense"
    assert "ignored" in d.reason


# ---- pinning ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "readings", [CALM, calm(battery_pct=3.0), calm(cpu_load_pct=99.0, temperature_c=95.0), Readings()]
)
def test_pinned_variant_always_wins(readings: Readings) -> None:
    d = Policy(sample_manifest(), PolicyConfig(pinned_variant="static-50")).decide(readings, 0.0)
    assert d.variant == "static-50"
    assert d.reason.startswith("pinned by fleet")


def test_pinning_ignores_dwell() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    policy.decide(CALM, 0.0)
    policy.reconfigure(policy.config.with_overrides({"pinned_variant": "static-50"}))
    assert policy.decide(CALM, 1.0).variant == "static-50"


def test_pinned_variant_not_in_the_bundle_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="static-90"):
        Policy(sample_manifest(), PolicyConfig(pinned_variant="static-90"))


# ---- budget ----------------------------------------------------------------------------------------------

BUDGET_STEPS = [
    calm(charging=True),
    CALM,
    calm(battery_pct=15.0),
    calm(battery_pct=15.0, cpu_load_pct=95.0),
    calm(battery_pct=15.0, cpu_load_pct=95.0, temperature_c=75.0),
    calm(battery_pct=5.0),
]


def test_gated_budget_is_within_range_and_decreases_with_pressure() -> None:
    policy = Policy(gated_only(), NO_DWELL)
    budgets = [policy.decide(r, float(i)).budget for i, r in enumerate(BUDGET_STEPS)]
    assert budgets == [1.0, 0.5, 0.375, 0.25, 0.125, 0.0]


def test_gated_budget_stays_inside_an_offset_range() -> None:
    gated = sample_manifest().variant("gated")
    gated = gated.model_copy(update={"budget": BudgetInput(minimum=0.2, maximum=0.9, default=0.6)})
    policy = Policy(manifest_with(gated), NO_DWELL)
    budgets: list[float] = []
    for i, r in enumerate(BUDGET_STEPS):
        budget = policy.decide(r, float(i)).budget
        assert budget is not None
        budgets.append(budget)
    assert all(0.2 <= b <= 0.9 for b in budgets)
    assert budgets[0] == 0.9 and budgets[1] == 0.6 and budgets[-1] == 0.2
    assert budgets == sorted(budgets, reverse=True)


def test_default_budget_under_normal_conditions_and_in_the_reason() -> None:
    d = Policy(gated_only(), PolicyConfig()).decide(CALM, 0.0)
    assert d.budget == 0.5
    assert d.reason.endswith("gated budget 0.50")


def test_charging_with_a_latency_goal_keeps_the_default_budget() -> None:
    # The latency was measured at the default budget: a larger one might miss the goal.
    policy = Policy(gated_only(), PolicyConfig(latency_goal_ms=5.0))
    assert policy.decide(calm(charging=True), 0.0).budget == 0.5


@pytest.mark.parametrize("readings", BUDGET_STEPS)
def test_only_gated_variants_get_a_budget(readings: Readings) -> None:
    d = Policy(sample_manifest(), NO_DWELL).decide(readings, 0.0)
    assert (d.budget is not None) == (d.variant == "gated")


def test_pinned_gated_variant_still_adapts_its_budget() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(pinned_variant="gated"))
    assert policy.decide(CALM, 0.0).budget == 0.5
    assert policy.decide(calm(battery_pct=5.0), 1.0).budget == 0.0


# ---- configuration ---------------------------------------------------------------------------------------


def test_every_config_field_is_described() -> None:
    assert all(field.description for field in PolicyConfig.model_fields.values())


def test_overrides_apply_and_leave_the_original_alone() -> None:
    base = PolicyConfig()
    changed = base.with_overrides({"low_battery_pct": 25, "latency_goal_ms": 2.5, "pinned_variant": None})
    assert (changed.low_battery_pct, changed.latency_goal_ms) == (25.0, 2.5)
    assert base.low_battery_pct == 20.0


def test_override_with_unknown_key_is_a_contract_error() -> None:
    with pytest.raises(ContractError, match="low_batery_pct") as info:
        PolicyConfig().with_overrides({"low_batery_pct": 25})
    assert info.value.errors


@pytest.mark.parametrize(
    "overrides",
    [
        {"low_battery_pct": "lots"},
        {"low_battery_pct": 120},
        {"min_dwell_s": -1},
        {"latency_goal_ms": 0},
        {"critical_battery_pct": 30},  # above low_battery_pct
        {"critical_temperature_c": 60},  # below hot_temperature_c
        {"pinned_variant": "no spaces allowed"},
    ],
    ids=[
        "not-a-number",
        "over-100",
        "negative-dwell",
        "zero-goal",
        "critical-above-low",
        "critical-below-hot",
        "bad-name",
    ],
)
def test_override_with_a_bad_value_is_a_contract_error(overrides: dict[str, Any]) -> None:
    with pytest.raises(ContractError):
        PolicyConfig().with_overrides(overrides)


def test_config_is_frozen_and_forbids_extra_fields() -> None:
    with pytest.raises(ContractError):
        PolicyConfig.from_obj({"bogus": 1})
    with pytest.raises(ValueError, match="frozen"):
        PolicyConfig().low_battery_pct = 5.0  # type: ignore[misc]


def test_reconfigure_keeps_the_current_variant_and_its_dwell() -> None:
    policy = Policy(sample_manifest(), PolicyConfig(min_dwell_s=30))
    policy.decide(calm(battery_pct=23.0), 0.0)  # dense
    policy.reconfigure(policy.config.with_overrides({"low_battery_pct": 25}))
    held = policy.decide(calm(battery_pct=23.0), 10.0)
    assert held.variant == "dense" and "wanted gated" in held.reason
    assert policy.decide(calm(battery_pct=23.0), 30.0).variant == "gated"


# ---- decisions -------------------------------------------------------------------------------------------


def test_decision_is_frozen() -> None:
    d = Policy(sample_manifest(), PolicyConfig()).decide(CALM, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.variant = "static-50"  # type: ignore[misc]


def test_first_decision_is_a_change_and_the_next_calm_one_is_not() -> None:
    policy = Policy(sample_manifest(), PolicyConfig())
    assert policy.last_decision is None
    first, second = policy.decide(CALM, 0.0), policy.decide(CALM, 1.0)
    assert (first.changed, second.changed) == (True, False)
    assert policy.last_decision is second


SWEEP_VALUES = {
    "battery_pct": (None, 5.0, 15.0, 22.0, 80.0),
    "charging": (None, False, True),
    "cpu_load_pct": (None, 10.0, 95.0),
    "temperature_c": (None, 45.0, 75.0, 90.0),
}


@pytest.mark.parametrize("pinned", [None, "gated"])
@pytest.mark.parametrize("goal", [None, 1.0])
def test_every_decision_has_a_non_empty_reason_naming_its_variant(
    pinned: str | None, goal: float | None
) -> None:
    policy = Policy(
        sample_manifest(), PolicyConfig(pinned_variant=pinned, latency_goal_ms=goal, min_dwell_s=10)
    )
    combos = itertools.product(*SWEEP_VALUES.values())
    for t, values in enumerate(combos):
        d: Decision = policy.decide(Readings(**dict(zip(SWEEP_VALUES, values, strict=True))), t * 3.0)
        assert d.reason.strip(), d
        assert f": {d.variant}" in d.reason, d
        assert d.variant in policy.ladder
