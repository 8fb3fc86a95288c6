"""Ed25519 keys and manifest signatures."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from agent.errors import UserError
from agent.signing import (
    SignatureError,
    generate_keys,
    load_private_key,
    load_public_key,
    sign_manifest,
    verify_manifest,
)
from tests.samples import sample_manifest


def test_sign_and_verify(tmp_path: Path) -> None:
    pair = generate_keys(tmp_path)
    assert stat.S_IMODE(pair.private.stat().st_mode) == 0o600
    signed = sign_manifest(sample_manifest(), load_private_key(pair.private))
    assert signed.signature is not None and signed.signature.key_id == pair.key_id
    verify_manifest(signed, load_public_key(pair.public))


def test_signature_survives_json_round_trip(tmp_path: Path) -> None:
    pair = generate_keys(tmp_path)
    signed = sign_manifest(sample_manifest(), load_private_key(pair.private))
    again = type(signed).from_json(signed.model_dump_json(indent=2))
    verify_manifest(again, load_public_key(pair.public))


def test_tampered_manifest_is_refused(tmp_path: Path) -> None:
    pair = generate_keys(tmp_path)
    signed = sign_manifest(sample_manifest(), load_private_key(pair.private))
    tampered = signed.model_copy(update={"bundle_version": "6.6.6"})
    with pytest.raises(SignatureError, match="does not match"):
        verify_manifest(tampered, load_public_key(pair.public))


def test_other_key_is_refused(tmp_path: Path) -> None:
    mine, theirs = generate_keys(tmp_path / "a"), generate_keys(tmp_path / "b")
    signed = sign_manifest(sample_manifest(), load_private_key(theirs.private))
    with pytest.raises(SignatureError, match="signed by key"):
        verify_manifest(signed, load_public_key(mine.public))


def test_unsigned_is_refused(tmp_path: Path) -> None:
    pair = generate_keys(tmp_path)
    with pytest.raises(SignatureError, match="not signed"):
        verify_manifest(sample_manifest(), load_public_key(pair.public))


def test_existing_keys_are_not_overwritten(tmp_path: Path) -> None:
    generate_keys(tmp_path)
    with pytest.raises(UserError, match="already exists"):
        generate_keys(tmp_path)
    generate_keys(tmp_path, overwrite=True)


def test_garbage_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(SignatureError, match="cannot load private key"):
        load_private_key(bad)


def test_garbage_public_key_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pub"
    bad.write_text("-----BEGIN PUBLIC KEY-----\nnot base64!\n-----END PUBLIC KEY-----\n")
    with pytest.raises(SignatureError, match="cannot load public key"):
        load_public_key(bad)
    with pytest.raises(SignatureError, match="cannot load public key"):
        load_public_key(tmp_path / "missing.pub")


def test_a_public_key_of_another_algorithm_is_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pem = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    (tmp_path / "ec.pub").write_bytes(pem)
    with pytest.raises(SignatureError, match="not an Ed25519 public key"):
        load_public_key(tmp_path / "ec.pub")


def test_pem_parsing_matches_cryptography(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pair = generate_keys(tmp_path)
    ours = load_public_key(pair.public)
    theirs = serialization.load_pem_public_key(pair.public.read_bytes())
    assert ours.raw == theirs.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert ours.key_id == pair.key_id


def test_libcrypto_and_cryptography_agree_on_every_signature(tmp_path: Path) -> None:
    """The light verifier (the process's libcrypto via ctypes) must say exactly what cryptography says."""
    import random

    from agent.signing import _libcrypto, _verify_with_cryptography, _verify_with_libcrypto

    lib = _libcrypto()
    assert lib is not None, "this machine's Python links an OpenSSL with Ed25519; the light path must work"
    rng = random.Random(7)
    keys = [generate_keys(tmp_path / str(i)) for i in range(3)]
    checked = 0
    for pair in keys:
        private, public = load_private_key(pair.private), load_public_key(pair.public)
        for size in (0, 1, 63, 64, 1000, 100_000):
            data = rng.randbytes(size)
            sig = private.sign(data)
            cases = [(sig, data, True)]
            flipped = bytearray(sig)
            flipped[rng.randrange(64)] ^= 1 << rng.randrange(8)
            cases.append((bytes(flipped), data, False))
            if data:
                other = bytearray(data)
                other[rng.randrange(len(data))] ^= 1
                cases.append((sig, bytes(other), False))
            cases.append(
                (
                    load_private_key(keys[0].private if pair is not keys[0] else keys[1].private).sign(data),
                    data,
                    False,
                )
            )
            for s, d, expected in cases:
                assert _verify_with_libcrypto(lib, public.raw, s, d) is expected
                assert _verify_with_cryptography(public.raw, s, d) is expected
                assert public.verify(s, d) is expected
                checked += 1
    assert public.verify(sig[:63], data) is False
    assert checked > 50


def test_verifying_a_bundle_does_not_load_cryptography(tmp_path: Path) -> None:
    """The agent's process verifies signatures without mapping cryptography's own OpenSSL (memory)."""
    import subprocess
    import sys

    pair = generate_keys(tmp_path)
    signed = sign_manifest(sample_manifest(), load_private_key(pair.private))
    (tmp_path / "manifest.json").write_text(signed.model_dump_json())
    code = (
        "import sys, pathlib\n"
        "import agent.cli, agent.core\n"
        "from agent.contract import BundleManifest\n"
        "from agent.signing import load_public_key, verify_manifest\n"
        f"m = BundleManifest.from_json(pathlib.Path({str(tmp_path / 'manifest.json')!r}).read_text())\n"
        f"verify_manifest(m, load_public_key(pathlib.Path({str(pair.public)!r})))\n"
        "print(sorted(n for n in sys.modules if n.split('.')[0] == 'cryptography'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
