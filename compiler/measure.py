"""Measure a variant: MACs and parameters, accuracy, and batch-1 latency in each runtime side by side."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from agent.contract import Latency, Runtime
from compiler.export import load_runner

__all__ = ["count_macs_params", "host_description", "latency_side_by_side"]


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass at batch 1, and the parameter count."""
    macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    return int(macs), int(params)


def latency_side_by_side(
    files: dict[str, dict[Runtime, Path]],
    x: np.ndarray,
    *,
    runs: int = 200,
    threads: int = 1,
    rounds: int = 5,
) -> dict[str, dict[Runtime, Latency]]:
    """Time every (variant, runtime) in one process, interleaved over ``rounds`` so drift hits all alike.

    Each round times every file for ``runs // rounds`` calls; the median is over all calls of all rounds.
    """
    runners = {
        (v, rt): load_runner(p, rt, threads=threads) for v, per in files.items() for rt, p in per.items()
    }
    samples: dict[tuple[str, Runtime], list[float]] = {k: [] for k in runners}
    per_round = max(1, runs // rounds)
    for run in runners.values():
        for _ in range(50):
            run(x)
    for _ in range(rounds):
        for key, run in runners.items():
            for _ in range(per_round):
                start = time.perf_counter()
                run(x)
                samples[key].append(time.perf_counter() - start)
    out: dict[str, dict[Runtime, Latency]] = {}
    for (variant, rt), values in samples.items():
        arr = np.array(values) * 1e3
        out.setdefault(variant, {})[rt] = Latency(
            median_ms=float(np.median(arr)),
            p90_ms=float(np.percentile(arr, 90)),
            threads=threads,
            runs=len(values),
        )
    return out


def host_description() -> str:
    """CPU model and core count of this machine, for the manifest."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
