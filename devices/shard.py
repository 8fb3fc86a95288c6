"""Part of a simulated fleet in one process: its agents, the inference workers and the sampler.

:class:`devices.simulator.Simulator` runs one shard in its own process for a small fleet, and one per
child process (:func:`shard_main`) for a large one.
"""

from __future__ import annotations

import heapq
import random
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.bundle import open_bundle
from agent.core import Agent, AgentConfig
from agent.data import ImageDataset
from agent.runtime import ModelServer, make_backend
from agent.signing import load_public_key
from devices.serving import ServerView
from devices.sim import SimClock, SimSensors
from devices.simtypes import DeviceSeries, SimConfig, SimulatorError, raise_fd_limit

__all__ = ["Shard", "Spec", "Tagged", "shard_main", "specs_of"]


Spec = tuple[int, str, float, float, int]  # index, profile, battery %, phase (h), seed


@dataclass
class _Device:
    agent: Agent
    sensors: SimSensors
    series: DeviceSeries
    order: np.ndarray
    cursor: int = 0


def specs_of(config: SimConfig) -> list[Spec]:
    """Every device's profile, starting charge, phase and seed: a function of the config's seed only."""
    rng = random.Random(config.seed)
    specs = []
    for i in range(config.devices):
        profile = config.profiles[i % len(config.profiles)]
        specs.append(
            (i, profile, rng.uniform(*config.battery_pct), rng.uniform(-2.0, 2.0), rng.getrandbits(32))
        )
    return specs


class Shard:
    """Some of the fleet's devices in this process: agents, inference workers and the sampler.

    The clock is frozen until :meth:`go`; devices report from simulated time 0 once it runs.
    """

    def __init__(self, config: SimConfig, specs: Sequence[Spec], data: ImageDataset, clock: SimClock) -> None:
        self.config = config
        self.data = data
        self.clock = clock
        self.devices: list[_Device] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        c = config
        key = load_public_key(c.public_key)
        manifest = open_bundle(c.bundle, public_key=key)
        self._shared = ModelServer(c.bundle, manifest, make_backend("onnx"))
        if c.pinned_variant is not None and c.pinned_variant not in self._shared.available:
            have = ", ".join(self._shared.available)
            raise SimulatorError(f"pinned variant {c.pinned_variant!r} is not in the bundle ({have})")
        self._policy = c.policy.with_overrides({"pinned_variant": c.pinned_variant})
        with ThreadPoolExecutor(max_workers=4) as pool:
            self.devices = list(pool.map(self._make, specs))

    def _make(self, spec: Spec) -> _Device:
        c = self.config
        i, profile, battery, phase, seed = spec
        device_id = f"{profile}-{i:04d}"
        sensors = SimSensors(
            profile,
            clock=self.clock,
            battery_pct=battery,
            phase_h=phase,
            charging_enabled=c.charging,
            seed=seed,
        )
        config = AgentConfig(
            bundle=c.bundle,
            public_key=c.public_key,
            broker_url=c.broker_url,
            device_id=device_id,
            state_dir=c.state_root / device_id,
            fleet=c.fleet,
            profile=profile,
            metrics_period_s=c.metrics_period_s,
            heartbeat_period_s=c.heartbeat_period_s,
            decide_period_s=c.decide_period_s,
            loop_period_s=c.loop_period_s,
            policy=self._policy,
            seed=seed,
        )
        agent = Agent(config, sensors=sensors, server=ServerView(self._shared))
        order = np.random.default_rng(seed).permutation(len(self.data.labels))
        return _Device(agent, sensors, DeviceSeries(device_id, profile), order)

    def start_agents(self) -> None:
        for device in self.devices:
            device.agent.start()

    def go(self, at: float | None = None) -> None:
        """Start the clock (at monotonic time ``at``), the inference workers and the sampler."""
        self.clock.start(at=at)
        self._sample()  # every series starts at simulated time 0
        c = self.config
        self._threads = [
            threading.Thread(target=self._worker, args=(k,), name=f"sim-worker-{k}", daemon=True)
            for k in range(max(1, c.workers))
        ]
        self._threads.append(threading.Thread(target=self._sampler, name="sim-sampler", daemon=True))
        for thread in self._threads:
            thread.start()

    def counters(self) -> tuple[int, float, bool]:
        """(real inferences so far, sum of battery %, every battery empty)."""
        states = [d.sensors.state() for d in self.devices]
        return (
            sum(d.series.inferences for d in self.devices),
            sum(s.battery_pct for s in states),
            all(s.empty for s in states),
        )

    def finish(self) -> tuple[list[DeviceSeries], list[str]]:
        """Stop the threads and the agents (cleanly, in parallel); the devices' series and the errors."""
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self._sample()

        def stop(device: _Device) -> None:
            try:
                device.agent.stop(flush_timeout_s=2.0)
            except Exception as exc:  # one device failing to stop must not keep the others running
                with self._lock:
                    self.errors.append(f"{device.series.device_id}: stop failed: {type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(max_workers=32) as pool:
            list(pool.map(stop, self.devices))
        for device in self.devices:
            state = device.sensors.state()
            s = device.series
            s.device_inferences = state.device_inferences
            s.total_energy_j = state.energy_j
            s.inference_energy_j = state.inference_energy_j
            empty = device.sensors.empty_at_s
            s.empty_at_h = None if empty is None else empty / 3600.0
        return [d.series for d in self.devices], list(self.errors)

    def _worker(self, k: int) -> None:
        """Runs the inferences of every ``workers``-th device, each at ``infer_hz`` real Hz."""
        c = self.config
        period = 1.0 / c.infer_hz
        mine = self.devices[k :: max(1, c.workers)]
        start = time.monotonic()
        # spread the first inferences over one period so the devices do not all fire together
        heap = [(start + period * j / max(1, len(mine)), j) for j in range(len(mine))]
        heapq.heapify(heap)
        while heap and not self.stopping.is_set():
            due, j = heap[0]
            delay = due - time.monotonic()
            if delay > 0:
                self.stopping.wait(min(delay, 0.1))
                continue
            heapq.heapreplace(heap, (max(due + period, time.monotonic() - period), j))
            self._infer_once(mine[j], c.weight)

    def _infer_once(self, device: _Device, weight: float) -> None:
        if device.sensors.empty:
            return  # switched off: an empty battery serves nothing
        index = int(device.order[device.cursor % len(device.order)])
        device.cursor += 1
        try:
            result = device.agent.infer(self.data.images[index])
        except Exception as exc:
            device.series.errors += 1
            with self._lock:
                if len(self.errors) < 100:
                    self.errors.append(f"{device.series.device_id}: {type(exc).__name__}: {exc}")
            return
        device.sensors.record_inference(result.latency_ms, weight=weight)
        s = device.series
        s.inferences += 1
        s.labelled += 1
        s.correct += int(result.label == int(self.data.labels[index]))

    def _sampler(self) -> None:
        while not self.stopping.wait(self.config.sample_period_s):
            self._sample()

    def _sample(self) -> None:
        for device in self.devices:
            state = device.sensors.state()
            s = device.series
            s.t_h.append(state.t_s / 3600.0)
            s.battery_pct.append(round(state.battery_pct, 3))
            s.charging.append(state.charging)
            s.cpu_load_pct.append(round(state.cpu_load_pct, 2))
            s.temperature_c.append(round(state.temperature_c, 2))
            s.variant.append(device.agent.server.active)
            s.energy_j.append(round(state.energy_j, 3))


def shard_main(  # noqa: PLR0917 -- the positional args of a multiprocessing target
    config: SimConfig,
    specs: list[Spec],
    data: ImageDataset,
    channel: Any,
    go: Any,
    go_at: Any,
    stop: Any,
    progress_period_s: float,
) -> None:
    """A shard in a process of its own: build, report ready, wait for go, run until stop, send results."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and tells us through ``stop``
    raise_fd_limit()
    try:
        shard = Shard(
            config, specs, data, SimClock(speedup=config.speedup, start_hour=config.start_hour, frozen=True)
        )
        shard.start_agents()
    except Exception as exc:
        channel.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    channel.put(("ready", len(specs)))
    while not go.wait(0.2):
        if stop.is_set():
            break
    if go.is_set():
        shard.go(at=go_at.value)
    while not stop.wait(progress_period_s):
        channel.put(("progress", shard.counters()))
    channel.put(("progress", shard.counters()))
    channel.put(("result", shard.finish()))


class Tagged:
    """A queue wrapper that tags every item with the shard number (picklable for ``spawn``)."""

    def __init__(self, channel: Any, tag: int) -> None:
        self.channel = channel
        self.tag = tag

    def put(self, item: object) -> None:
        self.channel.put((self.tag, item))
