"""Ed25519 keys and signatures over bundle manifests.

The compiler signs :meth:`BundleManifest.signing_payload`; the agent and the fleet verify it with the
public key before trusting any file of the bundle. Keys are PEM files: the private key PKCS#8 (mode
0600), the public key SubjectPublicKeyInfo.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.contract import BundleManifest, Signature
from agent.errors import UserError

__all__ = [
    "KeyPair",
    "SignatureError",
    "generate_keys",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_manifest",
    "verify_manifest",
]


class SignatureError(UserError):
    """A signature is missing, malformed, made with another key, or does not match the manifest."""


@dataclass(frozen=True)
class KeyPair:
    """Where ``generate_keys`` wrote the two halves."""

    private: Path
    public: Path
    key_id: str


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keys(directory: Path, *, name: str = "edgeprune", overwrite: bool = False) -> KeyPair:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    private_path, public_path = directory / f"{name}.key", directory / f"{name}.pub"
    if not overwrite and (private_path.exists() or public_path.exists()):
        raise UserError(
            f"{private_path} or {public_path} already exists",
            hint="refusing to replace a signing key; pass --force to overwrite",
        )
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return KeyPair(private=private_path, public=public_path, key_id=key_id(key.public_key()))


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(
            f"cannot load private key {path}: {exc}", hint="make one with `edgeprune keys new`"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"cannot load public key {path}: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path} is not an Ed25519 public key")
    return key


def sign_manifest(manifest: BundleManifest, key: Ed25519PrivateKey) -> BundleManifest:
    """A copy of ``manifest`` with its signature block set."""
    value = base64.b64encode(key.sign(manifest.signing_payload())).decode("ascii")
    return manifest.model_copy(update={"signature": Signature(key_id=key_id(key.public_key()), value=value)})


def verify_manifest(manifest: BundleManifest, public: Ed25519PublicKey) -> None:
    """Raise :class:`SignatureError` unless ``manifest`` carries a valid signature by ``public``."""
    sig = manifest.signature
    if sig is None:
        raise SignatureError("the manifest is not signed", hint="sign bundles with `edgeprune compile --key`")
    if sig.key_id != key_id(public):
        raise SignatureError(
            f"the manifest was signed by key {sig.key_id}, not by the configured key {key_id(public)}"
        )
    try:
        public.verify(base64.b64decode(sig.value, validate=True), manifest.signing_payload())
    except (InvalidSignature, ValueError) as exc:
        raise SignatureError("the manifest's signature does not match its content (tampered?)") from exc
