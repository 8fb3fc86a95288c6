"""The fleet manager over real HTTP: auth, devices and series, bundles, rollouts, stats, /metrics,
OpenAPI, artifacts; and a rollout driven end to end through the broker."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import pack_bundle
from agent.contract import (
    Birth,
    BundleRef,
    DesiredState,
    Metrics,
    Percentiles,
    Readings,
    UpdateStatus,
    device_topic,
    envelope,
    parse_message,
)
from agent.signing import KeyPair
from fleet.broker import MosquittoBroker, free_port
from fleet.server import FleetServer, ServeConfig, parse_http
from tests.fleet_fixtures import make_bundle
from tests.helpers import Inbox, connected_client, wait_for

pytestmark = pytest.mark.broker

FLEET = "api"
MODEL = "fmnist-resnet"
TOKEN = "t0ken-for-tests"


class Http:
    def __init__(self, base: str) -> None:
        self.base = base

    def call(
        self, method: str, path: str, body: Any = None, *, token: str | None = TOKEN, raw: bytes | None = None
    ) -> tuple[int, Any]:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            req.add_header("Content-Type", "application/json")
        if raw is not None:
            req.add_header("Content-Type", "application/x-tar")
        try:
            with urllib.request.urlopen(req, timeout=20) as resp:
                text = resp.read()
                status = resp.status
                ctype = resp.headers.get("content-type", "")
        except urllib.error.HTTPError as err:
            with err:
                text = err.read()
                status = err.code
                ctype = err.headers.get("content-type", "")
        return status, json.loads(text) if "json" in ctype else text.decode()

    def get(self, path: str, **kw: Any) -> Any:
        status, body = self.call("GET", path, **kw)
        assert status == 200, (status, body)
        return body


def publish(broker: MosquittoBroker, messages: list[tuple[str, Any]], name: str) -> None:
    client = connected_client(broker, name)
    for channel, m in messages:
        client.publish(
            device_topic(FLEET, m.device_id, channel), m.to_json().encode(), qos=1
        ).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()


@pytest.fixture(scope="module")
def server(
    broker: MosquittoBroker, signing_keys: KeyPair, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FleetServer]:
    root = tmp_path_factory.mktemp("fleet-api")
    config = ServeConfig(
        db=str(root / "fleet.db"),
        broker=broker.url,
        data_dir=root / "data",
        http_port=free_port(),
        public_key=signing_keys.public,
        token=TOKEN,
        fleet=FLEET,
        group="api-tests",
        tick_s=0.2,
    )
    with FleetServer(config) as running:
        yield running


@pytest.fixture(scope="module")
def http(server: FleetServer) -> Http:
    return Http(server.url)


@pytest.fixture(scope="module")
def bundles(signing_keys: KeyPair, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("api-bundles")
    out = {}
    for version in ("1.0.0", "1.1.0"):
        make_bundle(root / version, signing_keys, version=version)
        out[version] = pack_bundle(root / version, root / f"{version}.tar")
    return out


def birth(device: str, version: str = "1.0.0") -> Birth:
    return Birth(
        **envelope(device_id=device, seq=0),
        profile="rpi4",
        agent_version="0.1.0",
        backend="onnx",
        bundle=BundleRef(model_id=MODEL, bundle_version=version),
        variants=("dense", "static-50"),
    )


def test_parse_http() -> None:
    assert parse_http("0.0.0.0:80") == ("0.0.0.0", 80)
    with pytest.raises(Exception, match="HOST:PORT"):
        parse_http("8080")


def test_health_is_open_and_the_api_needs_the_token(http: Http) -> None:
    assert http.get("/healthz", token=None) == {"ok": True}
    assert http.call("GET", "/api/devices", token=None)[0] == 401
    assert http.call("GET", "/api/devices", token="wrong")[0] == 401
    assert http.call("GET", "/metrics", token=None)[0] == 401
    assert http.get("/api/devices") is not None


def test_openapi_is_published(http: Http) -> None:
    doc = http.get("/openapi.json", token=None)
    for path in (
        "/api/devices",
        "/api/devices/{device_id}/series",
        "/api/bundles",
        "/api/rollouts/{rollout_id}/pause",
    ):
        assert path in doc["paths"]


def test_the_dashboard_is_served_without_the_token(http: Http) -> None:
    status, page = http.call("GET", "/", token=None)
    assert status == 200 and "edgeprune fleet" in page
    status, js = http.call("GET", "/static/app.js", token=None)
    assert status == 200 and "localStorage" in js


def test_devices_series_and_stats(broker: MosquittoBroker, http: Http) -> None:
    m = Metrics(
        **envelope(device_id="api-01", seq=1),
        window_s=5,
        inferences=10,
        latency=Percentiles(p50_ms=1.0, p90_ms=1.5, p99_ms=2.0),
        active_variant="static-50",
        readings=Readings(battery_pct=64.0),
    )
    publish(broker, [("birth", birth("api-01")), ("metrics", m)], "api-pub-1")
    dev = wait_for(
        lambda: http.get("/api/devices/api-01") if http.call("GET", "/api/devices/api-01")[0] == 200 else None
    )
    dev = wait_for(lambda: (d := http.get("/api/devices/api-01"))["battery_pct"] == 64.0 and d)
    assert dev["online"] is True and dev["active_variant"] == "static-50" and dev["profile"] == "rpi4"
    series = http.get("/api/devices/api-01/series")
    assert [r["p90_ms"] for r in series] == [1.5]
    assert http.call("GET", "/api/devices/nope")[0] == 404
    client = connected_client(broker, "api-junk")
    client.publish(device_topic(FLEET, "api-01", "metrics"), b"{not json", qos=1).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    stats = wait_for(lambda: (s := http.get("/api/stats"))["rejects"].get("not_json") and s)
    assert stats["counters"]["stored"] >= 2 and stats["process"]["received"] >= 3
    text = http.get("/metrics")
    assert "edgeprune_fleet_messages_stored_total" in text
    assert 'edgeprune_fleet_messages_rejected_total{reason="not_json"}' in text


def test_tags_can_be_set(http: Http) -> None:
    status, dev = http.call("PUT", f"/api/devices/tagged/tags?fleet={FLEET}", {"tags": {"site": "x"}})
    assert status == 200 and dev["tags"] == {"site": "x"}


def test_bundle_upload_list_and_artifacts(http: Http, bundles: dict[str, Path]) -> None:
    status, row = http.call("POST", "/api/bundles", raw=bundles["1.0.0"].read_bytes())
    assert status == 201, row
    assert row["bundle_version"] == "1.0.0"
    assert any(b["bundle_version"] == "1.0.0" for b in http.get("/api/bundles"))
    status, err = http.call("POST", "/api/bundles", raw=b"this is not a tar")
    assert status == 400 and err["error"] == "BundleUploadError"
    req = urllib.request.Request(http.base + f"/artifacts/bundles/{MODEL}/1.0.0/manifest.json")
    req.add_header("Range", "bytes=0-9")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 206 and len(resp.read()) == 10


def test_rollout_errors_are_400_and_404(http: Http) -> None:
    status, err = http.call(
        "POST", "/api/rollouts", {"fleet": FLEET, "model_id": MODEL, "bundle_version": "9"}
    )
    assert status == 400 and "not been uploaded" in err["message"]
    assert http.call("GET", "/api/rollouts/nope")[0] == 404
    assert http.call("POST", "/api/rollouts/nope/pause", {})[0] == 404
    status, err = http.call(
        "POST", "/api/rollouts", {"fleet": FLEET, "model_id": MODEL, "bundle_version": "9", "x": 1}
    )
    assert status == 422


def test_a_rollout_end_to_end_over_mqtt_and_http(
    broker: MosquittoBroker, http: Http, bundles: dict[str, Path]
) -> None:
    for version in ("1.0.0", "1.1.0"):
        assert http.call("POST", "/api/bundles", raw=bundles[version].read_bytes())[0] == 201
    devices = [f"e2e-{i}" for i in range(4)]
    publish(broker, [("birth", birth(d)) for d in devices], "api-pub-2")
    wait_for(lambda: all(http.call("GET", f"/api/devices/{d}")[0] == 200 for d in devices))
    inbox = Inbox(broker, f"edgeprune/v1/{FLEET}/+/desired", client_id="api-e2e-devices")
    spec = {
        "fleet": FLEET,
        "model_id": MODEL,
        "bundle_version": "1.1.0",
        "cohort": {"devices": devices},
        "stages": [25, 100],
        "soak_s": 0,
    }
    status, r = http.call("POST", "/api/rollouts", spec)
    assert status == 201, r
    assert [p["devices"] for p in r["progress"]] == [1, 3]
    device = connected_client(broker, "api-e2e-fake-devices")
    try:
        told: set[str] = set()
        while len(told) < 4:
            topic, payload, _retained = inbox.get(timeout=20)
            if not payload:
                continue
            desired = parse_message(payload)
            assert isinstance(desired, DesiredState) and desired.update is not None
            if desired.device_id not in devices:
                continue
            assert desired.update.base_url == http.base + "/artifacts"
            told.add(desired.device_id)
            for seq, state in enumerate(("downloading", "committed")):
                status_msg = UpdateStatus(
                    **envelope(device_id=desired.device_id, seq=seq),
                    update_id=desired.update.update_id,
                    target=desired.update.target,
                    state=state,
                )
                device.publish(topic.replace("/desired", "/update"), status_msg.to_json().encode(), qos=1)
        done = wait_for(lambda: (g := http.get(f"/api/rollouts/{r['id']}"))["state"] == "completed" and g)
        assert {m["state"] for m in done["members"]} == {"committed"}
        assert {http.get(f"/api/devices/{d}")["bundle_version"] for d in devices} == {"1.1.0"}
    finally:
        device.disconnect()
        device.loop_stop()
        inbox.close()


def test_pause_resume_abort_over_http(broker: MosquittoBroker, http: Http, bundles: dict[str, Path]) -> None:
    http.call("POST", "/api/bundles", raw=bundles["1.1.0"].read_bytes())
    publish(broker, [("birth", birth("par-1")), ("birth", birth("par-2"))], "api-pub-3")
    wait_for(lambda: http.call("GET", "/api/devices/par-2")[0] == 200)
    spec = {
        "fleet": FLEET,
        "model_id": MODEL,
        "bundle_version": "1.1.0",
        "cohort": {"devices": ["par-1", "par-2"]},
    }
    _, r = http.call("POST", "/api/rollouts", spec)
    status, paused = http.call("POST", f"/api/rollouts/{r['id']}/pause", {"reason": "looking"})
    assert status == 200 and paused["state"] == "paused" and paused["reason"] == "looking"
    status, err = http.call("POST", f"/api/rollouts/{r['id']}/pause")
    assert status == 400 and "paused" in err["message"]
    assert http.call("POST", f"/api/rollouts/{r['id']}/resume")[1]["state"] == "running"
    assert http.call("POST", f"/api/rollouts/{r['id']}/abort", {"reason": "no"})[1]["state"] == "aborted"
    assert any(x["id"] == r["id"] for x in http.get("/api/rollouts"))
