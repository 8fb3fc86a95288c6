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
from compiler.data import Splits
from compiler.gating.deploy import (
    GatedDeploy,
    GatedFiles,
    export_gated,
    gated_runner,
    gating_spec,
    verify_gated,
)
from compiler.gating.slim import DEFAULT_FRACTIONS, SlimNet
from compiler.gating.train import BudgetResult, GateTrainConfig, evaluate_gated, train_gates, train_slim
from compiler.measure import time_interleaved

__all__ = ["BUDGETS", "GatedBuild", "build_gated", "export_and_verify", "gated_latency"]

log = logging.getLogger(__name__)

BUDGETS = (0.25, 0.4, 0.55, 0.7, 0.85, 1.0)
"""Budgets the bundle's curve reports (the budget is the target share of the gated blocks' compute)."""

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


def build_gated(
    dense: nn.Module,
    splits: Splits,
    example: torch.Tensor,
    config: GateTrainConfig,
    *,
    dense_key: str,
    budgets: Sequence[float] = BUDGETS,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    default_tolerance: float = 0.005,
) -> GatedBuild:
    """Train (or load from the cache) the gated net of ``dense`` and measure its budget curve."""
    net = SlimNet(dense, example, fractions=fractions)
    key = cache.cache_key(dense=dense_key, gate=config, fractions=tuple(fractions), n=len(splits.train))
    if cache.load_cached(net, key, kind="gated"):
        print(f"    reusing cached gated checkpoint {key} from {cache.cache_dir()}")
    else:
        started = time.monotonic()
        train_slim(net, splits.train, config, teacher=dense)
        train_gates(net, splits.train, config)
        path = cache.store(net, key, kind="gated")
        print(f"    trained in {time.monotonic() - started:.0f}s; cached the gated checkpoint at {path}")
    net.eval()
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
