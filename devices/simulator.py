"""The fleet simulator: N real agents in one process, on simulated sensors, against a real broker.

Every device is a real :class:`agent.core.Agent` (its own device id, state directory, on-disk outbox,
MQTT connection, policy and loop thread) whose sensors are a :class:`devices.sim.SimSensors` of its
profile. What is shared, to reach thousands of devices on a small machine: the loaded bundle (one
:class:`agent.runtime.ModelServer`, a :class:`devices.serving.ServerView` per device keeps each device's
own active variant), the input data, and a few worker threads that run the inferences of all devices.

Time. A :class:`devices.sim.SimClock` runs ``speedup`` times faster than real time. A device serves
``workload_hz`` inferences per *simulated* second, but only ``infer_hz`` per *real* second really run;
each real inference, with its measured latency, stands for ``weight = workload_hz * speedup / infer_hz``
device inferences in the energy accounting and is scored against its label for accuracy.

A fleet-side observer (one more MQTT client) counts what reaches the broker: births, online devices,
messages per second and every ``variant_switch`` event with its reason.

>>> sim = Simulator(SimConfig(bundle=Path("b"), public_key=Path("k.pub"),  # doctest: +SKIP
...                           broker_url="mqtt://127.0.0.1:1883", state_root=Path("state"), devices=20))
>>> result = sim.run(duration_s=30)  # doctest: +SKIP
>>> result.summary()["devices_born"]  # doctest: +SKIP
20
"""

import logging
import multiprocessing
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from agent.data import ImageDataset
from devices.observer import FleetObserver
from devices.profiles import PROFILES, get_profile
from devices.shard import Shard, Tagged, shard_main, specs_of
from devices.sim import SimClock
from devices.simtypes import (
    FDS_PER_DEVICE,
    DeviceSeries,
    SimConfig,
    SimResult,
    SimulatorError,
    Switch,
    load_inputs,
    raise_fd_limit,
)

__all__ = [
    "DeviceSeries",
    "SimConfig",
    "SimResult",
    "Simulator",
    "SimulatorError",
    "Switch",
    "load_inputs",
    "profile_mix",
    "raise_fd_limit",
]

log = logging.getLogger(__name__)


class Simulator:
    """Runs a simulated fleet; see the module docstring. One run per instance.

    Up to ``devices_per_process`` devices run in this process; a larger fleet is split over that many
    per child process (paho's network loop uses ``select()``, which cannot watch file descriptors past
    1024, so one process holds about 120 connected agents at most). ``data`` defaults to the
    Fashion-MNIST test split. ``progress`` is called about every ``progress_period_s`` real seconds
    with a one-line status.
    """

    def __init__(
        self,
        config: SimConfig,
        *,
        data: ImageDataset | None = None,
        progress: Callable[[str], None] | None = None,
        progress_period_s: float = 5.0,
        devices_per_process: int = 100,
    ) -> None:
        self.config = config
        self.data = data if data is not None else load_inputs("fashion-mnist")
        if len(self.data.labels) == 0:
            raise SimulatorError("the input data set is empty")
        if devices_per_process < 1:
            raise SimulatorError(f"devices_per_process must be >= 1, got {devices_per_process}")
        self.progress = progress
        self.progress_period_s = progress_period_s
        self.devices_per_process = devices_per_process
        self.clock = SimClock(speedup=config.speedup, start_hour=config.start_hour, frozen=True)
        self._stop = threading.Event()
        self._observer: FleetObserver | None = None
        self._local: Shard | None = None
        self._children: list[Any] = []
        self._channel: Any = None
        self._mp_stop: Any = None
        self._counters: dict[int, tuple[int, float, bool]] = {}
        self._child_results: dict[int, tuple[list[DeviceSeries], list[str]]] = {}
        self._child_errors: list[str] = []
        self.startup_s = 0.0
        self._messages_at_start = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask a running :meth:`run` to finish (safe from a signal handler or another thread)."""
        self._stop.set()

    def run(self, *, duration_s: float | None = None, sim_hours: float | None = None) -> SimResult:
        """Start the fleet, run until ``duration_s`` real seconds or ``sim_hours`` simulated hours pass
        (or :meth:`stop`, SIGINT, SIGTERM, or every battery empty with ``stop_when_empty``), stop
        everything cleanly and return the result.
        """
        if duration_s is None and sim_hours is None and not self.config.stop_when_empty:
            raise SimulatorError(
                "give duration_s or sim_hours (or stop_when_empty)", hint="e.g. duration_s=60"
            )
        c = self.config
        per_process = c.devices if c.devices <= self.devices_per_process else self.devices_per_process
        if per_process * FDS_PER_DEVICE + 64 > raise_fd_limit():
            raise SimulatorError(
                f"{per_process} devices in one process need about {per_process * FDS_PER_DEVICE} open files",
                hint="raise the hard limit (ulimit -Hn) or lower devices_per_process",
            )
        restore = self._install_signal_handlers()
        try:
            started = time.monotonic()
            self._observer = FleetObserver(c.broker_url, c.fleet, self.clock)
            try:
                self._start()
                self.startup_s = time.monotonic() - started
                with self._observer.lock:
                    self._messages_at_start = self._observer.messages
                t0 = time.monotonic()
                try:
                    self._wait(t0, duration_s, sim_hours)
                finally:
                    wall = time.monotonic() - t0
                    series, errors = self._finish()
                time.sleep(0.2)  # the last offline statuses reach the observer
                self._observer.drain()
            finally:
                self._observer.close()
            return self._result(series, errors, wall)
        finally:
            restore()

    def _install_signal_handlers(self) -> Callable[[], None]:
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def handler(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping the simulation", signum)
            self._stop.set()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, old in previous.items():
                signal.signal(sig, old)

        return restore

    def _start(self) -> None:
        c = self.config
        specs = specs_of(c)
        if c.devices <= self.devices_per_process:
            self._local = Shard(c, specs, self.data, self.clock)
            self._local.start_agents()
            self._wait_for_births()
            self._local.go()
            return
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that runs threads
        self._channel = ctx.Queue()
        go, self._mp_stop, go_at = ctx.Event(), ctx.Event(), ctx.Value("d", 0.0)
        chunks = [
            specs[i : i + self.devices_per_process] for i in range(0, len(specs), self.devices_per_process)
        ]
        for k, chunk in enumerate(chunks):
            proc = ctx.Process(
                target=shard_main,
                args=(c, chunk, self.data, Tagged(self._channel, k), go, go_at, self._mp_stop, 1.0),
                name=f"sim-shard-{k}",
                daemon=True,
            )
            proc.start()
            self._children.append(proc)
        ready = 0
        deadline = time.monotonic() + c.online_timeout_s
        while ready < len(chunks) and not self._stop.is_set():
            if time.monotonic() > deadline:
                raise SimulatorError(f"only {ready} of {len(chunks)} simulator processes started in time")
            try:
                k, (kind, payload) = self._channel.get(timeout=0.5)
            except queue.Empty:
                continue
            if kind == "error":
                raise SimulatorError(f"simulator process {k} failed: {payload}")
            if kind == "ready":
                ready += 1
                if self.progress:
                    self.progress(f"process {ready}/{len(chunks)} ready ({payload} agents)")
        self._wait_for_births()
        go_at.value = time.monotonic()
        self.clock.start(at=go_at.value)
        go.set()

    def _wait_for_births(self) -> None:
        """Wait (up to ``online_timeout_s``) until the observer has every device's birth."""
        assert self._observer is not None
        n = self.config.devices
        deadline = time.monotonic() + self.config.online_timeout_s
        next_progress = time.monotonic() + self.progress_period_s
        while not self._stop.wait(0.1):
            with self._observer.lock:
                born = len(self._observer.born)
            if born >= n:
                return
            now = time.monotonic()
            if now >= deadline:
                log.warning(
                    "only %d of %d devices were born within %.0f s", born, n, self.config.online_timeout_s
                )
                return
            if self.progress and now >= next_progress:
                self.progress(f"waiting for births: {born}/{n}")
                next_progress = now + self.progress_period_s

    def _poll_children(self) -> None:
        while self._channel is not None:
            try:
                k, (kind, payload) = self._channel.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                self._counters[k] = payload
            elif kind == "result":
                self._child_results[k] = payload
            elif kind == "error":
                self._child_errors.append(f"process {k}: {payload}")

    def _fleet_counters(self) -> tuple[int, float, bool]:
        if self._local is not None:
            return self._local.counters()
        self._poll_children()
        values = list(self._counters.values())
        return (
            sum(v[0] for v in values),
            sum(v[1] for v in values),
            len(values) == len(self._children) and all(v[2] for v in values),
        )

    def _wait(self, t0: float, duration_s: float | None, sim_hours: float | None) -> None:
        next_progress = t0 + self.progress_period_s
        while not self._stop.wait(0.2):
            now = time.monotonic()
            if duration_s is not None and now - t0 >= duration_s:
                return
            if sim_hours is not None and self.clock.now() >= sim_hours * 3600.0:
                return
            if self.config.stop_when_empty and self._fleet_counters()[2]:
                return
            if self.progress and now >= next_progress:
                self.progress(self._progress_line(now - t0))
                next_progress = now + self.progress_period_s

    def _progress_line(self, elapsed: float) -> str:
        assert self._observer is not None
        with self._observer.lock:
            born, online, messages = (
                len(self._observer.born),
                len(self._observer.online),
                self._observer.messages,
            )
        inferences, battery_sum, _ = self._fleet_counters()
        n = self.config.devices
        return (
            f"[{elapsed:6.1f}s, sim {self.clock.now() / 3600.0:5.1f} h] {online}/{n} online "
            f"({born} born), {inferences} inferences, mean battery {battery_sum / self.config.devices:.0f}%, "
            f"{(messages - self._messages_at_start) / max(elapsed, 1e-9):.0f} msg/s"
        )

    def _finish(self) -> tuple[list[DeviceSeries], list[str]]:
        if self._local is not None:
            return self._local.finish()
        assert self._mp_stop is not None
        self._mp_stop.set()
        deadline = time.monotonic() + 120.0
        while len(self._child_results) < len(self._children) and time.monotonic() < deadline:
            self._poll_children()
            if any(not p.is_alive() for k, p in enumerate(self._children) if k not in self._child_results):
                self._poll_children()
                break
            time.sleep(0.1)
        for proc in self._children:
            proc.join(timeout=10)
        series: list[DeviceSeries] = []
        errors = list(self._child_errors)
        for k in range(len(self._children)):
            if k not in self._child_results:
                errors.append(f"simulator process {k} returned no result")
                continue
            part, part_errors = self._child_results[k]
            series += part
            errors += part_errors
        return series, errors

    # ---- the result ----------------------------------------------------------------------------

    def _result(self, series: list[DeviceSeries], errors: list[str], wall: float) -> SimResult:
        assert self._observer is not None
        obs = self._observer
        with obs.lock:
            for s in series:
                s.switches = list(obs.switches.get(s.device_id, []))
            born, online, messages = len(obs.born), obs.peak_online, obs.messages
        return SimResult(
            fleet=self.config.fleet,
            devices=series,
            wall_s=wall,
            sim_hours=self.clock.now() / 3600.0,
            weight=self.config.weight,
            births=born,
            online=online,
            messages=messages,
            startup_s=self.startup_s,
            messages_at_start=self._messages_at_start,
            errors=errors,
        )


def profile_mix(names: Sequence[str] | None) -> tuple[str, ...]:
    """The profile names to mix: all of them by default; each name is checked.

    >>> profile_mix(["rpi4", "pixel"])
    ('rpi4', 'pixel')
    """
    if not names:
        return tuple(PROFILES)
    return tuple(get_profile(n).name for n in names)
