"""`edgeprune fleet serve` as a real process (stops cleanly on SIGTERM) and the client subcommands."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from agent.contract import Birth, device_topic, envelope
from agent.signing import KeyPair
from fleet.broker import MosquittoBroker, free_port
from tests.fleet_fixtures import make_bundle
from tests.helpers import connected_client

pytestmark = [pytest.mark.broker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeprune.cli", "fleet", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
        check=False,
    )


def test_serve_then_drive_it_from_the_cli_then_sigterm(
    broker: MosquittoBroker, signing_keys: KeyPair, tmp_path: Path
) -> None:
    port = free_port()
    env = os.environ | {
        "EDGEPRUNE_FLEET_TOKEN": "cli-token",
        "EDGEPRUNE_FLEET_URL": f"http://127.0.0.1:{port}",
    }
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgeprune.cli",
            "fleet",
            "serve",
            "--db",
            f"sqlite:///{tmp_path / 'fleet.db'}",
            "--broker",
            broker.url,
            "--data-dir",
            str(tmp_path / "data"),
            "--http",
            f"127.0.0.1:{port}",
            "--public-key",
            str(signing_keys.public),
            "--fleet",
            "cli",
            "--group",
            "cli-tests",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
                    assert resp.status == 200
                    break
            except OSError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "fleet serve did not answer in 60 s"
                time.sleep(0.2)
        client = connected_client(broker, "cli-device")
        b = Birth(
            **envelope(device_id="cli-01", seq=0), profile="rpi4", agent_version="0.1.0", backend="onnx"
        )
        client.publish(device_topic("cli", "cli-01", "birth"), b.to_json().encode(), qos=1).wait_for_publish(
            5
        )
        client.disconnect()
        client.loop_stop()
        out = cli("devices", env=env)
        for _ in range(50):
            if "cli-01" in out.stdout:
                break
            time.sleep(0.1)
            out = cli("devices", env=env)
        assert out.returncode == 0, out.stderr
        assert "cli-01" in out.stdout and "online" in out.stdout
        make_bundle(tmp_path / "b", signing_keys, version="3.0.0")
        up = cli("bundles", "upload", str(tmp_path / "b"), env=env)
        assert up.returncode == 0, up.stderr
        assert "uploaded fmnist-resnet 3.0.0" in up.stdout
        created = cli(
            "rollouts", "create", "--model", "fmnist-resnet", "--version", "3.0.0", "--fleet", "cli", env=env
        )
        assert created.returncode == 0, created.stderr
        assert "running" in created.stdout and "stage 1/4" in created.stdout
        rid = created.stdout.split()[0]
        paused = cli("rollouts", "pause", rid, "--reason", "check", env=env)
        assert "paused" in paused.stdout and "reason: check" in paused.stdout
        bad = cli("rollouts", "show", "nope", env=env)
        assert bad.returncode == 1 and bad.stderr.startswith("FleetClientError:") and "404" in bad.stderr
        conf = cli("configure", "cli-01", "--fleet", "cli", "--set", "low_battery_pct=30", env=env)
        assert conf.returncode == 0, conf.stderr
        # revision 1, or 2 when the rollout's first tick sent cli-01 its update before the pause above
        assert re.search(r"desired revision [12],", conf.stdout) and '"low_battery_pct": 30' in conf.stdout
        unknown = cli("configure", "cli-01", "--fleet", "cli", "--set", "warp=9", env=env)
        assert unknown.returncode == 1 and "HTTP 422" in unknown.stderr and "warp" in unknown.stderr
        ghost = cli("configure", "ghost", "--fleet", "cli", env=env)
        assert ghost.returncode == 1 and "no device 'ghost'" in ghost.stderr
        no_token = cli("devices", env={k: v for k, v in env.items() if k != "EDGEPRUNE_FLEET_TOKEN"})
        assert no_token.returncode == 1 and "EDGEPRUNE_FLEET_TOKEN" in no_token.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()
