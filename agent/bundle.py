"""Open and verify a bundle directory: manifest, every file's size and sha256, the signature.

Used by the agent before it loads anything, by the fleet before it serves a bundle, and by the compiler
as the last check of what it wrote.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

from agent.contract import MANIFEST_FILENAME, BundleManifest
from agent.errors import UserError
from agent.signing import PublicKey, verify_manifest

__all__ = ["BundleError", "file_sha256", "open_bundle", "pack_bundle", "unpack_bundle"]


class BundleError(UserError):
    """A bundle is missing, incomplete or corrupt."""


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def open_bundle(directory: Path, *, public_key: PublicKey | None) -> BundleManifest:
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


def pack_bundle(directory: Path, archive: Path) -> Path:
    """Write ``directory`` as one uncompressed tar file: sorted, owner and time stripped, so the same bundle
    always gives the same bytes. The bundle is checked first (without signature)."""
    open_bundle(directory, public_key=None)
    archive.parent.mkdir(parents=True, exist_ok=True)
    tmp = archive.with_name(archive.name + ".part")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=path.relative_to(directory).as_posix())
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mtime = 0
            info.mode = 0o644
            with path.open("rb") as f:
                tar.addfile(info, f)
    os.replace(tmp, archive)
    return archive


def unpack_bundle(archive: Path, directory: Path, *, public_key: PublicKey | None) -> BundleManifest:
    """Extract ``archive`` into ``directory`` (which must not exist) and check it like :func:`open_bundle`.

    Members that would land outside ``directory`` (absolute paths, ``..``, links) are refused by the tar
    ``data`` filter; on any failure nothing is left at ``directory``.
    """
    if directory.exists():
        raise BundleError(f"{directory} already exists", hint="unpack into a new directory")
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        try:
            with tarfile.open(archive, "r:") as tar:
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, OSError) as exc:
            raise BundleError(f"cannot unpack {archive}: {exc}") from exc
        manifest = open_bundle(tmp, public_key=public_key)
        tmp.chmod(0o755)
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest
