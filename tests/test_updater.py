"""Over-the-air updates end to end: a real agent, the real broker, a real uvicorn artifact server, real
bundles. Covers the happy path (delta and full files), a crash in every state, tampered artifacts, a
failing health check and a full disk."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zstandard

from agent.contract import (
    Birth,
    BundleManifest,
    BundleRef,
    DesiredState,
    Event,
    UpdateInstruction,
    UpdateState,
    UpdateStatus,
    device_topic,
    envelope,
)
from agent.core import Agent
from agent.delta import UPDATE_FILENAME, UpdateManifest, make_update
from agent.signing import KeyPair, generate_keys
from agent.updater import KILL_ENV, TRANSITIONS, Updater, UpdaterConfig
from compiler.finetune import resign_bundle
from fleet.broker import MosquittoBroker
from tests.helpers import connected_client
from tests.test_agent import Collector, make_config
from tests.test_artifacts import serving
from tests.test_delta import make_version

pytestmark = [pytest.mark.broker, pytest.mark.export]

IMAGE = np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8)
FULL_CHAIN: list[UpdateState] = [
    "downloading",
    "verifying",
    "staged",
    "activating",
    "health_check",
    "committed",
]
TERMINAL = ("committed", "failed", "rolled_back")


class Killed(BaseException):
    """Stands for SIGKILL inside the test process: nothing after the persisted state runs."""


@pytest.fixture(scope="module")
def versions(compiled, signing_keys: KeyPair, tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("ota")
    v1 = root / "v1"
    shutil.copytree(compiled.out, v1)
    return v1, make_version(v1, root / "v2", "2.0.0", signing_keys.private)


def publish_bundle(root: Path, bundle: Path) -> None:
    manifest = BundleManifest.from_json((bundle / "manifest.json").read_bytes())
    dest = root / "bundles" / manifest.model_id / manifest.bundle_version
    shutil.copytree(bundle, dest)


@pytest.fixture
def artifacts(versions, tmp_path) -> Path:  # type: ignore[no-untyped-def]
    """The fleet's artifact tree: both bundles and the 1.0.0 -> 2.0.0 update."""
    v1, v2 = versions
    root = tmp_path / "artifacts"
    publish_bundle(root, v1)
    publish_bundle(root, v2)
    model_id = BundleManifest.from_json((v1 / "manifest.json").read_bytes()).model_id
    make_update(v1, v2, root / "updates" / model_id / "1.0.0" / "2.0.0")
    return root


@pytest.fixture
def server(artifacts: Path) -> Iterator[str]:
    with serving(artifacts) as base:
        yield base


def instruction(
    bundle_dir: Path, base: str, *, update_id: str = "u1", window: float = 0.3
) -> UpdateInstruction:
    raw = (bundle_dir / "manifest.json").read_bytes()
    m = BundleManifest.from_json(raw)
    return UpdateInstruction(
        update_id=update_id,
        target=BundleRef(model_id=m.model_id, bundle_version=m.bundle_version),
        base_url=base,
        manifest_sha256=hashlib.sha256(raw).hexdigest(),
        health_window_s=window,
    )


def statuses(c: Collector, update_id: str, *, timeout: float = 60.0) -> list[UpdateStatus]:
    """Every UpdateStatus of ``update_id``, in seq order, once a terminal one arrived."""
    c.wait(
        lambda m: isinstance(m, UpdateStatus) and m.update_id == update_id and m.state in TERMINAL, timeout
    )
    time.sleep(0.3)  # let the rest of the burst arrive
    c.pump()
    found = {m.message_id: m for m in c.messages if isinstance(m, UpdateStatus) and m.update_id == update_id}
    return sorted(found.values(), key=lambda m: m.seq)


def chain(c: Collector, update_id: str, **kw: Any) -> list[str]:
    return [m.state for m in statuses(c, update_id, **kw)]


def new_agent(v1: Path, keys: KeyPair, broker: MosquittoBroker, state: Path, fleet: str, **kw: Any) -> Agent:
    return Agent(make_config(v1, keys, broker.url, state, fleet, **kw))


# ---- the table itself -----------------------------------------------------------------------------


def test_transition_table_is_the_documented_machine() -> None:
    assert TRANSITIONS[("idle", "start")] == "downloading"
    path = ["idle"]
    for event in ("start", "downloaded", "verified", "activate", "activated", "healthy"):
        path.append(TRANSITIONS[(path[-1], event)])  # type: ignore[index]
    assert path[1:] == FULL_CHAIN
    for state in ("downloading", "verifying", "staged"):
        assert TRANSITIONS[(state, "fail")] == "failed"  # type: ignore[index]
    for state in ("activating", "health_check"):
        assert TRANSITIONS[(state, "fail")] == "rolling_back"  # type: ignore[index]
        assert TRANSITIONS[(state, "interrupted")] == "rolling_back"  # type: ignore[index]
    assert TRANSITIONS[("rolling_back", "restored")] == "rolled_back"


# ---- happy paths ----------------------------------------------------------------------------------


def test_desired_update_installs_a_delta_and_survives_a_restart(
    versions, signing_keys, broker, server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    fleet = "ota-happy"
    c = Collector(broker, fleet, "fleet-ota-happy")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    fleet_client = connected_client(broker, "fleet-ota-happy-pub")
    try:
        agent.start()
        instr = instruction(v2, server)
        desired = DesiredState(**envelope(device_id="pi-01", seq=0), revision=1, update=instr)
        fleet_client.publish(device_topic(fleet, "pi-01", "desired"), desired.to_json(), qos=1, retain=True)
        found = statuses(c, "u1")
        assert [m.state for m in found] == FULL_CHAIN
        assert agent.manifest.bundle_version == "2.0.0"
        assert agent.infer(IMAGE).variant in agent.server.available
        onnx_full = sum(f.size_bytes for v in agent.manifest.variants for f in v.files if f.runtime == "onnx")
        total = found[-1].bytes_total
        assert total is not None and 0 < total < 0.5 * onnx_full  # a delta, and only onnx files
        assert found[-1].bytes_done == total
        state = tmp_path / "state"
        assert [p.name for p in (state / "bundles").iterdir()] == ["2.0.0"]
        assert not (state / "update" / "staging").exists()
    finally:
        agent.stop()
    # restart: serves 2.0.0 from the current pointer; the retained desired update is a no-op now
    c.messages.clear()
    again = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    try:
        again.start()
        assert again.manifest.bundle_version == "2.0.0"
        c.wait(lambda m: isinstance(m, Event) and m.event == "desired_applied")
        time.sleep(0.5)
        c.pump()
        assert not [m for m in c.messages if isinstance(m, UpdateStatus)]
    finally:
        again.stop()
        fleet_client.publish(device_topic(fleet, "pi-01", "desired"), b"", qos=1, retain=True)
        fleet_client.disconnect()
        fleet_client.loop_stop()
        c.close()


def test_without_an_update_artifact_the_full_files_come(
    versions, signing_keys, broker, artifacts, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    shutil.rmtree(artifacts / "updates")
    fleet = "ota-full"
    c = Collector(broker, fleet, "fleet-ota-full")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    try:
        agent.start()
        with serving(artifacts) as base:
            assert agent.updater.run(instruction(v2, base), agent, current=agent.bundle_path) == "committed"
        found = statuses(c, "u1")
        onnx_full = sum(f.size_bytes for v in agent.manifest.variants for f in v.files if f.runtime == "onnx")
        assert found[-1].bytes_total == onnx_full
        assert agent.manifest.bundle_version == "2.0.0"
        assert not any(
            (agent.bundle_path / f.path).exists()
            for v in agent.manifest.variants
            for f in v.files
            if f.runtime != "onnx"
        )  # only this device's runtime was fetched
    finally:
        agent.stop()
        c.close()


def test_update_to_the_running_version_is_a_no_op(versions, signing_keys, broker, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    v1, _ = versions
    fleet = "ota-noop"
    c = Collector(broker, fleet, "fleet-ota-noop")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    pub = connected_client(broker, "fleet-ota-noop-pub")
    try:
        agent.start()
        desired = DesiredState(
            **envelope(device_id="pi-01", seq=0), revision=1, update=instruction(v1, server)
        )
        pub.publish(device_topic(fleet, "pi-01", "desired"), desired.to_json(), qos=1, retain=True)
        c.wait(lambda m: isinstance(m, Event) and m.event == "desired_applied")
        time.sleep(0.5)
        c.pump()
        assert not [m for m in c.messages if isinstance(m, UpdateStatus)]
        assert agent.manifest.bundle_version == "1.0.0"
    finally:
        agent.stop()
        pub.publish(device_topic(fleet, "pi-01", "desired"), b"", qos=1, retain=True)
        pub.disconnect()
        pub.loop_stop()
        c.close()


# ---- a crash in every state -------------------------------------------------------------------------

KILLS: list[tuple[UpdateState, dict[str, Any], list[str], str]] = [
    # (killed right after entering, updater config, whole chain the fleet sees, version served after)
    ("downloading", {}, ["downloading", *FULL_CHAIN], "2.0.0"),
    ("verifying", {}, [*FULL_CHAIN[:2], *FULL_CHAIN[1:]], "2.0.0"),
    ("staged", {}, [*FULL_CHAIN[:3], *FULL_CHAIN[2:]], "2.0.0"),
    ("activating", {}, [*FULL_CHAIN[:4], "rolling_back", "rolled_back"], "1.0.0"),
    ("health_check", {}, [*FULL_CHAIN[:5], "rolling_back", "rolled_back"], "1.0.0"),
    ("committed", {}, FULL_CHAIN, "2.0.0"),
    ("rolling_back", {"max_latency_ms": 0.0}, [*FULL_CHAIN[:5], "rolling_back", "rolled_back"], "1.0.0"),
]


@pytest.mark.parametrize("case", KILLS, ids=[k[0] for k in KILLS])
def test_killed_in_every_state_ends_on_a_working_bundle(
    versions, signing_keys, broker, server, *, tmp_path, case
) -> None:  # type: ignore[no-untyped-def]
    killed_in, cfg, expected, serving_after = case
    v1, v2 = versions
    fleet = f"ota-kill-{killed_in}"
    state = tmp_path / "state"
    c = Collector(broker, fleet, f"fleet-{fleet}")
    first = new_agent(v1, signing_keys, broker, state, fleet, updater=UpdaterConfig(**cfg))

    def crash(entered: UpdateState) -> None:
        if entered == killed_in:
            raise Killed(entered)

    first.updater._crash_at = crash  # the test hook: the state is on disk, nothing after it runs
    with pytest.raises(Killed):
        first.updater.run(instruction(v2, server), first, current=first.bundle_path)
    first.outbox.close()  # what the kill leaves: an outbox on disk, never sent (the agent never connected)
    again = new_agent(v1, signing_keys, broker, state, fleet, updater=UpdaterConfig(**cfg))
    try:
        again.start()
        assert chain(c, "u1") == expected
        deadline = time.monotonic() + 10
        while again.manifest.bundle_version != serving_after and time.monotonic() < deadline:
            time.sleep(0.05)
        assert again.manifest.bundle_version == serving_after
        assert again.infer(IMAGE).variant in again.server.available  # serving, not broken
        assert again.updater.state in TERMINAL
        kept = sorted(p.name for p in (state / "bundles").iterdir())
        assert kept == (["2.0.0"] if serving_after == "2.0.0" else [])
    finally:
        again.stop()
        c.close()
    # and a third start changes nothing
    third = new_agent(v1, signing_keys, broker, state, fleet, updater=UpdaterConfig(**cfg))
    try:
        assert third.manifest.bundle_version == serving_after
    finally:
        third.outbox.close()


def test_a_crash_loop_gives_up(versions, signing_keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Restarted in `downloading` more than max_boots times: the update fails, the factory bundle serves."""
    from agent.signing import load_public_key

    v1, v2 = versions
    updater = Updater(
        tmp_path,
        public_key=load_public_key(signing_keys.public),
        runtime="onnx",
        config=UpdaterConfig(max_boots=2),
    )
    updater.record.state = "downloading"
    updater.record.update_id = "u1"
    updater.record.instruction = instruction(v2, "http://127.0.0.1:9").model_dump(mode="json")
    updater._save()
    for _ in range(2):
        again = Updater(
            tmp_path,
            public_key=load_public_key(signing_keys.public),
            runtime="onnx",
            config=UpdaterConfig(max_boots=2),
        )
        assert again.recover(v1) == v1 and again.state == "downloading"
    last = Updater(
        tmp_path,
        public_key=load_public_key(signing_keys.public),
        runtime="onnx",
        config=UpdaterConfig(max_boots=2),
    )
    assert last.recover(v1) == v1
    assert last.state == "failed" and "gave up" in (last.record.error or "")


# ---- refusals -----------------------------------------------------------------------------------


def _tamper_delta(artifacts: Path, v2: Path) -> None:
    """Replace one artifact by a well-formed one that rebuilds a different file (one flipped byte)."""
    upd_dir = next((artifacts / "updates").rglob(UPDATE_FILENAME)).parent
    update = UpdateManifest.from_json((upd_dir / UPDATE_FILENAME).read_bytes())
    entry = next(f for f in update.files if f.runtime == "onnx" and f.artifact is not None)
    wrong = bytearray((v2 / entry.path).read_bytes())
    wrong[len(wrong) // 2] ^= 1
    artifact = zstandard.ZstdCompressor().compress(bytes(wrong))
    assert entry.artifact is not None
    (upd_dir / entry.artifact).write_bytes(artifact)
    forged = entry.model_copy(
        update={
            "method": "zstd",
            "base_path": None,
            "base_sha256": None,
            "artifact_sha256": hashlib.sha256(artifact).hexdigest(),
            "artifact_size": len(artifact),
        }
    )
    files = tuple(forged if f.path == entry.path else f for f in update.files)
    (upd_dir / UPDATE_FILENAME).write_text(update.model_copy(update={"files": files}).to_json())


def _fails(agent: Agent, c: Collector, instr: UpdateInstruction, state_dir: Path) -> UpdateStatus:
    assert agent.updater.run(instr, agent, current=agent.bundle_path) == "failed"
    found = statuses(c, instr.update_id)
    assert found[-1].state == "failed" and found[-1].error
    assert "activating" not in [m.state for m in found]
    assert agent.manifest.bundle_version == "1.0.0"
    assert agent.infer(IMAGE).variant in agent.server.available
    assert list((state_dir / "bundles").iterdir()) == []  # nothing replaced, nothing left behind
    c.wait(lambda m: isinstance(m, Event) and m.event == "error" and instr.update_id in m.message)
    return found[-1]


def test_corrupt_delta_fails_on_the_target_hash_and_is_not_activated(
    versions, signing_keys, broker, artifacts, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    _tamper_delta(artifacts, v2)
    fleet = "ota-corrupt"
    c = Collector(broker, fleet, "fleet-ota-corrupt")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    try:
        agent.start()
        with serving(artifacts) as base:
            last = _fails(agent, c, instruction(v2, base), tmp_path / "state")
        assert "signed sha256" in (last.error or "")
    finally:
        agent.stop()
        c.close()


def test_foreign_signature_is_refused(versions, signing_keys, broker, artifacts, tmp_path) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    other = generate_keys(tmp_path / "other")
    forged = tmp_path / "forged"
    shutil.copytree(v2, forged)
    resign_bundle(forged, other.private, bundle_version="3.0.0")
    publish_bundle(artifacts, forged)
    fleet = "ota-forged"
    c = Collector(broker, fleet, "fleet-ota-forged")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    try:
        agent.start()
        with serving(artifacts) as base:
            last = _fails(agent, c, instruction(forged, base, update_id="u-forged"), tmp_path / "state")
        assert "SignatureError" in (last.error or "")
    finally:
        agent.stop()
        c.close()


def test_wrong_manifest_hash_in_the_instruction_is_refused(
    versions, signing_keys, broker, server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    fleet = "ota-hash"
    c = Collector(broker, fleet, "fleet-ota-hash")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    try:
        agent.start()
        instr = instruction(v2, server).model_copy(update={"manifest_sha256": "0" * 64})
        last = _fails(agent, c, instr, tmp_path / "state")
        assert "manifest_sha256" in (last.error or "")
    finally:
        agent.stop()
        c.close()


def test_full_disk_is_a_clean_failure(versions, signing_keys, broker, server, tmp_path) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    fleet = "ota-disk"
    c = Collector(broker, fleet, "fleet-ota-disk")
    agent = new_agent(
        v1, signing_keys, broker, tmp_path / "state", fleet, updater=UpdaterConfig(disk_free=lambda p: 10_000)
    )
    try:
        agent.start()
        last = _fails(agent, c, instruction(v2, server), tmp_path / "state")
        assert "disk space" in (last.error or "")
        assert not (tmp_path / "state" / "update" / "staging").exists()
    finally:
        agent.stop()
        c.close()


def test_failing_health_check_rolls_back_to_the_old_bundle(
    versions, signing_keys, broker, server, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    fleet = "ota-health"
    c = Collector(broker, fleet, "fleet-ota-health")
    agent = new_agent(
        v1, signing_keys, broker, tmp_path / "state", fleet, updater=UpdaterConfig(max_latency_ms=0.0)
    )
    try:
        agent.start()
        assert agent.updater.run(instruction(v2, server), agent, current=agent.bundle_path) == "rolled_back"
        found = statuses(c, "u1")
        assert [m.state for m in found] == [*FULL_CHAIN[:5], "rolling_back", "rolled_back"]
        assert "bound" in (found[-1].error or "")
        assert agent.manifest.bundle_version == "1.0.0"
        assert agent.infer(IMAGE).variant in agent.server.available
        assert list((tmp_path / "state" / "bundles").iterdir()) == []
    finally:
        agent.stop()
        c.close()


# ---- the same with a real SIGKILL of a real agent process ------------------------------------------


def _run_agent(
    v1: Path, keys: KeyPair, broker: MosquittoBroker, state: Path, fleet: str, *, env: dict[str, str]
):  # type: ignore[no-untyped-def]
    exe = Path(sys.executable).parent / "edgeprune"
    cmd = [
        str(exe),
        "agent",
        "run",
        "--bundle",
        str(v1),
        "--broker",
        broker.url,
        "--device-id",
        "pi-01",
        "--state-dir",
        str(state),
        "--public-key",
        str(keys.public),
        "--fleet",
        fleet,
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("case", KILLS[:6], ids=[k[0] for k in KILLS[:6]])
def test_sigkilled_agent_process_resumes_or_rolls_back(
    versions, signing_keys, broker, server, *, tmp_path, case
) -> None:  # type: ignore[no-untyped-def]
    killed_in, _, expected, serving_after = case
    v1, v2 = versions
    fleet = f"ota-sigkill-{killed_in}"
    state = tmp_path / "state"
    c = Collector(broker, fleet, f"fleet-{fleet}")
    pub = connected_client(broker, f"fleet-{fleet}-pub")
    desired = DesiredState(**envelope(device_id="pi-01", seq=0), revision=1, update=instruction(v2, server))
    pub.publish(device_topic(fleet, "pi-01", "desired"), desired.to_json(), qos=1, retain=True)
    try:
        env = {**os.environ, KILL_ENV: killed_in}
        with _run_agent(v1, signing_keys, broker, state, fleet, env=env) as proc:
            proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
        with _run_agent(v1, signing_keys, broker, state, fleet, env=env) as proc:
            try:
                assert chain(c, "u1", timeout=90) == expected
                birth = c.wait(
                    lambda m: (
                        isinstance(m, Birth)
                        and m.bundle is not None
                        and m.bundle.bundle_version == serving_after
                        and m.seq > 0
                    ),
                    timeout=30,
                )
                assert birth.variants
            finally:
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
    finally:
        pub.publish(device_topic(fleet, "pi-01", "desired"), b"", qos=1, retain=True)
        pub.disconnect()
        pub.loop_stop()
        c.close()


def test_a_newer_desired_update_supersedes_a_running_one(
    versions, signing_keys, broker, artifacts, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    fleet = "ota-supersede"
    c = Collector(broker, fleet, "fleet-ota-supersede")
    agent = new_agent(v1, signing_keys, broker, tmp_path / "state", fleet)
    pub = connected_client(broker, "fleet-ota-supersede-pub")
    topic = device_topic(fleet, "pi-01", "desired")
    try:
        agent.start()
        with serving(artifacts, max_bytes_per_s=2_000) as base:  # slow: u1 is still downloading
            first = DesiredState(
                **envelope(device_id="pi-01", seq=0), revision=1, update=instruction(v2, base)
            )
            pub.publish(topic, first.to_json(), qos=1, retain=True)
            c.wait(lambda m: isinstance(m, UpdateStatus) and m.state == "downloading")
            second = DesiredState(
                **envelope(device_id="pi-01", seq=1),
                revision=2,
                update=instruction(v2, base, update_id="u2"),
            )
            pub.publish(topic, second.to_json(), qos=1, retain=True)
            assert chain(c, "u1") == ["downloading", "failed"]
            assert "superseded" in (statuses(c, "u1")[-1].error or "")
            assert chain(c, "u2", timeout=90) == FULL_CHAIN
        assert agent.manifest.bundle_version == "2.0.0"
    finally:
        agent.stop()
        pub.publish(topic, b"", qos=1, retain=True)
        pub.disconnect()
        pub.loop_stop()
        c.close()
