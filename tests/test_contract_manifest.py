"""The bundle manifest: round trip, every cross-field rule, and one error type for malformed input."""

from __future__ import annotations

import json

import pytest

from agent.contract import BundleManifest, ContractError
from tests.samples import sample_manifest


def _mutated(manifest: BundleManifest, edit) -> str:  # type: ignore[no-untyped-def]
    data = json.loads(manifest.to_json())
    edit(data)
    return json.dumps(data)


def test_round_trip_model_json_model(manifest: BundleManifest) -> None:
    again = BundleManifest.from_json(manifest.to_json())
    assert again == manifest
    assert again.to_json() == manifest.to_json()


def test_round_trip_signed() -> None:
    signed = sample_manifest(signed=True)
    assert BundleManifest.from_json(signed.to_json()) == signed


def test_models_are_frozen(manifest: BundleManifest) -> None:
    with pytest.raises(Exception, match="frozen"):
        manifest.model_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "payload",
    [b"", b"not json", b"[]", b'{"model_id": "x"}', b"\xff\xfe"],
    ids=["empty", "not-json", "array", "missing-fields", "bad-utf8"],
)
def test_malformed_json_raises_contract_error(payload: bytes) -> None:
    with pytest.raises(ContractError) as info:
        BundleManifest.from_json(payload)
    assert info.value.errors, "every problem is listed"
    assert "docs/protocol.md" in info.value.hint


def test_unknown_field_is_rejected(manifest: BundleManifest) -> None:
    text = _mutated(manifest, lambda d: d.update(surprise=1))
    with pytest.raises(ContractError, match="surprise"):
        BundleManifest.from_json(text)


def test_future_schema_version_is_rejected(manifest: BundleManifest) -> None:
    with pytest.raises(ContractError, match="schema_version"):
        BundleManifest.from_json(_mutated(manifest, lambda d: d.update(schema_version=2)))


def test_gated_variant_needs_budget(manifest: BundleManifest) -> None:
    def drop_budget(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][1]["budget"] = None

    with pytest.raises(ContractError, match="needs a budget input"):
        BundleManifest.from_json(_mutated(manifest, drop_budget))


def test_static_variant_cannot_have_budget(manifest: BundleManifest) -> None:
    def add_budget(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][2]["budget"] = {"minimum": 0, "maximum": 1, "default": 1}

    with pytest.raises(ContractError, match=r"static variant .* has a budget"):
        BundleManifest.from_json(_mutated(manifest, add_budget))


def test_budget_default_must_lie_in_range(manifest: BundleManifest) -> None:
    def bad(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][1]["budget"] = {"minimum": 0, "maximum": 1, "default": 2}

    with pytest.raises(ContractError, match="minimum <= default <= maximum"):
        BundleManifest.from_json(_mutated(manifest, bad))


def test_duplicate_variant_names(manifest: BundleManifest) -> None:
    def dup(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][2]["name"] = "dense"

    with pytest.raises(ContractError, match="unique"):
        BundleManifest.from_json(_mutated(manifest, dup))


@pytest.mark.parametrize(
    "path", ["../escape.onnx", "/etc/passwd", "a/../../b.onnx", "a\\b.onnx", "./a.onnx", ""]
)
def test_file_paths_stay_inside_the_bundle(manifest: BundleManifest, path: str) -> None:
    def bad(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][0]["files"][0]["path"] = path

    with pytest.raises(ContractError, match="path"):
        BundleManifest.from_json(_mutated(manifest, bad))


@pytest.mark.parametrize("digest", ["AB" * 32, "ab" * 31, "zz" * 32])
def test_sha256_must_be_lower_hex(manifest: BundleManifest, digest: str) -> None:
    def bad(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][0]["files"][0]["sha256"] = digest

    with pytest.raises(ContractError, match="sha256"):
        BundleManifest.from_json(_mutated(manifest, bad))


def test_runtime_listed_twice(manifest: BundleManifest) -> None:
    def twice(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][0]["files"][1]["runtime"] = "onnx"

    with pytest.raises(ContractError, match="runtime twice"):
        BundleManifest.from_json(_mutated(manifest, twice))


def test_normalisation_channels_must_match_input(manifest: BundleManifest) -> None:
    def rgb(d: dict) -> None:  # type: ignore[type-arg]
        d["input"]["normalization"] = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}

    with pytest.raises(ContractError, match="channels"):
        BundleManifest.from_json(_mutated(manifest, rgb))


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_non_finite_numbers_are_rejected(manifest: BundleManifest, value: str) -> None:
    text = manifest.to_json().replace('"accuracy":0.935', f'"accuracy":{value}')
    assert value in text
    with pytest.raises(ContractError):
        BundleManifest.from_json(text)


def test_naive_creation_time_is_rejected(manifest: BundleManifest) -> None:
    def naive(d: dict) -> None:  # type: ignore[type-arg]
        d["created"]["created_at"] = "2026-11-27T12:00:00"

    with pytest.raises(ContractError, match="UTC offset"):
        BundleManifest.from_json(_mutated(manifest, naive))


def test_signing_payload_excludes_signature_and_is_canonical() -> None:
    unsigned, signed = sample_manifest(), sample_manifest(signed=True)
    assert unsigned.signing_payload() == signed.signing_payload()
    assert b"signature" not in unsigned.signing_payload()
    # key order in the input does not change the payload
    reordered = json.dumps(dict(reversed(list(json.loads(signed.to_json()).items()))))
    assert BundleManifest.from_json(reordered).signing_payload() == signed.signing_payload()


def test_signing_payload_covers_file_hashes(manifest: BundleManifest) -> None:
    def other_hash(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][0]["files"][0]["sha256"] = "cd" * 32

    changed = BundleManifest.from_json(_mutated(manifest, other_hash))
    assert changed.signing_payload() != manifest.signing_payload()


def test_lookup_helpers(manifest: BundleManifest) -> None:
    assert manifest.variant("static-50").plan == "static-50.plan.json"
    assert manifest.variant("dense").file_for("executorch").path == "dense.pte"  # type: ignore[union-attr]
    with pytest.raises(KeyError, match="static-50"):
        manifest.variant("nope")


def test_gated_variant_needs_its_gating(manifest: BundleManifest) -> None:
    def drop(d: dict) -> None:  # type: ignore[type-arg]
        del d["variants"][1]["gating"]

    with pytest.raises(ContractError, match="needs a budget input and its gating"):
        BundleManifest.from_json(_mutated(manifest, drop))


def test_gated_block_widths_and_macs_align(manifest: BundleManifest) -> None:
    def bad(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][1]["gating"]["blocks"][0]["macs"] = [1, 2, 3]

    with pytest.raises(ContractError, match="2 widths but 3 macs"):
        BundleManifest.from_json(_mutated(manifest, bad))


def test_realised_macs_and_density(manifest: BundleManifest) -> None:
    gating = manifest.variant("gated").gating
    assert gating is not None
    assert gating.realised([0, 0]) == (18_000_000 + 3_000_000 + 8_000_000, 48 / 96)
    assert gating.realised([1, 1]) == (18_000_000 + 6_000_000 + 16_000_000, 1.0)
    with pytest.raises(ValueError, match="1 width indices for 2"):
        gating.realised([0])


def test_only_gated_variants_ship_segments(manifest: BundleManifest) -> None:
    def segment_on_static(d: dict) -> None:  # type: ignore[type-arg]
        d["variants"][2]["files"][0]["segment"] = "stem"

    with pytest.raises(ContractError, match="has segment files; only gated"):
        BundleManifest.from_json(_mutated(manifest, segment_on_static))


def test_a_runtime_is_whole_or_segments_not_both(manifest: BundleManifest) -> None:
    def mixed(d: dict) -> None:  # type: ignore[type-arg]
        extra = dict(d["variants"][1]["files"][0], path="gated.stem.onnx", segment="stem")
        d["variants"][1]["files"].append(extra)

    with pytest.raises(ContractError, match="mixes a whole-model"):
        BundleManifest.from_json(_mutated(manifest, mixed))
