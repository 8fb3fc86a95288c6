"""Where the agent's :class:`~agent.contract.Readings` come from: the real device, or a script.

* :class:`SystemSensors` reads psutil (CPU load, available memory, battery as a fallback) and Linux
  sysfs (``/sys/class/power_supply`` for battery and external power, ``/sys/class/thermal`` for the
  hottest thermal zone). Anything missing, unreadable or implausible becomes ``None`` ("unknown"),
  never an exception and never a guess.
* :class:`StaticSensors` and :class:`ScriptedSensors` are the injectable sources the simulator and the
  tests use.

Every source satisfies :class:`SensorSource`: one method, ``read() -> Readings``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import psutil

from agent.contract import Readings

__all__ = ["ScriptedSensors", "SensorSource", "StaticSensors", "SystemSensors"]

_MIB = 1 << 20
# Battery ``status`` values that mean external power is connected. "Not charging" is what most laptops
# report when plugged in but held below a charge threshold; "Full" is plugged in and topped up.
_ON_POWER_STATUS = frozenset({"Charging", "Full", "Not charging"})
_OFF_POWER_STATUS = frozenset({"Discharging"})
# Power-supply ``type`` values of external sources (Mains, USB and its variants, wireless chargers).
_EXTERNAL_TYPES = frozenset({"Mains", "Wireless", "BrickID"})
# Thermal zones outside this range (degrees Celsius) are broken sensors or "not available" sentinels.
_PLAUSIBLE_C = (-50.0, 200.0)


@runtime_checkable
class SensorSource(Protocol):
    """Anything that can produce one set of sensor readings.

    >>> isinstance(StaticSensors(Readings(battery_pct=50.0)), SensorSource)
    True
    """

    def read(self) -> Readings:
        """The current readings; fields the source cannot measure are ``None``."""
        ...


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeError, ValueError):
        return None


def _read_number(path: Path) -> float | None:
    text = _read_text(path)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _subdirs(directory: Path, pattern: str) -> list[Path]:
    try:
        return sorted(p for p in directory.glob(pattern) if p.is_dir())
    except OSError:
        return []


def _is_external(supply_type: str | None) -> bool:
    return supply_type is not None and (supply_type in _EXTERNAL_TYPES or supply_type.startswith("USB"))


def _battery_capacity(supply: Path) -> float | None:
    """Charge in percent from ``capacity``, else from ``energy_now/energy_full`` or ``charge_*``."""
    capacity = _read_number(supply / "capacity")
    if capacity is None:
        for now_name, full_name in (("energy_now", "energy_full"), ("charge_now", "charge_full")):
            now, full = _read_number(supply / now_name), _read_number(supply / full_name)
            if now is not None and full is not None and full > 0:
                capacity = 100.0 * now / full
                break
    if capacity is None or not 0.0 <= capacity <= 100.0:
        return None
    return capacity


class SystemSensors:
    """Readings of the machine the agent runs on, from psutil and Linux sysfs.

    ``sysfs_root`` is the directory that holds ``class/power_supply`` and ``class/thermal`` (``/sys`` on
    a real device, a fake tree in tests). ``use_psutil=False`` skips psutil, so CPU load and free memory
    are ``None`` and the battery comes from sysfs only.

    Battery: mean ``capacity`` of the supplies of type ``Battery`` (device batteries of mice and
    keyboards, ``scope`` = ``Device``, are skipped); psutil's ``sensors_battery()`` when sysfs has none.
    Charging: ``True`` if any external supply (Mains, USB, Wireless) is ``online`` or a battery's status
    is Charging, Full or Not charging; ``False`` if there is evidence of no external power; else ``None``.
    Temperature: the hottest ``thermal_zone*/temp`` (millidegrees Celsius).

    >>> SystemSensors(sysfs_root=Path("/nonexistent"), use_psutil=False).read().battery_pct is None
    True
    """

    def __init__(self, *, sysfs_root: Path = Path("/sys"), use_psutil: bool = True) -> None:
        self.sysfs_root = sysfs_root
        self.use_psutil = use_psutil
        if use_psutil:
            self._cpu_percent()  # the first non-blocking call only starts the measurement window

    def read(self) -> Readings:
        """Read every sensor now; never raises, unknown values are ``None``."""
        battery_pct, charging = self._power_supply()
        if battery_pct is None and self.use_psutil:
            battery_pct, psutil_charging = self._psutil_battery()
            if charging is None:
                charging = psutil_charging
        return Readings(
            battery_pct=battery_pct,
            charging=charging,
            cpu_load_pct=self._cpu_percent() if self.use_psutil else None,
            temperature_c=self._temperature(),
            free_memory_mb=self._free_memory_mb() if self.use_psutil else None,
        )

    def _power_supply(self) -> tuple[float | None, bool | None]:
        capacities: list[float] = []
        on_power: bool | None = None
        for supply in _subdirs(self.sysfs_root / "class" / "power_supply", "*"):
            supply_type = _read_text(supply / "type")
            if supply_type == "Battery":
                if _read_text(supply / "scope") == "Device":
                    continue
                capacity = _battery_capacity(supply)
                if capacity is not None:
                    capacities.append(capacity)
                status = _read_text(supply / "status")
                if status in _ON_POWER_STATUS:
                    on_power = True
                elif status in _OFF_POWER_STATUS and on_power is None:
                    on_power = False
            elif _is_external(supply_type):
                online = _read_number(supply / "online")
                if online is not None:
                    if online > 0:
                        on_power = True
                    elif on_power is None:
                        on_power = False
        battery_pct = sum(capacities) / len(capacities) if capacities else None
        return battery_pct, on_power

    def _temperature(self) -> float | None:
        hottest: float | None = None
        for zone in _subdirs(self.sysfs_root / "class" / "thermal", "thermal_zone*"):
            milli = _read_number(zone / "temp")
            if milli is None:
                continue
            celsius = milli / 1000.0
            if _PLAUSIBLE_C[0] < celsius < _PLAUSIBLE_C[1] and (hottest is None or celsius > hottest):
                hottest = celsius
        return hottest

    @staticmethod
    def _cpu_percent() -> float | None:
        try:
            value = float(psutil.cpu_percent(interval=None))
        except Exception:
            return None
        return min(max(value, 0.0), 100.0) if math.isfinite(value) else None

    @staticmethod
    def _free_memory_mb() -> float | None:
        try:
            available = float(psutil.virtual_memory().available)
        except Exception:
            return None
        return available / _MIB if math.isfinite(available) and available >= 0 else None

    @staticmethod
    def _psutil_battery() -> tuple[float | None, bool | None]:
        sensors_battery = getattr(psutil, "sensors_battery", None)
        if sensors_battery is None:
            return None, None
        try:
            battery = sensors_battery()
            if battery is None:
                return None, None
            percent = float(battery.percent)
            plugged = battery.power_plugged
        except Exception:
            return None, None
        pct = percent if math.isfinite(percent) and 0.0 <= percent <= 100.0 else None
        return pct, plugged if isinstance(plugged, bool) else None


class StaticSensors:
    """Always the same readings; assign :attr:`readings` to change them.

    >>> sensors = StaticSensors(Readings(battery_pct=80.0, charging=False))
    >>> sensors.read().battery_pct
    80.0
    """

    def __init__(self, readings: Readings | None = None) -> None:
        self.readings = readings if readings is not None else Readings()

    def read(self) -> Readings:
        """The current :attr:`readings`."""
        return self.readings


class ScriptedSensors:
    """Readings from a script: a sequence played in order, or a callable asked on every read.

    A sequence repeats its last entry once played through, or starts over with ``cycle=True``.
    :attr:`reads` counts the calls.

    >>> script = ScriptedSensors([Readings(battery_pct=50.0), Readings(battery_pct=49.0)])
    >>> [script.read().battery_pct for _ in range(3)]
    [50.0, 49.0, 49.0]
    """

    def __init__(self, script: Sequence[Readings] | Callable[[], Readings], *, cycle: bool = False) -> None:
        if callable(script):
            self._fn: Callable[[], Readings] | None = script
            self._steps: tuple[Readings, ...] = ()
        else:
            self._fn = None
            self._steps = tuple(script)
            if not self._steps:
                raise ValueError("ScriptedSensors needs at least one Readings")
        self.cycle = cycle
        self.reads = 0

    @property
    def exhausted(self) -> bool:
        """Whether a non-cycling sequence has been played through (a callable never is)."""
        return self._fn is None and not self.cycle and self.reads >= len(self._steps)

    def read(self) -> Readings:
        """The next readings of the script."""
        index = self.reads
        self.reads += 1
        if self._fn is not None:
            return self._fn()
        if self.cycle:
            return self._steps[index % len(self._steps)]
        return self._steps[min(index, len(self._steps) - 1)]
