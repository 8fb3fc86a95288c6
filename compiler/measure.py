"""Measure a variant: MACs and parameters, accuracy, and batch-1 latency in each runtime side by side."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Hashable, Mapping
from functools import partial
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from agent.contract import Latency, Runtime
from compiler.export import load_runner

__all__ = ["count_macs_params", "host_description", "latency_side_by_side", "time_interleaved"]

K = TypeVar("K", bound=Hashable)


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of one forward pass at batch 1, and the parameter count."""
    macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    return int(macs), int(params)


def time_interleaved(
    calls: Mapping[K, Callable[[], object]],
    *,
    runs: int,
    rounds: int = 5,
    warmup: int = 50,
    threads: int = 1,
) -> dict[K, Latency]:
    """Batch-1 latency of every zero-argument call, all timed in one process, interleaved so that machine
    noise and drift hit them alike.

    Each call first runs ``warmup`` times untimed; then each of ``rounds`` rounds times every call, in
    turn, ``runs // rounds`` times; median and 90th percentile are over all rounds. ``threads`` is only
    recorded in the result.
    """
    for call in calls.values():
        for _ in range(warmup):
            call()
    samples: dict[K, list[float]] = {k: [] for k in calls}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for key, call in calls.items():
            values = samples[key]
            for _ in range(per_round):
                start = time.perf_counter()
                call()
                values.append(time.perf_counter() - start)
    out: dict[K, Latency] = {}
    for key, values in samples.items():
        arr = np.array(values) * 1e3
        out[key] = Latency(
            median_ms=float(np.median(arr)),
            p90_ms=float(np.percentile(arr, 90)),
            threads=threads,
            runs=len(values),
        )
    return out


def latency_side_by_side(
    files: dict[str, dict[Runtime, Path]],
    x: np.ndarray,
    *,
    runs: int = 200,
    threads: int = 1,
    rounds: int = 5,
) -> dict[str, dict[Runtime, Latency]]:
    """Time every (variant, runtime) in one process, interleaved over ``rounds``: :func:`time_interleaved`."""
    calls = {
        (v, rt): partial(load_runner(p, rt, threads=threads), x)
        for v, per in files.items()
        for rt, p in per.items()
    }
    out: dict[str, dict[Runtime, Latency]] = {}
    for (variant, rt), latency in time_interleaved(calls, runs=runs, rounds=rounds, threads=threads).items():
        out.setdefault(variant, {})[rt] = latency
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
