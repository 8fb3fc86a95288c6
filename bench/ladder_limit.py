"""Benchmark: how far can channel pruning go before batch-1 speed stops following the MACs on this host?

Builds the reference architecture at uniform width fractions (random weights: timing does not depend on
them), exports each to both runtimes and times them all in ONE process, interleaved, against the full
width. Per fraction and runtime it prints the MACs reduction R, the speed-up and the efficiency =
speed-up / R (the static-ladder goal is >= 0.85), then, per runtime, the largest R measured that still
reaches 0.85. A compiled ladder's steps past that R cannot meet the goal here, whatever the pruning:
every inference also pays a fixed cost that removing channels does not remove (docs/compiler.md, "Why
the 75% step falls short").

    python bench/ladder_limit.py [--fractions 1 .75 .5 .4 .35 .3 .25] [--runs 2000] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from agent.contract import Runtime
from compiler.export import EXPORTERS
from compiler.measure import count_macs_params, host_description, latency_side_by_side
from compiler.pipeline import aligned_channels
from compiler.reference import ReferenceNet

DENSE_WIDTHS = (32, 64, 128, 256)
GOAL = 0.85


def widths(fraction: float, align: int = 8) -> tuple[int, ...]:
    """The reference's stage widths at ``fraction``, in multiples of ``align`` as the compiler keeps them."""
    return tuple(aligned_channels(w * fraction, align, w) for w in DENSE_WIDTHS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.75, 0.5, 0.4, 0.35, 0.3, 0.25])
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--align", type=int, default=8, help="round widths to multiples of this (the compiler's --align)"
    )
    parser.add_argument("--json", type=Path, default=Path("out/bench-ladder-limit.json"))
    args = parser.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        parser.error("--fractions: each must be in (0, 1]")

    fractions = sorted(set(args.fractions) | {1.0}, reverse=True)
    example = torch.zeros(1, 1, 28, 28)
    tmp = Path(tempfile.mkdtemp(prefix="edgeprune-ladder-limit-"))
    try:
        files: dict[str, dict[Runtime, Path]] = {}
        macs: dict[str, int] = {}
        for f in fractions:
            name = "x".join(map(str, widths(f, args.align)))
            torch.manual_seed(0)
            model = ReferenceNet(widths=widths(f, args.align)).eval()
            macs[name] = count_macs_params(model, example)[0]
            files[name] = {}
            for rt, (suffix, export) in EXPORTERS.items():
                export(model, example, tmp / f"{name}{suffix}")
                files[name][rt] = tmp / f"{name}{suffix}"
        x = np.random.default_rng(0).standard_normal(example.shape).astype(np.float32)
        lat = latency_side_by_side(files, x, runs=args.runs, threads=args.threads, rounds=5)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    dense = next(iter(files))
    rows = []
    for f, name in zip(fractions, files, strict=True):
        for rt, m in lat[name].items():
            ratio = macs[dense] / macs[name]
            speedup = lat[dense][rt].median_ms / m.median_ms
            rows.append(
                {
                    "fraction": f,
                    "widths": list(widths(f, args.align)),
                    "runtime": rt,
                    "macs": macs[name],
                    "macs_ratio": ratio,
                    "median_ms": m.median_ms,
                    "speedup": speedup,
                    "efficiency": speedup / ratio,
                }
            )
    print(f"reference architecture, batch 1, {args.threads} thread(s), on {host_description()}")
    header = f"{'widths':<16}{'runtime':<11}{'MACs':>9}{'MACs ratio':>12}{'median us':>11}{'speed-up':>10}"
    header += f"{'efficiency':>12}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{'x'.join(map(str, r['widths'])):<16}{r['runtime']:<11}{r['macs'] / 1e6:>8.2f}M"
            f"{r['macs_ratio']:>11.2f}x{1e3 * r['median_ms']:>11.1f}{r['speedup']:>9.2f}x"
            f"{r['efficiency']:>12.2f}"
        )
    limits = {}
    for rt in EXPORTERS:
        ok = [r["macs_ratio"] for r in rows if r["runtime"] == rt and r["efficiency"] >= GOAL]
        limits[rt] = max(ok)
        print(f"{rt}: the largest MACs reduction measured at efficiency >= {GOAL}: {limits[rt]:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"host": host_description(), "threads": args.threads, "rows": rows, "limits": limits}, indent=1
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
