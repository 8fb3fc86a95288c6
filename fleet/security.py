"""Broker access for a fleet: per-device credentials, Mosquitto's password and ACL files, optional TLS.

Everything lives in one *security directory* on the fleet-manager host::

    registry.json            every account: user name, role, fleet, password hash (never a password)
    broker/passwd            Mosquitto password file, rendered from the registry ($7$ PBKDF2-SHA512)
    broker/acl               Mosquitto ACL file, rendered from the registry
    broker/mosquitto.conf    listener snippet (password_file, acl_file, allow_anonymous false, TLS)
    broker/ca.crt, server.crt, server.key    TLS files for the broker (optional)
    ca/ca.key                the private CA's key: keep it off the broker host if you can
    credentials/<user>/      one-time credentials: ``password`` (+ ``ca.crt``, ``device.json``);
                             copy to the device, then delete (nothing else keeps the plain password)

A device's MQTT user name is its device id. Its ACL lets it publish only to
``edgeprune/v1/<fleet>/<device>/{birth,status,metrics,events,update}`` and read only
``edgeprune/v1/<fleet>/<device>/desired``. The fleet-manager account reads the whole
``edgeprune/v1/#`` tree (shared subscriptions ``$share/<group>/edgeprune/v1/...`` included) and
writes every ``desired`` topic. Anonymous clients are refused.

>>> provision_devices("lab", ["pi-01", "pi-02"], Path("/srv/edgeprune/security"))  # doctest: +SKIP
{'pi-01': PosixPath('/srv/edgeprune/security/credentials/pi-01'), ...}
>>> write_broker_files(Path("/srv/edgeprune/security"), tls_hosts=["broker.lan"])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import datetime as dt
import fcntl
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.contract import CHANNELS, TOPIC_PREFIX, Channel, ContractError, device_topic
from agent.errors import UserError

__all__ = [
    "ACL_STYLES",
    "MANAGER_USERNAME",
    "Account",
    "AclStyle",
    "BrokerFiles",
    "SecurityError",
    "TlsFiles",
    "device_acl_topics",
    "generate_password",
    "hash_password",
    "load_accounts",
    "make_tls",
    "provision_devices",
    "provision_manager",
    "render_acl",
    "render_password_file",
    "revoke_device",
    "rotate_device",
    "verify_password",
    "write_broker_files",
]

log = logging.getLogger(__name__)

MANAGER_USERNAME = "fleet-manager"
PBKDF2_ITERATIONS = 101  # what mosquitto_passwd 2.0 writes; raise it freely, the count is in each hash
_SALT_BYTES = 12
_HASH_BYTES = 64
_REGISTRY_VERSION = 1

Role = Literal["device", "manager"]
AclStyle = Literal["per-user", "pattern"]
ACL_STYLES: tuple[AclStyle, ...] = ("per-user", "pattern")


class SecurityError(UserError):
    """A credential operation cannot be done as asked (unknown device, duplicate, bad id)."""


# ---- passwords -------------------------------------------------------------------------------------


def generate_password(*, nbytes: int = 24) -> str:
    """A random password (``nbytes`` of entropy, URL-safe base64, no ``:`` so any file format takes it).

    >>> len(generate_password())
    32
    """
    return secrets.token_urlsafe(nbytes)


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """Mosquitto 2's ``$7$`` hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512>``.

    Byte for byte what ``mosquitto_passwd`` writes (tests check both directions against the real tool).

    >>> hash_password("pw", salt=bytes(12))[:24]
    '$7$101$AAAAAAAAAAAAAAAA$'
    """
    salt = secrets.token_bytes(_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, _HASH_BYTES)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (constant-time compare).

    >>> verify_password("pw", hash_password("pw")), verify_password("no", hash_password("pw"))
    (True, False)
    """
    try:
        empty, kind, iterations, salt, digest = hashed.split("$")
        if empty or kind != "7":
            return False
        want = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac(
            "sha512",
            password.encode("utf-8"),
            base64.b64decode(salt, validate=True),
            int(iterations),
            len(want),
        )
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


# ---- the registry ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """One broker account as the fleet keeps it: the hash only."""

    username: str
    role: Role
    fleet: str | None
    password_hash: str
    updated_at: str


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _registry_path(security_dir: Path) -> Path:
    return security_dir / "registry.json"


def _load(security_dir: Path) -> tuple[dict[str, Account], AclStyle]:
    path = _registry_path(security_dir)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, "per-user"
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read the credential registry {path}: {exc}") from exc
    if data.get("version") != _REGISTRY_VERSION:
        raise SecurityError(f"{path} has registry version {data.get('version')!r}, expected 1")
    style = data.get("acl_style", "per-user")
    if style not in ACL_STYLES:
        raise SecurityError(f"{path} has an unknown acl_style {style!r}")
    return {a["username"]: Account(**a) for a in data["accounts"]}, style


def load_accounts(security_dir: Path) -> dict[str, Account]:
    """Every account in ``security_dir`` by user name (empty when nothing was provisioned yet)."""
    return _load(security_dir)[0]


def _write_private(path: Path, data: bytes, *, mode: int = 0o600, durable: bool = True) -> None:
    """Write-temp, fsync, rename; the file is created with ``mode`` so a secret is never world-readable.

    ``durable=False`` skips the fsync: for the one-time credential files, which a crash can only lose
    (rotate the device again), and whose fsync made provisioning 10x slower.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _save(security_dir: Path, accounts: dict[str, Account], style: AclStyle) -> None:
    body = {
        "version": _REGISTRY_VERSION,
        "acl_style": style,
        "accounts": [asdict(accounts[name]) for name in sorted(accounts)],
    }
    _write_private(_registry_path(security_dir), (json.dumps(body, indent=1) + "\n").encode())


@contextmanager
def _locked(security_dir: Path) -> Iterator[dict[str, Account]]:
    """Read-modify-write of the registry under an exclusive lock (several managers may share the dir)."""
    security_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(security_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        accounts, style = _load(security_dir)
        before = dict(accounts)
        yield accounts
        if accounts != before:
            _save(security_dir, accounts, style)
            _render_broker_auth(security_dir, accounts, style)


def _check_device_id(fleet: str, device_id: str) -> None:
    try:
        device_topic(fleet, device_id, "birth")  # the contract's identifier rules, for both ids
    except ContractError as exc:
        raise SecurityError(exc.message, hint=exc.hint) from exc


def _issue(
    security_dir: Path, accounts: dict[str, Account], username: str, role: Role, fleet: str | None
) -> Path:
    """New random password: hash into ``accounts``, plain text into the one-time credentials dir."""
    password = generate_password()
    accounts[username] = Account(
        username=username, role=role, fleet=fleet, password_hash=hash_password(password), updated_at=_now()
    )
    out = security_dir / "credentials" / username
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    _write_private(out / "password", (password + "\n").encode(), durable=False)
    info = {"username": username, "role": role, "fleet": fleet, "issued_at": accounts[username].updated_at}
    _write_private(out / "account.json", (json.dumps(info, indent=1) + "\n").encode(), durable=False)
    ca = security_dir / "broker" / "ca.crt"
    if ca.exists():
        shutil.copyfile(ca, out / "ca.crt")
    return out


def provision_devices(fleet: str, device_ids: Iterable[str], security_dir: Path) -> dict[str, Path]:
    """Create an account per device (user name = device id, random password) and re-render the broker's
    password and ACL files. Returns each device's one-time credentials directory.

    A device id already provisioned (in any fleet: user names are global to the broker) is an error;
    use :func:`rotate_device` for a new password.
    """
    ids = list(dict.fromkeys(device_ids))
    for device_id in ids:
        _check_device_id(fleet, device_id)
    with _locked(security_dir) as accounts:
        taken = [d for d in ids if d in accounts or d == MANAGER_USERNAME]
        if taken:
            raise SecurityError(
                f"already provisioned (or reserved): {', '.join(taken)}",
                hint="rotate_device() issues a new password; revoke_device() removes one",
            )
        out = {d: _issue(security_dir, accounts, d, "device", fleet) for d in ids}
    log.info("provisioned %d device(s) in fleet %s", len(out), fleet)
    return out


def provision_manager(security_dir: Path, *, username: str = MANAGER_USERNAME) -> Path:
    """Create (or give a new password to) the fleet-manager account; returns its credentials directory."""
    with _locked(security_dir) as accounts:
        existing = accounts.get(username)
        if existing is not None and existing.role != "manager":
            raise SecurityError(f"{username!r} is a device account, not a fleet-manager account")
        return _issue(security_dir, accounts, username, "manager", None)


def rotate_device(device_id: str, security_dir: Path) -> Path:
    """A new password for a provisioned device; the old one stops working at the broker's next reload
    (SIGHUP). Returns the new one-time credentials directory."""
    with _locked(security_dir) as accounts:
        account = accounts.get(device_id)
        if account is None or account.role != "device":
            raise SecurityError(f"device {device_id!r} is not provisioned", hint="provision_devices() first")
        return _issue(security_dir, accounts, device_id, "device", account.fleet)


def revoke_device(device_id: str, security_dir: Path) -> None:
    """Remove a device's account and its ACL entries; at the broker's next reload (SIGHUP) it can no
    longer connect, and while still connected its publishes are denied."""
    with _locked(security_dir) as accounts:
        if accounts.get(device_id) is None or accounts[device_id].role != "device":
            raise SecurityError(f"device {device_id!r} is not provisioned")
        del accounts[device_id]
    shutil.rmtree(security_dir / "credentials" / device_id, ignore_errors=True)
    log.info("revoked device %s", device_id)


# ---- broker files ----------------------------------------------------------------------------------


def device_acl_topics(fleet: str, device_id: str) -> tuple[list[str], list[str]]:
    """(topics the device may publish, topics it may read), straight from the contract's channel table.

    >>> device_acl_topics("lab", "pi-01")[1]
    ['edgeprune/v1/lab/pi-01/desired']
    """
    write = [device_topic(fleet, device_id, ch) for ch in _channels_of("device")]
    read = [device_topic(fleet, device_id, ch) for ch in _channels_of("fleet")]
    return write, read


def _channels_of(publisher: str) -> list[Channel]:
    """The contract's channels that ``publisher`` ("device" or "fleet") publishes on, in table order."""
    return [ch for ch, spec in CHANNELS.items() if spec.publisher == publisher]


def render_password_file(accounts: Iterable[Account]) -> str:
    """Mosquitto's password file: ``user:$7$...`` per line."""
    return "".join(f"{a.username}:{a.password_hash}\n" for a in sorted(accounts, key=lambda a: a.username))


def render_acl(accounts: Iterable[Account], *, style: AclStyle = "per-user") -> str:
    """Mosquitto's ACL file, nothing for anonymous clients.

    ``per-user``: one ``user`` section per account, exact for any number of fleets; Mosquitto 2.0 parses
    it slowly (1.2 s for 10,000 devices, during which a starting or reloading broker serves nobody).
    ``pattern``: a ``user`` section for the manager and, per fleet, ``pattern`` lines with ``%u`` (the
    user name, i.e. the device id): constant size. Exact with one fleet; with several, a device may also
    publish under its own id in another fleet's tree (never under another device's id).
    """
    accounts = list(accounts)
    fleet_channels = _channels_of("fleet")
    lines = ["# Generated by edgeprune (fleet/security.py) from registry.json: do not edit by hand.", ""]
    if style == "pattern":
        for fleet in sorted({a.fleet for a in accounts if a.role == "device" and a.fleet is not None}):
            # %u must be a whole topic level; device ids (= user names) cannot hold + # or /.
            lines += [f"pattern write {TOPIC_PREFIX}/{fleet}/%u/{ch}" for ch in _channels_of("device")]
            lines += [f"pattern read {TOPIC_PREFIX}/{fleet}/%u/{ch}" for ch in _channels_of("fleet")]
            lines.append("")
    for a in sorted(accounts, key=lambda a: (a.role != "manager", a.username)):
        if style == "pattern" and a.role == "device":
            continue
        lines.append(f"user {a.username}")
        if a.role == "manager":
            # Reading the tree also covers shared subscriptions: mosquitto checks $share/<group>/<filter>
            # against the filter.
            lines.append(f"topic read {TOPIC_PREFIX}/#")
            lines += [f"topic write {TOPIC_PREFIX}/+/+/{ch}" for ch in fleet_channels]
        else:
            assert a.fleet is not None
            write, read = device_acl_topics(a.fleet, a.username)
            lines += [f"topic write {t}" for t in write] + [f"topic read {t}" for t in read]
        lines.append("")
    return "\n".join(lines)


def _render_broker_auth(security_dir: Path, accounts: dict[str, Account], style: AclStyle) -> None:
    broker = security_dir / "broker"
    _write_private(broker / "passwd", render_password_file(accounts.values()).encode())
    _write_private(broker / "acl", render_acl(accounts.values(), style=style).encode())


@dataclass(frozen=True)
class TlsFiles:
    """The broker's TLS material: its certificate and key, and the CA that clients must trust."""

    certfile: Path
    keyfile: Path
    cafile: Path


@dataclass(frozen=True)
class BrokerFiles:
    """What :func:`write_broker_files` wrote; ``config_file`` holds a listener for ``mosquitto -c``."""

    password_file: Path
    acl_file: Path
    config_file: Path
    tls: TlsFiles | None


def write_broker_files(
    security_dir: Path,
    *,
    port: int | None = None,
    bind: str = "0.0.0.0",
    tls_hosts: Sequence[str] | None = None,
    acl_style: AclStyle | None = None,
) -> BrokerFiles:
    """Render ``broker/passwd``, ``broker/acl`` and a ``broker/mosquitto.conf`` listener from the registry.

    With ``tls_hosts`` (the names and IPs devices use to reach the broker) the listener is TLS: a private
    CA is created on first use and a server certificate for those hosts is (re)issued. ``port`` defaults
    to 8883 with TLS, 1883 without. Point mosquitto at the config with ``include_dir`` or ``-c``; after
    any change send it SIGHUP to reload the password and ACL files. ``acl_style`` (see :func:`render_acl`)
    is remembered in the registry for later provisioning; default: as before, ``per-user`` at first.
    """
    if acl_style is not None and acl_style not in ACL_STYLES:
        raise SecurityError(f"unknown ACL style {acl_style!r}", hint=f"one of {', '.join(ACL_STYLES)}")
    with _locked(security_dir) as accounts:
        _, style = _load(security_dir)
        if acl_style is not None and acl_style != style:
            style = acl_style
            _save(security_dir, accounts, style)
        _render_broker_auth(security_dir, accounts, style)
    broker = security_dir / "broker"
    tls = make_tls(security_dir, hosts=tls_hosts) if tls_hosts else None
    port = port if port is not None else (8883 if tls else 1883)
    conf = [
        "# Generated by edgeprune (fleet/security.py).",
        f"listener {port} {bind}",
        "allow_anonymous false",
        f"password_file {broker / 'passwd'}",
        f"acl_file {broker / 'acl'}",
    ]
    if tls is not None:
        conf += [f"certfile {tls.certfile}", f"keyfile {tls.keyfile}", f"cafile {tls.cafile}"]
        conf.append("set_tcp_nodelay true")  # else Nagle + delayed ACK add ~40 ms to every TLS handshake
    config_file = broker / "mosquitto.conf"
    _write_private(config_file, ("\n".join(conf) + "\n").encode(), mode=0o644)
    return BrokerFiles(
        password_file=broker / "passwd", acl_file=broker / "acl", config_file=config_file, tls=tls
    )


# ---- TLS -------------------------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _ensure_ca(security_dir: Path, *, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = security_dir / "broker" / "ca.crt", security_dir / "ca" / "ca.key"
    if cert_path.exists() and key_path.exists():
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return x509.load_pem_x509_certificate(cert_path.read_bytes()), key
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (security_dir / "ca").mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(key_path, _pem_key(key))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return cert, key


def make_tls(security_dir: Path, *, hosts: Sequence[str], ca_name: str = "edgeprune fleet CA") -> TlsFiles:
    """A private CA (created once, reused after) and a fresh server certificate for ``hosts`` (DNS names
    or IP addresses, all put in subjectAltName so clients' host-name checks pass). EC P-256 keys.

    >>> make_tls(Path("/srv/edgeprune/security"), hosts=["broker.lan", "10.0.0.2"])  # doctest: +SKIP
    """
    if not hosts:
        raise SecurityError("a server certificate needs at least one host name or IP address")
    ca_cert, ca_key = _ensure_ca(security_dir, name=ca_name)
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    broker = security_dir / "broker"
    files = TlsFiles(certfile=broker / "server.crt", keyfile=broker / "server.key", cafile=broker / "ca.crt")
    _write_private(files.keyfile, _pem_key(key))
    _write_private(files.certfile, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return files
