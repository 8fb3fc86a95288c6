"""The gated stage of ``edgeprune compile --gated``: train (or reuse), measure, export, verify, time.

Typed hand-offs, each checked: :func:`train_gated` -> :class:`SlimNet` (cached by the dense key and the
gate config), :func:`measure_curve` -> accuracy/MACs/density per budget on the test split,
:func:`export_and_verify` -> one verified file per runtime, :func:`gated_latency` -> batch-1 latency per
budget and runtime over real test images (the width, so the time, depends on the input).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent.contract import BudgetInput, BudgetPoint, Gating, Latency, Runtime
from compiler import cache
from compiler.data import Splits, TensorData
from compiler.gating.deploy import (
    GatedDeploy,
    GatedFiles,
    export_gated,
    gated_runner,
    gating_spec,
    verify_gated,
)
from compiler.gating.slim import DEFAULT_FRACTIONS, BudgetMap, SlimNet
from compiler.gating.train import BudgetResult, GateTrainConfig, evaluate_gated, train_gates, train_slim
from compiler.measure import time_interleaved

__all__ = ["BUDGETS", "GatedBuild", "build_gated", "export_and_verify", "gated_latency"]

log = logging.getLogger(__name__)

BUDGETS = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
"""Budgets the bundle's curve reports (the budget is the target share of the gated blocks' compute)."""

CALIBRATION_GRID = tuple(i / 10 for i in range(21))
"""Raw budgets the calibration evaluates (score shifts of 0 to 20 for the full width)."""

CALIBRATION_IMAGES = 1000
"""Training images (a fixed seeded sample, no augmentation) the calibration measures density on."""

FULL_DENSITY = 0.995
"""A curve budget whose gates compute at least this share of the gated channels on the test split runs the
``full`` segment instead (with every budget above it): the gates' dispatch would buy nothing there."""


@dataclass
class GatedBuild:
    """A trained gated net and what was measured on it."""

    net: SlimNet
    deploy: GatedDeploy
    gating: Gating
    budget: BudgetInput
    curve: list[BudgetResult]
    params: int

    @property
    def default_point(self) -> BudgetResult:
        return next(r for r in self.curve if r.budget == self.budget.default)


def _pick_default(curve: Sequence[BudgetResult], tolerance: float) -> float:
    """The smallest budget whose accuracy is within ``tolerance`` of the best on the curve."""
    best = max(r.accuracy for r in curve)
    return min(r.budget for r in curve if r.accuracy >= best - tolerance)


def calibrate_budget(
    net: SlimNet,
    data: TensorData,
    budgets: Sequence[float],
    *,
    grid: Sequence[float] = CALIBRATION_GRID,
    refine: int = 24,
    max_gap: float = 0.03,
) -> BudgetMap:
    """A map from the run-time budget to the raw budget the gates were trained with, such that the mean
    density (share of the gated channels computed) on ``data`` is about the budget itself.

    Trained gates answer the raw budget steeply and over only part of its range (the reference model's
    went from 25% to 29% density between raw budgets 0.25 and 0.55, then to 91% by 0.7), so the knob had
    two useful settings. Here the density is measured at each raw budget of ``grid``, then up to
    ``refine`` more times halfway across the steepest step (while one is larger than ``max_gap``); made
    non-decreasing, it is inverted by linear interpolation at 16 budgets evenly spread over the range of
    ``budgets``. Budgets beyond the densest the gates reach map to where that density starts.
    """
    net.budget_map = None
    points = {float(r): d.density for r, d in zip(grid, evaluate_gated(net, data, list(grid)), strict=True)}
    for _ in range(refine):
        raws = sorted(points)
        gap, lo, hi = max((points[b] - points[a], a, b) for a, b in itertools.pairwise(raws))
        if gap <= max_gap or hi - lo < 1e-3:
            break
        mid = (lo + hi) / 2
        points[mid] = evaluate_gated(net, data, [mid])[0].density
    raw = np.asarray(sorted(points), dtype=np.float64)
    dens = np.maximum.accumulate([points[r] for r in raw])
    targets = np.linspace(min(budgets), max(budgets), 16)
    top = int(np.argmax(dens >= dens[-1]))  # first raw budget at the highest density
    values = []
    for b in targets:
        if b <= dens[0]:
            values.append(raw[0])
        elif b >= dens[-1]:
            values.append(raw[top])
        else:
            i = int(np.argmax(dens >= b))
            t = (b - dens[i - 1]) / (dens[i] - dens[i - 1])
            values.append(raw[i - 1] + t * (raw[i] - raw[i - 1]))
    return tuple(float(x) for x in targets), tuple(float(y) for y in np.maximum.accumulate(values))


def _calibration_data(train: TensorData, n: int = CALIBRATION_IMAGES, seed: int = 0) -> TensorData:
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return TensorData(train.x[idx], train.y[idx])


def build_gated(
    dense: nn.Module,
    splits: Splits,
    example: torch.Tensor,
    config: GateTrainConfig,
    *,
    dense_key: str,
    teacher: nn.Module | torch.Tensor | None = None,
    budgets: Sequence[float] = BUDGETS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    default_tolerance: float = 0.005,
) -> GatedBuild:
    """Train (or load from the cache) the gated net of ``dense`` and measure its budget curve.

    ``teacher`` is what the shared widths distil from: ``dense`` (the default), or its outputs on every
    training image, computed once by the compile (:func:`compiler.train.teacher_logits`)."""
    net = SlimNet(dense, example, fractions=fractions)
    key = cache.cache_key(dense=dense_key, gate=config, fractions=tuple(fractions), n=len(splits.train))
    if cache.load_cached(net, key, kind="gated"):
        print(f"    reusing cached gated checkpoint {key} from {cache.cache_dir()}")
    else:
        started = time.monotonic()
        train_slim(net, splits.train, config, teacher=dense if teacher is None else teacher)
        train_gates(net, splits.train, config)
        path = cache.store(net, key, kind="gated")
        print(f"    trained in {time.monotonic() - started:.0f}s; cached the gated checkpoint at {path}")
    net.eval()
    started = time.monotonic()
    net.budget_map = calibrate_budget(net, _calibration_data(splits.train), budgets)
    knots = ", ".join(f"{b:.2f}->{r:.2f}" for b, r in zip(*net.budget_map, strict=True))
    print(f"    calibrated the budget knob in {time.monotonic() - started:.0f}s (budget -> raw): {knots}")
    curve = evaluate_gated(net, splits.test, sorted(set(budgets)))
    # Where the gates already compute (nearly) every channel, skip them: from the first such budget up
    # (at least the top of the range) the `full` segment runs every block at full width in one call
    full_from = min([r.budget for r in curve if r.density >= FULL_DENSITY] + [max(budgets)])
    curve = [
        evaluate_gated(net, splits.test, [r.budget], full_from=full_from)[0] if r.budget >= full_from else r
        for r in curve
    ]
    default = _pick_default(curve, default_tolerance)
    for r in curve:
        mark = "  <- default" if r.budget == default else ""
        print(
            f"    budget {r.budget:.2f}: accuracy {r.accuracy:.4f}, {r.macs / 1e6:.2f}M MACs, "
            f"density {r.density:.2f}{mark}"
        )
    budget = BudgetInput(minimum=min(budgets), maximum=max(budgets), default=default)
    params = sum(p.numel() for p in net.parameters())
    return GatedBuild(
        net,
        GatedDeploy(net, full_from=full_from).eval(),
        gating_spec(net, full_from=full_from),
        budget,
        curve,
        params,
    )


def export_and_verify(
    build: GatedBuild,
    example: torch.Tensor,
    checks: torch.Tensor,
    runtimes: Sequence[Runtime],
    out: Path,
    *,
    name: str,
) -> dict[Runtime, GatedFiles]:
    """Export the gated net for each runtime into ``out`` and verify each form at every budget."""
    files: dict[Runtime, GatedFiles] = {}
    budgets = [r.budget for r in build.curve]
    for rt in runtimes:
        files[rt] = export_gated(build.deploy, example, out, rt, name=name)
        worst = verify_gated(
            build.deploy, files[rt], rt, checks, budgets, gating=build.gating, budget=build.budget
        )
        log.info("gated %s verified at %d budgets: max |diff| %.2e", rt, len(budgets), worst)
    return files


def gated_latency(
    build: GatedBuild,
    files: dict[Runtime, GatedFiles],
    images: np.ndarray,
    *,
    runs: int,
    threads: int,
    rounds: int = 5,
) -> dict[float, dict[Runtime, Latency]]:
    """Batch-1 latency per budget and runtime, cycling through ``images`` (the widths depend on them),
    interleaved over ``rounds`` so drift hits every budget alike (:func:`time_interleaved`)."""
    runners = {
        rt: gated_runner(p, rt, gating=build.gating, budget=build.budget, threads=threads)
        for rt, p in files.items()
    }
    inputs = [np.ascontiguousarray(images[i : i + 1]) for i in range(len(images))]

    def cycling(run: Callable[[np.ndarray, float], object], b: float) -> Callable[[], object]:
        next_input = itertools.cycle(inputs).__next__
        return lambda: run(next_input(), b)

    calls = {(r.budget, rt): cycling(run, r.budget) for r in build.curve for rt, run in runners.items()}
    timed = time_interleaved(calls, runs=runs, rounds=rounds, warmup=20, threads=threads)
    out: dict[float, dict[Runtime, Latency]] = {}
    for (b, rt), latency in timed.items():
        out.setdefault(b, {})[rt] = latency
    return out


def budget_points(build: GatedBuild, latency: dict[float, dict[Runtime, Latency]]) -> tuple[BudgetPoint, ...]:
    """The manifest's budget curve."""
    return tuple(
        BudgetPoint(
            budget=r.budget,
            accuracy=r.accuracy,
            macs=round(r.macs),
            density=min(1.0, r.density),
            latency=latency.get(r.budget, {}),
        )
        for r in build.curve
    )
