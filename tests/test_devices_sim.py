"""The fleet simulator against a real Mosquitto, with real agents serving the session's tiny bundle."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.contract import Event, Message, Status, Variant, parse_message, subscription
from agent.core import Agent, AgentConfig
from agent.data import ImageDataset, make_fixture
from agent.policy import PolicyConfig
from agent.signing import load_private_key, sign_manifest
from devices.plots import plots_available, write_plots
from devices.profiles import PROFILES, get_profile
from devices.serving import ServerView
from devices.sim import SimClock, SimSensors
from devices.simulator import SimConfig, Simulator, SimulatorError
from fleet.broker import MosquittoBroker
from tests.helpers import Inbox

pytestmark = [pytest.mark.broker, pytest.mark.export]


@pytest.fixture(scope="module")
def bundle(compiled, signing_keys, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The tiny bundle with a realistic ladder (dense most accurate and slowest), re-signed: its measured
    accuracies and latencies are noise, and the policy orders its ladder by them (see tests/test_agent.py)."""
    out = tmp_path_factory.mktemp("devices-bundle") / "b"
    shutil.copytree(compiled.out, out)
    manifest = compiled.manifest
    dense_macs = max(v.macs for v in manifest.variants)

    def realistic(v: Variant) -> Variant:
        latency = {
            runtime: lat.model_copy(
                update={"median_ms": v.macs / dense_macs, "p90_ms": 1.2 * v.macs / dense_macs}
            )
            for runtime, lat in v.latency.items()
        }
        return v.model_copy(update={"accuracy": 0.95 if v.kind == "dense" else 0.90, "latency": latency})

    signed = sign_manifest(
        manifest.model_copy(
            update={"variants": tuple(realistic(v) for v in manifest.variants), "signature": None}
        ),
        load_private_key(signing_keys.private),
    )
    (out / "manifest.json").write_text(signed.model_dump_json(indent=1))
    return out


@pytest.fixture(scope="module")
def data() -> ImageDataset:
    fixture = make_fixture(n=600, seed=0)
    return ImageDataset(
        images=fixture.images[500:], labels=fixture.labels[500:], class_names=fixture.class_names
    )


class Watcher:
    """Every message on a fleet's topics, parsed."""

    def __init__(self, broker: MosquittoBroker, fleet: str) -> None:
        self.inbox = Inbox(broker, subscription(fleet=fleet), client_id=f"watch-{fleet}")
        self.messages: list[Message] = []

    def wait(self, predicate: Callable[[Message], bool], timeout: float = 30.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while not self.inbox.messages.empty():
                _, payload, _ = self.inbox.messages.get_nowait()
                if payload:
                    self.messages.append(parse_message(payload))
            for m in self.messages:
                if predicate(m):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no matching message in {timeout}s; got {[m.kind for m in self.messages]}")

    def close(self) -> None:
        self.inbox.close()


def sim_config(
    bundle: Path, keys, broker: MosquittoBroker, tmp_path: Path, fleet: str, **kw: object
) -> SimConfig:  # type: ignore[no-untyped-def]
    base: dict[str, object] = dict(
        bundle=bundle,
        public_key=keys.public,
        broker_url=broker.url,
        state_root=tmp_path / "state",
        fleet=fleet,
        speedup=3600.0,
        infer_hz=5.0,
        metrics_period_s=1.0,
        heartbeat_period_s=1.0,
        decide_period_s=0.2,
        loop_period_s=0.05,
        sample_period_s=0.2,
        policy=PolicyConfig(min_dwell_s=0.0),
    )
    base.update(kw)
    return SimConfig(**base)  # type: ignore[arg-type]


def test_server_views_keep_their_own_variant(bundle, signing_keys) -> None:  # type: ignore[no-untyped-def]
    from agent.bundle import open_bundle
    from agent.runtime import ModelServer, make_backend
    from agent.signing import load_public_key

    shared = ModelServer(
        bundle, open_bundle(bundle, public_key=load_public_key(signing_keys.public)), make_backend("onnx")
    )
    a, b = ServerView(shared), ServerView(shared)
    a.switch("static-50")
    image = np.zeros((28, 28), np.uint8)
    assert (a.infer(image).variant, b.infer(image).variant) == ("static-50", "dense")
    assert shared.active == "dense" and a.available == shared.available


def test_small_fleet_comes_online_and_reports(bundle, signing_keys, broker, tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    fleet = "t-sim-small"
    watcher = Watcher(broker, fleet)
    lines: list[str] = []
    sim = Simulator(
        sim_config(bundle, signing_keys, broker, tmp_path, fleet, devices=5),
        data=data,
        progress=lines.append,
        progress_period_s=1.0,
    )
    result = sim.run(duration_s=4.0)
    try:
        ids = {d.device_id for d in result.devices}
        assert len(ids) == 5 and {d.profile for d in result.devices} == set(PROFILES)
        for device_id in ids:  # every device's birth reached the broker
            watcher.wait(lambda m, i=device_id: m.kind == "birth" and m.device_id == i)  # type: ignore[misc]
        summary = result.summary()
        assert summary["devices_born"] == 5 and summary["devices_online"] == 5
        assert summary["errors"] == 0 and summary["real_inferences"] > 0
        assert summary["messages"] > 0 and summary["accuracy"] is not None
        assert result.sim_hours > 1.0  # 4 s at 3600x
        for d in result.devices:
            assert len(d.t_h) == len(d.battery_pct) == len(d.variant) >= 2
            assert d.t_h == sorted(d.t_h)
        assert lines and "online" in lines[-1]
        if plots_available():
            paths = write_plots(result, tmp_path / "plots")
            assert paths and all(p.stat().st_size > 1000 for p in paths)
    finally:
        watcher.close()


def test_draining_battery_switches_down_and_charging_brings_dense_back(
    bundle, signing_keys, broker, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    fleet = "t-sim-drain"
    watcher = Watcher(broker, fleet)
    # a phone at 22:00 with 21% left: it drains below 20% within minutes, and plugs in at 23:00
    clock = SimClock(speedup=1.0, start_hour=22.0, frozen=True)
    sensors = SimSensors(get_profile("pixel"), clock=clock, battery_pct=21.0, noise_pct=0.0)
    config = AgentConfig(
        bundle=bundle,
        public_key=signing_keys.public,
        broker_url=broker.url,
        device_id="phone-1",
        state_dir=tmp_path / "state",
        fleet=fleet,
        decide_period_s=0.05,
        policy=PolicyConfig(min_dwell_s=0.0),
    )
    agent = Agent(config, sensors=sensors)
    agent.start()
    try:
        watcher.wait(lambda m: m.kind == "birth")
        clock.advance(1800.0)  # 22:30, about 16%
        down = watcher.wait(lambda m: isinstance(m, Event) and m.event == "variant_switch")
        assert isinstance(down, Event) and down.data["from_variant"] == "dense"
        assert "battery" in down.message and down.data["charging"] is False
        assert agent.infer(np.zeros((28, 28), np.uint8)).variant != "dense"
        clock.advance(3600.0)  # 23:30: on the charger
        up = watcher.wait(
            lambda m: isinstance(m, Event) and m.event == "variant_switch" and m.data["to_variant"] == "dense"
        )
        assert isinstance(up, Event) and up.data["charging"] is True and "charging" in up.message
    finally:
        agent.stop()
        watcher.close()


def test_pinned_fleet_serves_only_the_pinned_variant(bundle, signing_keys, broker, tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    config = sim_config(
        bundle, signing_keys, broker, tmp_path, "t-sim-pin", devices=2, pinned_variant="static-50"
    )
    result = Simulator(config, data=data).run(duration_s=2.0)
    assert {v for d in result.devices for v in d.variant} == {"static-50"}
    assert result.summary()["errors"] == 0


def test_unknown_pinned_variant_is_refused(bundle, signing_keys, broker, tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    config = sim_config(bundle, signing_keys, broker, tmp_path, "t-sim-bad", devices=1, pinned_variant="nope")
    with pytest.raises(SimulatorError, match="nope"):
        Simulator(config, data=data).run(duration_s=1.0)


@pytest.mark.slow
def test_two_hundred_devices_run_without_errors(bundle, signing_keys, broker, tmp_path, data) -> None:  # type: ignore[no-untyped-def]
    config = sim_config(
        bundle,
        signing_keys,
        broker,
        tmp_path,
        "t-sim-200",
        devices=200,
        infer_hz=0.5,
        metrics_period_s=5.0,
        heartbeat_period_s=5.0,
        decide_period_s=1.0,
        loop_period_s=0.5,
        sample_period_s=1.0,
    )
    result = Simulator(config, data=data).run(duration_s=10.0)
    summary = result.summary()
    assert summary["errors"] == 0, result.errors[:5]
    assert summary["devices_born"] == 200
    assert summary["real_inferences"] > 200


def test_stop_from_another_thread_takes_every_agent_offline(
    bundle, signing_keys, broker, tmp_path, data
) -> None:  # type: ignore[no-untyped-def]
    fleet = "t-sim-stop"
    watcher = Watcher(broker, fleet)
    sim = Simulator(sim_config(bundle, signing_keys, broker, tmp_path, fleet, devices=3), data=data)
    timer = threading.Timer(3.0, sim.stop)
    timer.start()
    try:
        result = sim.run(duration_s=600.0)  # only stop() ends it
        assert result.summary()["errors"] == 0
        for d in result.devices:
            watcher.wait(
                lambda m, i=d.device_id: isinstance(m, Status) and m.device_id == i and m.state == "offline"  # type: ignore[misc]
            )
    finally:
        timer.cancel()
        watcher.close()


def test_a_fleet_split_over_processes_reports_every_device(
    bundle, signing_keys, broker, tmp_path, data
) -> None:  # type: ignore[no-untyped-def]
    config = sim_config(bundle, signing_keys, broker, tmp_path, "t-sim-procs", devices=4)
    result = Simulator(config, data=data, devices_per_process=2).run(duration_s=3.0)
    summary = result.summary()
    assert summary["errors"] == 0, result.errors
    assert summary["devices_born"] == 4 and len(result.devices) == 4
    assert [d.device_id for d in result.devices] == [f"{p}-{i:04d}" for i, p in enumerate(PROFILES)]
    assert all(d.inferences > 0 and d.t_h[0] < d.t_h[-1] for d in result.devices)


def test_cli_simulate_writes_the_result_and_a_plot(bundle, signing_keys, broker, tmp_path, npz_data) -> None:  # type: ignore[no-untyped-def]
    from edgeprune.cli import main

    out = tmp_path / "sim"
    args = ["devices", "simulate", "--bundle", str(bundle), "--public-key", str(signing_keys.public)]
    args += ["--broker", broker.url, "--devices", "2", "--duration", "2", "--data", str(npz_data)]
    args += ["--fleet", "t-sim-cli", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "result.json").read_text())
    assert saved["summary"]["devices"] == 2 and len(saved["devices"]) == 2
    assert (out / "battery_variant.png").exists() == plots_available()
