"""The fleet manager: device registry, telemetry ingestion, staged rollouts, API and dashboard.

Imports the contract from :mod:`agent.contract`, never :mod:`compiler` (the fleet serves bundles, it does
not build them). The parts: :mod:`fleet.store` (SQLite or PostgreSQL), :mod:`fleet.ingest` (MQTT v5
shared subscription, batched writes), :mod:`fleet.registry` (bundle uploads), :mod:`fleet.rollouts` and
:mod:`fleet.gates` (staged rollouts behind health gates), :mod:`fleet.api` (HTTP API and dashboard),
:mod:`fleet.server` (all of it in one process), :mod:`fleet.broker` (a private Mosquitto).

Importing :mod:`fleet` is cheap; the names below load their module on first use.

>>> from fleet import FleetServer, ServeConfig  # doctest: +SKIP
>>> with FleetServer(ServeConfig(db="fleet.db", broker="mqtt://127.0.0.1:1883",
...                              data_dir=Path("fleet-data"))) as server:  # doctest: +SKIP
...     print(server.url)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fleet.api import create_app
    from fleet.gates import GateResult, Gates
    from fleet.ingest import Ingestor
    from fleet.registry import BundleUploadError, upload_bundle
    from fleet.rollouts import Cohort, RolloutError, RolloutManager, RolloutSpec
    from fleet.server import FleetServer, ServeConfig
    from fleet.store import Store, StoreError

__all__ = [
    "BundleUploadError",
    "Cohort",
    "FleetServer",
    "GateResult",
    "Gates",
    "Ingestor",
    "RolloutError",
    "RolloutManager",
    "RolloutSpec",
    "ServeConfig",
    "Store",
    "StoreError",
    "create_app",
    "upload_bundle",
]

_WHERE = {
    "create_app": "fleet.api",
    "GateResult": "fleet.gates",
    "Gates": "fleet.gates",
    "Ingestor": "fleet.ingest",
    "BundleUploadError": "fleet.registry",
    "upload_bundle": "fleet.registry",
    "Cohort": "fleet.rollouts",
    "RolloutError": "fleet.rollouts",
    "RolloutManager": "fleet.rollouts",
    "RolloutSpec": "fleet.rollouts",
    "FleetServer": "fleet.server",
    "ServeConfig": "fleet.server",
    "Store": "fleet.store",
    "StoreError": "fleet.store",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'fleet' has no attribute {name!r}")
