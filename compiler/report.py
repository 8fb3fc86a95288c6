"""The human side of a bundle: a Pareto plot (accuracy vs latency) and a Markdown report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from agent.contract import BundleManifest, Variant

__all__ = ["markdown_report", "pareto_plot"]

_MARKERS = {"onnx": "o", "executorch": "s"}
# Labels above the onnxruntime points and below the ExecuTorch ones, so coinciding points stay readable.
_LABEL_OFFSET = {"onnx": (4, 5), "executorch": (4, -12)}
_RUNTIME_NAMES = {"onnx": "onnxruntime", "executorch": "ExecuTorch"}


def pareto_plot(manifest: BundleManifest, path: Path) -> None:
    """One point per variant and runtime: median batch-1 latency (x) against test accuracy (y); a gated
    variant is a curve, one point per budget."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for runtime, marker in _MARKERS.items():
        for v in manifest.variants:
            curve = [
                (p.latency[runtime].median_ms, p.accuracy, p.budget)
                for p in v.budget_curve
                if runtime in p.latency
            ]
            if curve:
                curve.sort()
                ax.plot(
                    [c[0] for c in curve],
                    [100 * c[1] for c in curve],
                    marker=marker,
                    markersize=3,
                    linestyle="-",
                    label=f"{v.name} over budgets ({runtime})",
                )
                for x, y, b in (curve[0], curve[-1]):
                    ax.annotate(
                        f"b={b:g}", (x, 100 * y), textcoords="offset points", xytext=(4, -12), fontsize=7
                    )
        pts = [
            (v.latency[runtime].median_ms, v.accuracy, v.name)
            for v in manifest.variants
            if runtime in v.latency and v.accuracy is not None and not v.budget_curve
        ]
        if not pts:
            continue
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker=marker, linestyle="--", label=runtime)
        for x, y, name in pts:
            ax.annotate(
                name, (x, 100 * y), textcoords="offset points", xytext=_LABEL_OFFSET[runtime], fontsize=8
            )
    ax.set_xlabel("median latency, batch 1 (ms)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{manifest.model_id} {manifest.bundle_version}: accuracy vs latency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


EFFICIENCY_GOAL = 0.85
"""A static variant's speed-up should be at least this share of its MACs reduction (docs/compiler.md)."""


def _speed_against_macs(manifest: BundleManifest, dense: Variant) -> list[str]:
    """Lines naming each static variant whose measured speed-up falls short of EFFICIENCY_GOAL of its
    MACs reduction in some runtime: on this host its MACs overstate its speed."""
    short = []
    for v in manifest.variants:
        if v.kind != "static" or v.macs >= dense.macs:
            continue
        ratio = dense.macs / max(v.macs, 1)
        efficiency = {
            rt: dense.latency[rt].median_ms / v.latency[rt].median_ms / ratio
            for rt in _RUNTIME_NAMES
            if rt in v.latency and rt in dense.latency
        }
        if any(e < EFFICIENCY_GOAL for e in efficiency.values()):
            measured = ", ".join(f"{_RUNTIME_NAMES[rt]} {e:.2f}" for rt, e in efficiency.items())
            short.append(f"- {v.name}: speed-up / MACs reduction ({ratio:.2f}x) = {measured}")
    if not short:
        return []
    return [
        "",
        f"Below {EFFICIENCY_GOAL} of their MACs reduction at batch 1 on this host (every inference has a "
        'fixed cost that removing channels does not remove; docs/compiler.md, "Why the 75% step falls '
        'short"):',
        "",
        *short,
    ]


def markdown_report(manifest: BundleManifest, *, breakdown: dict[str, float], notes: list[str]) -> str:
    """A table of every variant (MACs, params, accuracy, latency per runtime, speed-up vs dense)."""
    dense = next((v for v in manifest.variants if v.kind == "dense"), manifest.variants[0])
    lines = [
        f"# {manifest.model_id} {manifest.bundle_version}",
        "",
        f"Created {manifest.created.created_at:%Y-%m-%d %H:%M} UTC from `{manifest.created.source_model}` on "
        f"`{manifest.created.dataset}`; latency measured on {manifest.created.host}.",
        "",
        "![accuracy vs latency](pareto.png)",
        "",
        "| variant | kind | MACs | params | accuracy | ORT ms | ORT speed-up | ET ms | ET speed-up "
        "| MACs ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in manifest.variants:
        cells = [
            v.name,
            v.kind,
            f"{v.macs / 1e6:.2f}M",
            f"{v.params / 1e3:.0f}k",
            "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}%",
        ]
        for rt in ("onnx", "executorch"):
            if rt in v.latency and rt in dense.latency:
                cells += [
                    f"{v.latency[rt].median_ms:.3f}",
                    f"{dense.latency[rt].median_ms / v.latency[rt].median_ms:.2f}x",
                ]
            else:
                cells += ["-", "-"]
        cells.append(f"{dense.macs / max(v.macs, 1):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    lines += _speed_against_macs(manifest, dense)
    for v in manifest.variants:
        if not v.budget_curve:
            continue
        lines += [
            "",
            f"## {v.name}: accuracy, compute and latency by budget",
            "",
            "The budget is the second input of the gated model: the target share of the gated blocks' "
            "compute. Latency cycles through real test images, because the widths depend on the input.",
            "",
            "| budget | accuracy | mean MACs | density | ORT ms | ORT speed-up | ET ms | ET speed-up |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for point in v.budget_curve:
            cells = [
                f"{point.budget:g}" + (" (default)" if v.budget and point.budget == v.budget.default else ""),
                f"{100 * point.accuracy:.2f}%",
                f"{point.macs / 1e6:.2f}M",
                f"{point.density:.2f}",
            ]
            for rt in ("onnx", "executorch"):
                if rt in point.latency and rt in dense.latency:
                    ms = point.latency[rt].median_ms
                    cells += [f"{ms:.3f}", f"{dense.latency[rt].median_ms / ms:.2f}x"]
                else:
                    cells += ["-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Time spent", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in breakdown.items()]
    lines += [f"| **total** | {sum(breakdown.values()):.1f} |"]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"
