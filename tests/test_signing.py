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
