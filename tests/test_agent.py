"""The device agent against a real Mosquitto: telemetry, policy switches, desired state, outages, restarts."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import BundleError
from agent.contract import (
    DesiredState,
    Event,
    Message,
    Metrics,
    Readings,
    Status,
    Variant,
    device_topic,
    envelope,
    parse_message,
    subscription,
)
from agent.core import Agent, AgentConfig
from agent.policy import PolicyConfig
from agent.sensors import StaticSensors
from agent.signing import KeyPair, load_private_key, sign_manifest
from fleet.broker import MosquittoBroker, free_port
from tests.helpers import Inbox, connected_client, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.export]

IMAGE = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)


class Collector:
    """Everything received on a fleet's topics, parsed; duplicates (same message_id) kept for counting."""

    def __init__(self, broker: MosquittoBroker, fleet: str, name: str) -> None:
        self.inbox = Inbox(broker, subscription(fleet=fleet), client_id=name)
        self.messages: list[Message] = []

    def pump(self) -> None:
        while not self.inbox.messages.empty():
            topic, payload, _ = self.inbox.messages.get_nowait()
            if payload and not topic.endswith("/desired"):  # the fleet's own (maybe malformed) commands
                self.messages.append(parse_message(payload))

    def wait(self, predicate: Callable[[Message], bool], timeout: float = 30.0) -> Message:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.pump()
            for m in self.messages:
                if predicate(m):
                    return m
            time.sleep(0.05)
        raise AssertionError(f"no matching message in {timeout}s; got {[m.kind for m in self.messages]}")

    def close(self) -> None:
        self.inbox.close()


@pytest.fixture(scope="module")
def bundle(compiled, signing_keys, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The session's tiny bundle with the accuracies and latencies a real ladder has (dense best and
    slowest), re-signed.

    On 100 fixture test images the tiny variants' measured accuracies are noise, and so are 20-run
    latencies of a 1M-MAC net on a loaded CI machine: the policy orders its ladder by measured latency,
    and a noisy "static-50 slower than dense" made it start on static-50. These tests are about the agent.
    """
    out = tmp_path_factory.mktemp("agent-bundle") / "b"
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

    variants = tuple(realistic(v) for v in manifest.variants)
    signed = sign_manifest(
        manifest.model_copy(update={"variants": variants, "signature": None}),
        load_private_key(signing_keys.private),
    )
    (out / "manifest.json").write_text(signed.model_dump_json(indent=1))
    return out


def make_config(
    compiled_out: Path, keys: KeyPair, broker_url: str, state: Path, fleet: str, **kw: object
) -> AgentConfig:
    base: dict[str, object] = dict(
        bundle=compiled_out,
        public_key=keys.public,
        broker_url=broker_url,
        device_id="pi-01",
        state_dir=state,
        fleet=fleet,
        metrics_period_s=0.3,
        heartbeat_period_s=1.0,
        decide_period_s=0.05,
        policy=PolicyConfig(min_dwell_s=0.0),
        seed=0,
    )
    base.update(kw)
    return AgentConfig(**base)  # type: ignore[arg-type]


def test_telemetry_birth_metrics_and_clean_stop(bundle, signing_keys, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fleet = "t-telemetry"
    c = Collector(broker, fleet, "fleet-telemetry")
    agent = Agent(
        make_config(bundle, signing_keys, broker.url, tmp_path, fleet),
        sensors=StaticSensors(Readings(battery_pct=90.0, charging=False)),
    )
    agent.start()
    try:
        birth = c.wait(lambda m: m.kind == "birth")
        assert birth.variants == ("dense", "static-50")  # type: ignore[union-attr]
        for _ in range(20):
            assert agent.infer(IMAGE).variant == "dense"
        metrics = c.wait(lambda m: isinstance(m, Metrics) and m.inferences > 0)
        assert isinstance(metrics, Metrics)
        assert metrics.latency is not None and metrics.active_variant == "dense"
        assert metrics.readings.battery_pct == 90.0
    finally:
        agent.stop()
    offline = c.wait(lambda m: isinstance(m, Status) and m.state == "offline")
    assert offline.device_id == "pi-01"
    c.wait(lambda m: isinstance(m, Event) and m.event == "stopping")
    c.close()


def test_the_broker_password_never_reaches_the_log(bundle, signing_keys, broker, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    url = f"mqtt://pi-01:s3cret-pw@{broker.host}:{broker.port}"  # the private broker takes any login
    agent = Agent(
        make_config(bundle, signing_keys, url, tmp_path, "t-password"), sensors=StaticSensors(Readings())
    )
    with caplog.at_level(logging.DEBUG):
        agent.start()
        try:
            wait_for(lambda: "connected to" in caplog.text)
        finally:
            agent.stop()
    assert f"connected to mqtt://pi-01@{broker.host}:{broker.port}" in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_critical_battery_switches_to_the_cheapest_variant_with_a_reason(
    bundle,
    signing_keys,
    broker,  # type: ignore[no-untyped-def]
    tmp_path,
) -> None:
    c = Collector(broker, "t-battery", "fleet-battery")
    sensors = StaticSensors(Readings(battery_pct=90.0, charging=False))
    agent = Agent(make_config(bundle, signing_keys, broker.url, tmp_path, "t-battery"), sensors=sensors)
    agent.start()
    try:
        assert agent.infer(IMAGE).variant == "dense"
        sensors.readings = Readings(battery_pct=5.0, charging=False)
        switch = c.wait(lambda m: isinstance(m, Event) and m.event == "variant_switch")
        assert isinstance(switch, Event)
        assert switch.data["to_variant"] == "static-50" and switch.data["battery_pct"] == 5.0
        assert "battery" in switch.message
        assert agent.infer(IMAGE).variant == "static-50"
    finally:
        agent.stop()
        c.close()


def publish_desired(broker: MosquittoBroker, fleet: str, payload: bytes) -> None:
    client = connected_client(broker, "fleet-cmd")
    client.publish(device_topic(fleet, "pi-01", "desired"), payload, qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


def test_desired_state_pins_a_variant_and_survives_a_restart(bundle, signing_keys, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    fleet = "t-desired"
    c = Collector(broker, fleet, "fleet-desired")
    desired = DesiredState(
        **envelope(device_id="pi-01", seq=0), revision=3, pinned_variant="static-50", metrics_period_s=0.5
    )
    agent = Agent(
        make_config(bundle, signing_keys, broker.url, tmp_path, fleet),
        sensors=StaticSensors(Readings(battery_pct=90.0)),
    )
    agent.start()
    try:
        publish_desired(broker, fleet, desired.to_json().encode())
        c.wait(lambda m: isinstance(m, Event) and m.event == "desired_applied")
        deadline = time.monotonic() + 15
        while agent.infer(IMAGE).variant != "static-50" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.infer(IMAGE).variant == "static-50"
    finally:
        agent.stop()
    publish_desired(broker, fleet, b"")  # clear the retained message: the restart must use its saved copy
    again = Agent(
        make_config(bundle, signing_keys, broker.url, tmp_path, fleet),
        sensors=StaticSensors(Readings(battery_pct=90.0)),
    )
    again.start()
    try:
        assert again.infer(IMAGE).variant == "static-50"
    finally:
        again.stop()
        c.close()


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"kind": "desired"}',
        DesiredState(**envelope(device_id="pi-01", seq=0), revision=1, pinned_variant="no-such")
        .to_json()
        .encode(),
        DesiredState(**envelope(device_id="pi-01", seq=0), revision=1, policy_overrides={"no_such_knob": 1})
        .to_json()
        .encode(),
        DesiredState(**envelope(device_id="someone-else", seq=0), revision=1).to_json().encode(),
        DesiredState(**envelope(device_id="pi-01", seq=0), revision=1, policy_overrides={"low\x00": 1})
        .to_json()
        .encode(),
    ],
    ids=["not-json", "incomplete", "unknown-variant", "unknown-override", "other-device", "nul-in-text"],
)
def test_bad_desired_state_is_rejected_with_an_event(
    bundle,
    signing_keys,
    broker,
    tmp_path,  # type: ignore[no-untyped-def]
    payload: bytes,
) -> None:
    fleet = "t-reject"
    c = Collector(broker, fleet, "fleet-reject")
    agent = Agent(
        make_config(bundle, signing_keys, broker.url, tmp_path, fleet),
        sensors=StaticSensors(Readings()),
    )
    agent.start()
    try:
        publish_desired(broker, fleet, payload)
        rejected = c.wait(lambda m: isinstance(m, Event) and m.event == "command_rejected")
        assert rejected.severity == "warning"  # type: ignore[union-attr]
        assert agent.infer(IMAGE).variant == "dense"  # still serving, policy untouched
    finally:
        publish_desired(broker, fleet, b"")
        agent.stop()
        c.close()


def test_broker_outage_loses_nothing(bundle, signing_keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    own = MosquittoBroker(port=port).start()
    fleet = "t-outage"
    first = Collector(own, fleet, "fleet-outage-1")
    agent = Agent(
        make_config(bundle, signing_keys, own.url, tmp_path, fleet, metrics_period_s=0.1, reconnect_max_s=1),
        sensors=StaticSensors(Readings(battery_pct=80.0)),
    )
    agent.start()
    try:
        first.wait(lambda m: isinstance(m, Metrics))
        own.stop()  # the broker goes away while the agent keeps producing telemetry
        for _ in range(30):
            agent.infer(IMAGE)
            time.sleep(0.03)
        queued = agent.outbox.pending()
        assert queued > 0
        own = MosquittoBroker(port=port).start()
        second = Collector(own, fleet, "fleet-outage-2")
        deadline = time.monotonic() + 40
        while (agent.outbox.pending() or not agent._connected.is_set()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert agent.outbox.pending() == 0
    finally:
        agent.stop()
    time.sleep(0.5)
    first.pump()
    second.pump()
    every = first.messages + second.messages
    unique = {m.message_id: m for m in every}
    seqs = sorted(m.seq for m in unique.values())
    # seq 0 is the last will, built at connect: mosquitto sends it when it shuts down with the agent
    # connected, so it may or may not be there. Every other message must be, once after dedup.
    assert [s for s in seqs if s != 0] == list(range(1, seqs[-1] + 1)), "a message was lost"
    assert len(seqs) >= queued + 1  # what was queued in the outage, after what went before it
    first.close()
    second.close()
    own.stop()


def test_a_reconnected_agent_replaces_its_last_will_at_once(bundle, signing_keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The broker publishes the agent's last will ("offline", retained) when the link drops; after the
    reconnect the agent must say "online" right away, not at its next heartbeat (here 10 minutes)."""
    port = free_port()
    own = MosquittoBroker(port=port).start()
    fleet = "t-rewill"
    agent = Agent(
        make_config(
            bundle, signing_keys, own.url, tmp_path, fleet, heartbeat_period_s=600, reconnect_max_s=1
        ),
        sensors=StaticSensors(Readings(battery_pct=80.0)),
    )
    agent.start()
    try:
        first = Collector(own, fleet, "rewill-1")
        first.wait(lambda m: isinstance(m, Status) and m.state == "online")
        own.stop()
        own = MosquittoBroker(port=port).start()
        second = Collector(own, fleet, "rewill-2")
        status = second.wait(lambda m: isinstance(m, Status), timeout=20)
        assert status.state == "online"
        first.close()
        second.close()
    finally:
        agent.stop()
        own.stop()


AGENT_SCRIPT = """
import sys, time
from pathlib import Path
from agent.core import Agent, AgentConfig
from agent.policy import PolicyConfig
from agent.sensors import StaticSensors
from agent.contract import Readings
bundle, key, url, state = sys.argv[1:5]
agent = Agent(AgentConfig(bundle=Path(bundle), public_key=Path(key), broker_url=url, device_id="pi-01",
                          state_dir=Path(state), fleet="t-kill", metrics_period_s=0.1),
              sensors=StaticSensors(Readings(battery_pct=50.0)))
agent.start()
import numpy as np
for _ in range(10):
    agent.infer(np.zeros((28, 28), np.uint8))
time.sleep(0.5)
print("queued", agent.outbox.pending(), flush=True)
time.sleep(60)
"""


def test_killed_agent_delivers_its_queue_after_restart(bundle, signing_keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"  # nothing listens yet: everything stays in the outbox
    with subprocess.Popen(
        [sys.executable, "-c", AGENT_SCRIPT, str(bundle), str(signing_keys.public), url, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        assert line[0] == "queued" and int(line[1]) >= 5
        os.kill(proc.pid, signal.SIGKILL)
    own = MosquittoBroker(port=port).start()
    c = Collector(own, "t-kill", "fleet-kill")
    agent = Agent(
        make_config(bundle, signing_keys, url, tmp_path, "t-kill"), sensors=StaticSensors(Readings())
    )
    agent.start()
    try:
        c.wait(lambda m: m.kind == "birth" and m.seq == 1)  # the first run's birth, queued before the kill
        # the first run's 10 inferences, however its metrics periods split them (the second run infers
        # nothing); a redelivered message counts once
        deadline = time.monotonic() + 30.0
        counted: dict[str, int] = {}
        while time.monotonic() < deadline and sum(counted.values()) < 10:
            c.pump()
            counted = {m.message_id: m.inferences for m in c.messages if isinstance(m, Metrics)}
            time.sleep(0.05)
        assert sum(counted.values()) == 10, counted
    finally:
        agent.stop()
        c.close()
        own.stop()


def test_tampered_bundle_is_refused_before_serving(bundle, signing_keys, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "dense.onnx").read_bytes())
    data[100] ^= 0xFF
    (copy / "dense.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        Agent(make_config(copy, signing_keys, broker.url, tmp_path / "state", "t-tamper"))


def _agent_run(
    bundle: Path, url: str, state: Path, public_key: Path, *, device: str, fleet: str, source: str
) -> list[str]:
    """`edgeprune agent run` serving ``source``, with metrics every 0.2 s."""
    exe = Path(sys.executable).parent / "edgeprune"
    return [
        str(exe),
        *("agent", "run", "--bundle", str(bundle), "--broker", url, "--device-id", device),
        *("--state-dir", str(state), "--public-key", str(public_key), "--fleet", fleet),
        *("--input", source, "--metrics-period", "0.2"),
    ]


def test_cli_run_and_sigterm(bundle, signing_keys, broker, tmp_path, npz_data) -> None:  # type: ignore[no-untyped-def]
    c = Collector(broker, "t-cli", "fleet-cli")
    cmd = _agent_run(
        bundle, broker.url, tmp_path, signing_keys.public, device="pi-01", fleet="t-cli", source=str(npz_data)
    )
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            metrics = c.wait(lambda m: isinstance(m, Metrics) and m.inferences > 0, timeout=60)
            assert metrics.device_id == "pi-01"
        finally:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "served 100 input(s)" in out and "stopped cleanly" in out
    c.wait(lambda m: isinstance(m, Status) and m.state == "offline")
    c.close()


def test_sigterm_stops_an_agent_waiting_for_frames_on_stdin(bundle, signing_keys, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # `--input -` blocks reading the pipe between frames (a camera feeding it); SIGTERM must still stop
    # the agent cleanly, with what it served sent and its offline status published.
    c = Collector(broker, "t-stdin", "fleet-stdin")
    cmd = _agent_run(
        bundle, broker.url, tmp_path, signing_keys.public, device="pi-02", fleet="t-stdin", source="-"
    )
    frame = bytes(range(256)) * 3 + bytes(16)  # one 28x28 uint8 frame
    with subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdin is not None
        try:
            proc.stdin.write(frame * 3)
            proc.stdin.flush()
            c.wait(lambda m: isinstance(m, Metrics) and m.inferences == 3, timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            # stdin stays open while it stops: the agent is blocked reading it, and EOF would end the
            # input loop by itself
            proc.wait(timeout=30)
            out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert b"stopped cleanly" in out
    c.wait(lambda m: isinstance(m, Status) and m.state == "offline")
    c.close()


def test_tampered_new_bundle_is_refused_and_the_old_one_keeps_serving(
    bundle,
    signing_keys,
    broker,  # type: ignore[no-untyped-def]
    tmp_path,
) -> None:
    c = Collector(broker, "t-reload", "fleet-reload")
    agent = Agent(
        make_config(bundle, signing_keys, broker.url, tmp_path / "state", "t-reload"),
        sensors=StaticSensors(Readings()),
    )
    agent.start()
    try:
        bad = tmp_path / "bad"
        shutil.copytree(bundle, bad)
        (bad / "static-50.pte").write_bytes(b"truncated")
        with pytest.raises(BundleError):
            agent.load_bundle(bad)
        refused = c.wait(lambda m: isinstance(m, Event) and m.event == "error" and "refused" in m.message)
        assert "still serving" in refused.message  # type: ignore[union-attr]
        assert agent.infer(IMAGE).variant == "dense"  # the old bundle serves on

        good = tmp_path / "good"
        shutil.copytree(bundle, good)
        manifest = agent.load_bundle(good)
        assert agent.infer(IMAGE).variant in manifest.variant("dense").name
        c.wait(lambda m: isinstance(m, Event) and m.event == "bundle_loaded")
    finally:
        agent.stop()
        c.close()


def test_shadow_runs_report_agreement_with_dense(bundle, signing_keys, broker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = Collector(broker, "t-shadow", "fleet-shadow")
    config = make_config(
        bundle,
        signing_keys,
        broker.url,
        tmp_path,
        "t-shadow",
        shadow_rate=1.0,
        policy=PolicyConfig(min_dwell_s=0.0, pinned_variant="static-50"),
    )
    agent = Agent(config, sensors=StaticSensors(Readings()))
    agent.start()
    try:
        rng = np.random.default_rng(1)
        for _ in range(30):
            assert agent.infer(rng.integers(0, 255, (28, 28), dtype=np.uint8)).variant == "static-50"
        m = c.wait(lambda m: isinstance(m, Metrics) and m.shadow_runs > 0)
        assert isinstance(m, Metrics) and m.agreement is not None and 0.0 <= m.agreement <= 1.0
    finally:
        agent.stop()
        c.close()
