"""Device profiles and simulated sensors: every profile validates, drains, heats and charges the right way."""

from __future__ import annotations

import pytest

from agent.contract import Readings
from agent.sensors import SensorSource
from devices.profiles import PROFILES, DeviceProfile, ProfileError, get_profile
from devices.sim import SimClock, SimSensors


def quiet(profile: DeviceProfile, *, start_hour: float = 3.0, **kw: object) -> SimSensors:
    """A device with a frozen clock and no CPU-load noise, so a test moves time by hand."""
    clock = SimClock(speedup=1.0, start_hour=start_hour, frozen=True)
    return SimSensors(profile, clock=clock, noise_pct=0.0, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_validates_and_round_trips(profile: str) -> None:
    p = get_profile(profile)
    assert p.name == profile
    assert DeviceProfile.model_validate_json(p.model_dump_json()) == p
    assert p.idle_w <= p.active_w <= p.busy_w


@pytest.mark.parametrize("profile", PROFILES)
def test_battery_drains_without_a_charger(profile: str) -> None:
    s = quiet(get_profile(profile), charging_enabled=False, battery_pct=80.0)
    assert isinstance(s, SensorSource)
    s.clock.advance(1800.0)
    reading = s.read()
    assert reading.charging is False
    assert reading.battery_pct is not None and reading.battery_pct < 80.0


@pytest.mark.parametrize("profile", PROFILES)
def test_inference_costs_energy_on_top_of_idle(profile: str) -> None:
    p = get_profile(profile)
    idle, busy = (quiet(p, charging_enabled=False, battery_pct=90.0) for _ in range(2))
    joules = busy.record_inference(5.0, weight=10_000)
    # 10,000 inferences measured at 5 ms here take 50 s / relative_speed (slowed by load) on the device
    assert joules >= (p.active_w - p.idle_w) * 50.0 / p.relative_speed
    for s in (idle, busy):
        s.clock.advance(600.0)
    assert busy.state().battery_pct < idle.state().battery_pct
    assert busy.state().inference_energy_j == pytest.approx(joules)
    assert busy.state().device_inferences == 10_000


@pytest.mark.parametrize("profile", PROFILES)
def test_charging_window_fills_the_battery(profile: str) -> None:
    p = get_profile(profile)
    start, _ = p.charge_windows[0]
    s = quiet(p, start_hour=start + 0.01, battery_pct=20.0)
    assert s.read().charging is True
    s.clock.advance(1200.0)
    reading = s.read()
    assert reading.battery_pct is not None and reading.battery_pct > 20.0


@pytest.mark.parametrize("profile", PROFILES)
def test_temperature_rises_with_power_and_cools_toward_ambient(profile: str) -> None:
    p = get_profile(profile)
    s = quiet(p, charging_enabled=False)
    s.record_inference(1000.0, weight=p.relative_speed * 3600)  # a busy hour's worth of inference
    s.clock.advance(3600.0)
    hot = s.state().temperature_c
    assert hot > p.ambient_c
    s.clock.advance(24 * 3600.0)
    cooled = s.state().temperature_c
    assert cooled < hot
    assert cooled >= p.ambient_c


def test_empty_battery_stays_empty_and_draws_nothing() -> None:
    s = quiet(get_profile("gateway"), charging_enabled=False, battery_pct=1.0)
    s.clock.advance(24 * 3600.0)
    assert s.empty and s.state().battery_pct == 0.0
    assert s.empty_at_s is not None and 0 < s.empty_at_s < 3600.0
    assert s.record_inference(10.0) == 0.0


def test_the_clock_runs_speedup_times_faster() -> None:
    clock = SimClock(speedup=1000.0, frozen=True)
    clock.advance(10.0)
    clock.start()
    assert clock.now() >= 10.0  # it runs on from where it stood


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ProfileError) as info:
        get_profile("toaster")
    assert info.value.hint is not None and all(name in info.value.hint for name in PROFILES)


@pytest.mark.parametrize(
    "update",
    [{"active_w": 0.1}, {"load_trace": "nope"}, {"charge_windows": ((5.0, 5.0),)}, {"cores": 0}],
    ids=["active-below-idle", "unknown-trace", "empty-window", "no-cores"],
)
def test_inconsistent_profiles_are_rejected(update: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DeviceProfile.model_validate({**get_profile("rpi4").model_dump(), **update})


def test_readings_are_valid_contract_readings() -> None:
    reading = quiet(get_profile("pixel")).read()
    assert Readings.model_validate(reading.model_dump()) == reading
    assert reading.free_memory_mb is None  # not simulated: unknown, never a guess


def test_cli_lists_and_shows_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    from edgeprune.cli import main

    assert main(["devices", "list"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in PROFILES)
    assert main(["devices", "show", "rpi4"]) == 0
    assert DeviceProfile.model_validate_json(capsys.readouterr().out) == get_profile("rpi4")
    assert main(["devices", "show", "toaster"]) == 1
    assert "known profiles" in capsys.readouterr().err
