"""Wire messages: every kind round-trips, and malformed or misplaced payloads raise ContractError."""

from __future__ import annotations

import json

import pytest

from agent.contract import (
    CHANNELS,
    ContractError,
    Event,
    Message,
    Status,
    channel_for_kind,
    envelope,
    parse_message,
)
from tests.samples import sample_messages

MESSAGES = sample_messages()


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.kind)
def test_round_trip(message: Message) -> None:
    again = parse_message(message.to_json())
    assert type(again) is type(message)
    assert again == message


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: m.kind)
def test_envelope_is_complete(message: Message) -> None:
    data = json.loads(message.to_json())
    for key in ("schema_version", "kind", "device_id", "seq", "message_id", "sent_at"):
        assert key in data
    assert data["sent_at"].endswith("Z") or "+" in data["sent_at"]


def test_every_kind_has_a_sample_and_a_channel() -> None:
    kinds = {m.kind for m in MESSAGES}
    assert kinds == {spec.kind for spec in CHANNELS.values()}
    for kind in kinds:
        assert CHANNELS[channel_for_kind(kind)].kind == kind


def test_message_ids_are_unique() -> None:
    ids = {m.message_id for m in sample_messages()} | {m.message_id for m in sample_messages()}
    assert len(ids) == 2 * len(MESSAGES)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"", "invalid message"),
        (b"{", "invalid message"),
        (b'{"kind": "launch_missiles"}', "kind"),
        (b'{"device_id": "a"}', "kind"),
        (b"null", "invalid message"),
    ],
    ids=["empty", "truncated", "unknown-kind", "no-kind", "null"],
)
def test_malformed_payloads(payload: bytes, fragment: str) -> None:
    with pytest.raises(ContractError, match=fragment):
        parse_message(payload)


def _status_dict() -> dict:  # type: ignore[type-arg]
    return json.loads(Status(**envelope(device_id="d1", seq=5), state="online", uptime_s=1).to_json())


@pytest.mark.parametrize(
    ("edit", "fragment"),
    [
        (lambda d: d.update(extra_field=1), "extra_field"),
        (lambda d: d.update(seq=-1), "seq"),
        (lambda d: d.update(message_id="not-hex"), "message_id"),
        (lambda d: d.update(device_id="a/b"), "device_id"),
        (lambda d: d.update(device_id="+"), "device_id"),
        (lambda d: d.update(sent_at="2026-11-27T10:00:00"), "UTC offset"),
        (lambda d: d.update(state="sleeping"), "state"),
        (lambda d: d.update(schema_version=99), "schema_version"),
        (lambda d: d.pop("message_id"), "message_id"),
    ],
    ids=[
        "extra",
        "negative-seq",
        "bad-id",
        "slash-device",
        "wildcard-device",
        "naive-time",
        "bad-enum",
        "future-schema",
        "missing-id",
    ],
)
def test_field_rules(edit, fragment: str) -> None:  # type: ignore[no-untyped-def]
    data = _status_dict()
    edit(data)
    with pytest.raises(ContractError, match=fragment) as info:
        parse_message(json.dumps(data))
    assert any(fragment in line or "status" in line for line in info.value.errors)


@pytest.mark.parametrize("where", ["message", "data-value", "data-key"])
def test_nul_characters_are_refused_anywhere(where: str) -> None:
    """No store can keep U+0000 everywhere (PostgreSQL refuses it in text), so the wire refuses it."""
    text, data = "fine", {"k": "v"}
    if where == "message":
        text = "a\x00b"
    elif where == "data-value":
        data = {"k": "v\x00"}
    else:
        data = {"k\x00": "v"}
    event = Event(**envelope(device_id="d1", seq=1), event="error", severity="error", message=text, data=data)
    for payload in (event.to_json(), event.to_json().encode()):
        with pytest.raises(ContractError, match="NUL character"):
            parse_message(payload)
    # the six characters backslash-u-0-0-0-0 as text are fine
    literal = Event(**envelope(device_id="d1", seq=1), event="error", severity="error", message="\\u0000")
    assert parse_message(literal.to_json().encode()).message == "\\u0000"


def test_wrong_kind_for_channel_is_rejected() -> None:
    payload = MESSAGES[0].to_json()  # a birth
    with pytest.raises(ContractError, match="'birth' message arrived where 'metrics'"):
        parse_message(payload, expect_kind="metrics")


def test_message_from_another_device_is_rejected() -> None:
    with pytest.raises(ContractError, match="arrived on the topic of 'pi-02'"):
        parse_message(MESSAGES[1].to_json(), expect_device="pi-02")


def test_readings_bounds() -> None:
    data = json.loads(MESSAGES[2].to_json())
    data["readings"]["battery_pct"] = 140
    with pytest.raises(ContractError, match="battery_pct"):
        parse_message(json.dumps(data))


def test_update_url_must_be_http() -> None:
    data = json.loads(MESSAGES[4].to_json())
    data["update"]["base_url"] = "file:///etc/passwd"
    with pytest.raises(ContractError, match="base_url"):
        parse_message(json.dumps(data))
