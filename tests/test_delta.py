"""The update codec: every method rebuilds exactly, the device checks base and target hashes, real bundles."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import open_bundle
from agent.contract import BundleManifest
from agent.delta import (
    METHODS,
    UPDATE_FILENAME,
    DeltaError,
    UpdateManifest,
    apply_file,
    apply_update,
    decode,
    encode,
    make_update,
)
from agent.signing import KeyPair
from compiler.finetune import perturb_onnx, resign_bundle, snap_to_grid

RNG = np.random.default_rng(0)


def make_version(
    src: Path, dst: Path, version: str, key: Path, *, seed: int = 1, bits: int | None = 4
) -> Path:
    """A copy of bundle ``src`` as ``version`` with every .onnx file "fine-tuned" (seeded noise, snapped
    to a ``bits`` grid unless None) and re-signed with ``key``. The .pte files stay as they are."""
    shutil.copytree(src, dst)
    manifest = BundleManifest.from_json((dst / "manifest.json").read_bytes())
    for v in manifest.variants:
        f = v.file_for("onnx")
        if f is not None:
            perturb_onnx(dst / f.path, dst / f.path, seed=seed, bits=bits)
    resign_bundle(dst, key, bundle_version=version)
    return dst


def _floats(n: int, header: int = 37) -> tuple[bytes, bytes, bytes]:
    """(old, snapped fine-tune, raw fine-tune) of a fake file: a header, n float32 weights, a tail."""
    w = RNG.normal(0, 0.1, n).astype(np.float32)
    head = bytes(RNG.integers(0, 255, header, dtype=np.uint8))
    d = RNG.normal(0, 0.001, n)
    raw = (w + d).astype(np.float32)
    snapped = snap_to_grid(w, raw, bits=4)
    return (
        head + w.tobytes() + b"tail",
        head + snapped.tobytes() + b"tail",
        head + raw.tobytes() + b"tail",
    )


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", ["snapped", "raw", "resized", "identical"])
def test_every_method_rebuilds_exactly_or_declines(method, case) -> None:  # type: ignore[no-untyped-def]
    old, snapped, raw = _floats(20_000)
    new = {"snapped": snapped, "raw": raw, "resized": raw + b"more", "identical": old}[case]
    artifact = encode(method, new, old)
    if artifact is None:
        assert method in ("unchanged", "xor", "grid")  # only these need equal files / sizes
        return
    assert decode(method, artifact, old, size=len(new)) == new


def test_grid_pays_on_a_snapped_fine_tune() -> None:
    old, snapped, _ = _floats(200_000)
    sizes = {m: len(encode(m, snapped, old) or b"") for m in ("zstd", "patch", "xor", "grid")}
    assert sizes["grid"] < 0.25 * len(snapped), sizes
    assert sizes["grid"] < sizes["xor"] < sizes["zstd"], sizes


def test_grid_with_non_float_bytes_still_rebuilds() -> None:
    old = bytes(RNG.integers(0, 255, 50_001, dtype=np.uint8))
    new = bytearray(old)
    new[100:200] = bytes(100)
    new[-5:] = b"12345"
    artifact = encode("grid", bytes(new), old)
    assert artifact is not None and decode("grid", artifact, old, size=len(new)) == bytes(new)


def test_corrupt_artifacts_raise() -> None:
    old, new, _ = _floats(5_000)
    for method in ("zstd", "patch", "xor", "grid"):
        artifact = bytearray(encode(method, new, old) or b"")
        artifact[len(artifact) // 2] ^= 0xFF
        try:
            out = decode(method, bytes(artifact), old, size=len(new))
        except DeltaError:
            continue
        assert out != new  # a flip that decodes still gives other bytes: the hash check catches it


@pytest.fixture(scope="module")
def versions(compiled, signing_keys: KeyPair, tmp_path_factory) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("delta-versions")
    v1 = root / "v1"
    shutil.copytree(compiled.out, v1)
    v2 = make_version(v1, root / "v2", "2.0.0", signing_keys.private)
    return v1, v2


@pytest.mark.export
def test_make_update_and_apply_rebuild_every_file(versions, signing_keys, tmp_path) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    update = make_update(v1, v2, tmp_path / "upd")
    assert UpdateManifest.from_json((tmp_path / "upd" / UPDATE_FILENAME).read_bytes()) == update
    assert (update.from_version, update.to_version) == ("1.0.0", "2.0.0")
    methods = {f.path: f.method for f in update.files}
    assert all(methods[p] == "unchanged" for p in methods if p.endswith(".pte"))  # untouched files
    assert all(methods[p] in ("grid", "xor", "patch") for p in methods if p.endswith(".onnx"))
    onnx_full = sum(f.target_size for f in update.files if f.path.endswith(".onnx"))
    onnx_wire = update.wire_bytes(p for p in methods if p.endswith(".onnx"))
    assert onnx_wire < 0.5 * onnx_full
    target = open_bundle(v2, public_key=None)
    out = tmp_path / "rebuilt"
    written = apply_update(tmp_path / "upd", v1, out, target=target)
    assert len(written) == sum(len(v.files) for v in target.variants)
    for path in written:
        assert path.read_bytes() == (v2 / path.relative_to(out)).read_bytes()


@pytest.mark.export
def test_only_named_variants_go_into_an_update(versions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    update = make_update(v1, v2, tmp_path / "upd", variants=["dense"])
    assert {f.variant for f in update.files} == {"dense"}
    with pytest.raises(DeltaError, match="no variant"):
        make_update(v1, v2, tmp_path / "upd2", variants=["nope"])


@pytest.mark.export
def test_device_refuses_wrong_base_corrupt_artifact_and_foreign_target(versions, tmp_path) -> None:  # type: ignore[no-untyped-def]
    v1, v2 = versions
    update = make_update(v1, v2, tmp_path / "upd")
    entry = next(f for f in update.files if f.artifact is not None)
    artifact = (tmp_path / "upd" / entry.artifact).read_bytes()  # type: ignore[operator]
    # right base: fine
    assert apply_file(entry, artifact, v1, expected_sha256=entry.target_sha256)
    # delta against the wrong base: v2 as the "old" bundle
    if entry.base_path is not None:
        with pytest.raises(DeltaError, match="base sha256"):
            apply_file(entry, artifact, v2, expected_sha256=entry.target_sha256)
    # flipped byte in the artifact
    bad = bytearray(artifact)
    bad[len(bad) // 2] ^= 1
    with pytest.raises(DeltaError, match="corrupt"):
        apply_file(entry, bytes(bad), v1, expected_sha256=entry.target_sha256)
    # truncated
    with pytest.raises(DeltaError):
        apply_file(entry, artifact[:-10], v1, expected_sha256=entry.target_sha256)
    # the signed manifest names another hash
    with pytest.raises(DeltaError, match="another file"):
        apply_file(entry, artifact, v1, expected_sha256="0" * 64)
    # the update manifest lies about the artifact hash too: the rebuilt file is still checked
    liar = entry.model_copy(update={"artifact_sha256": None})
    with pytest.raises(DeltaError):
        apply_file(liar, bytes(bad), v1, expected_sha256=entry.target_sha256)


@pytest.mark.export
def test_cli_bundle_diff_prints_methods_and_bytes(versions, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from edgeprune.cli import main

    v1, v2 = versions
    assert main(["bundle", "diff", str(v1), str(v2), "--out", str(tmp_path / "upd")]) == 0
    out = capsys.readouterr().out
    assert "1.0.0 -> 2.0.0" in out and "unchanged" in out and "bytes on the wire" in out
    assert (tmp_path / "upd" / UPDATE_FILENAME).is_file()
    assert main(["bundle", "inspect", str(v2)]) == 0
    assert "manifest.json sha256" in capsys.readouterr().out
