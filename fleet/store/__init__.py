"""The fleet store: registry, telemetry, bundles and rollouts in SQLite or PostgreSQL (same code).

>>> from fleet.store import Store
>>> store = Store("/tmp/fleet.db")  # doctest: +SKIP
"""

from fleet.store import schema
from fleet.store.core import IngestResult, Store, StoreError, database_url
from fleet.store.migrations import MIGRATIONS, migrate

__all__ = ["MIGRATIONS", "IngestResult", "Store", "StoreError", "database_url", "migrate", "schema"]
