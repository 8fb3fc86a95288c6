"""Topic builders and parser for edgeprune/v1/<fleet>/<device>/<channel>."""

from __future__ import annotations

import pytest

from agent.contract import CHANNELS, ContractError, device_topic, parse_topic, subscription


@pytest.mark.parametrize("channel", sorted(CHANNELS))
def test_build_and_parse(channel: str) -> None:
    topic = device_topic("lab-1", "pi_01.a", channel)  # type: ignore[arg-type]
    assert topic == f"edgeprune/v1/lab-1/pi_01.a/{channel}"
    parts = parse_topic(topic)
    assert (parts.fleet, parts.device, parts.channel) == ("lab-1", "pi_01.a", channel)


@pytest.mark.parametrize(
    "topic",
    [
        "other/v1/a/b/status",
        "edgeprune/v2/a/b/status",
        "edgeprune/v1/a/b",
        "edgeprune/v1/a/b/c/status",
        "edgeprune/v1/a/b/nope",
        "edgeprune/v1/a/+/status",
        "edgeprune/v1//b/status",
    ],
)
def test_foreign_topics_are_rejected(topic: str) -> None:
    with pytest.raises(ContractError):
        parse_topic(topic)


@pytest.mark.parametrize("device", ["a/b", "+", "#", "", "x" * 65, "-lead", "sp ace"])
def test_ids_that_would_break_topics(device: str) -> None:
    with pytest.raises(ContractError, match="not a valid identifier"):
        device_topic("lab", device, "status")


def test_subscriptions() -> None:
    assert subscription() == "edgeprune/v1/+/+/+"
    assert subscription(fleet="lab", channel="metrics") == "edgeprune/v1/lab/+/metrics"
    assert subscription(fleet="lab", device="d1") == "edgeprune/v1/lab/d1/+"
    with pytest.raises(ContractError):
        subscription(channel="bogus")  # type: ignore[arg-type]


def test_channel_table_qos_and_retain() -> None:
    retained = {name for name, spec in CHANNELS.items() if spec.retained}
    assert retained == {"birth", "status", "desired"}
    assert all(spec.qos == 1 for spec in CHANNELS.values())
    assert {n for n, s in CHANNELS.items() if s.publisher == "fleet"} == {"desired"}
