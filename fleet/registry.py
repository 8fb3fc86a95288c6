"""Bundles the fleet can roll out: upload (signature checked), stored immutably under the data dir.

Layout (what :mod:`fleet.artifacts` serves): ``<data_dir>/bundles/<model_id>/<bundle_version>/``.

>>> upload_bundle(store, data_dir=Path("/srv/fleet"), source=Path("b.tar"), public_key=key)  # doctest: +SKIP
{'model_id': 'fmnist-resnet', 'bundle_version': '1.1.0', ...}
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from agent.bundle import open_bundle, unpack_bundle
from agent.contract import MANIFEST_FILENAME
from agent.errors import UserError
from agent.signing import PublicKey
from fleet.store import Store

__all__ = ["BundleUploadError", "bundle_dir", "update_dir", "upload_bundle"]

log = logging.getLogger(__name__)


class BundleUploadError(UserError):
    """An uploaded bundle is unacceptable: unsigned, corrupt, or another bundle under a taken version."""


def bundle_dir(data_dir: Path, model_id: str, bundle_version: str) -> Path:
    return data_dir / "bundles" / model_id / bundle_version


def update_dir(data_dir: Path, model_id: str, from_version: str, to_version: str) -> Path:
    return data_dir / "updates" / model_id / from_version / to_version


def _freeze(directory: Path) -> None:
    for path in directory.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o444)


def upload_bundle(
    store: Store, *, data_dir: Path, source: Path, public_key: PublicKey | None
) -> dict[str, Any]:
    """Check ``source`` (a bundle directory or a ``.tar`` from :func:`agent.bundle.pack_bundle`) against
    ``public_key`` and store it. Uploading the same bundle twice is a no-op; another bundle under a
    model id and version already taken is refused (bundles are immutable)."""
    incoming = data_dir / "bundles" / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="upload-", dir=incoming))
    try:
        staged = work / "bundle"
        if source.is_dir():
            open_bundle(source, public_key=public_key)
            shutil.copytree(source, staged)
            manifest = open_bundle(staged, public_key=public_key)  # what was copied, not what was checked
        elif tarfile.is_tarfile(source):
            manifest = unpack_bundle(source, staged, public_key=public_key)
        else:
            raise BundleUploadError(f"{source} is neither a bundle directory nor a tar archive")
        raw = (staged / MANIFEST_FILENAME).read_bytes()
        sha = hashlib.sha256(raw).hexdigest()
        final = bundle_dir(data_dir, manifest.model_id, manifest.bundle_version)
        existing = store.bundle(manifest.model_id, manifest.bundle_version)
        if existing is not None:
            if existing["manifest_sha256"] != sha:
                raise BundleUploadError(
                    f"{manifest.model_id} {manifest.bundle_version} is already stored with another manifest",
                    hint="bundles are immutable: give the new one a new bundle_version",
                )
            return existing
        final.parent.mkdir(parents=True, exist_ok=True)
        _freeze(staged)
        try:
            os.rename(staged, final)
        except OSError as exc:
            if not (final / MANIFEST_FILENAME).is_file():
                raise BundleUploadError(f"cannot store the bundle at {final}: {exc}") from exc
            # Another process stored it first; the database row below decides who won.
        store.add_bundle(
            model_id=manifest.model_id,
            bundle_version=manifest.bundle_version,
            manifest=manifest.model_dump(mode="json"),
            manifest_sha256=sha,
            path=str(final),
        )
        log.info("stored bundle %s %s at %s", manifest.model_id, manifest.bundle_version, final)
        row = store.bundle(manifest.model_id, manifest.bundle_version)
        assert row is not None
        return row
    finally:
        for path in work.rglob("*"):
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(work, ignore_errors=True)
