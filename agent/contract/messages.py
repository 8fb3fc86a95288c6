"""MQTT wire messages between agents and the fleet manager.

Every message is one JSON object with a common envelope (``schema_version``, ``kind``, ``device_id``,
``seq``, ``message_id``, ``sent_at``) and the fields of its kind. ``kind`` discriminates the union, so
:func:`parse_message` returns the right class. ``seq`` rises by one per message a device sends (the fleet
uses gaps to count losses); ``message_id`` is unique per message, so a consumer drops duplicates after a
QoS 1 redelivery or an outbox replay. See ``docs/protocol.md``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError, field_validator

from agent.contract._base import (
    INT32_MAX,
    INT64_MAX,
    SCHEMA_VERSION,
    ContractModel,
    Identifier,
    MessageId,
    Sha256Hex,
    contract_error,
    described,
)
from agent.contract.manifest import Finite, Runtime
from agent.errors import ContractError

__all__ = [
    "Birth",
    "BundleRef",
    "DesiredState",
    "Event",
    "EventName",
    "Message",
    "Metrics",
    "Percentiles",
    "Readings",
    "Scalar",
    "Status",
    "UpdateInstruction",
    "UpdateState",
    "UpdateStatus",
    "envelope",
    "new_message_id",
    "parse_message",
]

Scalar = str | int | float | bool | None


def new_message_id() -> str:
    """A fresh random message id: 32 lower-case hex digits (a UUID4 without dashes)."""
    return uuid.uuid4().hex


def envelope(*, device_id: str, seq: int) -> dict[str, Any]:
    """The common envelope fields for a new message, with a fresh id and the current UTC time.

    >>> Status(**envelope(device_id="pi-01", seq=7), state="online", uptime_s=1.5).seq
    7
    """
    return {"device_id": device_id, "seq": seq, "message_id": new_message_id(), "sent_at": datetime.now(UTC)}


class _Envelope(ContractModel):
    schema_version: Literal[1] = described("Version of the wire protocol.", default=SCHEMA_VERSION)
    device_id: Identifier = described("The device the message is from (or, for `desired`, for).")
    seq: int = described("Sequence number, +1 per message from the same sender.", ge=0, le=INT64_MAX)
    message_id: MessageId = described("Unique id (32 hex digits) used to drop duplicates.")
    sent_at: datetime = described("UTC time the message was created, ISO 8601 with offset.")

    @field_validator("sent_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("sent_at must carry a UTC offset")
        return value


class BundleRef(ContractModel):
    """Names one bundle: the model family and its version."""

    model_id: Identifier = described("Model family of the bundle.")
    bundle_version: Identifier = described("Version of the bundle.")


class Birth(_Envelope):
    """Sent (retained) when an agent connects: who it is and what it serves."""

    kind: Literal["birth"] = described("Message kind.", default="birth")
    profile: Identifier = described("Device profile name, e.g. `rpi4`, `pixel`.")
    agent_version: str = described("Version of the edgeprune agent.", min_length=1, max_length=64)
    backend: Runtime = described("Inference runtime the agent uses.")
    bundle: BundleRef | None = described("Bundle being served; null if none is installed yet.", default=None)
    variants: tuple[Identifier, ...] = described("Variants of that bundle this device can serve.", default=())


class Status(_Envelope):
    """Heartbeat (retained). ``state="offline"`` is also the last-will message set at connect."""

    kind: Literal["status"] = described("Message kind.", default="status")
    state: Literal["online", "offline"] = described("online: heartbeat; offline: clean stop or last will.")
    uptime_s: Finite = described("Seconds since the agent started.", ge=0)
    active_variant: Identifier | None = described("Variant serving now; null if none.", default=None)
    budget: Finite | None = described("Gating budget in use when the active variant is gated.", default=None)
    outbox_pending: int = described(
        "Telemetry messages waiting in the on-disk outbox.", default=0, ge=0, le=INT64_MAX
    )


class Percentiles(ContractModel):
    """Latency percentiles over a metrics window, milliseconds."""

    p50_ms: Finite = described("Median latency.", ge=0)
    p90_ms: Finite = described("90th percentile.", ge=0)
    p99_ms: Finite = described("99th percentile.", ge=0)


class Readings(ContractModel):
    """Sensor readings; null where the device cannot measure a value (never a guess)."""

    battery_pct: Finite | None = described("Battery charge, 0..100.", default=None, ge=0, le=100)
    charging: bool | None = described("Whether external power is connected.", default=None)
    cpu_load_pct: Finite | None = described(
        "CPU load of the whole device, 0..100.", default=None, ge=0, le=100
    )
    temperature_c: Finite | None = described("Hottest thermal zone, degrees Celsius.", default=None)
    free_memory_mb: Finite | None = described("Available memory, MiB.", default=None, ge=0)


class Metrics(_Envelope):
    """Periodic summary of one window of inference."""

    kind: Literal["metrics"] = described("Message kind.", default="metrics")
    window_s: Finite = described("Length of the window the numbers cover, seconds.", gt=0)
    inferences: int = described("Inferences completed in the window.", ge=0, le=INT32_MAX)
    errors: int = described("Inferences that failed in the window.", default=0, ge=0, le=INT32_MAX)
    latency: Percentiles | None = described(
        "Latency percentiles; null when there was no inference.", default=None
    )
    mean_macs: Finite | None = described(
        "Mean realised MACs per inference; null when none.", default=None, ge=0
    )
    mean_density: Finite | None = described(
        "Mean fraction of gated channels computed (1 for non-gated variants).", default=None, ge=0, le=1
    )
    active_variant: Identifier | None = described("Variant serving at the end of the window.", default=None)
    budget: Finite | None = described("Gating budget at the end of the window.", default=None)
    readings: Readings = described("Sensor readings at the end of the window.", default=Readings())
    agreement: Finite | None = described(
        "Fraction of shadow runs where the active variant agreed with dense; null without shadow runs.",
        default=None,
        ge=0,
        le=1,
    )
    shadow_runs: int = described(
        "Shadow runs of the dense variant in the window.", default=0, ge=0, le=INT32_MAX
    )
    outbox_dropped: int = described(
        "Telemetry messages dropped because the outbox was full, since the outbox was created.",
        default=0,
        ge=0,
        le=INT64_MAX,
    )


EventName = Literal[
    "started",
    "stopping",
    "bundle_loaded",
    "variant_switch",
    "budget_change",
    "command_rejected",
    "desired_applied",
    "error",
]


class Event(_Envelope):
    """Something happened on the device that the fleet should see once (not a periodic value)."""

    kind: Literal["event"] = described("Message kind.", default="event")
    event: EventName = described("What happened.")
    severity: Literal["info", "warning", "error"] = described("How much it matters.", default="info")
    message: str = described("Human-readable description, including the reason for a switch.")
    data: dict[str, Scalar] = described(
        "Structured details, e.g. from_variant, to_variant, reason for a switch.", default={}
    )


class UpdateInstruction(ContractModel):
    """Where to fetch a new bundle from; part of the desired state."""

    update_id: Identifier = described("Id of this update (one rollout to one device).")
    target: BundleRef = described("The bundle to end up on.")
    base_url: str = described(
        "HTTP(S) URL of the fleet manager's artifact endpoint for this update.", pattern=r"^https?://"
    )
    manifest_sha256: Sha256Hex = described("SHA-256 of the target bundle's manifest.json.")
    max_bytes_per_s: int | None = described("Download bandwidth cap; null for none.", default=None, gt=0)
    health_window_s: Finite = described(
        "Seconds the new bundle must stay healthy before commit.", default=60, gt=0
    )


class DesiredState(_Envelope):
    """What the fleet wants a device to do (retained, one per device; the newest revision wins)."""

    kind: Literal["desired"] = described("Message kind.", default="desired")
    revision: int = described("Increases with every change; the agent ignores older revisions.", ge=0)
    pinned_variant: Identifier | None = described(
        "Serve only this variant; null lets the policy choose.", default=None
    )
    policy_overrides: dict[str, Scalar] = described(
        "Policy settings overriding the device's defaults.", default={}
    )
    metrics_period_s: Finite | None = described(
        "Seconds between metrics; null keeps the default.", default=None, gt=0
    )
    heartbeat_period_s: Finite | None = described(
        "Seconds between heartbeats; null keeps the default.", default=None, gt=0
    )
    update: UpdateInstruction | None = described("Bundle to move to; null for no update.", default=None)


UpdateState = Literal[
    "idle",
    "downloading",
    "verifying",
    "staged",
    "activating",
    "health_check",
    "committed",
    "rolling_back",
    "rolled_back",
    "failed",
]


class UpdateStatus(_Envelope):
    """Progress of an update, sent at every state change of the device's updater."""

    kind: Literal["update_status"] = described("Message kind.", default="update_status")
    update_id: Identifier = described("The update this is about.")
    target: BundleRef = described("The bundle being installed.")
    state: UpdateState = described("State the updater just entered.")
    bytes_done: int = described("Bytes downloaded so far.", default=0, ge=0, le=INT64_MAX)
    bytes_total: int | None = described(
        "Bytes to download in all; null if not known yet.", default=None, ge=0, le=INT64_MAX
    )
    error: str | None = described("Why the update failed or rolled back; null otherwise.", default=None)


Message = Annotated[
    Birth | Status | Metrics | Event | DesiredState | UpdateStatus,
    Field(discriminator="kind"),
]
"""Any wire message; ``kind`` selects the class."""

_MESSAGE = TypeAdapter[Message](Message)


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def parse_message(
    data: str | bytes | bytearray, *, expect_kind: str | None = None, expect_device: str | None = None
) -> Message:
    """Validate one MQTT payload; raise :class:`ContractError` if it is malformed or unexpected.

    ``expect_kind``/``expect_device`` come from the topic it arrived on, so a payload published on
    the wrong topic is rejected too.

    >>> m = parse_message(Status(**envelope(device_id="d1", seq=0), state="online", uptime_s=0).to_json())
    >>> type(m).__name__
    'Status'
    """
    try:
        message = _MESSAGE.validate_json(data)
    except ValidationError as exc:
        raise contract_error("message", exc) from exc
    escaped = "\\u0000" in data if isinstance(data, str) else b"\\u0000" in data  # JSON escapes U+0000
    if escaped and _has_nul(json.loads(data)):
        raise ContractError(
            "message holds a NUL character (U+0000) in a string",
            hint="no text on the wire may contain U+0000: the fleet's databases cannot store it",
        )
    if expect_kind is not None and message.kind != expect_kind:
        raise ContractError(
            f"a {message.kind!r} message arrived where {expect_kind!r} was expected",
            hint="publish each kind on its own channel (docs/protocol.md)",
        )
    if expect_device is not None and message.device_id != expect_device:
        raise ContractError(
            f"message names device {message.device_id!r} but arrived on the topic of {expect_device!r}",
            hint="a device may only publish on its own topics",
        )
    return message
