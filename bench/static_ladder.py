"""Benchmark: do the static variants of a bundle run faster by their MACs ratio, in both runtimes?

Loads every .onnx and .pte of a compiled bundle in ONE process and times them interleaved at batch 1
(so machine noise hits all alike), then reports, per variant and runtime, the speed-up over dense and
its efficiency = speed-up / MACs reduction (goal: >= 0.85), plus the test accuracy from the manifest.

    python bench/static_ladder.py --bundle out/bundle [--threads 1 2] [--runs 600] [--json FILE]
    python bench/static_ladder.py --bundle NEW --baseline OLD   # both bundles in one interleaved loop
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from agent.bundle import open_bundle
from compiler.measure import host_description, latency_side_by_side


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="a second bundle timed in the same interleaved loop (before/after a compiler change)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--json", type=Path, default=Path("out/bench-static.json"))
    args = parser.parse_args(argv)

    bundles = {"": args.bundle} | ({"baseline:": args.baseline} if args.baseline else {})
    manifests = {tag: open_bundle(path, public_key=None) for tag, path in bundles.items()}
    manifest = manifests[""]
    # gated variants take a budget too: bench/gated_speed.py measures them
    variants = {tag: [v for v in m.variants if v.kind != "gated"] for tag, m in manifests.items()}
    files = {
        tag + v.name: {f.runtime: bundles[tag] / f.path for f in v.files}
        for tag, vs in variants.items()
        for v in vs
    }
    x = np.random.default_rng(0).standard_normal(manifest.input.shape).astype(np.float32)
    rows = []
    for threads in args.threads:
        lat = latency_side_by_side(files, x, runs=args.runs, threads=threads, rounds=5)
        for tag, vs in variants.items():
            dense = next(v for v in manifests[tag].variants if v.kind == "dense")
            for v in vs:
                for rt, m in lat[tag + v.name].items():
                    speedup = lat[tag + dense.name][rt].median_ms / m.median_ms
                    macs_ratio = dense.macs / v.macs
                    rows.append(
                        {
                            "bundle": str(bundles[tag]),
                            "variant": tag + v.name,
                            "runtime": rt,
                            "threads": threads,
                            "macs": v.macs,
                            "params": v.params,
                            "accuracy": v.accuracy,
                            "median_ms": m.median_ms,
                            "p90_ms": m.p90_ms,
                            "speedup": speedup,
                            "macs_ratio": macs_ratio,
                            "efficiency": speedup / macs_ratio,
                        }
                    )
    header = (
        f"{'variant':<20}{'runtime':<11}{'thr':>4}{'MACs':>9}{'acc %':>8}{'median ms':>11}{'speed-up':>10}"
    )
    header += f"{'MACs ratio':>12}{'efficiency':>12}"
    print(f"bundle {manifest.model_id} {manifest.bundle_version} on {host_description()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        print(
            f"{r['variant']:<20}{r['runtime']:<11}{r['threads']:>4}{r['macs'] / 1e6:>8.2f}M{acc:>8}"
            f"{r['median_ms']:>11.3f}{r['speedup']:>9.2f}x{r['macs_ratio']:>11.2f}x{r['efficiency']:>12.2f}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "host": host_description(),
                "bundle": str(args.bundle),
                "baseline": None if args.baseline is None else str(args.baseline),
                "runs": args.runs,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
