"""Sensor sources: SystemSensors on a fake sysfs tree (and psutil), StaticSensors, ScriptedSensors."""

from __future__ import annotations

from collections import namedtuple
from pathlib import Path

import psutil
import pytest

from agent.contract import Readings
from agent.sensors import ScriptedSensors, SensorSource, StaticSensors, SystemSensors

FakeBattery = namedtuple("FakeBattery", "percent secsleft power_plugged")


def supply(root: Path, name: str, **files: str | bytes) -> Path:
    """``class/power_supply/<name>`` with the given attribute files."""
    return write_dir(root / "class" / "power_supply" / name, files)


def zone(root: Path, name: str, temp: str | bytes) -> Path:
    return write_dir(root / "class" / "thermal" / name, {"temp": temp, "type": "x86_pkg_temp"})


def write_dir(directory: Path, files: dict[str, str | bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else f"{content}\n".encode()
        (directory / name).write_bytes(data)
    return directory


def sysfs_read(root: Path) -> Readings:
    return SystemSensors(sysfs_root=root, use_psutil=False).read()


def test_fake_tree_with_battery_mains_and_two_thermal_zones(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="57", status="Charging")
    supply(tmp_path, "AC", type="Mains", online="1")
    zone(tmp_path, "thermal_zone0", "45000")
    zone(tmp_path, "thermal_zone1", "61500")
    assert sysfs_read(tmp_path) == Readings(battery_pct=57.0, charging=True, temperature_c=61.5)


def test_mains_offline_and_discharging_battery_is_not_charging(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="31", status="Discharging")
    supply(tmp_path, "AC", type="Mains", online="0")
    readings = sysfs_read(tmp_path)
    assert (readings.battery_pct, readings.charging) == (31.0, False)


def test_any_online_external_supply_means_charging(tmp_path: Path) -> None:
    # A battery that claims to discharge, but USB power is online: external power is connected.
    supply(tmp_path, "BAT0", type="Battery", capacity="80", status="Discharging")
    supply(tmp_path, "AC", type="Mains", online="0")
    supply(tmp_path, "usb", type="USB", online="1")
    assert sysfs_read(tmp_path).charging is True


@pytest.mark.parametrize(
    ("status", "charging"),
    [("Charging", True), ("Full", True), ("Not charging", True), ("Discharging", False), ("Unknown", None)],
)
def test_battery_status_alone_decides_charging(tmp_path: Path, status: str, charging: bool | None) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="50", status=status)
    assert sysfs_read(tmp_path).charging is charging


def test_mains_only_desktop_has_no_battery_but_is_on_power(tmp_path: Path) -> None:
    supply(tmp_path, "AC", type="Mains", online="1")
    readings = sysfs_read(tmp_path)
    assert (readings.battery_pct, readings.charging) == (None, True)


def test_two_batteries_average_and_device_batteries_are_ignored(tmp_path: Path) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity="40", status="Discharging")
    supply(tmp_path, "BAT1", type="Battery", capacity="60", status="Discharging")
    supply(tmp_path, "hidpp_battery_0", type="Battery", scope="Device", capacity="5", status="Charging")
    readings = sysfs_read(tmp_path)
    assert (readings.battery_pct, readings.charging) == (50.0, False)


@pytest.mark.parametrize("prefix", ["energy", "charge"])
def test_capacity_from_now_and_full_when_capacity_is_missing(tmp_path: Path, prefix: str) -> None:
    supply(tmp_path, "BAT0", type="Battery", **{f"{prefix}_now": "25000", f"{prefix}_full": "100000"})
    assert sysfs_read(tmp_path).battery_pct == 25.0


def test_power_supply_entries_may_be_symlinks_as_in_real_sysfs(tmp_path: Path) -> None:
    real = write_dir(tmp_path / "devices" / "BAT0", {"type": "Battery", "capacity": "77"})
    (tmp_path / "class" / "power_supply").mkdir(parents=True)
    (tmp_path / "class" / "power_supply" / "BAT0").symlink_to(real)
    assert sysfs_read(tmp_path).battery_pct == 77.0


def test_missing_sysfs_gives_all_none_without_crash(tmp_path: Path) -> None:
    assert sysfs_read(tmp_path / "does-not-exist") == Readings()


def test_empty_sysfs_directories_give_all_none(tmp_path: Path) -> None:
    (tmp_path / "class" / "power_supply").mkdir(parents=True)
    (tmp_path / "class" / "thermal").mkdir(parents=True)
    assert sysfs_read(tmp_path) == Readings()


@pytest.mark.parametrize(
    "capacity",
    ["abc", "", "nan", "inf", "-5", "150", "57%", b"\xff\xfe\x00", b"5\x007"],
    ids=["text", "empty", "nan", "inf", "negative", "over-100", "unit", "binary", "nul"],
)
def test_garbage_battery_capacity_is_none(tmp_path: Path, capacity: str | bytes) -> None:
    supply(tmp_path, "BAT0", type="Battery", capacity=capacity, status="Discharging")
    readings = sysfs_read(tmp_path)
    assert readings.battery_pct is None
    assert readings.charging is False  # the rest of the supply is still read


@pytest.mark.parametrize(
    "temp",
    ["hot", "", "nan", "999999999", "-273150", b"\x80\x81"],
    ids=["text", "empty", "nan", "implausibly-hot", "absolute-zero-sentinel", "binary"],
)
def test_garbage_thermal_zone_is_skipped(tmp_path: Path, temp: str | bytes) -> None:
    zone(tmp_path, "thermal_zone0", temp)
    assert sysfs_read(tmp_path).temperature_c is None


def test_one_garbage_zone_does_not_hide_a_good_one(tmp_path: Path) -> None:
    zone(tmp_path, "thermal_zone0", "garbage")
    zone(tmp_path, "thermal_zone1", "52000")
    assert sysfs_read(tmp_path).temperature_c == 52.0


def test_unreadable_files_are_none(tmp_path: Path) -> None:
    bat = supply(tmp_path, "BAT0", type="Battery")
    (bat / "capacity").mkdir()  # reading a directory fails with an OSError, as a permission error would
    (bat / "status").mkdir()
    (tmp_path / "class" / "thermal" / "thermal_zone0" / "temp").mkdir(parents=True)
    assert sysfs_read(tmp_path) == Readings()


def test_supply_without_type_is_ignored(tmp_path: Path) -> None:
    supply(tmp_path, "mystery", capacity="10", online="1")
    assert sysfs_read(tmp_path) == Readings()


def test_psutil_gives_cpu_load_and_free_memory(tmp_path: Path) -> None:
    readings = SystemSensors(sysfs_root=tmp_path).read()
    assert readings.cpu_load_pct is not None and 0.0 <= readings.cpu_load_pct <= 100.0
    assert readings.free_memory_mb is not None and readings.free_memory_mb > 0


def test_psutil_battery_is_the_fallback_when_sysfs_has_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(42.0, 3600, True), raising=False)
    readings = SystemSensors(sysfs_root=tmp_path).read()
    assert (readings.battery_pct, readings.charging) == (42.0, True)


def test_sysfs_battery_wins_over_psutil(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(42.0, 3600, True), raising=False)
    supply(tmp_path, "BAT0", type="Battery", capacity="12", status="Discharging")
    readings = SystemSensors(sysfs_root=tmp_path).read()
    assert (readings.battery_pct, readings.charging) == (12.0, False)


def test_psutil_errors_become_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise RuntimeError("no /proc here")

    monkeypatch.setattr(psutil, "cpu_percent", boom)
    monkeypatch.setattr(psutil, "virtual_memory", boom)
    monkeypatch.setattr(psutil, "sensors_battery", boom, raising=False)
    assert SystemSensors(sysfs_root=tmp_path).read() == Readings()


def test_psutil_without_sensors_battery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(psutil, "sensors_battery", raising=False)
    assert SystemSensors(sysfs_root=tmp_path).read().battery_pct is None


def test_psutil_garbage_battery_percent_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psutil, "sensors_battery", lambda: FakeBattery(140.0, -1, None), raising=False)
    readings = SystemSensors(sysfs_root=tmp_path).read()
    assert (readings.battery_pct, readings.charging) == (None, None)


def test_static_sensors_return_their_readings_until_changed() -> None:
    sensors = StaticSensors(Readings(battery_pct=80.0))
    assert sensors.read() == sensors.read() == Readings(battery_pct=80.0)
    sensors.readings = Readings(battery_pct=10.0)
    assert sensors.read().battery_pct == 10.0
    assert StaticSensors().read() == Readings()


def test_scripted_sequence_plays_in_order_then_repeats_the_last() -> None:
    script = ScriptedSensors([Readings(battery_pct=p) for p in (50.0, 40.0, 30.0)])
    assert [script.read().battery_pct for _ in range(5)] == [50.0, 40.0, 30.0, 30.0, 30.0]
    assert script.exhausted and script.reads == 5


def test_scripted_sequence_can_cycle() -> None:
    script = ScriptedSensors([Readings(cpu_load_pct=c) for c in (10.0, 90.0)], cycle=True)
    assert [script.read().cpu_load_pct for _ in range(5)] == [10.0, 90.0, 10.0, 90.0, 10.0]
    assert not script.exhausted


def test_scripted_callable_is_asked_on_every_read() -> None:
    levels = iter([70.0, 69.0])
    script = ScriptedSensors(lambda: Readings(battery_pct=next(levels)))
    assert [script.read().battery_pct for _ in range(2)] == [70.0, 69.0]
    assert not script.exhausted


def test_scripted_sensors_need_at_least_one_step() -> None:
    with pytest.raises(ValueError, match="at least one"):
        ScriptedSensors([])


@pytest.mark.parametrize(
    "source",
    [
        StaticSensors(),
        ScriptedSensors([Readings()]),
        SystemSensors(sysfs_root=Path("/nonexistent"), use_psutil=False),
    ],
    ids=["static", "scripted", "system"],
)
def test_every_source_is_a_sensor_source(source: SensorSource) -> None:
    assert isinstance(source, SensorSource)
    assert isinstance(source.read(), Readings)
