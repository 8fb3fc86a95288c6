"""Open and verify a bundle directory: manifest, every file's size and sha256, the signature.

Used by the agent before it loads anything, by the fleet before it serves a bundle, and by the compiler
as the last check of what it wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.contract import MANIFEST_FILENAME, BundleManifest
from agent.errors import UserError
from agent.signing import verify_manifest

__all__ = ["BundleError", "file_sha256", "open_bundle"]


class BundleError(UserError):
    """A bundle is missing, incomplete or corrupt."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_bundle(directory: Path, *, public_key: Ed25519PublicKey | None) -> BundleManifest:
    """Read and check ``directory`` and, given ``public_key``, its signature.

    ``public_key=None`` skips the signature check: only for trusted local tools, never on a device.

    Every file the manifest lists must exist with the stated size and hash; nothing is loaded before.
    """
    path = directory / MANIFEST_FILENAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(
            f"{directory} is not a bundle: cannot read {MANIFEST_FILENAME} ({exc.strerror})"
        ) from exc
    manifest = BundleManifest.from_json(data)
    if public_key is not None:
        verify_manifest(manifest, public_key)
    for variant in manifest.variants:
        for f in variant.files:
            target = directory / f.path
            if not target.is_file():
                raise BundleError(f"bundle file {f.path} of variant {variant.name} is missing")
            size = target.stat().st_size
            if size != f.size_bytes:
                raise BundleError(f"bundle file {f.path} has {size} bytes, the manifest says {f.size_bytes}")
            if file_sha256(target) != f.sha256:
                raise BundleError(f"bundle file {f.path} does not match its sha256 (corrupt or tampered)")
    return manifest
