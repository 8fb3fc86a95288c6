"""Channel importance criteria, selectable by name (``--criterion``).

| name | what scores a channel | needs |
|---|---|---|
| ``l1`` / ``l2`` | L1 / L2 norm of the weights of the channel, over its dependency group | nothing |
| ``bn`` | absolute BatchNorm scale (gamma), as in network slimming (Liu et al. 2017) | BN after each conv |
| ``taylor`` | first-order Taylor estimate abs(w * dL/dw) (Molchanov et al. 2019) | calibration gradients |
| ``activation`` | mean absolute output of the channel (conv, linear, BN) | calibration data |
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from compiler.errors import CompileError

__all__ = ["CRITERIA", "Criterion", "MeanActivationImportance", "criterion"]


@dataclass(frozen=True)
class Criterion:
    """A named importance criterion and how to prepare a model before scoring with it."""

    name: str
    make: Callable[[], Any]
    prepare: Callable[[Any, nn.Module, torch.Tensor, torch.Tensor], Any]  # -> context manager
    description: str


@contextmanager
def _nothing(imp: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
    yield


@contextmanager
def _gradients(imp: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
    # Taylor scores read .grad of every weight: one backward pass over the calibration batch.
    model.eval()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    try:
        yield
    finally:
        model.zero_grad(set_to_none=True)


_RECORDED = (nn.Conv2d, nn.Linear, nn.BatchNorm2d)
_OUT_HANDLERS = (
    tp.pruner.function.prune_conv_out_channels,
    tp.pruner.function.prune_linear_out_channels,
    tp.pruner.function.prune_batchnorm_out_channels,
    tp.pruner.function.prune_depthwise_conv_out_channels,
)


class MeanActivationImportance(tp.importance.GroupMagnitudeImportance):  # type: ignore[misc]
    """Mean |output| of each channel over the calibration batch, averaged over the coupled group.

    Scores a channel by what it produces (its own outputs and those of its BatchNorm), so every group
    with a conv, linear or BN producer gets a score; Torch-Pruning's own ActivationImportance scores
    consumers' inputs and skips groups whose consumer is behind a flatten.
    """

    def __init__(self) -> None:
        super().__init__(p=1, group_reduction="mean", normalizer="mean")

    @torch.no_grad()
    def __call__(self, group: Any) -> torch.Tensor | None:
        scores, root_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            recorded = getattr(layer, "_edgeprune_activation", None)
            if dep.handler in _OUT_HANDLERS and recorded is not None:
                scores.append(recorded[sorted(idxs)])
                root_idxs.append(group[i].root_idxs)
        if not scores:
            return None
        return self._normalize(self._reduce(scores, root_idxs), self.normalizer)


def _record_hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
    dims = (0, 2, 3) if output.ndim == 4 else tuple(range(output.ndim - 1))
    module._edgeprune_activation = output.detach().abs().mean(dim=dims)  # type: ignore[assignment]


@contextmanager
def _activations(imp: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Iterator[None]:
    model.eval()
    hooks = [m.register_forward_hook(_record_hook) for m in model.modules() if isinstance(m, _RECORDED)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    try:
        yield
    finally:
        for m in model.modules():
            if hasattr(m, "_edgeprune_activation"):
                del m._edgeprune_activation


CRITERIA: dict[str, Criterion] = {
    "l1": Criterion("l1", lambda: tp.importance.MagnitudeImportance(p=1), _nothing, "L1 weight magnitude"),
    "l2": Criterion("l2", lambda: tp.importance.MagnitudeImportance(p=2), _nothing, "L2 weight magnitude"),
    "bn": Criterion("bn", tp.importance.BNScaleImportance, _nothing, "BatchNorm scale (slimming)"),
    "taylor": Criterion(
        "taylor", tp.importance.TaylorImportance, _gradients, "first-order Taylor sensitivity"
    ),
    "activation": Criterion(
        "activation", MeanActivationImportance, _activations, "mean activation on calibration data"
    ),
}


def criterion(name: str) -> Criterion:
    """The criterion called ``name``; :class:`CompileError` lists the valid names otherwise."""
    try:
        return CRITERIA[name]
    except KeyError:
        raise CompileError(f"unknown --criterion {name!r}", hint=f"one of {', '.join(CRITERIA)}") from None
