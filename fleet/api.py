"""The fleet manager's HTTP API (FastAPI), the dashboard's static files and the artifact endpoint.

Every ``/api`` route and ``/metrics`` need ``Authorization: Bearer <token>``; ``/healthz``, the dashboard
(``/``, ``/static/...``) and ``/artifacts/...`` (devices fetch updates there) are open. The OpenAPI
document is at ``/openapi.json``.

>>> app = create_app(store=store, manager=manager, token="s3cret", data_dir=Path("/srv/fleet"),
...                  public_key=key)  # doctest: +SKIP
"""

from __future__ import annotations

import hmac
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict

from agent.errors import EdgepruneError, UserError
from agent.signing import PublicKey
from fleet.registry import upload_bundle
from fleet.rollouts import DeviceConfig, RolloutManager, RolloutSpec
from fleet.store import Store

__all__ = ["DASHBOARD_DIR", "create_app", "prometheus_text"]

log = logging.getLogger(__name__)

DASHBOARD_DIR = Path(__file__).parent / "dashboard"

_bearer = HTTPBearer(auto_error=False, description="The fleet token (EDGEPRUNE_FLEET_TOKEN).")


class Reason(BaseModel):
    """Why a rollout is paused, resumed or aborted by hand."""

    model_config = ConfigDict(extra="forbid")
    reason: str = ""


class Tags(BaseModel):
    """A device's tags (replaces them all)."""

    model_config = ConfigDict(extra="forbid")
    tags: dict[str, str]


def prometheus_text(
    counters: dict[str, int], devices: list[dict[str, Any]], rollouts: list[dict[str, Any]]
) -> str:
    """The Prometheus text exposition of the fleet's numbers.

    >>> print(prometheus_text({"stored": 3}, [], []).splitlines()[2])
    edgeprune_fleet_messages_stored_total 3
    """
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    metric(
        "edgeprune_fleet_messages_stored_total",
        "counter",
        "Device messages stored.",
        [("", counters.get("stored", 0))],
    )
    metric(
        "edgeprune_fleet_messages_duplicate_total",
        "counter",
        "Device messages dropped as duplicates (message id seen before).",
        [("", counters.get("duplicates", 0))],
    )
    rejects = sorted((k.removeprefix("reject."), v) for k, v in counters.items() if k.startswith("reject."))
    metric(
        "edgeprune_fleet_messages_rejected_total",
        "counter",
        "Device messages rejected, by reason.",
        [(f'{{reason="{reason}"}}', v) for reason, v in rejects],
    )
    online = sum(1 for d in devices if d["online"])
    metric(
        "edgeprune_fleet_devices",
        "gauge",
        "Registered devices by connection state.",
        [('{state="online"}', online), ('{state="offline"}', len(devices) - online)],
    )
    states: dict[str, int] = {}
    for r in rollouts:
        states[r["state"]] = states.get(r["state"], 0) + 1
    metric(
        "edgeprune_fleet_rollouts",
        "gauge",
        "Rollouts by state.",
        [(f'{{state="{k}"}}', v) for k, v in sorted(states.items())],
    )
    return "\n".join(lines) + "\n"


def create_app(
    *,
    store: Store,
    manager: RolloutManager,
    token: str,
    data_dir: Path,
    public_key: PublicKey | None,
    ingest_stats: Callable[[], dict[str, Any]] | None = None,
) -> FastAPI:
    """The whole HTTP surface of one fleet manager (see the module docstring)."""
    if not token:
        raise UserError("the fleet API needs a token", hint="set EDGEPRUNE_FLEET_TOKEN or pass --token")

    def authorized(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> None:
        if credentials is None or not hmac.compare_digest(credentials.credentials.encode(), token.encode()):
            raise HTTPException(
                status_code=401,
                detail="missing or wrong bearer token",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app = FastAPI(
        title="edgeprune fleet manager",
        version="1",
        description="Device registry, telemetry, bundles and staged rollouts of an edgeprune fleet.",
    )

    @app.exception_handler(EdgepruneError)
    async def _domain_error(request: Request, exc: EdgepruneError) -> JSONResponse:
        status = 400 if isinstance(exc, UserError) else 500
        body = {"error": type(exc).__name__, "message": exc.message, "hint": exc.hint}
        return JSONResponse(body, status_code=status)

    api = APIRouter(prefix="/api", dependencies=[Depends(authorized)])

    @api.get("/devices", summary="Every registered device")
    def devices(fleet: str | None = None) -> list[dict[str, Any]]:
        return store.devices(fleet=fleet)

    @api.get("/devices/{device_id}", summary="One device")
    def device(device_id: str, fleet: str | None = None) -> dict[str, Any]:
        found = store.device(device_id, fleet=fleet)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no device {device_id!r}")
        return found

    @api.put("/devices/{device_id}/tags", summary="Replace a device's tags")
    def set_tags(device_id: str, body: Tags, fleet: str = "default") -> dict[str, Any]:
        store.set_tags(device_id, body.tags, fleet=fleet)
        found = store.device(device_id, fleet=fleet)
        assert found is not None
        return found

    @api.put("/devices/{device_id}/config", summary="Set a device's pins, policy overrides and periods")
    def set_config(device_id: str, body: DeviceConfig, fleet: str = "default") -> dict[str, Any]:
        return manager.set_config(device_id, body, fleet=fleet)

    @api.get("/devices/{device_id}/series", summary="A device's metrics over time, oldest first")
    def series(device_id: str, since: float = 0.0, limit: int = 2000) -> list[dict[str, Any]]:
        return store.series(device_id, since=since, limit=min(max(limit, 1), 20000))

    @api.get("/bundles", summary="Uploaded bundles")
    def bundles() -> list[dict[str, Any]]:
        return store.bundles()

    @api.post(
        "/bundles",
        status_code=201,
        summary="Upload a bundle: the request body is a tar from `edgeprune` (agent.bundle.pack_bundle)",
        openapi_extra={
            "requestBody": {
                "content": {"application/x-tar": {"schema": {"type": "string", "format": "binary"}}}
            }
        },
    )
    async def upload(request: Request) -> dict[str, Any]:
        incoming = data_dir / "bundles" / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=incoming, suffix=".tar") as tmp:
            async for chunk in request.stream():
                tmp.write(chunk)
            tmp.flush()
            return await run_in_threadpool(
                upload_bundle, store, data_dir=data_dir, source=Path(tmp.name), public_key=public_key
            )

    _rollout_routes(api, manager)

    @api.get("/stats", summary="Ingestion counters (fleet-wide and this process) and rejects")
    def stats() -> dict[str, Any]:
        counters = store.counters()
        devs = store.devices()
        return {
            "counters": counters,
            "rejects": {k.removeprefix("reject."): v for k, v in counters.items() if k.startswith("reject.")},
            "devices": len(devs),
            "online": sum(1 for d in devs if d["online"]),
            "process": ingest_stats() if ingest_stats else None,
        }

    app.include_router(api)

    @app.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(authorized)])
    def metrics() -> PlainTextResponse:
        text = prometheus_text(store.counters(), store.devices(), manager.rollouts())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/healthz", summary="Liveness")
    def healthz() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(DASHBOARD_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=DASHBOARD_DIR), name="static")
    try:
        from fleet.artifacts import artifacts_app
    except ImportError:  # the OTA part is optional for the API
        log.warning("fleet.artifacts is missing: /artifacts is not served")
    else:
        app.mount("/artifacts", artifacts_app(data_dir))
    return app


def _rollout_routes(api: APIRouter, manager: RolloutManager) -> None:
    @api.get("/rollouts", summary="Every rollout, newest first")
    def rollouts() -> list[dict[str, Any]]:
        return manager.rollouts()

    @api.post("/rollouts", status_code=201, summary="Create a rollout")
    def create(spec: RolloutSpec) -> dict[str, Any]:
        return manager.create(spec)

    @api.get("/rollouts/{rollout_id}", summary="One rollout with its members and gate status")
    def rollout(rollout_id: str) -> dict[str, Any]:
        found = manager.get(rollout_id)
        if found is None:
            raise HTTPException(status_code=404, detail=f"no rollout {rollout_id!r}")
        return found

    def _exists(rollout_id: str) -> None:
        if manager.get(rollout_id) is None:
            raise HTTPException(status_code=404, detail=f"no rollout {rollout_id!r}")

    @api.post("/rollouts/{rollout_id}/pause", summary="Pause a running rollout")
    def pause(rollout_id: str, body: Reason | None = None) -> dict[str, Any]:
        _exists(rollout_id)
        return manager.pause(rollout_id, reason=body.reason if body else "")

    @api.post("/rollouts/{rollout_id}/resume", summary="Resume a paused or halted rollout")
    def resume(rollout_id: str, body: Reason | None = None) -> dict[str, Any]:
        _exists(rollout_id)
        return manager.resume(rollout_id, reason=body.reason if body else "")

    @api.post("/rollouts/{rollout_id}/abort", summary="Abort a rollout (devices not yet told stay put)")
    def abort(rollout_id: str, body: Reason | None = None) -> dict[str, Any]:
        _exists(rollout_id)
        return manager.abort(rollout_id, reason=body.reason if body else "")
