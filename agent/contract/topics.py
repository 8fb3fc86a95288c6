"""MQTT topic layout: ``edgeprune/v1/<fleet>/<device>/<channel>``.

One topic tree per device, one channel per message kind. The table :data:`CHANNELS` says, for each
channel, which message kind it carries, who publishes it, its QoS and whether it is retained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from agent.errors import ContractError

__all__ = [
    "CHANNELS",
    "TOPIC_PREFIX",
    "Channel",
    "ChannelSpec",
    "TopicParts",
    "channel_for_kind",
    "device_topic",
    "parse_topic",
    "subscription",
]

TOPIC_PREFIX = "edgeprune/v1"

Channel = Literal["birth", "status", "metrics", "events", "desired", "update"]

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ChannelSpec:
    """How one channel is used."""

    kind: str
    publisher: Literal["device", "fleet"]
    qos: Literal[0, 1]
    retained: bool


CHANNELS: dict[Channel, ChannelSpec] = {
    # Retained so a fleet manager that starts later still learns every device and its last state.
    "birth": ChannelSpec(kind="birth", publisher="device", qos=1, retained=True),
    "status": ChannelSpec(kind="status", publisher="device", qos=1, retained=True),
    "metrics": ChannelSpec(kind="metrics", publisher="device", qos=1, retained=False),
    "events": ChannelSpec(kind="event", publisher="device", qos=1, retained=False),
    "update": ChannelSpec(kind="update_status", publisher="device", qos=1, retained=False),
    # Retained so a device that reconnects (or boots) gets what the fleet wants without asking.
    "desired": ChannelSpec(kind="desired", publisher="fleet", qos=1, retained=True),
}
assert set(CHANNELS) == set(get_args(Channel))

_CHANNEL_OF_KIND = {spec.kind: name for name, spec in CHANNELS.items()}


@dataclass(frozen=True)
class TopicParts:
    """A parsed device topic."""

    fleet: str
    device: str
    channel: Channel


def _check_id(what: str, value: str) -> str:
    if not _ID.match(value):
        raise ContractError(
            f"{what} {value!r} is not a valid identifier",
            hint="use 1-64 characters from A-Z a-z 0-9 _ . - starting with a letter or digit",
        )
    return value


def device_topic(fleet: str, device: str, channel: Channel) -> str:
    """The topic a device (or the fleet, for ``desired``) publishes on.

    >>> device_topic("lab", "pi-01", "metrics")
    'edgeprune/v1/lab/pi-01/metrics'
    """
    if channel not in CHANNELS:
        raise ContractError(f"unknown channel {channel!r}", hint=f"one of {sorted(CHANNELS)}")
    return f"{TOPIC_PREFIX}/{_check_id('fleet id', fleet)}/{_check_id('device id', device)}/{channel}"


def subscription(
    *, fleet: str | None = None, device: str | None = None, channel: Channel | None = None
) -> str:
    """A subscription filter; ``None`` parts become the ``+`` wildcard.

    >>> subscription(fleet="lab")
    'edgeprune/v1/lab/+/+'
    """
    parts = [
        "+" if fleet is None else _check_id("fleet id", fleet),
        "+" if device is None else _check_id("device id", device),
        "+" if channel is None else channel,
    ]
    if channel is not None and channel not in CHANNELS:
        raise ContractError(f"unknown channel {channel!r}", hint=f"one of {sorted(CHANNELS)}")
    return "/".join([TOPIC_PREFIX, *parts])


def parse_topic(topic: str) -> TopicParts:
    """Split a device topic; :class:`ContractError` if it is not one of ours.

    >>> parse_topic("edgeprune/v1/lab/pi-01/status").device
    'pi-01'
    """
    prefix = TOPIC_PREFIX + "/"
    if not topic.startswith(prefix):
        raise ContractError(f"topic {topic!r} is outside {TOPIC_PREFIX}/")
    rest = topic[len(prefix) :].split("/")
    if len(rest) != 3:
        raise ContractError(f"topic {topic!r} is not {TOPIC_PREFIX}/<fleet>/<device>/<channel>")
    fleet, device, channel = rest
    if channel not in CHANNELS:
        raise ContractError(
            f"topic {topic!r} has unknown channel {channel!r}", hint=f"one of {sorted(CHANNELS)}"
        )
    return TopicParts(
        fleet=_check_id("fleet id", fleet),
        device=_check_id("device id", device),
        channel=channel,
    )


def channel_for_kind(kind: str) -> Channel:
    """The channel that carries messages of ``kind`` (``event`` -> ``events``)."""
    try:
        return _CHANNEL_OF_KIND[kind]
    except KeyError:
        raise ContractError(f"no channel carries message kind {kind!r}") from None
