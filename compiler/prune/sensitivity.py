"""Per-layer sensitivity scan and automatic per-layer ratios under an accuracy bound.

The scan prunes one channel group at a time by each step ratio (no fine-tuning) and measures the
accuracy drop on a validation subset. ``allocate`` then spends a MACs reduction target greedily: it
keeps raising the ratio of the group that loses the least accuracy per MAC saved, never past the point
where that group alone would lose more than ``max_drop``. Robust groups end up pruned hard, fragile
ones (often the stem and the last stage's shortcut) lightly: what users mean by "automated pruning".
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from compiler.data import TensorData
from compiler.measure import count_macs_params
from compiler.progress import progress
from compiler.prune.static import PruneGroup, prunable_groups, prune
from compiler.train import evaluate

__all__ = ["Sensitivity", "allocate", "scan"]

log = logging.getLogger(__name__)

STEPS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Sensitivity:
    """Accuracy and MACs after pruning one group alone by each of ``STEPS``."""

    group: PruneGroup
    accuracy: dict[float, float]
    macs: dict[float, int]


def _pruned_copy(
    model: nn.Module,
    example: torch.Tensor,
    ratios: dict[str, float],
    criterion: str,
    calibration: tuple[torch.Tensor, torch.Tensor],
) -> nn.Module:
    clone = copy.deepcopy(model)
    prune(clone, example, ratios=ratios, criterion=criterion, calibration=calibration, source_model="scan")
    return clone


def scan(
    model: nn.Module,
    example: torch.Tensor,
    *,
    criterion: str,
    calibration: tuple[torch.Tensor, torch.Tensor],
    validation: TensorData,
) -> tuple[float, list[Sensitivity]]:
    """Baseline accuracy and the sensitivity of every prunable group."""
    baseline = evaluate(model, validation)
    groups = prunable_groups(model, example)
    results = []
    with progress(total=len(groups) * len(STEPS), desc="sensitivity scan", unit="probe") as bar:
        for group in groups:
            acc, macs = {}, {}
            for r in STEPS:
                clone = _pruned_copy(model, example, {group.root: r}, criterion, calibration)
                acc[r] = evaluate(clone, validation)
                macs[r] = count_macs_params(clone, example)[0]
                bar.update(1)
            results.append(Sensitivity(group=group, accuracy=acc, macs=macs))
            log.info("sensitivity %s: %s", group.root, {r: round(baseline - a, 4) for r, a in acc.items()})
    return baseline, results


def allocate(
    sensitivities: list[Sensitivity],
    *,
    baseline: float,
    dense_macs: int,
    target_macs: int,
    max_drop: float,
    measure: Callable[[dict[str, float]], int],
) -> dict[str, float]:
    """Per-group ratios that bring the real MACs (``measure(ratios)``) down to ``target_macs``.

    Each step raises one group to its next step ratio: the one whose single-group scan lost the least
    accuracy per MAC saved. Steps that would cost a group more than ``max_drop`` on its own (before
    fine-tuning) come last: they are taken only once every other step is used up, with a warning, so
    a ladder step always reaches its MACs target and the fragile layers are cut least.
    """
    ratios = {s.group.root: 0.0 for s in sensitivities}
    macs = dense_macs
    warned = False
    while macs > target_macs:
        best: tuple[bool, float, str, float] | None = None
        for s in sensitivities:
            current = ratios[s.group.root]
            nxt = next((r for r in STEPS if r > current), None)
            if nxt is None:
                continue
            before_macs = s.macs[current] if current else dense_macs
            before_acc = s.accuracy[current] if current else baseline
            gain = before_macs - s.macs[nxt]
            loss = max(before_acc - s.accuracy[nxt], 0.0)
            key = (baseline - s.accuracy[nxt] > max_drop, (loss + 1e-4) / max(gain, 1), s.group.root, nxt)
            if best is None or key[:2] < best[:2]:
                best = key
        if best is None:
            log.warning(
                "every group is at its largest step; MACs %d stay above the target %d", macs, target_macs
            )
            break
        over, _, root, nxt = best
        if over and not warned:
            log.warning(
                "reaching %d MACs needs steps past the accuracy bound %.3f (from %s on)",
                target_macs,
                max_drop,
                root,
            )
            warned = True
        ratios[root] = nxt
        macs = measure(ratios)
    return ratios
