"""A real agent updated by a real fleet manager: rollout -> retained desired state -> download from the
artifact endpoint (delta made by the manager) -> verify, activate, health check -> committed -> the
rollout completes and the registry shows the new bundle."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.contract import Readings
from agent.signing import KeyPair, load_private_key, sign_manifest
from fleet.broker import MosquittoBroker, free_port
from fleet.gates import Gates
from fleet.registry import upload_bundle
from fleet.rollouts import Cohort, DeviceConfig, RolloutSpec
from fleet.server import FleetServer, ServeConfig
from tests.helpers import wait_for as helpers_wait_for

pytestmark = [pytest.mark.broker, pytest.mark.export, pytest.mark.slow]

# The p90 latency of a 1M-MAC test model on a loaded CI machine is noise (a 6.95x "regression" halted a
# rollout once); the latency gate is tested with controlled telemetry in tests/test_fleet_rollouts.py.
NO_LATENCY_GATE = Gates(max_p90_ratio=None)
FLEET = "e2e"


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0) -> Any:
    return helpers_wait_for(predicate, timeout, poll_s=0.1)


def test_a_real_agent_is_updated_by_a_rollout(
    compiled,  # type: ignore[no-untyped-def]
    signing_keys: KeyPair,
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    from agent.core import Agent, AgentConfig
    from agent.policy import PolicyConfig
    from agent.sensors import StaticSensors

    v1 = tmp_path / "v1"
    shutil.copytree(compiled.out, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(compiled.out, v2)
    new = compiled.manifest.model_copy(update={"bundle_version": "e2e-2", "signature": None})
    (v2 / "manifest.json").write_text(
        sign_manifest(new, load_private_key(signing_keys.private)).model_dump_json()
    )
    config = ServeConfig(
        db=str(tmp_path / "fleet.db"),
        broker=broker.url,
        data_dir=tmp_path / "data",
        http_port=free_port(),
        public_key=signing_keys.public,
        token="e2e",
        fleet=FLEET,
        group="e2e-tests",
        tick_s=0.2,
    )
    with FleetServer(config) as server:
        assert server.store is not None and server.manager is not None
        for bundle in (v1, v2):
            upload_bundle(server.store, data_dir=config.data_dir, source=bundle, public_key=None)
        agent = Agent(
            AgentConfig(
                bundle=v1,
                public_key=signing_keys.public,
                broker_url=broker.url,
                device_id="real-01",
                state_dir=tmp_path / "state",
                fleet=FLEET,
                metrics_period_s=0.3,
                heartbeat_period_s=1.0,
                decide_period_s=0.05,
                policy=PolicyConfig(min_dwell_s=0.0),
                seed=0,
            ),
            sensors=StaticSensors(Readings(battery_pct=80.0, charging=True)),
        )
        agent.start()
        try:
            store = server.store
            wait_for(
                lambda: (
                    (store.device("real-01") or {}).get("bundle_version") == compiled.manifest.bundle_version
                )
            )
            # a person pins a variant from the fleet; the rollout that follows must keep the pin
            pin = next(v.name for v in compiled.manifest.variants if v.kind == "static")
            server.manager.set_config("real-01", DeviceConfig(pinned_variant=pin), fleet=FLEET)
            wait_for(lambda: agent.server.active == pin)
            r = server.manager.create(
                RolloutSpec(
                    fleet=FLEET,
                    model_id=compiled.manifest.model_id,
                    bundle_version="e2e-2",
                    cohort=Cohort(devices=("real-01",)),
                    soak_s=0,
                    health_window_s=1.0,
                    gates=NO_LATENCY_GATE,
                )
            )
            image = np.zeros((28, 28), dtype=np.uint8)

            def done() -> bool:
                agent.infer(image)  # traffic for the health check
                got = server.manager.get(r["id"])  # type: ignore[union-attr]
                assert got is not None and got["state"] in ("running", "completed"), got
                return got["state"] == "completed"

            wait_for(done, timeout=90)
            assert (store.device("real-01") or {})["bundle_version"] == "e2e-2"
            wait_for(lambda: agent.manifest.bundle_version == "e2e-2" and agent.server.active == pin)
            assert agent.decision is not None and "pinned" in agent.decision.reason, agent.decision
            update_dir = config.data_dir / "updates" / compiled.manifest.model_id
            assert (update_dir / compiled.manifest.bundle_version / "e2e-2" / "update.json").is_file()
        finally:
            agent.stop()


def test_a_failing_canary_halts_the_rollout_and_real_agents_roll_back(
    compiled,  # type: ignore[no-untyped-def]
    signing_keys: KeyPair,
    broker: MosquittoBroker,
    tmp_path: Path,
) -> None:
    """Two real agents in the first stage: one trusts another signing key, so the new bundle fails its
    signature check there; the failure gate halts the rollout and the other agent, already updated, is
    told to go back to the bundle it ran before, and does."""
    from agent.core import Agent, AgentConfig
    from agent.policy import PolicyConfig
    from agent.sensors import StaticSensors
    from agent.signing import generate_keys

    v1 = tmp_path / "v1"
    shutil.copytree(compiled.out, v1)
    v2 = tmp_path / "v2"
    shutil.copytree(compiled.out, v2)
    key = load_private_key(signing_keys.private)
    new = compiled.manifest.model_copy(update={"bundle_version": "e2e-3", "signature": None})
    (v2 / "manifest.json").write_text(sign_manifest(new, key).model_dump_json())
    stranger = generate_keys(tmp_path / "stranger")
    v1_stranger = tmp_path / "v1-stranger"
    shutil.copytree(compiled.out, v1_stranger)
    old = compiled.manifest.model_copy(update={"signature": None})
    (v1_stranger / "manifest.json").write_text(
        sign_manifest(old, load_private_key(stranger.private)).model_dump_json()
    )
    config = ServeConfig(
        db=str(tmp_path / "fleet.db"),
        broker=broker.url,
        data_dir=tmp_path / "data",
        http_port=free_port(),
        public_key=signing_keys.public,
        token="e2e",
        fleet="e2e-rb",
        group="e2e-rb-tests",
        tick_s=0.2,
    )

    def agent(device: str, bundle: Path, keys: KeyPair) -> Agent:
        return Agent(
            AgentConfig(
                bundle=bundle,
                public_key=keys.public,
                broker_url=broker.url,
                device_id=device,
                state_dir=tmp_path / f"state-{device}",
                fleet="e2e-rb",
                metrics_period_s=0.3,
                heartbeat_period_s=1.0,
                decide_period_s=0.05,
                policy=PolicyConfig(min_dwell_s=0.0),
                seed=0,
            ),
            sensors=StaticSensors(Readings(battery_pct=80.0, charging=True)),
        )

    with FleetServer(config) as server:
        assert server.store is not None and server.manager is not None
        store, manager = server.store, server.manager
        for bundle in (v1, v2):
            upload_bundle(store, data_dir=config.data_dir, source=bundle, public_key=None)
        good, bad = agent("good-01", v1, signing_keys), agent("bad-01", v1_stranger, stranger)
        good.start()
        bad.start()
        try:
            wait_for(lambda: len([d for d in store.devices(fleet="e2e-rb") if d["bundle_version"]]) == 2)
            r = manager.create(
                RolloutSpec(
                    fleet="e2e-rb",
                    model_id=compiled.manifest.model_id,
                    bundle_version="e2e-3",
                    stages=(100,),
                    soak_s=0,
                    health_window_s=1.0,
                    gates=NO_LATENCY_GATE,
                )
            )
            image = np.zeros((28, 28), dtype=np.uint8)

            def members() -> dict[str, str]:
                good.infer(image)
                got = manager.get(r["id"])
                assert got is not None
                return {m["device_id"]: m["state"] for m in got["members"]}

            wait_for(lambda: members().get("good-01") == "reverted", timeout=120)
            got = manager.get(r["id"])
            assert got is not None and got["state"] == "halted"
            assert "max_failure_rate" in got["reason"] and "bad-01" in got["reason"]
            assert members()["bad-01"] == "failed"
            wait_for(lambda: (store.device("good-01") or {}).get("bundle_version") == old.bundle_version)
        finally:
            good.stop()
            bad.stop()
