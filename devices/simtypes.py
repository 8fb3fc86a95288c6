"""The simulator's data: its configuration, what a run returns, and the helpers every process uses.

>>> SimConfig(bundle=Path("b"), public_key=Path("k"), broker_url="mqtt://h", state_root=Path("s")).weight
6000.0
"""

from __future__ import annotations

import json
import resource
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.data import ImageDataset, load_fashion_mnist, make_fixture
from agent.errors import UserError
from agent.inputs import NpzSource
from agent.policy import PolicyConfig
from devices.profiles import PROFILES, get_profile

__all__ = [
    "DeviceSeries",
    "SimConfig",
    "SimResult",
    "SimulatorError",
    "Switch",
    "load_inputs",
    "raise_fd_limit",
]

FDS_PER_DEVICE = 8  # socket, paho's wake-up socket pair, the outbox database with its WAL and shm files


class SimulatorError(UserError):
    """The simulation cannot run as configured (fd limit, no inputs, bad options)."""


@dataclass(frozen=True)
class SimConfig:
    """One simulated fleet. ``profiles`` are mixed round-robin over the devices."""

    bundle: Path
    public_key: Path
    broker_url: str
    state_root: Path
    devices: int = 5
    profiles: tuple[str, ...] = tuple(PROFILES)
    fleet: str = "sim"
    speedup: float = 600.0
    start_hour: float = 8.0
    infer_hz: float = 1.0
    workload_hz: float = 10.0
    battery_pct: tuple[float, float] = (40.0, 100.0)
    charging: bool = True
    policy: PolicyConfig = field(default_factory=lambda: PolicyConfig(min_dwell_s=2.0))
    pinned_variant: str | None = None
    metrics_period_s: float = 10.0
    heartbeat_period_s: float = 30.0
    decide_period_s: float = 1.0
    loop_period_s: float = 0.25
    sample_period_s: float = 1.0
    workers: int = 2
    seed: int = 0
    stop_when_empty: bool = False
    online_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise SimulatorError(f"devices must be >= 1, got {self.devices}")
        if not self.profiles:
            raise SimulatorError("profiles must name at least one profile")
        for name in self.profiles:
            get_profile(name)  # raises with the known names
        if not (self.infer_hz > 0 and self.workload_hz > 0 and self.speedup > 0):
            raise SimulatorError("infer_hz, workload_hz and speedup must be > 0")
        lo, hi = self.battery_pct
        if not 0 <= lo <= hi <= 100:
            raise SimulatorError(f"battery_pct range {self.battery_pct} must satisfy 0 <= low <= high <= 100")

    @property
    def weight(self) -> float:
        """Device inferences one real inference stands for."""
        return self.workload_hz * self.speedup / self.infer_hz


@dataclass(frozen=True)
class Switch:
    """A ``variant_switch`` event as the observer received it (``t_h``: simulated hours since start)."""

    t_h: float
    from_variant: str
    to_variant: str
    reason: str
    battery_pct: float | None


@dataclass
class DeviceSeries:
    """One device's run: sampled time series (simulated hours) and totals."""

    device_id: str
    profile: str
    t_h: list[float] = field(default_factory=list)
    battery_pct: list[float] = field(default_factory=list)
    charging: list[bool] = field(default_factory=list)
    cpu_load_pct: list[float] = field(default_factory=list)
    temperature_c: list[float] = field(default_factory=list)
    variant: list[str] = field(default_factory=list)
    energy_j: list[float] = field(default_factory=list)
    switches: list[Switch] = field(default_factory=list)
    inferences: int = 0
    correct: int = 0
    labelled: int = 0
    errors: int = 0
    device_inferences: float = 0.0
    total_energy_j: float = 0.0
    inference_energy_j: float = 0.0
    empty_at_h: float | None = None

    @property
    def accuracy(self) -> float | None:
        """Served predictions that matched their label, or ``None`` without labelled inputs."""
        return self.correct / self.labelled if self.labelled else None


@dataclass
class SimResult:
    """What a run produced. :meth:`summary` for the headline numbers, :meth:`to_json` for everything."""

    fleet: str
    devices: list[DeviceSeries]
    wall_s: float
    sim_hours: float
    weight: float
    births: int
    online: int  # the most devices online at once, as the observer saw their status messages
    messages: int
    startup_s: float
    messages_at_start: int = 0  # received before the simulated clock started (births, first statuses)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Fleet totals: inferences, accuracy, energy per 1,000 inferences, battery life, switches."""
        inferences = sum(d.inferences for d in self.devices)
        labelled = sum(d.labelled for d in self.devices)
        device_inf = sum(d.device_inferences for d in self.devices)
        inf_j = sum(d.inference_energy_j for d in self.devices)
        emptied = [d.empty_at_h for d in self.devices if d.empty_at_h is not None]
        return {
            "devices": len(self.devices),
            "devices_born": self.births,
            "devices_online": self.online,
            "wall_s": round(self.wall_s, 2),
            "startup_s": round(self.startup_s, 2),
            "sim_hours": round(self.sim_hours, 3),
            "real_inferences": inferences,
            "device_inferences": round(device_inf),
            "accuracy": sum(d.correct for d in self.devices) / labelled if labelled else None,
            "inference_j_per_1000": 1000.0 * inf_j / device_inf if device_inf else None,
            "total_energy_j": sum(d.total_energy_j for d in self.devices),
            "mean_battery_pct": float(np.mean([d.battery_pct[-1] for d in self.devices if d.battery_pct]))
            if any(d.battery_pct for d in self.devices)
            else None,
            "devices_emptied": len(emptied),
            "mean_hours_to_empty": float(np.mean(emptied)) if emptied else None,
            "switches": sum(len(d.switches) for d in self.devices),
            "messages": self.messages,
            "messages_per_s": (self.messages - self.messages_at_start) / self.wall_s
            if self.wall_s > 0
            else 0.0,
            "errors": len(self.errors) + sum(d.errors for d in self.devices),
        }

    def to_json(self) -> str:
        """Everything, as JSON (time series included)."""
        return json.dumps({"summary": self.summary(), **asdict(self)}, default=str)


def raise_fd_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to the hard limit; return the new soft limit.

    >>> raise_fd_limit() >= 1024  # doctest: +SKIP
    True
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft


def load_inputs(spec: str) -> ImageDataset:
    """Inputs with labels: ``fashion-mnist`` (the test split), ``fixture`` (the in-code data set's last
    100 images, the test split of ``tests/conftest.py``'s ``npz_data``) or an ``.npz`` file's test arrays.

    >>> load_inputs("fixture").images.shape
    (100, 28, 28)
    """
    if spec == "fashion-mnist":
        return load_fashion_mnist("test")
    if spec == "fixture":
        data = make_fixture(n=600, seed=0)
        return ImageDataset(images=data.images[500:], labels=data.labels[500:], class_names=data.class_names)
    if spec.endswith(".npz"):
        source = NpzSource(Path(spec))
        if source.labels is None:
            raise SimulatorError(f"{spec} has no labels; the simulator scores served predictions")
        names = tuple(str(i) for i in range(int(source.labels.max()) + 1))
        return ImageDataset(images=source.images, labels=source.labels.astype(np.int64), class_names=names)
    raise SimulatorError(
        f"unknown input data {spec!r}", hint="use 'fashion-mnist', 'fixture' or a path to an .npz data set"
    )
