"""Device profiles as data: how fast, how big a battery, how much power, how hot, when charging.

Every figure is an order of magnitude taken from public spec sheets and published measurements
(``docs/devices.md`` cites them); the simulator needs the right shape of the curves, not a lab model.

* ``relative_speed``: one core of the device against one core of the host the simulator runs on
  (0.25 = an inference takes 4x as long there as measured here).
* ``idle_w`` / ``active_w`` / ``busy_w``: the whole device at rest, with one core busy running
  inference, and with every core busy. Other apps' CPU load (``load_trace``) draws between idle and busy.
* Thermal: a first-order model, ``dT/dt = heating_c_per_ws * P - cooling_per_s * (T - ambient_c)``;
  the steady state at a constant power ``P`` is ``ambient_c + P * heating_c_per_ws / cooling_per_s``.
* ``charge_windows``: hours of the (simulated) day during which the device is on external power,
  e.g. ``((22.0, 7.0),)`` overnight; ``charge_w`` the power the charger delivers.

>>> get_profile("rpi4").cores
4
>>> sorted(PROFILES)
['gateway', 'jetson-nano', 'pixel', 'rpi4']
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import UserError

__all__ = ["LOAD_TRACES", "PROFILES", "DeviceProfile", "ProfileError", "get_profile"]


class ProfileError(UserError):
    """An unknown device profile, or a profile whose figures do not make sense."""


LOAD_TRACES: dict[str, tuple[tuple[float, float], ...]] = {
    # (hour of day, CPU load % from other apps); linear in between, wrapping at 24 h.
    "phone": ((0, 2), (7, 5), (8, 30), (9, 10), (12, 35), (13, 10), (18, 20), (20, 92), (21, 25), (23, 3)),
    "board": ((0, 10), (6, 15), (9, 40), (12, 35), (15, 90), (16, 40), (20, 20)),
    "robot": ((0, 5), (8, 30), (10, 75), (14, 95), (15, 50), (19, 20)),
    "gateway": ((0, 20), (6, 25), (12, 45), (18, 30)),
}
"""CPU load traces of other apps, by name; a profile names one. Invented but plausible daily shapes."""


class DeviceProfile(BaseModel):
    """One kind of device. Frozen; build new ones with ``model_copy(update=...)``.

    >>> get_profile("pixel").battery_wh
    16.8
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Registry name, e.g. 'rpi4'.")
    description: str = Field(description="What the profile stands for.")
    relative_speed: float = Field(gt=0, le=10, description="One core vs one host core (higher is faster).")
    cores: int = Field(ge=1, le=64, description="CPU cores.")
    battery_wh: float = Field(gt=0, description="Usable battery energy (Wh).")
    idle_w: float = Field(gt=0, description="Whole-device power at rest (W).")
    active_w: float = Field(gt=0, description="Whole-device power with one core busy on inference (W).")
    busy_w: float = Field(gt=0, description="Whole-device power with every core busy (W).")
    heating_c_per_ws: float = Field(ge=0, description="Temperature rise per joule dissipated (degC/J).")
    cooling_per_s: float = Field(gt=0, le=1, description="Fraction of the gap to ambient closed per second.")
    ambient_c: float = Field(ge=-40, le=60, description="Ambient temperature (degC).")
    charge_w: float = Field(ge=0, description="Charger power while on external power (W).")
    charge_windows: tuple[tuple[float, float], ...] = Field(
        default=(), description="(start hour, end hour) of each daily period on external power."
    )
    load_trace: str = Field(description="Name of the other-apps CPU load trace in LOAD_TRACES.")

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if not self.idle_w <= self.active_w <= self.busy_w:
            raise ValueError(
                f"need idle_w <= active_w <= busy_w, got {self.idle_w}, {self.active_w}, {self.busy_w}"
            )
        if self.load_trace not in LOAD_TRACES:
            raise ValueError(f"unknown load trace {self.load_trace!r}; known: {sorted(LOAD_TRACES)}")
        for start, end in self.charge_windows:
            if not (0 <= start < 24 and 0 <= end <= 24) or start == end:
                raise ValueError(f"charge window ({start}, {end}) must be two different hours in [0, 24]")
        return self

    def steady_temperature_c(self, power_w: float) -> float:
        """The temperature reached at a constant ``power_w``.

        >>> round(get_profile("rpi4").steady_temperature_c(6.4), 1)
        76.2
        """
        return self.ambient_c + power_w * self.heating_c_per_ws / self.cooling_per_s

    def battery_hours(self, power_w: float) -> float:
        """Hours a full battery lasts at a constant ``power_w``.

        >>> round(get_profile("pixel").battery_hours(1.0), 1)
        16.8
        """
        return self.battery_wh / power_w


_ALL = (
    DeviceProfile(
        name="pixel",
        description="Pixel-class phone: 8-core Arm SoC, 4,355 mAh at 3.85 V, 21 W wired charging",
        relative_speed=0.7,
        cores=8,
        battery_wh=16.8,
        idle_w=0.35,
        active_w=3.0,
        busy_w=6.0,
        heating_c_per_ws=0.2,
        cooling_per_s=0.025,
        ambient_c=25.0,
        charge_w=18.0,
        charge_windows=((23.0, 7.0),),
        load_trace="phone",
    ),
    DeviceProfile(
        name="rpi4",
        description="Raspberry-Pi-4-class board (4x Cortex-A72 1.5 GHz) on a 10,000 mAh USB power bank",
        relative_speed=0.25,
        cores=4,
        battery_wh=37.0,
        idle_w=2.7,
        active_w=4.0,
        busy_w=6.4,
        heating_c_per_ws=0.12,
        cooling_per_s=0.015,
        ambient_c=25.0,
        charge_w=12.0,
        charge_windows=((19.0, 21.0),),
        load_trace="board",
    ),
    DeviceProfile(
        name="jetson-nano",
        description="Jetson-Nano-class module (4x Cortex-A57 1.43 GHz, 5 W mode) on a 2S 50 Wh robot battery",
        relative_speed=0.2,
        cores=4,
        battery_wh=50.0,
        idle_w=1.5,
        active_w=3.0,
        busy_w=7.5,
        heating_c_per_ws=0.08,
        cooling_per_s=0.012,
        ambient_c=30.0,
        charge_w=25.0,
        charge_windows=((0.0, 3.0),),
        load_trace="robot",
    ),
    DeviceProfile(
        name="gateway",
        description="Low-end IoT gateway (2x Cortex-A7 1 GHz) 10 Wh backup battery, 5 W solar panel",
        relative_speed=0.06,
        cores=2,
        battery_wh=10.0,
        idle_w=0.8,
        active_w=1.6,
        busy_w=2.5,
        heating_c_per_ws=0.15,
        cooling_per_s=0.01,
        ambient_c=35.0,
        charge_w=5.0,
        charge_windows=((10.0, 16.0),),
        load_trace="gateway",
    ),
)

PROFILES: dict[str, DeviceProfile] = {p.name: p for p in _ALL}
"""Every known profile by name; tests parametrize over it, so a new entry is tested without new code."""


def get_profile(name: str) -> DeviceProfile:
    """The profile called ``name``; :class:`ProfileError` listing the known names otherwise.

    >>> get_profile("jetson-nano").relative_speed
    0.2
    """
    try:
        return PROFILES[name]
    except KeyError:
        raise ProfileError(
            f"unknown device profile {name!r}", hint=f"known profiles: {', '.join(sorted(PROFILES))}"
        ) from None
