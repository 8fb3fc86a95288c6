"""Small helpers for paho-mqtt 2.x clients speaking MQTT v5 to an edgeprune broker."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.errors import UserError

__all__ = ["BrokerAddress", "make_client", "parse_broker_url"]


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker listens."""

    host: str
    port: int


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST[:PORT]`` (default port 1883) -> :class:`BrokerAddress`.

    >>> parse_broker_url("mqtt://127.0.0.1:1884")
    BrokerAddress(host='127.0.0.1', port=1884)
    """
    parts = urlsplit(url)
    try:
        port = parts.port or 1883
    except ValueError as exc:
        raise UserError(f"broker URL {url!r} has a bad port", hint="use mqtt://HOST:PORT") from exc
    if parts.scheme != "mqtt" or not parts.hostname or parts.path not in ("", "/"):
        raise UserError(f"broker URL {url!r} is not mqtt://HOST[:PORT]", hint="e.g. mqtt://127.0.0.1:1883")
    return BrokerAddress(host=parts.hostname, port=port)


def make_client(client_id: str) -> mqtt.Client:
    """A paho client with the v2 callback API and MQTT v5, not yet connected."""
    return mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
    )
