"""Opening, checking, packing and unpacking bundles: what each kind of damage gets."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from agent.bundle import BundleError, open_bundle, pack_bundle, unpack_bundle
from agent.errors import ContractError
from agent.signing import KeyPair, SignatureError, load_private_key, load_public_key
from tests.samples import write_bundle


@pytest.fixture
def bundle(tmp_path: Path, signing_keys: KeyPair) -> Path:
    write_bundle(tmp_path / "b", key=load_private_key(signing_keys.private))
    return tmp_path / "b"


def test_open_checks_every_file(bundle: Path, signing_keys: KeyPair) -> None:
    manifest = open_bundle(bundle, public_key=load_public_key(signing_keys.public))
    assert len(manifest.variants) == 3


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle"):
        open_bundle(tmp_path, public_key=None)


def test_corrupt_manifest_json(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"model_id": ')
    with pytest.raises(ContractError):
        open_bundle(bundle, public_key=None)


def test_missing_file(bundle: Path) -> None:
    (bundle / "gated.pte").unlink()
    with pytest.raises(BundleError, match=r"gated\.pte of variant gated is missing"):
        open_bundle(bundle, public_key=None)


def test_truncated_file(bundle: Path) -> None:
    data = (bundle / "dense.onnx").read_bytes()
    (bundle / "dense.onnx").write_bytes(data[:-1])
    with pytest.raises(BundleError, match="bytes, the manifest says"):
        open_bundle(bundle, public_key=None)


def test_flipped_byte(bundle: Path) -> None:
    data = bytearray((bundle / "dense.onnx").read_bytes())
    data[3] ^= 1
    (bundle / "dense.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(bundle, public_key=None)


def test_unsigned_bundle_refused_when_a_key_is_configured(tmp_path: Path, signing_keys: KeyPair) -> None:
    write_bundle(tmp_path / "u")
    with pytest.raises(SignatureError, match="not signed"):
        open_bundle(tmp_path / "u", public_key=load_public_key(signing_keys.public))


def test_pack_unpack_round_trip_is_deterministic(bundle: Path, tmp_path: Path, signing_keys: KeyPair) -> None:
    a, b = pack_bundle(bundle, tmp_path / "a.tar"), pack_bundle(bundle, tmp_path / "b.tar")
    assert a.read_bytes() == b.read_bytes()
    manifest = unpack_bundle(a, tmp_path / "out", public_key=load_public_key(signing_keys.public))
    assert (tmp_path / "out" / "dense.onnx").read_bytes() == (bundle / "dense.onnx").read_bytes()
    assert manifest.model_id == "fmnist-resnet"


def test_unpack_refuses_path_traversal(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../escaped.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(BundleError, match="cannot unpack"):
        unpack_bundle(evil, tmp_path / "out", public_key=None)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["evil.tar"]


def test_unpack_refuses_a_truncated_archive(bundle: Path, tmp_path: Path) -> None:
    archive = pack_bundle(bundle, tmp_path / "a.tar")
    archive.write_bytes(archive.read_bytes()[:3000])
    with pytest.raises((BundleError, ContractError)):
        unpack_bundle(archive, tmp_path / "out", public_key=None)
    assert not (tmp_path / "out").exists()


def test_unpack_with_the_wrong_key_leaves_nothing(bundle: Path, tmp_path: Path) -> None:
    from agent.signing import generate_keys

    stranger = generate_keys(tmp_path / "k")
    archive = pack_bundle(bundle, tmp_path / "a.tar")
    with pytest.raises(SignatureError):
        unpack_bundle(archive, tmp_path / "out", public_key=load_public_key(stranger.public))
    assert not (tmp_path / "out").exists()


def test_cli_inspect(bundle: Path, signing_keys: KeyPair) -> None:
    exe = Path(sys.executable).parent / "edgeprune"
    out = subprocess.run(
        [str(exe), "bundle", "inspect", str(bundle), "--public-key", str(signing_keys.public)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "signature verified, all files match" in out.stdout
    assert "static-50" in out.stdout
    (bundle / "dense.pte").write_bytes(b"x")
    out = subprocess.run(
        [str(exe), "bundle", "inspect", str(bundle)], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 1 and out.stderr.startswith("BundleError: bundle file dense.pte has 1 bytes")
