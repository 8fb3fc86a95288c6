"""Pictures of a simulation: battery and active variant over time per profile; accuracy vs energy.

matplotlib comes with the ``[compiler]`` extra; without it :func:`plots_available` is false and
:func:`write_plots` writes nothing and says so (returns an empty list) instead of failing.

>>> paths = write_plots(result, Path("out/plots"))  # doctest: +SKIP
>>> [p.name for p in paths]  # doctest: +SKIP
['battery_variant.png']
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from devices.simulator import SimResult

__all__ = ["plot_energy_accuracy", "plots_available", "write_plots"]

log = logging.getLogger(__name__)


def plots_available() -> bool:
    """Whether matplotlib is installed."""
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: SimResult, out: Path, *, max_per_profile: int = 3) -> list[Path]:
    """``battery_variant.png``: per profile (one row each), battery % and the active variant over
    simulated hours for up to ``max_per_profile`` devices; returns the paths written ([] without
    matplotlib)."""
    if not plots_available():
        log.warning("matplotlib is not installed: no plots (pip install 'edgeprune[compiler]')")
        return []
    plt = _pyplot()
    out.mkdir(parents=True, exist_ok=True)
    by_profile: dict[str, list[Any]] = {}
    for device in result.devices:
        by_profile.setdefault(device.profile, []).append(device)
    variants = sorted({v for d in result.devices for v in d.variant})
    rows = max(1, len(by_profile))
    fig, axes = plt.subplots(rows, 2, figsize=(12, 2.6 * rows), squeeze=False, sharex=True)
    for row, (profile, devices) in enumerate(sorted(by_profile.items())):
        battery_ax, variant_ax = axes[row]
        for device in devices[:max_per_profile]:
            battery_ax.plot(device.t_h, device.battery_pct, label=device.device_id)
            variant_ax.step(device.t_h, [variants.index(v) for v in device.variant], where="post")
        battery_ax.set_ylabel(f"{profile}\nbattery %")
        battery_ax.set_ylim(0, 100)
        variant_ax.set_yticks(range(len(variants)), variants)
        variant_ax.set_ylabel("active variant")
        battery_ax.legend(fontsize=7, loc="upper right")
    for ax in axes[-1]:
        ax.set_xlabel("simulated hours")
    fig.tight_layout()
    path = out / "battery_variant.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]


def plot_energy_accuracy(rows: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Accuracy vs inference energy per 1,000 inferences, one point per policy (``rows``: policy name ->
    ``SimResult.summary()``); ``None`` without matplotlib."""
    if not plots_available():
        log.warning("matplotlib is not installed: no plot (pip install 'edgeprune[compiler]')")
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        energy, accuracy = row.get("inference_j_per_1000"), row.get("accuracy")
        if energy is None or accuracy is None:
            continue
        ax.scatter([energy], [accuracy], s=60)
        ax.annotate(name, (energy, accuracy), textcoords="offset points", xytext=(6, 4))
    ax.set_xlabel("inference energy per 1,000 inferences (J)")
    ax.set_ylabel("accuracy of served predictions")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
