"""Contract objects built in code, shared by the tests."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.contract import (
    ArtifactFile,
    Birth,
    BudgetInput,
    BundleManifest,
    BundleRef,
    CreationInfo,
    DesiredState,
    Event,
    GatedBlock,
    Gating,
    InputSpec,
    Latency,
    Message,
    Metrics,
    Normalization,
    Percentiles,
    Readings,
    Status,
    UpdateInstruction,
    UpdateStatus,
    Variant,
    envelope,
)
from agent.data import FASHION_MNIST_CLASSES
from agent.signing import sign_manifest


def sample_manifest(*, signed: bool = False) -> BundleManifest:
    """A realistic three-variant manifest built in code."""
    digest = "ab" * 32

    def files(name: str) -> tuple[ArtifactFile, ...]:
        return (
            ArtifactFile(runtime="onnx", path=f"{name}.onnx", sha256=digest, size_bytes=1234),
            ArtifactFile(runtime="executorch", path=f"{name}.pte", sha256=digest, size_bytes=2345),
        )

    latency = {"onnx": Latency(median_ms=1.5, p90_ms=1.9, threads=2, runs=200)}
    return BundleManifest.from_obj(
        {
            "model_id": "fmnist-resnet",
            "bundle_version": "1.0.0",
            "input": InputSpec(
                shape=(1, 1, 28, 28),
                normalization=Normalization(mean=(0.286,), std=(0.353,), scale=255.0),
                class_names=FASHION_MNIST_CLASSES,
            ),
            "variants": (
                Variant(
                    name="dense",
                    kind="dense",
                    files=files("dense"),
                    macs=40_000_000,
                    params=600_000,
                    accuracy=0.935,
                    latency=latency,
                ),
                Variant(
                    name="gated",
                    kind="gated",
                    files=files("gated"),
                    macs=40_000_000,
                    params=610_000,
                    accuracy=0.931,
                    latency=latency,
                    budget=BudgetInput(minimum=0.0, maximum=1.0, default=0.5),
                    gating=Gating(
                        blocks=(
                            GatedBlock(name="blocks.0", widths=(16, 32), macs=(3_000_000, 6_000_000)),
                            GatedBlock(name="blocks.1", widths=(32, 64), macs=(8_000_000, 16_000_000)),
                        ),
                        fixed_macs=18_000_000,
                    ),
                ),
                Variant(
                    name="static-50",
                    kind="static",
                    files=files("static-50"),
                    macs=11_000_000,
                    params=160_000,
                    accuracy=0.925,
                    latency=latency,
                    plan="static-50.plan.json",
                ),
            ),
            "created": CreationInfo(
                created_at=datetime(2026, 11, 27, 12, 0, tzinfo=UTC),
                tool_version="0.1.0",
                source_model="reference",
                dataset="fashion-mnist",
                seed=0,
                versions={"torch": "2.13.0"},
            ),
            "signature": {"key_id": "0123456789abcdef", "value": "A" * 86 + "=="} if signed else None,
        }
    )


def sample_messages(device_id: str = "pi-01") -> list[Message]:
    """One message of every kind, with every optional block filled in."""
    ref = BundleRef(model_id="fmnist-resnet", bundle_version="1.1.0")
    return [
        Birth(
            **envelope(device_id=device_id, seq=0),
            profile="rpi4",
            agent_version="0.1.0",
            backend="onnx",
            bundle=ref,
            variants=("dense", "gated"),
        ),
        Status(
            **envelope(device_id=device_id, seq=1),
            state="online",
            uptime_s=12.5,
            active_variant="gated",
            budget=0.5,
            outbox_pending=3,
        ),
        Metrics(
            **envelope(device_id=device_id, seq=2),
            window_s=10,
            inferences=100,
            errors=1,
            latency=Percentiles(p50_ms=1.2, p90_ms=2.0, p99_ms=3.5),
            mean_macs=1.2e7,
            mean_density=0.4,
            active_variant="gated",
            budget=0.5,
            readings=Readings(
                battery_pct=42.0, charging=False, cpu_load_pct=13.0, temperature_c=51.5, free_memory_mb=900.0
            ),
            agreement=0.97,
            shadow_runs=30,
            outbox_dropped=0,
        ),
        Event(
            **envelope(device_id=device_id, seq=3),
            event="variant_switch",
            message="battery 19% < 20%: dense -> static-50",
            data={"from_variant": "dense", "to_variant": "static-50", "battery_pct": 19.0},
        ),
        DesiredState(
            **envelope(device_id=device_id, seq=0),
            revision=4,
            pinned_variant=None,
            policy_overrides={"low_battery_pct": 25},
            metrics_period_s=30,
            update=UpdateInstruction(
                update_id="u-7",
                target=ref,
                base_url="http://127.0.0.1:8000/a/u-7",
                manifest_sha256="cd" * 32,
                max_bytes_per_s=100_000,
            ),
        ),
        UpdateStatus(
            **envelope(device_id=device_id, seq=4),
            update_id="u-7",
            target=ref,
            state="downloading",
            bytes_done=1000,
            bytes_total=5000,
        ),
    ]


def write_bundle(directory: Path, *, key: Ed25519PrivateKey | None = None) -> BundleManifest:
    """A small, valid bundle on disk (fake model bytes, correct hashes), signed with ``key`` if given."""
    directory.mkdir(parents=True)
    manifest = sample_manifest()
    variants = []
    for v in manifest.variants:
        files = []
        for f in v.files:
            data = f"{v.name} {f.runtime} ".encode() * 50
            (directory / f.path).write_bytes(data)
            files.append(
                f.model_copy(update={"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data)})
            )
        variants.append(v.model_copy(update={"files": tuple(files)}))
    manifest = manifest.model_copy(update={"variants": tuple(variants)})
    if key is not None:
        manifest = sign_manifest(manifest, key)
    (directory / "manifest.json").write_text(manifest.model_dump_json(indent=1))
    return manifest
