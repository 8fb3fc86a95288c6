"""Physically remove channels: analysis (dependency groups), surgery (Torch-Pruning), plan record/replay.

Torch-Pruning's DepGraph finds which layers must lose the same channels (a residual add couples every
block output of a stage with its shortcut; a depthwise conv couples its input and output; a concat
couples slices of its inputs), so the pruned network stays consistent and is truly smaller.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from compiler.errors import PruneError
from compiler.prune.importance import criterion as get_criterion
from compiler.prune.plan import PlanStep, PruningPlan

__all__ = ["PruneGroup", "check_supported", "head_layers", "prunable_groups", "prune", "replay"]

log = logging.getLogger(__name__)

MAX_RATIO = 0.95


@dataclass(frozen=True)
class PruneGroup:
    """One set of coupled channels, named by its root layer."""

    root: str
    channels: int
    layers: tuple[str, ...]


def _names(model: nn.Module) -> dict[nn.Module, str]:
    return {m: n for n, m in model.named_modules()}


# Layers whose weights Torch-Pruning cuts by a rule that knows their channel dimension. A custom layer
# holding a raw nn.Parameter would be cut along a guessed dimension ("the last non-singleton one"), which
# can be silently wrong, so we refuse it instead.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d,
    nn.PReLU, nn.Embedding,
)  # fmt: skip


def check_supported(model: nn.Module) -> None:
    """Raise :class:`PruneError` naming the first layer with weights the pruner has no rule for."""
    for name, module in model.named_modules():
        own = [p for p in module._parameters.values() if p is not None]
        if own and not isinstance(module, SUPPORTED_LAYERS):
            raise PruneError(
                f"layer {name!r} ({type(module).__name__}) holds weights the pruner cannot handle",
                hint="express it with standard layers (Conv, Linear, BatchNorm, LayerNorm, GroupNorm, PReLU, "
                "Embedding)",
            )


def head_layers(model: nn.Module, example: torch.Tensor) -> list[nn.Module]:
    """Layers that produce the logits: their output channels are the classes and must stay."""
    with torch.no_grad():
        classes = model.eval()(example).shape[-1]
    heads = [
        m
        for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == classes)
    ]
    return heads[-1:]


def _dependency_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except Exception as exc:  # tracing runs the user's forward: any error means we cannot analyse it
        raise PruneError(
            f"cannot trace the model to find channel dependencies: {type(exc).__name__}: {exc}",
            hint="the model's forward must run on the example input",
        ) from exc


def prunable_groups(model: nn.Module, example: torch.Tensor) -> list[PruneGroup]:
    """The coupled channel groups the pruner may cut, each named by its root layer."""
    check_supported(model)
    dg = _dependency_graph(model, example)
    names = _names(model)
    groups = []
    for group in dg.get_all_groups(
        ignored_layers=head_layers(model, example), root_module_types=(nn.Conv2d, nn.Linear)
    ):
        root = group[0].dep.target.module
        layers = tuple(dict.fromkeys(names[d.target.module] for d, _ in group if d.target.module in names))
        groups.append(PruneGroup(root=names[root], channels=len(group[0].idxs), layers=layers))
    return groups


def prune(
    model: nn.Module,
    example: torch.Tensor,
    *,
    ratios: dict[str, float],
    criterion: str,
    calibration: tuple[torch.Tensor, torch.Tensor],
    source_model: str,
    round_to: int | None = None,
) -> PruningPlan:
    """Remove ``ratios[root]`` of the channels of each named group, in place; return the plan.

    >>> plan = prune(net, x, ratios={"blocks.0.conv1": 0.5}, criterion="l1", calibration=(xc, yc),
    ...              source_model="reference")  # doctest: +SKIP
    """
    for name, ratio in ratios.items():
        if not 0.0 <= ratio < 1.0:
            raise PruneError(f"pruning ratio {ratio} for {name!r} is out of range", hint="use 0 <= ratio < 1")
    check_supported(model)
    modules = dict(model.named_modules())
    unknown = sorted(set(ratios) - set(modules))
    if unknown:
        raise PruneError(
            f"no layer named {unknown[0]!r} in the model",
            hint=f"prunable roots: {[g.root for g in prunable_groups(model, example)]}",
        )
    chosen = get_criterion(criterion)
    importance = chosen.make()
    model.eval()
    try:
        pruner = tp.pruner.BasePruner(
            model,
            example,
            importance=importance,
            pruning_ratio=0.0,
            pruning_ratio_dict={modules[name]: r for name, r in ratios.items() if r > 0},
            ignored_layers=head_layers(model, example),
            round_to=round_to,
        )
    except Exception as exc:
        raise PruneError(f"cannot analyse the model for pruning: {type(exc).__name__}: {exc}") from exc

    def width(name: str) -> int:
        m = modules[name]
        return int(m.out_channels if isinstance(m, nn.Conv2d) else getattr(m, "out_features", -1))

    wanted = {name: width(name) for name, r in ratios.items() if int(width(name) * r) > 0}
    x, y = calibration
    with chosen.prepare(importance, model, x, y):
        pruner.step()
    model.zero_grad(set_to_none=True)
    untouched = [name for name, before in wanted.items() if width(name) == before]
    if untouched:
        raise PruneError(
            f"criterion {criterion!r} could not score the channels of {untouched[0]!r}, "
            "so nothing was removed there",
            hint="'bn' needs a BatchNorm after every pruned layer; try 'l1', 'l2', 'taylor' or 'activation'",
        )
    steps = tuple(
        PlanStep(layer=name, side="out" if out else "in", indices=tuple(int(i) for i in idxs))
        for name, out, idxs in pruner.pruning_history()
    )
    return PruningPlan(
        source_model=source_model,
        input_shape=tuple(example.shape),
        criterion=criterion,
        ratios={k: float(v) for k, v in sorted(ratios.items())},
        steps=steps,
    )


def replay(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Apply ``plan`` to a dense ``model`` in place (same architecture), rebuilding the variant."""
    example = torch.zeros(plan.input_shape)
    dg = _dependency_graph(model.eval(), example)
    try:
        dg.load_pruning_history([[s.layer, s.side == "out", list(s.indices)] for s in plan.steps])
    except (AttributeError, IndexError) as exc:
        raise PruneError(
            f"the plan does not fit this model: {exc}",
            hint=f"the plan was made for {plan.source_model!r} with input {plan.input_shape}",
        ) from exc
    return model
