"""The dashboard in a real headless Chromium: what a person would see, read from the rendered DOM."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.contract import Birth, BundleRef, Metrics, Percentiles, Readings, Status, device_topic, envelope
from agent.signing import KeyPair
from fleet.broker import MosquittoBroker, free_port
from fleet.server import FleetServer, ServeConfig
from tests.fleet_fixtures import make_bundle
from tests.helpers import connected_client

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FLEET = "dash"
TOKEN = "dash-token"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "chromium is not installed (Debian package 'chromium'; scripts/bootstrap.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must have it")
        pytest.skip(reason)
    return found


def render(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, as Chromium dumps it."""
    out = subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=8000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout


@pytest.fixture(scope="module")
def server(
    broker: MosquittoBroker, signing_keys: KeyPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetServer]:
    chromium()
    root = tmp_path_factory.mktemp("fleet-dash")
    config = ServeConfig(
        db=str(root / "fleet.db"),
        broker=broker.url,
        data_dir=root / "data",
        http_port=free_port(),
        public_key=signing_keys.public,
        token=TOKEN,
        fleet=FLEET,
        group="dash-tests",
        tick_s=0.2,
    )
    with FleetServer(config) as running:
        client = connected_client(broker, "dash-devices")
        t0 = datetime.now(UTC) - timedelta(minutes=5)
        msgs = []
        for i, dev in enumerate(("cam-01", "cam-02")):
            msgs.append(
                Birth(
                    **envelope(device_id=dev, seq=0),
                    profile="rpi4" if i == 0 else "jetson",
                    agent_version="0.1.0",
                    backend="onnx",
                    bundle=BundleRef(model_id="fmnist-resnet", bundle_version="1.0.0"),
                    variants=("dense", "static-50"),
                )
            )
        for k in range(12):
            env = envelope(device_id="cam-01", seq=k + 1)
            env["sent_at"] = t0 + timedelta(seconds=20 * k)
            msgs.append(
                Metrics(
                    **env,
                    window_s=20,
                    inferences=50,
                    latency=Percentiles(p50_ms=2 + k % 3, p90_ms=4 + k % 3, p99_ms=9),
                    active_variant="dense" if k < 6 else "static-50",
                    readings=Readings(battery_pct=90 - 3 * k, charging=False),
                )
            )
        msgs.append(Status(**envelope(device_id="cam-02", seq=1), state="offline", uptime_s=3))
        channels = {"birth": "birth", "metrics": "metrics", "status": "status"}
        for m in msgs:
            topic = device_topic(FLEET, m.device_id, channels[m.kind])  # type: ignore[arg-type]
            client.publish(topic, m.to_json().encode(), qos=1).wait_for_publish(5)
        client.disconnect()
        client.loop_stop()
        assert running.store is not None and running.manager is not None
        deadline = time.monotonic() + 20
        while (running.store.device("cam-01") or {}).get("active_variant") != "static-50":
            assert time.monotonic() < deadline, "telemetry did not arrive"
            time.sleep(0.05)
        while (running.store.device("cam-02") or {}).get("online") is not False:
            assert time.monotonic() < deadline, "offline status did not arrive"
            time.sleep(0.05)
        for version in ("1.0.0", "1.1.0"):
            make_bundle(root / "src" / version, signing_keys, version=version)
            from fleet.registry import upload_bundle

            upload_bundle(
                running.store, data_dir=config.data_dir, source=root / "src" / version, public_key=None
            )
        from fleet.rollouts import RolloutSpec

        running.manager.create(
            RolloutSpec(fleet=FLEET, model_id="fmnist-resnet", bundle_version="1.1.0", stages=(50, 100))
        )
        yield running


def test_fleet_table_shows_devices_state_and_variant(server: FleetServer, tmp_path: Path) -> None:
    dom = render(f"{server.url}/?token={TOKEN}", tmp_path / "profile")
    rows = re.findall(r'<tr data-device="([^"]+)">(.*?)</tr>', dom, flags=re.S)
    assert [name for name, _ in rows] == ["cam-01", "cam-02"]
    cam1, cam2 = (re.sub(r"<[^>]+>", "|", body) for _, body in rows)
    assert "online" in cam1 and "static-50" in cam1 and "rpi4" in cam1 and "57 %" in cam1
    assert "offline" in cam2 and "jetson" in cam2
    assert "1 of 2 devices online" in dom


def test_rollout_shows_its_stage_and_gates(server: FleetServer, tmp_path: Path) -> None:
    dom = render(f"{server.url}/?token={TOKEN}", tmp_path / "profile")
    assert "fmnist-resnet 1.1.0" in dom
    assert re.search(r"Stage 1: 50% · \d/1 committed", dom), dom[-3000:]
    assert "Stage 2: 100%" in dom
    assert "max_failure_rate" in dom and "running" in dom


def test_device_charts_draw_latency_battery_and_variant(server: FleetServer, tmp_path: Path) -> None:
    dom = render(f"{server.url}/?token={TOKEN}&device=cam-01", tmp_path / "profile")
    assert 'id="device-name">cam-01<' in dom
    found = re.findall(r'<polyline points="([^"]+)"[^>]*data-series="(\w+)"', dom)
    lines = {series: points for points, series in found}
    assert set(lines) == {"p50", "p90", "battery"}
    assert all(len(points.split()) == 12 for points in lines.values())
    labels = re.findall(r'class="variant-label"[^>]*>([^<]+)<', dom)
    assert labels == ["dense", "static-50"]


def test_without_a_token_the_page_asks_for_one(server: FleetServer, tmp_path: Path) -> None:
    dom = render(server.url + "/", tmp_path / "fresh-profile")
    assert "enter the API token" in dom
    assert '<form id="token-form">' in dom  # no longer hidden
