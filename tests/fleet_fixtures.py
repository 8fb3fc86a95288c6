"""Fixtures shared by the fleet tests: a database URL for SQLite and for PostgreSQL, bundles on disk.

PostgreSQL: the local server at 127.0.0.1:5432 (trust auth, user postgres, database `test`), or
``EDGEPRUNE_TEST_PG`` (a ``postgresql+psycopg://`` URL of a database we may create databases from).
Each test gets a fresh, uniquely named database that is dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract import BundleManifest
from agent.signing import KeyPair, load_private_key, sign_manifest
from tests.samples import write_bundle

PG_ADMIN = os.environ.get("EDGEPRUNE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _pg_admin_or_skip():  # type: ignore[no-untyped-def]
    from sqlalchemy import create_engine
    from sqlalchemy.exc import OperationalError

    engine = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect():
            pass
    except OperationalError as exc:
        engine.dispose()
        reason = f"no PostgreSQL reachable at {PG_ADMIN} ({type(exc.orig).__name__})"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must have it")
        pytest.skip(reason)
    return engine


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import text

    admin = _pg_admin_or_skip()
    name = f"edgeprune_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Every store test runs against SQLite (a file) and PostgreSQL (a fresh database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return str(request.getfixturevalue("pg_url"))


def make_bundle(directory: Path, keys: KeyPair, *, version: str = "1.0.0") -> BundleManifest:
    """A small valid bundle (fake model bytes) of ``version``, signed with ``keys``."""
    manifest = write_bundle(directory)
    manifest = sign_manifest(
        manifest.model_copy(update={"bundle_version": version}), load_private_key(keys.private)
    )
    (directory / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    return manifest
