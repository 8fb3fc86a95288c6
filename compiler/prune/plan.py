"""The pruning plan: JSON that rebuilds a statically pruned variant from the dense model.

A plan lists, in order, the channels removed from each root layer, as recorded by Torch-Pruning's
dependency graph; replaying it on the dense model (same architecture, same input shape) removes the same
channels from every coupled layer (residual adds, BatchNorms, depthwise convs, concats). Plans are data:
diffable, shippable, never pickled modules.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PlanStep", "PruningPlan"]


class PlanStep(BaseModel):
    """Remove channels ``indices`` of one layer (and every layer coupled to them)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    layer: str = Field(description="Qualified name of the root module, e.g. `blocks.0.conv1`.")
    side: Literal["out", "in"] = Field(description="Output or input channels of that layer.")
    indices: tuple[int, ...] = Field(
        description="Channel indices removed, in the layer's numbering at that step."
    )


class PruningPlan(BaseModel):
    """How a variant was cut from the dense model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = Field(default=1, description="Version of the plan format.")
    source_model: str = Field(description="Model the plan applies to, e.g. `reference` or `pkg.mod:fn`.")
    input_shape: tuple[int, ...] = Field(description="Example input shape used to trace dependencies.")
    criterion: str = Field(description="Importance criterion that chose the channels.")
    ratios: dict[str, float] = Field(description="Fraction of channels removed per root layer.")
    steps: tuple[PlanStep, ...] = Field(description="The removals, in order.")
