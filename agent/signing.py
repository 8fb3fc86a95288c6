"""Ed25519 keys and signatures over bundle manifests.

The compiler signs :meth:`BundleManifest.signing_payload`; the agent and the fleet verify it with the
public key before trusting any file of the bundle. Keys are PEM files: the private key PKCS#8 (mode
0600), the public key SubjectPublicKeyInfo.

Verifying is the agent's side and must stay light: :class:`PublicKey` parses the PEM itself and checks
signatures with the OpenSSL ``libcrypto`` that Python's ``ssl`` module (which paho-mqtt imports) has
already mapped, through ``ctypes``. That avoids loading ``cryptography``, which carries its own copy
of OpenSSL (about 7 MB of resident memory on a device). Where that libcrypto is missing or too old
(no Ed25519 before OpenSSL 1.1.1), verification falls back to ``cryptography``. Making keys and
signing (the compiler's side) always use ``cryptography``, imported only then.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import hashlib
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.contract import BundleManifest, Signature
from agent.errors import UserError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "KeyPair",
    "PublicKey",
    "SignatureError",
    "generate_keys",
    "key_id",
    "load_private_key",
    "load_public_key",
    "public_key_of",
    "sign_manifest",
    "verify_manifest",
]

# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING (32 bytes) }; the raw key follows.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_NID_ED25519 = 1087  # EVP_PKEY_ED25519 in every OpenSSL since 1.1.1


class SignatureError(UserError):
    """A signature is missing, malformed, made with another key, or does not match the manifest."""


@dataclass(frozen=True)
class KeyPair:
    """Where ``generate_keys`` wrote the two halves."""

    private: Path
    public: Path
    key_id: str


def key_id(public: PublicKey | bytes) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = public.raw if isinstance(public, PublicKey) else public
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True)
class PublicKey:
    """An Ed25519 public key: the raw 32 bytes, its key id, and signature checks.

    >>> key = PublicKey(bytes(32))
    >>> key.key_id
    '66687aadf862bd77'
    """

    raw: bytes
    key_id: str = field(init=False)

    def __post_init__(self) -> None:
        if len(self.raw) != 32:
            raise SignatureError(f"an Ed25519 public key is 32 bytes, got {len(self.raw)}")
        object.__setattr__(self, "key_id", key_id(self.raw))

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """Parse a PEM (or DER) SubjectPublicKeyInfo holding an Ed25519 key."""
        der = data
        if data.lstrip().startswith(b"-----BEGIN"):
            lines = [line.strip() for line in data.strip().splitlines()]
            if lines[0] != b"-----BEGIN PUBLIC KEY-----" or lines[-1] != b"-----END PUBLIC KEY-----":
                raise SignatureError("not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')")
            try:
                der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
            except binascii.Error as exc:
                raise SignatureError(f"the PEM body is not base64: {exc}") from exc
        if len(der) != len(_SPKI_PREFIX) + 32 or not der.startswith(_SPKI_PREFIX):
            raise SignatureError("not an Ed25519 public key (SubjectPublicKeyInfo of OID 1.3.101.112)")
        return cls(der[len(_SPKI_PREFIX) :])

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True when ``signature`` is this key's Ed25519 signature of ``data``."""
        if len(signature) != 64:
            return False
        lib = _libcrypto()
        if lib is None:
            return _verify_with_cryptography(self.raw, signature, data)
        return _verify_with_libcrypto(lib, self.raw, signature, data)


@cache
def _libcrypto() -> Any | None:
    """The process's OpenSSL libcrypto with the EVP Ed25519 calls typed, or None if unusable."""
    import ssl  # noqa: F401 -- maps the libcrypto Python was built with (paho-mqtt imports it anyway)

    name = ctypes.util.find_library("crypto")
    if name is None:
        return None
    try:
        lib = ctypes.CDLL(name)
        p, sz = ctypes.c_void_p, ctypes.c_size_t
        for fn, res, args in (
            ("EVP_PKEY_new_raw_public_key", p, [ctypes.c_int, p, ctypes.c_char_p, sz]),
            ("EVP_PKEY_free", None, [p]),
            ("EVP_MD_CTX_new", p, []),
            ("EVP_MD_CTX_free", None, [p]),
            ("EVP_DigestVerifyInit", ctypes.c_int, [p, p, p, p, p]),
            ("EVP_DigestVerify", ctypes.c_int, [p, ctypes.c_char_p, sz, ctypes.c_char_p, sz]),
        ):
            f = getattr(lib, fn)
            f.restype, f.argtypes = res, args
    except (OSError, AttributeError):
        return None
    return lib


def _verify_with_libcrypto(lib: Any, raw: bytes, signature: bytes, data: bytes) -> bool:
    pkey = lib.EVP_PKEY_new_raw_public_key(_NID_ED25519, None, raw, 32)
    if not pkey:
        return False
    ctx = lib.EVP_MD_CTX_new()
    try:
        if not ctx or lib.EVP_DigestVerifyInit(ctx, None, None, None, pkey) != 1:
            raise SignatureError("OpenSSL could not set up an Ed25519 verification")
        return bool(lib.EVP_DigestVerify(ctx, signature, len(signature), data, len(data)) == 1)
    finally:
        lib.EVP_MD_CTX_free(ctx)
        lib.EVP_PKEY_free(pkey)


def _verify_with_cryptography(raw: bytes, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def public_key_of(key: Ed25519PrivateKey) -> PublicKey:
    """The public half of a private key, as the agent's :class:`PublicKey`."""
    from cryptography.hazmat.primitives import serialization

    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PublicKey(raw)


def generate_keys(directory: Path, *, name: str = "edgeprune", overwrite: bool = False) -> KeyPair:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub`` into ``directory``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

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
    return KeyPair(private=private_path, public=public_path, key_id=public_key_of(key).key_id)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(
            f"cannot load private key {path}: {exc}", hint="make one with `edgeprune keys new`"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path} is not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> PublicKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"cannot load public key {path}: {exc}") from exc
    try:
        return PublicKey.from_pem(data)
    except SignatureError as exc:
        raise SignatureError(f"cannot load public key {path}: {exc}") from exc


def sign_manifest(manifest: BundleManifest, key: Ed25519PrivateKey) -> BundleManifest:
    """A copy of ``manifest`` with its signature block set."""
    value = base64.b64encode(key.sign(manifest.signing_payload())).decode("ascii")
    return manifest.model_copy(update={"signature": Signature(key_id=public_key_of(key).key_id, value=value)})


def verify_manifest(manifest: BundleManifest, public: PublicKey) -> None:
    """Raise :class:`SignatureError` unless ``manifest`` carries a valid signature by ``public``."""
    sig = manifest.signature
    if sig is None:
        raise SignatureError("the manifest is not signed", hint="sign bundles with `edgeprune compile --key`")
    if sig.key_id != public.key_id:
        raise SignatureError(
            f"the manifest was signed by key {sig.key_id}, not by the configured key {public.key_id}"
        )
    try:
        value = base64.b64decode(sig.value, validate=True)
    except binascii.Error as exc:
        raise SignatureError(f"the manifest's signature is not base64: {exc}") from exc
    if not public.verify(value, manifest.signing_payload()):
        raise SignatureError("the manifest's signature does not match its content (tampered?)")
