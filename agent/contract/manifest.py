"""The bundle manifest: what a bundle holds, how it was measured, and the signature over it.

A bundle is a directory (or a single-file archive of one) with ``manifest.json`` at its root and the
exported files beside it. Every file is listed with its sha256 and size; the signature covers the
canonical JSON of the manifest without its ``signature`` block, so it covers every file through its
hash. Bundles are immutable: a new model is a new bundle version.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import PurePosixPath
from typing import Annotated, Literal

from pydantic import AfterValidator, StringConstraints, field_validator, model_validator

from agent.contract._base import (
    SCHEMA_VERSION,
    ContractModel,
    Identifier,
    Sha256Hex,
    canonical_json,
    described,
)

__all__ = [
    "MANIFEST_FILENAME",
    "ArtifactFile",
    "BudgetInput",
    "BudgetPoint",
    "BundleManifest",
    "CreationInfo",
    "GatedBlock",
    "Gating",
    "InputSpec",
    "Latency",
    "Normalization",
    "Runtime",
    "Signature",
    "Variant",
    "VariantKind",
]

MANIFEST_FILENAME = "manifest.json"

Runtime = Literal["onnx", "executorch"]
"""The runtimes a variant can be exported for: onnxruntime (``.onnx``) and ExecuTorch (``.pte``)."""

VariantKind = Literal["dense", "gated", "static"]


def _relative_posix_path(value: str) -> str:
    path = PurePosixPath(value)
    if not value or path.is_absolute() or ".." in path.parts or "\\" in value or value != str(path):
        raise ValueError("must be a normalised relative POSIX path inside the bundle (no '..', no '/' start)")
    return value


BundlePath = Annotated[str, AfterValidator(_relative_posix_path)]


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Finite = Annotated[float, AfterValidator(_finite)]
KeyId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class Normalization(ContractModel):
    """Per-channel normalisation applied before the model: ``x = (pixel / scale - mean) / std``."""

    mean: tuple[Finite, ...] = described("Mean per input channel, after dividing by `scale`.", min_length=1)
    std: tuple[Finite, ...] = described("Standard deviation per input channel; all > 0.", min_length=1)
    scale: Finite = described("Raw values are divided by this first (255 for 8-bit images).", default=1.0)

    @model_validator(mode="after")
    def _check(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} channels but std has {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError("every std must be > 0")
        if self.scale <= 0:
            raise ValueError("scale must be > 0")
        return self


class InputSpec(ContractModel):
    """The model's main input and how to prepare it; identical for every variant of a bundle."""

    name: Identifier = described("Name of the image input in every exported graph.", default="input")
    shape: tuple[int, ...] = described(
        "Input shape at batch 1, e.g. [1, 1, 28, 28]; all dimensions > 0.", min_length=1
    )
    dtype: Literal["float32", "float16", "uint8", "int8"] = described(
        "Element type the exported graphs expect.", default="float32"
    )
    layout: Literal["NCHW", "NHWC", "NC"] = described("Dimension order of `shape`.", default="NCHW")
    normalization: Normalization = described("Preprocessing applied before the model.")
    class_names: tuple[str, ...] = described(
        "Label of each output index, in order; the output has this many logits.", min_length=1
    )

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        if any(d <= 0 for d in shape):
            raise ValueError("every dimension must be > 0")
        return shape

    @model_validator(mode="after")
    def _channels_match(self) -> InputSpec:
        expected = {"NCHW": 4, "NHWC": 4, "NC": 2}[self.layout]
        if len(self.shape) != expected:
            raise ValueError(f"layout {self.layout} needs {expected} dimensions, shape has {len(self.shape)}")
        if self.layout != "NC":
            channels = self.shape[1] if self.layout == "NCHW" else self.shape[3]
            if len(self.normalization.mean) != channels:
                raise ValueError(
                    f"normalization has {len(self.normalization.mean)} channels, input has {channels}"
                )
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError("class_names must be unique")
        return self


class ArtifactFile(ContractModel):
    """One exported file of a variant, for one runtime."""

    runtime: Runtime = described("Runtime that executes this file.")
    path: BundlePath = described("Path relative to the bundle root, POSIX separators.")
    sha256: Sha256Hex = described("Lower-case hex SHA-256 of the file's bytes.")
    size_bytes: int = described("Exact size of the file in bytes.", ge=0)
    segment: Identifier | None = described(
        "For a gated variant shipped as one graph per segment: the segment (`stem`, `block{i}_w{j}`); "
        "null for a file holding the whole model.",
        default=None,
    )


class Latency(ContractModel):
    """Batch-1 latency of one exported file, measured in its runtime on the compiling host."""

    median_ms: Finite = described("Median wall-clock time of one inference, milliseconds.", ge=0)
    p90_ms: Finite = described("90th percentile, milliseconds.", ge=0)
    threads: int = described("Intra-op threads the runtime used.", ge=1)
    runs: int = described("Timed runs after warm-up.", ge=1)


class BudgetInput(ContractModel):
    """The run-time compute knob of a gated variant: a second scalar float32 input of the graph."""

    name: Identifier = described("Name of the budget input in the exported graphs.", default="budget")
    minimum: Finite = described("Smallest accepted budget (least compute).")
    maximum: Finite = described("Largest accepted budget (most compute).")
    default: Finite = described("Budget the agent uses when its policy has no opinion.")

    @model_validator(mode="after")
    def _ordered(self) -> BudgetInput:
        if not self.minimum <= self.default <= self.maximum:
            raise ValueError(
                f"need minimum <= default <= maximum, got {self.minimum}, {self.default}, {self.maximum}"
            )
        return self


class BudgetPoint(ContractModel):
    """What a gated variant achieves at one budget value, measured on the test split."""

    budget: Finite = described("Budget input value.")
    accuracy: Finite = described("Top-1 accuracy on the test split, 0..1.", ge=0, le=1)
    macs: int = described("Mean multiply-accumulates per inference at this budget.", ge=0)
    density: Finite = described("Mean fraction of gated channels computed, 0..1.", ge=0, le=1)
    latency: dict[Runtime, Latency] = described("Measured latency per runtime at this budget.", default={})


class GatedBlock(ContractModel):
    """One residual block whose inner width a gate picks per input."""

    name: str = described("Module path of the block in the source model, e.g. `blocks.1`.", min_length=1)
    widths: tuple[int, ...] = described(
        "Selectable inner channel counts, ascending; the last is the full width.", min_length=2
    )
    macs: tuple[int, ...] = described("Multiply-accumulates of the block at each width.", min_length=2)

    @model_validator(mode="after")
    def _aligned(self) -> GatedBlock:
        if len(self.macs) != len(self.widths):
            raise ValueError(f"block {self.name}: {len(self.widths)} widths but {len(self.macs)} macs")
        if list(self.widths) != sorted(set(self.widths)) or self.widths[0] < 1:
            raise ValueError(f"block {self.name}: widths must be distinct, ascending and >= 1")
        return self


class Gating(ContractModel):
    """How a gated variant computes: the gated blocks, so a device can dispatch and count realised MACs.

    A gated variant ships segments: ``stem`` (input, budget) -> (features, index for block 0), then
    ``block{i}_w{j}`` (features, budget) -> (features, index for block i+1), the last block's segments
    returning (logits,); a dispatcher runs ``stem`` and then, per block, the segment the index names.
    With ``full_from`` set there is one more segment, ``full``, run alone at budgets from that value up.
    ExecuTorch holds them as the methods of one ``.pte``; ONNX as one graph each (files with ``segment``
    set), which onnxruntime runs as fast as one graph with ``If`` nodes. ``widths_output`` names the
    width-index output of that single-graph form, which only ``bench/gated_speed.py`` builds; the agent
    does not load it.
    """

    blocks: tuple[GatedBlock, ...] = described("The gated blocks, in execution order.", min_length=1)
    fixed_macs: int = described("Multiply-accumulates outside the gated blocks (stem, gates, head).", ge=0)
    widths_output: Identifier = described(
        "Single-graph ONNX form only (not shipped): its output with the width index per block.",
        default="widths",
    )
    full_from: float | None = described(
        "Budgets at or above this run the `full` segment instead: (input) -> (logits,), every block at its "
        "largest width in one call, no gates, so the top of the budget range costs what a plain network "
        "costs. Null: the variant has no such segment.",
        default=None,
        ge=0.0,
    )

    def realised(self, indices: Sequence[int]) -> tuple[int, float]:
        """MACs and density (fraction of gated channels computed) for one inference's width indices.

        >>> gating.realised([0, 3, 1])  # doctest: +SKIP
        (14200000, 0.5)
        """
        if len(indices) != len(self.blocks):
            raise ValueError(f"{len(indices)} width indices for {len(self.blocks)} gated blocks")
        macs = self.fixed_macs + sum(b.macs[i] for b, i in zip(self.blocks, indices, strict=True))
        used = sum(b.widths[i] for b, i in zip(self.blocks, indices, strict=True))
        return macs, used / sum(b.widths[-1] for b in self.blocks)


class Variant(ContractModel):
    """One model of the bundle: the dense reference, the gated model, or a statically pruned network."""

    name: Identifier = described("Unique name within the bundle, e.g. `dense`, `gated`, `static-50`.")
    kind: VariantKind = described("dense: the reference; gated: input-dependent width; static: pruned.")
    files: tuple[ArtifactFile, ...] = described(
        "Exported files: one per runtime, or for a gated variant one per runtime and segment.", min_length=1
    )
    macs: int = described("Multiply-accumulates of one inference at full width.", ge=0)
    params: int = described("Number of parameters.", ge=0)
    accuracy: Finite | None = described(
        "Top-1 accuracy on the test split, 0..1 (for gated: at the default budget); null if unmeasured.",
        default=None,
        ge=0,
        le=1,
    )
    latency: dict[Runtime, Latency] = described(
        "Measured batch-1 latency per runtime (for gated: at the default budget).", default={}
    )
    budget: BudgetInput | None = described(
        "The budget input; required for gated, absent otherwise.", default=None
    )
    budget_curve: tuple[BudgetPoint, ...] = described(
        "Accuracy/MACs/latency at several budgets; gated variants only.", default=()
    )
    plan: BundlePath | None = described(
        "Path of the JSON pruning plan that rebuilds this variant from the dense model, if any.", default=None
    )
    gating: Gating | None = described("The gated blocks; required for gated, absent otherwise.", default=None)

    @model_validator(mode="after")
    def _consistent(self) -> Variant:
        keys = [(f.runtime, f.segment) for f in self.files]
        if len(set(keys)) != len(keys):
            raise ValueError(
                f"variant {self.name!r} lists a runtime twice: {[f.runtime for f in self.files]}"
            )
        for runtime in {f.runtime for f in self.files}:
            segments = [f.segment for f in self.files if f.runtime == runtime]
            if None in segments and len(segments) > 1:
                raise ValueError(f"variant {self.name!r} mixes a whole-model {runtime} file with segments")
        if self.kind != "gated" and any(f.segment is not None for f in self.files):
            raise ValueError(f"{self.kind} variant {self.name!r} has segment files; only gated variants do")
        if self.kind == "gated" and (self.budget is None or self.gating is None):
            raise ValueError(f"gated variant {self.name!r} needs a budget input and its gating")
        if self.kind != "gated" and (self.budget is not None or self.budget_curve or self.gating is not None):
            raise ValueError(f"{self.kind} variant {self.name!r} has a budget, budget_curve or gating")
        return self

    def file_for(self, runtime: Runtime) -> ArtifactFile | None:
        """The file this variant ships for ``runtime`` (the first segment if in segments), or ``None``."""
        return next((f for f in self.files if f.runtime == runtime), None)

    def files_for(self, runtime: Runtime) -> tuple[ArtifactFile, ...]:
        """Every file this variant ships for ``runtime``: one, or one per segment."""
        return tuple(f for f in self.files if f.runtime == runtime)


class CreationInfo(ContractModel):
    """Who made the bundle, from what, with which tools."""

    created_at: datetime = described("UTC time the bundle was written (ISO 8601 with offset).")
    tool: str = described("Program that wrote the bundle.", default="edgeprune")
    tool_version: str = described("Version of that program.")
    source_model: str = described("The model the bundle was compiled from, e.g. `reference` or `pkg.mod:fn`.")
    dataset: str = described("Data set used for calibration, fine-tuning and measurement.")
    seed: int | None = described("Random seed of the compile run, if seeded.", default=None)
    host: str = described("Description of the machine that measured latency (CPU, cores).", default="")
    versions: dict[str, str] = described("Versions of torch, executorch, onnxruntime... used.", default={})

    @field_validator("created_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("created_at must carry a UTC offset")
        return value


class Signature(ContractModel):
    """Ed25519 signature over :meth:`BundleManifest.signing_payload`."""

    algorithm: Literal["ed25519"] = described("Signature algorithm.", default="ed25519")
    key_id: KeyId = described(
        "First 16 hex digits of the SHA-256 of the raw public key, to pick the verifying key."
    )
    value: str = described(
        "Base64 (standard alphabet) of the 64-byte signature.", min_length=86, max_length=88
    )


class BundleManifest(ContractModel):
    """``manifest.json`` at the root of every bundle.

    >>> m = BundleManifest.from_json(open("manifest.json").read())  # doctest: +SKIP
    >>> [v.name for v in m.variants]  # doctest: +SKIP
    ['dense', 'gated', 'static-50']
    """

    schema_version: Literal[1] = described("Version of this schema.", default=SCHEMA_VERSION)
    model_id: Identifier = described("Stable id of the model family, e.g. `fmnist-resnet`.")
    bundle_version: Identifier = described("Version of this bundle; unique per model_id, e.g. `1.0.0`.")
    input: InputSpec = described("The model input, shared by every variant.")
    variants: tuple[Variant, ...] = described("The variants, dense first by convention.", min_length=1)
    created: CreationInfo = described("Creation information.")
    signature: Signature | None = described(
        "Signature over everything else; null until signed.", default=None
    )

    @model_validator(mode="after")
    def _unique(self) -> BundleManifest:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        paths = [f.path for v in self.variants for f in v.files]
        if len(set(paths)) != len(paths):
            raise ValueError("two variants list the same file path")
        if MANIFEST_FILENAME in paths:
            raise ValueError(f"{MANIFEST_FILENAME} cannot be a variant file")
        return self

    def variant(self, name: str) -> Variant:
        """The variant called ``name``; ``KeyError`` names the ones that exist."""
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"no variant {name!r}; the bundle has {[v.name for v in self.variants]}")

    def signing_payload(self) -> bytes:
        """The exact bytes the signature covers: canonical JSON of the manifest minus ``signature``."""
        return canonical_json(self.model_dump(mode="json", exclude={"signature"}))
