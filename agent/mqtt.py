"""paho-mqtt 2.x clients speaking MQTT v5 to an edgeprune broker, configured the same way everywhere.

A broker is named by a URL: ``mqtt://[USER[:PASSWORD]@]HOST[:PORT]`` (plain TCP, default port 1883) or
``mqtts://...`` (TLS, default port 8883). Passwords should not live in URLs (they end up in shell history,
process lists and logs): give a password file or the name of an environment variable instead, see
:func:`resolve_address`. :func:`make_client` turns a :class:`BrokerAddress` into a paho client with the
credentials (``username_pw_set``) and TLS (``tls_set``: the given CA file or the system's CAs, server
hostname checked) already set; the agent, the fleet's ingestion and the tests all go through it.

>>> address = resolve_address("mqtts://pi-01@broker.lan", password_file=Path("/etc/edgeprune/password"),
...                           ca_file=Path("/etc/edgeprune/ca.crt"))  # doctest: +SKIP
>>> client = connect_client(address, client_id="pi-01")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import UserError

__all__ = [
    "DEFAULT_PORTS",
    "BrokerAddress",
    "BrokerConnectError",
    "connect_client",
    "make_client",
    "parse_broker_url",
    "read_password",
    "resolve_address",
]

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerConnectError(UserError):
    """The broker could not be reached, its certificate did not verify, or it refused our credentials."""


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens and how to log in. The password never shows in ``repr`` or :attr:`url`."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None

    @property
    def url(self) -> str:
        """The URL without the password, safe to log.

        >>> parse_broker_url("mqtts://pi-01:s3cret@broker.lan").url
        'mqtts://pi-01@broker.lan:8883'
        """
        user = f"{quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt[s]://[USER[:PASSWORD]@]HOST[:PORT]`` -> :class:`BrokerAddress` (user and password %-decoded).

    >>> parse_broker_url("mqtt://127.0.0.1:1884")
    BrokerAddress(host='127.0.0.1', port=1884, tls=False, username=None, ca_file=None)
    >>> parse_broker_url("mqtts://pi-01@broker.lan").port
    8883
    """
    shape = "mqtt://[USER@]HOST[:PORT] or mqtts://[USER@]HOST[:PORT]"
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname or parts.path not in ("", "/"):
        redacted = url if parts.password is None else url.replace(parts.password, "***")
        raise UserError(f"broker URL {redacted!r} is not {shape}", hint="e.g. mqtt://127.0.0.1:1883")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise UserError(f"broker URL for {parts.hostname!r} has a bad port", hint=f"use {shape}") from exc
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if password is not None and username is None:
        raise UserError("broker URL has a password but no user name", hint="use mqtt://USER@HOST")
    return BrokerAddress(
        host=parts.hostname, port=port, tls=parts.scheme == "mqtts", username=username, password=password
    )


def read_password(*, password_file: Path | None = None, password_env: str | None = None) -> str | None:
    """The password from a file (first line, trailing newline dropped) or an environment variable.

    Giving both is an error; giving neither returns ``None``. A file that others can read is used but
    logged as a warning, the way ssh treats a private key.

    >>> read_password(password_file=Path("/etc/edgeprune/password"))  # doctest: +SKIP
    's3cret'
    """
    if password_file is not None and password_env is not None:
        raise UserError("give the broker password as a file or an environment variable, not both")
    if password_env is not None:
        value = os.environ.get(password_env)
        if not value:
            raise UserError(
                f"environment variable {password_env} holding the broker password is not set or empty",
                hint=f"export {password_env}=... or use a password file",
            )
        return value
    if password_file is None:
        return None
    try:
        mode = password_file.stat().st_mode
        text = password_file.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(
            f"cannot read the broker password file {password_file}: {exc.strerror}",
            hint="the provisioning step writes one per device (edgeprune fleet provision)",
        ) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("broker password file %s is readable by others; chmod 600 it", password_file)
    password = text.splitlines()[0] if text else ""
    if not password:
        raise UserError(f"the broker password file {password_file} is empty")
    return password


def resolve_address(
    url: str,
    *,
    username: str | None = None,
    password_file: Path | None = None,
    password_env: str | None = None,
    ca_file: Path | None = None,
) -> BrokerAddress:
    """Parse ``url`` and complete it: the password from ``password_file`` or ``password_env`` (not
    allowed together with a password in the URL), ``username`` when a password is given and the URL
    names no user (the agent passes its device id), and the CA file that must have signed the broker's
    certificate (``mqtts`` only). Without any password the address stays anonymous, as before.

    >>> resolve_address("mqtt://127.0.0.1", username="pi-01").username is None
    True
    """
    address = parse_broker_url(url)
    password = read_password(password_file=password_file, password_env=password_env)
    if password is not None and address.password is not None:
        raise UserError(
            f"the broker password is given twice (in the URL {address.url} and as a file or variable)",
            hint="drop it from the URL",
        )
    if ca_file is not None and not address.tls:
        raise UserError(
            f"a CA file was given but {address.url} is not a TLS URL", hint="use mqtts://HOST[:PORT]"
        )
    if ca_file is not None and not ca_file.is_file():
        raise UserError(f"CA file {ca_file} does not exist")
    return replace(
        address,
        username=address.username or (username if password is not None else None),
        password=address.password if password is None else password,
        ca_file=ca_file,
    )


def make_client(
    client_id: str, address: BrokerAddress | None = None, *, cls: type[mqtt.Client] = mqtt.Client
) -> mqtt.Client:
    """A paho client (``cls``, a subclass of paho's ``Client`` if given) with the v2 callback API and
    MQTT v5, not yet connected.

    With an ``address``, its credentials and TLS settings are applied: ``username_pw_set`` when it
    names a user, ``tls_set`` with its CA file (or the system's CAs) when it is ``mqtts``; the server's
    certificate and host name are always checked.

    >>> make_client("pi-01", parse_broker_url("mqtt://pi-01:pw@127.0.0.1")).username
    'pi-01'
    """
    client = cls(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
    if address is None:
        return client
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    if address.tls:
        client.tls_set(
            ca_certs=str(address.ca_file) if address.ca_file is not None else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )
        client.tls_insecure_set(False)
    return client


def _close_half_open_tls(exc: BaseException) -> None:
    """paho 2.2 leaves the socket of a failed TLS handshake open (it lives only in the failing frame of
    ``Client._ssl_wrap_socket``); close it so a refused certificate does not leak a descriptor."""
    tb = exc.__traceback__
    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, ssl.SSLSocket):
                value.close()
        tb = tb.tb_next


def connect_client(
    address: BrokerAddress, *, client_id: str, keepalive: int = 60, timeout_s: float = 10.0
) -> mqtt.Client:
    """A configured client, connected, its network loop started, once the broker has accepted it.

    Raises :class:`BrokerConnectError` when the broker cannot be reached, its certificate does not
    verify, or its CONNACK refuses us (the message carries the MQTT v5 reason, e.g. "Not authorized").
    The caller owns the client: ``client.disconnect(); client.loop_stop()``.
    """
    client = make_client(client_id, address)
    done = threading.Event()
    result: list[Any] = []

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        result.append(reason)
        done.set()

    client.on_connect = on_connect
    try:
        client.connect(address.host, address.port, keepalive=keepalive)
    except ssl.SSLError as exc:
        _close_half_open_tls(exc)
        raise BrokerConnectError(
            f"TLS with {address.url} failed: {exc}",
            hint="give the CA file that signed the broker's certificate (ca_file / --ca-file)",
        ) from exc
    except OSError as exc:
        raise BrokerConnectError(f"cannot reach the broker at {address.url}: {exc}") from exc
    client.loop_start()
    if not done.wait(timeout_s) or result[0].is_failure:
        client.disconnect()
        client.loop_stop()
        reason = str(result[0]) if result else f"no CONNACK within {timeout_s}s"
        raise BrokerConnectError(
            f"broker {address.url} refused {client_id!r}: {reason}",
            hint="check the user name and password (a device's user name is its device id)",
        )
    client.on_connect = None
    return client
