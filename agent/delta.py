"""Update artifacts: what changed between two bundles, encoded per file as small as it pays.

The host runs :func:`make_update` on an old and a new bundle and writes ``update.json`` (an
:class:`UpdateManifest`) plus one artifact file per changed file. The device runs :func:`apply_file` /
:func:`apply_update` against the bundle it already has. Each file of the new bundle goes by the smallest of:

``unchanged``  the same bytes already exist in the old bundle (maybe under another path): 0 bytes;
``zstd``       the whole new file, zstd-compressed;
``patch``      zstd with an old file as a raw-content dictionary (what ``zstd --patch-from`` does);
``xor``        same-size files: old XOR new, byte planes of 4-byte lanes split apart, then zstd;
``grid``       same-size files: float32 words as ``new = old + k * scale`` with an int8 ``k`` and one
               scale per 1 KiB block (at the best of four byte phases), plus a byte residual that
               fixes every byte the grid did not reproduce exactly, then zstd. A fine-tune snapped
               to such a grid on the host (:mod:`compiler.finetune`) costs about one byte per weight
               before zstd; any file still reconstructs exactly, the residual only grows.

The update manifest is NOT trusted by the device: the update is only a way to rebuild files whose
sha256 the signed target manifest states. :func:`apply_file` checks the base file's hash before and
the result's hash after; a mismatch raises :class:`DeltaError` and nothing is written.

Only numpy and zstandard: this module runs on the device.

>>> upd = make_update(Path("old"), Path("new"), Path("upd"))  # doctest: +SKIP
>>> [(f.path, f.method, f.artifact_size) for f in upd.files]  # doctest: +SKIP
[('dense.onnx', 'grid', 41210), ('dense.pte', 'grid', 41840), ...]
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import zstandard

from agent.contract import MANIFEST_FILENAME, BundleManifest, Runtime
from agent.contract._base import ContractModel, Identifier, Sha256Hex, described
from agent.contract.manifest import BundlePath
from agent.errors import UserError

__all__ = [
    "METHODS",
    "UPDATE_FILENAME",
    "DeltaError",
    "FileUpdate",
    "Method",
    "UpdateManifest",
    "apply_file",
    "apply_update",
    "decode",
    "encode",
    "make_update",
]

log = logging.getLogger(__name__)

UPDATE_FILENAME = "update.json"
Method = Literal["unchanged", "zstd", "patch", "xor", "grid"]
METHODS: tuple[Method, ...] = ("unchanged", "zstd", "patch", "xor", "grid")

_LEVEL = 19
_BLOCK_WORDS = 256  # grid: one scale and one phase per 1 KiB
_GRID_MAGIC = b"EPG1"
_MAX_OUTPUT = 1 << 31


class DeltaError(UserError):
    """An update artifact is malformed, made against another base, or does not rebuild the target file."""


class FileUpdate(ContractModel):
    """How to rebuild one file of the new bundle."""

    path: BundlePath = described("Path of the file in the new bundle.")
    variant: Identifier | None = described("Variant the file belongs to; null for manifest-level files.")
    runtime: Runtime | None = described("Runtime of the file; null for manifest-level files.")
    method: Method = described("unchanged, zstd, patch, xor or grid (see agent/delta.py).")
    base_path: BundlePath | None = described(
        "File of the old bundle the method starts from (unchanged, patch, xor, grid); null for zstd."
    )
    base_sha256: Sha256Hex | None = described("SHA-256 the base file must have; null for zstd.")
    target_sha256: Sha256Hex = described("SHA-256 of the rebuilt file (also in the signed target manifest).")
    target_size: int = described("Size of the rebuilt file in bytes.", ge=0)
    artifact: BundlePath | None = described("Artifact file, relative to update.json; null for unchanged.")
    artifact_sha256: Sha256Hex | None = described("SHA-256 of the artifact file; null for unchanged.")
    artifact_size: int = described("Bytes of the artifact file (what goes over the wire).", ge=0)


class UpdateManifest(ContractModel):
    """``update.json``: rebuild bundle ``to_version`` from ``from_version`` of ``model_id``."""

    format: Literal["edgeprune-update/1"] = described("Format of this file.", default="edgeprune-update/1")
    model_id: Identifier = described("Model family of both bundles.")
    from_version: Identifier = described("Bundle version the device must have.")
    to_version: Identifier = described("Bundle version the update produces.")
    from_manifest_sha256: Sha256Hex = described("SHA-256 of the old bundle's manifest.json.")
    to_manifest_sha256: Sha256Hex = described("SHA-256 of the new bundle's manifest.json.")
    files: tuple[FileUpdate, ...] = described("One entry per file of the new bundle (manifest excluded).")
    full_bytes: int = described("Bytes of the full new bundle (every file plus manifest.json).", ge=0)

    def wire_bytes(self, paths: Iterable[str] | None = None) -> int:
        """Artifact bytes to fetch for ``paths`` (all if ``None``); manifest and update.json excluded."""
        wanted = None if paths is None else set(paths)
        return sum(f.artifact_size for f in self.files if wanted is None or f.path in wanted)

    def entry(self, path: str) -> FileUpdate | None:
        """The entry rebuilding ``path``, or ``None``."""
        return next((f for f in self.files if f.path == path), None)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _zstd_dict(base: bytes) -> zstandard.ZstdCompressionDict:
    return zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def _window_log(*sizes: int) -> int:
    need = max(max(sizes, default=1), 1 << 20)
    return min(max(need - 1, 1).bit_length() + 1, 30)


def _compress(data: bytes, *, level: int = _LEVEL, base: bytes | None = None) -> bytes:
    params = zstandard.ZstdCompressionParameters.from_level(
        level, window_log=_window_log(len(data), len(base or b"")), source_size=len(data)
    )
    dict_data = None if base is None else _zstd_dict(base)
    out: bytes = zstandard.ZstdCompressor(compression_params=params, dict_data=dict_data).compress(data)
    return out


def _decompress(data: bytes, *, size: int, base: bytes | None = None) -> bytes:
    dict_data = None if base is None else _zstd_dict(base)
    try:
        out: bytes = zstandard.ZstdDecompressor(max_window_size=1 << 31, dict_data=dict_data).decompress(
            data, max_output_size=size
        )
    except zstandard.ZstdError as exc:
        raise DeltaError(f"corrupt artifact: {exc}") from exc
    if len(out) != size:
        raise DeltaError(f"artifact decodes to {len(out)} bytes, expected {size}")
    return out


def _shuffle4(data: np.ndarray) -> np.ndarray:
    pad = (-len(data)) % 4
    lanes = np.concatenate([data, np.zeros(pad, np.uint8)]).reshape(-1, 4)
    return np.ascontiguousarray(lanes.T).ravel()


def _unshuffle4(data: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(data.reshape(4, -1).T).ravel()[:size]


# ---- grid codec --------------------------------------------------------------------------------


def _words(buf: np.ndarray, phase: int, nblocks: int) -> np.ndarray:
    """float32 words of ``buf`` starting at byte ``phase``, zero-padded to ``nblocks`` blocks."""
    count = (len(buf) - phase) // 4 if len(buf) > phase else 0
    out = np.zeros(nblocks * _BLOCK_WORDS, np.uint32)
    out[:count] = np.frombuffer(buf[phase : phase + 4 * count].tobytes(), "<u4")
    return out


def _pow2(x: np.ndarray) -> np.ndarray:
    """The power of two nearest to each finite positive ``x`` (inf stays inf)."""
    with np.errstate(all="ignore"):
        return np.where(np.isfinite(x) & (x > 0), np.exp2(np.rint(np.log2(x))), np.inf)


def _mode_pow2(ad: np.ndarray) -> np.ndarray:
    """Per row of ``ad`` (inf = ignore), the most common power of two nearest to its finite values."""
    rows = ad.shape[0]
    with np.errstate(all="ignore"):
        e = np.rint(np.log2(ad))
    valid = np.isfinite(e)
    e = np.clip(np.where(valid, e, 0), -160, 127).astype(np.int64) + 160
    counts = np.zeros((rows, 288), np.int64)
    np.add.at(counts, (np.repeat(np.arange(rows), ad.shape[1])[valid.ravel()], e.ravel()[valid.ravel()]), 1)
    best = counts.argmax(axis=1)
    has = counts.max(axis=1) > 0
    return np.where(has, np.exp2(best.astype(np.float64) - 160), np.inf).astype(np.float64)


def _grid_apply(
    old: np.ndarray, phases: np.ndarray, scales: np.ndarray, ks: np.ndarray, nblocks: int
) -> np.ndarray:
    """Rebuild: every word with ``k != 0`` becomes ``old + k * scale`` (float32); blocks in order."""
    out = old.copy()
    n = len(old)
    with np.errstate(all="ignore"):
        for phase in range(4):
            blocks = np.flatnonzero(phases == phase)
            if not len(blocks):
                continue
            count = max((n - phase) // 4, 0)
            base = _words(old, phase, nblocks).reshape(nblocks, _BLOCK_WORDS)[blocks]
            k = ks.reshape(nblocks, _BLOCK_WORDS)[blocks]
            rebuilt = (
                base.view("<f4") + k.astype(np.float32) * scales[blocks, None].astype(np.float32)
            ).view("<u4")
            word_index = blocks[:, None] * _BLOCK_WORDS + np.arange(_BLOCK_WORDS)[None, :]
            write = (k != 0) & (word_index < count)
            idx = word_index[write]
            vals = rebuilt[write].astype("<u4")
            byte_pos = phase + 4 * idx
            for lane in range(4):
                out[byte_pos + lane] = ((vals >> (8 * lane)) & 0xFF).astype(np.uint8)
    return out


def _grid_encode(old_b: bytes, new_b: bytes, *, level: int) -> bytes:
    old = np.frombuffer(old_b, np.uint8)
    new = np.frombuffer(new_b, np.uint8)
    n = len(new)
    nblocks = max(-(-n // (4 * _BLOCK_WORDS)), 1)
    best_score = np.full(nblocks, -1, np.int64)
    phases = np.zeros(nblocks, np.uint8)
    scales = np.zeros(nblocks, np.float32)
    ks = np.zeros((nblocks, _BLOCK_WORDS), np.int8)
    with np.errstate(all="ignore"):
        for phase in range(4):
            ow = _words(old, phase, nblocks)
            nw = _words(new, phase, nblocks)
            of = ow.view("<f4").reshape(nblocks, _BLOCK_WORDS)
            nf = nw.view("<f4").reshape(nblocks, _BLOCK_WORDS)
            changed = (ow != nw).reshape(nblocks, _BLOCK_WORDS)
            d = (nf.astype(np.float64) - of.astype(np.float64)).astype(np.float32)
            ad = np.where(changed & np.isfinite(d) & (d != 0), np.abs(d), np.inf)
            smallest = ad.min(axis=1)
            # snapped fine-tunes use power-of-two scales (exact products): try the most common power of
            # two of |d| and the two below it (robust to misaligned garbage in the block), and the minimum
            mode = _mode_pow2(ad)
            candidates = [mode, mode / 2, mode / 4, _pow2(smallest), smallest]
            for cand in candidates:
                scale = np.where(np.isfinite(cand) & (cand > 0), cand, 0).astype(np.float32)
                safe = np.where(scale > 0, scale, 1).astype(np.float32)
                kf = np.rint(d / safe[:, None])
                valid = changed & (scale[:, None] > 0) & np.isfinite(kf) & (np.abs(kf) <= 127) & (kf != 0)
                k = np.where(valid, kf, 0).astype(np.int8)
                rebuilt = (of + k.astype(np.float32) * scale[:, None]).view("<u4")
                ok = valid & (rebuilt == nw.reshape(nblocks, _BLOCK_WORDS))
                score = ok.sum(axis=1)
                better = score > best_score
                best_score = np.where(better, score, best_score)
                phases = np.where(better, phase, phases).astype(np.uint8)
                scales = np.where(better, scale, scales).astype(np.float32)
                ks = np.where(better[:, None], np.where(ok, k, 0), ks).astype(np.int8)
    rebuilt_all = _grid_apply(old[:n] if len(old) >= n else old, phases, scales, ks.ravel(), nblocks)
    residual = rebuilt_all ^ new
    header = _GRID_MAGIC + struct.pack("<QI", n, nblocks)
    body = phases.tobytes() + scales.tobytes() + ks.tobytes() + _shuffle4(residual).tobytes()
    return header + _compress(body, level=level)


def _grid_decode(old_b: bytes, artifact: bytes, size: int) -> bytes:
    if artifact[:4] != _GRID_MAGIC or len(artifact) < 16:
        raise DeltaError("corrupt grid artifact: bad header")
    n, nblocks = struct.unpack("<QI", artifact[4:16])
    if n != size or len(old_b) != size or nblocks != max(-(-n // (4 * _BLOCK_WORDS)), 1):
        raise DeltaError("grid artifact does not fit this base file")
    pad = (-n) % 4
    body_size = nblocks * (1 + 4 + _BLOCK_WORDS) + n + pad
    body = np.frombuffer(_decompress(artifact[16:], size=body_size), np.uint8)
    phases = body[:nblocks]
    scales = body[nblocks : 5 * nblocks].view("<f4")
    ks = body[5 * nblocks : 5 * nblocks + nblocks * _BLOCK_WORDS].view(np.int8)
    residual = _unshuffle4(body[5 * nblocks + nblocks * _BLOCK_WORDS :], n)
    if phases.max(initial=0) > 3:
        raise DeltaError("corrupt grid artifact: bad phase")
    old = np.frombuffer(old_b, np.uint8)
    rebuilt: bytes = (_grid_apply(old, phases, scales, ks, nblocks) ^ residual).tobytes()
    return rebuilt


# ---- one file ------------------------------------------------------------------------------------


def encode(method: Method, new: bytes, base: bytes | None, *, level: int = _LEVEL) -> bytes | None:
    """The artifact for ``new`` by ``method`` (``base`` is the old file); ``None`` if it does not apply.

    >>> decode("zstd", encode("zstd", b"abc" * 100, None), None, size=300) == b"abc" * 100
    True
    """
    if method == "unchanged":
        return b"" if base == new else None
    if method == "zstd":
        return _compress(new, level=level)
    if base is None:
        return None
    if method == "patch":
        return _compress(new, level=level, base=base)
    if len(base) != len(new):
        return None
    if method == "xor":
        x = np.frombuffer(base, np.uint8) ^ np.frombuffer(new, np.uint8)
        return _compress(_shuffle4(x).tobytes(), level=level)
    return _grid_encode(base, new, level=level)


def decode(method: Method, artifact: bytes, base: bytes | None, *, size: int) -> bytes:
    """Inverse of :func:`encode`. Raises :class:`DeltaError` on malformed input (never checks hashes)."""
    if method == "unchanged":
        if base is None:
            raise DeltaError("unchanged file without a base")
        return base
    if method == "zstd":
        return _decompress(artifact, size=size)
    if base is None:
        raise DeltaError(f"method {method} needs a base file")
    if method == "patch":
        return _decompress(artifact, size=size, base=base)
    if len(base) != size:
        raise DeltaError(f"{method} needs a base of {size} bytes, got {len(base)}")
    if method == "xor":
        pad = (-size) % 4
        x = _unshuffle4(np.frombuffer(_decompress(artifact, size=size + pad), np.uint8), size)
        out: bytes = (np.frombuffer(base, np.uint8) ^ x).tobytes()
        return out
    if method == "grid":
        return _grid_decode(base, artifact, size)
    raise DeltaError(f"unknown method {method!r}")


def apply_file(entry: FileUpdate, artifact: bytes, old_bundle: Path, *, expected_sha256: str) -> bytes:
    """Rebuild one file: check the base's hash, decode, check the result against ``expected_sha256``.

    ``expected_sha256`` comes from the signed target manifest, never from the update manifest alone.
    """
    if entry.target_sha256 != expected_sha256:
        raise DeltaError(f"{entry.path}: the update targets another file than the signed manifest names")
    if entry.artifact_sha256 is not None and _sha(artifact) != entry.artifact_sha256:
        raise DeltaError(f"{entry.path}: artifact {entry.artifact} is corrupt (sha256 mismatch)")
    base = None
    if entry.base_path is not None:
        try:
            base = (old_bundle / entry.base_path).read_bytes()
        except OSError as exc:
            raise DeltaError(f"{entry.path}: base file {entry.base_path} unreadable ({exc})") from exc
        if _sha(base) != entry.base_sha256:
            raise DeltaError(
                f"{entry.path}: the update was made against another {entry.base_path} (base sha256 mismatch)",
                hint="the device is not on the version the update starts from; fetch the full file",
            )
    out = decode(entry.method, artifact, base, size=entry.target_size)
    if _sha(out) != expected_sha256:
        raise DeltaError(f"{entry.path}: the rebuilt file does not match the signed sha256; not used")
    return out


def apply_update(
    update_dir: Path,
    old_bundle: Path,
    out: Path,
    *,
    target: BundleManifest,
    paths: Iterable[str] | None = None,
) -> list[Path]:
    """Rebuild ``paths`` (every file of ``target`` if ``None``) into ``out`` from ``update_dir``.

    Each file is written to a temporary name, fsynced and renamed only after its sha256 matched
    ``target`` (the signed manifest). Returns the written paths.
    """
    update = UpdateManifest.from_json((update_dir / UPDATE_FILENAME).read_bytes())
    if update.to_version != target.bundle_version or update.model_id != target.model_id:
        raise DeltaError(
            f"update {update.model_id} {update.from_version}->{update.to_version} does not build "
            f"{target.model_id} {target.bundle_version}"
        )
    expected = {f.path: f.sha256 for v in target.variants for f in v.files}
    written = []
    for path in expected if paths is None else paths:
        entry = update.entry(path)
        if entry is None:
            raise DeltaError(f"the update has no entry for {path}")
        artifact = b"" if entry.artifact is None else (update_dir / entry.artifact).read_bytes()
        data = apply_file(entry, artifact, old_bundle, expected_sha256=expected[path])
        written.append(write_atomic(out / path, data))
    return written


def write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


# ---- host side -----------------------------------------------------------------------------------


def _candidates(path: str, runtime: str | None, old: BundleManifest, new_size: int) -> list[str]:
    """Old files worth trying as a base for a new file: same path first, then same runtime by size."""
    out = []
    old_files = [(f.path, f.runtime, f.size_bytes) for v in old.variants for f in v.files]
    if any(p == path for p, _, _ in old_files):
        out.append(path)
    same = sorted((abs(size - new_size), p) for p, rt, size in old_files if rt == runtime and p != path)
    out.extend(p for _, p in same[:2])
    return out


def best_encoding(
    new: bytes, bases: dict[str, bytes], *, level: int = _LEVEL, methods: Iterable[Method] = METHODS
) -> tuple[Method, str | None, bytes]:
    """Try every method against every base; return ``(method, base_path, artifact)`` of the smallest."""
    methods = tuple(methods)
    best: tuple[Method, str | None, bytes] | None = None
    for base_path, base in bases.items():
        if "unchanged" in methods and base == new:
            return "unchanged", base_path, b""
    if "zstd" in methods:
        best = ("zstd", None, _compress(new, level=level))
    for base_path, base in bases.items():
        for method in methods:
            if method in ("unchanged", "zstd"):
                continue
            artifact = encode(method, new, base, level=level)
            if artifact is not None and (best is None or len(artifact) < len(best[2])):
                best = (method, base_path, artifact)
    if best is None:
        return "zstd", None, _compress(new, level=level)
    return best


def make_update(
    old_bundle: Path,
    new_bundle: Path,
    out: Path,
    *,
    variants: Iterable[str] | None = None,
    level: int = _LEVEL,
    methods: Iterable[Method] = METHODS,
) -> UpdateManifest:
    """Write ``out/update.json`` and ``out/files/...``: what rebuilds ``new_bundle`` from ``old_bundle``.

    Both bundles are checked (sizes, hashes; not signatures: the device checks the target's). ``variants``
    limits the update to those variants of the new bundle. ``methods`` limits the codecs tried (the
    benchmark uses it to compare). Deterministic for the same inputs.

    >>> make_update(Path("b1"), Path("b2"), Path("upd")).wire_bytes()  # doctest: +SKIP
    123456
    """
    from agent.bundle import open_bundle  # local: keep this module importable without cryptography

    old = open_bundle(old_bundle, public_key=None)
    new = open_bundle(new_bundle, public_key=None)
    if old.model_id != new.model_id:
        raise DeltaError(f"cannot diff {old.model_id} against {new.model_id}: different models")
    wanted = None if variants is None else set(variants)
    if wanted is not None:
        unknown = wanted - {v.name for v in new.variants}
        if unknown:
            raise DeltaError(f"the new bundle has no variant {sorted(unknown)}")
    old_files = {f.path: f for v in old.variants for f in v.files}
    by_hash = {f.sha256: f.path for f in old_files.values()}
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    cache: dict[str, bytes] = {}

    def read_old(path: str) -> bytes:
        if path not in cache:
            cache[path] = (old_bundle / path).read_bytes()
        return cache[path]

    for variant in new.variants:
        if wanted is not None and variant.name not in wanted:
            continue
        for f in variant.files:
            if f.sha256 in by_hash:
                base_path = by_hash[f.sha256]
                entries.append(
                    FileUpdate(
                        path=f.path,
                        variant=variant.name,
                        runtime=f.runtime,
                        method="unchanged",
                        base_path=base_path,
                        base_sha256=f.sha256,
                        target_sha256=f.sha256,
                        target_size=f.size_bytes,
                        artifact=None,
                        artifact_sha256=None,
                        artifact_size=0,
                    )
                )
                continue
            data = (new_bundle / f.path).read_bytes()
            bases = {p: read_old(p) for p in _candidates(f.path, f.runtime, old, f.size_bytes)}
            method, chosen, artifact = best_encoding(data, bases, level=level, methods=methods)
            rel = f"files/{f.path}.{method}"
            write_atomic(out / rel, artifact)
            entries.append(
                FileUpdate(
                    path=f.path,
                    variant=variant.name,
                    runtime=f.runtime,
                    method=method,
                    base_path=chosen,
                    base_sha256=None if chosen is None else old_files[chosen].sha256,
                    target_sha256=f.sha256,
                    target_size=f.size_bytes,
                    artifact=rel,
                    artifact_sha256=_sha(artifact),
                    artifact_size=len(artifact),
                )
            )
            log.info("%s: %s from %s, %d -> %d bytes", f.path, method, chosen, f.size_bytes, len(artifact))
    new_manifest = (new_bundle / MANIFEST_FILENAME).read_bytes()
    update = UpdateManifest(
        model_id=new.model_id,
        from_version=old.bundle_version,
        to_version=new.bundle_version,
        from_manifest_sha256=_sha((old_bundle / MANIFEST_FILENAME).read_bytes()),
        to_manifest_sha256=_sha(new_manifest),
        files=tuple(entries),
        full_bytes=len(new_manifest) + sum(f.size_bytes for v in new.variants for f in v.files),
    )
    write_atomic(out / UPDATE_FILENAME, update.to_json().encode())
    return update
