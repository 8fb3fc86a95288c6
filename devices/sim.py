"""Simulated device physics behind :class:`agent.sensors.SensorSource`: battery, charging, load, heat.

* :class:`SimClock`: simulated seconds since the start of the run, ``speedup`` times real time, so a
  demo of minutes covers hours of battery life. ``start_hour`` is the simulated hour of day at 0.
* :class:`SimSensors`: one device of a :class:`~devices.profiles.DeviceProfile`. Its state advances
  lazily to the clock's "now" whenever it is read or charged with an inference:

  - power drawn between inferences: ``idle_w + load * (busy_w - idle_w)``, where ``load`` is the
    profile's CPU load trace of other apps (a daily shape, per-device phase and noise);
  - each inference (:meth:`SimSensors.record_inference`) costs ``(active_w - idle_w) * device latency``,
    the device latency being the latency *measured on this host* divided by the profile's
    ``relative_speed`` and slowed by the other apps' load (``1 + load``), times ``weight``: how many
    device inferences the one real inference stands for (see :mod:`devices.simulator`);
  - during the profile's charge windows (``(start hour, end hour)`` of the simulated day) the charger
    adds ``charge_w``; ``charging`` reads true while on external power;
  - temperature: first order, relaxing toward ``ambient + P * heating / cooling``, integrated exactly
    over each step so any speed-up is stable.

>>> clock = SimClock(speedup=3600.0)
>>> sensors = SimSensors(get_profile("pixel"), clock=clock, battery_pct=50.0)
>>> sensors.read().battery_pct <= 50.0
True
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass

from agent.contract import Readings
from devices.profiles import LOAD_TRACES, DeviceProfile, ProfileError, get_profile

__all__ = ["SimClock", "SimSensors", "SimState"]

_STEP_S = 60.0  # longest simulated step of the integration (seconds); load and charging change per step
_J_PER_WH = 3600.0


class SimClock:
    """Simulated time: ``speedup`` simulated seconds per real second, from a fixed real start.

    ``frozen=True`` stops the clock (tests advance it by hand with :meth:`advance`).

    >>> clock = SimClock(speedup=600.0, start_hour=8.0, frozen=True)
    >>> clock.advance(1800.0); clock.hour_of_day()
    8.5
    """

    def __init__(self, *, speedup: float = 600.0, start_hour: float = 8.0, frozen: bool = False) -> None:
        if not speedup > 0:
            raise ProfileError(f"speedup must be > 0, got {speedup}")
        self.speedup = speedup
        self.start_hour = start_hour
        self.frozen = frozen
        self._real0 = time.monotonic()
        self._offset = 0.0

    def now(self) -> float:
        """Simulated seconds since the start."""
        if self.frozen:
            return self._offset
        return (time.monotonic() - self._real0) * self.speedup + self._offset

    def start(self, *, at: float | None = None) -> None:
        """Unfreeze the clock: simulated time runs on from where it stands, ``speedup`` times real time,
        from monotonic time ``at`` (default: now; processes of one machine share the monotonic clock)."""
        self._offset = self.now()
        self._real0 = time.monotonic() if at is None else at
        self.frozen = False

    def advance(self, seconds: float) -> None:
        """Jump ``seconds`` of simulated time ahead (on top of the running clock, if it runs)."""
        self._offset += seconds

    def hour_of_day(self, at: float | None = None) -> float:
        """The simulated hour of day (0..24) at simulated time ``at`` (default: now)."""
        t = self.now() if at is None else at
        return (self.start_hour + t / 3600.0) % 24.0


def _in_windows(hour: float, windows: tuple[tuple[float, float], ...]) -> bool:
    return any(
        (start <= hour < end) if start < end else (hour >= start or hour < end) for start, end in windows
    )


def _trace_load(trace: tuple[tuple[float, float], ...], hour: float) -> float:
    """Load % of a daily trace at ``hour``: linear between points, wrapping at 24 h."""
    points = sorted(trace)
    prev_h, prev_v = points[-1][0] - 24.0, points[-1][1]
    for h, v in points:
        if hour < h:
            return prev_v + (v - prev_v) * (hour - prev_h) / (h - prev_h)
        prev_h, prev_v = h, v
    first_h, first_v = points[0][0] + 24.0, points[0][1]
    return prev_v + (first_v - prev_v) * (hour - prev_h) / (first_h - prev_h)


@dataclass(frozen=True, slots=True)
class SimState:
    """A snapshot of one simulated device (simulated time ``t_s`` seconds since the start)."""

    t_s: float
    battery_pct: float
    charging: bool
    cpu_load_pct: float
    temperature_c: float
    energy_j: float
    inference_energy_j: float
    device_inferences: float
    empty: bool


class SimSensors:
    """Simulated sensors of one device; see the module docstring. Thread-safe.

    ``phase_h`` shifts the device's load trace and charge windows (devices of a fleet do not all plug in
    at the same minute); ``noise_pct`` adds a per-step random CPU load (seeded by ``seed``).
    ``charging_enabled=False`` ignores the charge windows (a battery-life measurement).

    >>> s = SimSensors("rpi4", clock=SimClock(frozen=True), seed=1)
    >>> s.clock.advance(3600.0); s.read().battery_pct < 100.0
    True
    """

    def __init__(
        self,
        profile: DeviceProfile | str,
        *,
        clock: SimClock,
        battery_pct: float = 100.0,
        phase_h: float = 0.0,
        noise_pct: float = 5.0,
        charging_enabled: bool = True,
        seed: int = 0,
    ) -> None:
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        if not 0.0 <= battery_pct <= 100.0:
            raise ProfileError(f"battery_pct must be in [0, 100], got {battery_pct}")
        self.clock = clock
        self.phase_h = phase_h
        self.noise_pct = noise_pct
        self.charging_enabled = charging_enabled
        self._trace = LOAD_TRACES[self.profile.load_trace]
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._capacity_j = self.profile.battery_wh * _J_PER_WH
        self._charge_j = self._capacity_j * battery_pct / 100.0
        self._t = clock.now()
        self._temp = self.profile.ambient_c
        self._load = self._load_at(self._t)
        self._charging = self._charging_at(self._t)
        self._pending_j = 0.0  # inference energy not yet spread over a step
        self._energy_j = 0.0
        self._inference_j = 0.0
        self._device_inferences = 0.0
        self.empty_at_s: float | None = None  # simulated time the battery first ran out

    # ---- the model -----------------------------------------------------------------------------

    def _hour(self, t: float) -> float:
        return (self.clock.start_hour + self.phase_h + t / 3600.0) % 24.0

    def _load_at(self, t: float) -> float:
        base = _trace_load(self._trace, self._hour(t))
        noise = self._rng.gauss(0.0, self.noise_pct) if self.noise_pct else 0.0
        return min(max(base + noise, 0.0), 100.0)

    def _charging_at(self, t: float) -> bool:
        return self.charging_enabled and _in_windows(self._hour(t), self.profile.charge_windows)

    def _background_w(self) -> float:
        p = self.profile
        return p.idle_w + self._load / 100.0 * (p.busy_w - p.idle_w)

    def _advance(self, now: float) -> None:
        """Integrate from ``self._t`` to ``now`` in steps of at most ``_STEP_S``. Call with the lock."""
        p = self.profile
        while now > self._t:
            dt = min(_STEP_S, now - self._t)
            step_end = self._t + dt
            inference_j, self._pending_j = self._pending_j, 0.0
            drawn_j = 0.0 if self._charge_j <= 0.0 and not self._charging else self._background_w() * dt
            drawn_j += inference_j
            power = drawn_j / dt
            supplied_j = p.charge_w * dt if self._charging else 0.0
            self._energy_j += drawn_j
            self._charge_j = min(max(self._charge_j - drawn_j + supplied_j, 0.0), self._capacity_j)
            if self._charge_j <= 0.0 and self.empty_at_s is None:
                self.empty_at_s = step_end
            target = p.steady_temperature_c(power)
            self._temp = target + (self._temp - target) * math.exp(-p.cooling_per_s * dt)
            self._t = step_end
            self._load = self._load_at(self._t)
            self._charging = self._charging_at(self._t)

    # ---- the interface -------------------------------------------------------------------------

    def device_latency_ms(self, host_latency_ms: float) -> float:
        """How long an inference measured at ``host_latency_ms`` here takes on this device, now."""
        with self._lock:
            load = self._load
        return host_latency_ms / self.profile.relative_speed * (1.0 + load / 100.0)

    def record_inference(self, host_latency_ms: float, *, weight: float = 1.0) -> float:
        """Charge the battery with ``weight`` inferences of measured ``host_latency_ms``; the energy (J).

        Nothing is drawn once the battery is empty (the device is off); the caller should stop serving.
        """
        with self._lock:
            self._advance(self.clock.now())
            if self._charge_j <= 0.0 and not self._charging:
                return 0.0
            seconds = host_latency_ms / 1000.0 / self.profile.relative_speed * (1.0 + self._load / 100.0)
            joules = (self.profile.active_w - self.profile.idle_w) * seconds * weight
            self._pending_j += joules
            self._inference_j += joules
            self._device_inferences += weight
            return joules

    @property
    def empty(self) -> bool:
        """Whether the battery is empty now (and no charger is connected)."""
        with self._lock:
            self._advance(self.clock.now())
            return self._charge_j <= 0.0 and not self._charging

    def state(self) -> SimState:
        """The device's state now."""
        with self._lock:
            self._advance(self.clock.now())
            return SimState(
                t_s=self._t,
                battery_pct=100.0 * self._charge_j / self._capacity_j,
                charging=self._charging,
                cpu_load_pct=self._load,
                temperature_c=self._temp,
                energy_j=self._energy_j + self._pending_j,
                inference_energy_j=self._inference_j,
                device_inferences=self._device_inferences,
                empty=self._charge_j <= 0.0 and not self._charging,
            )

    def read(self) -> Readings:
        """:class:`agent.sensors.SensorSource`: battery, charging, CPU load and temperature now."""
        s = self.state()
        return Readings(
            battery_pct=round(s.battery_pct, 2),
            charging=s.charging,
            cpu_load_pct=round(s.cpu_load_pct, 1),
            temperature_c=round(s.temperature_c, 1),
        )

    def __repr__(self) -> str:
        return f"SimSensors({self.profile.name!r}, phase_h={self.phase_h})"
