"""House rules every contract model keeps: frozen, closed, and a description on every field."""

from __future__ import annotations

import inspect

import pytest
from pydantic import BaseModel

from agent import contract
from agent.contract import ContractModel

MODELS = sorted(
    (
        obj
        for obj in vars(contract).values()
        if inspect.isclass(obj) and issubclass(obj, BaseModel) and obj is not ContractModel
    ),
    key=lambda cls: cls.__name__,
)


def test_models_found() -> None:
    assert len(MODELS) >= 20


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_frozen_and_closed(model: type[BaseModel]) -> None:
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_field_is_described(model: type[BaseModel]) -> None:
    missing = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not missing, f"{model.__name__} fields without description: {missing}"


def test_public_api_is_pinned() -> None:
    # Adding to the contract is a deliberate act: update this list and docs/protocol.md together.
    assert sorted(contract.__all__) == sorted(
        [
            "CHANNELS",
            "INT32_MAX",
            "INT64_MAX",
            "MANIFEST_FILENAME",
            "SCHEMA_VERSION",
            "TOPIC_PREFIX",
            "ArtifactFile",
            "Birth",
            "BudgetInput",
            "GatedBlock",
            "Gating",
            "BudgetPoint",
            "BundleManifest",
            "BundleRef",
            "Channel",
            "ChannelSpec",
            "ContractError",
            "ContractModel",
            "CreationInfo",
            "DesiredState",
            "Event",
            "EventName",
            "InputSpec",
            "Latency",
            "Message",
            "Metrics",
            "Normalization",
            "Percentiles",
            "Readings",
            "Runtime",
            "Scalar",
            "Signature",
            "Status",
            "TopicParts",
            "UpdateInstruction",
            "UpdateState",
            "UpdateStatus",
            "Variant",
            "VariantKind",
            "canonical_json",
            "channel_for_kind",
            "device_topic",
            "envelope",
            "new_message_id",
            "parse_message",
            "parse_topic",
            "subscription",
        ]
    )
    for name in contract.__all__:
        assert hasattr(contract, name), name
