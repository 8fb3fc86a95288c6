"""Benchmark: do the static variants of a bundle run faster by their MACs ratio, in both runtimes?

Loads every .onnx and .pte of a compiled bundle in ONE process and times them interleaved at batch 1
(so machine noise hits all alike), then reports, per variant and runtime, the speed-up over dense and
its efficiency = speed-up / MACs reduction (goal: >= 0.85), plus the test accuracy from the manifest.

It also measures, per runtime and thread count, what bounds that efficiency on this host (``--no-ceiling``
skips it): the runtime's best fp32 rate, one 128-channel 3x3 convolution at 28x28 (115.6M MACs), and
the cost of calling it at all, a program that only flattens the bundle's input. No variant can run
faster than ``MACs / best rate + empty call``, so ``ceiling = dense ms / that / MACs reduction`` is the
most efficiency any variant could show here even if its own operators cost nothing beyond their
multiply-accumulates (docs/compiler.md, "Why the 75% step falls short").

    python bench/static_ladder.py --bundle out/bundle [--threads 1 2] [--runs 600] [--json FILE]
    python bench/static_ladder.py --bundle NEW --baseline OLD   # both bundles in one interleaved loop
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
from torch import nn

from agent.bundle import open_bundle
from agent.contract import Runtime
from compiler.export import EXPORTERS
from compiler.measure import count_macs_params, host_description, latency_side_by_side

PEAK_CONV = (128, 28)  # channels, height = width: large enough to run at the kernels' best rate


def _probes(input_shape: tuple[int, ...], runtimes: set[Runtime], tmp: Path) -> tuple[dict, dict, int]:
    """Export the two probe programs (best rate, empty call) to every runtime of the bundle."""
    channels, side = PEAK_CONV
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    conv_x = torch.randn(1, channels, side, side)
    flat = nn.Flatten()
    files: dict[str, dict[Runtime, Path]] = {"peak": {}, "call": {}}
    for rt in sorted(runtimes):
        suffix, export = EXPORTERS[rt]
        export(conv, conv_x, tmp / f"peak{suffix}")
        export(flat, torch.zeros(input_shape), tmp / f"call{suffix}")
        files["peak"][rt], files["call"][rt] = tmp / f"peak{suffix}", tmp / f"call{suffix}"
    inputs = {"peak": conv_x.numpy(), "call": None}
    return files, inputs, count_macs_params(conv, conv_x)[0]


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
    parser.add_argument(
        "--no-ceiling", action="store_true", help="skip measuring the best rate and the empty call"
    )
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
    probes: dict[str, dict[Runtime, Path]] = {}
    probe_x: dict[str, np.ndarray | None] = {}
    peak_macs = 0
    tmp = Path(tempfile.mkdtemp(prefix="edgeprune-ceiling-"))
    if not args.no_ceiling:
        runtimes = {rt for per in files.values() for rt in per}
        probes, probe_x, peak_macs = _probes(tuple(manifest.input.shape), runtimes, tmp)
    rows = []
    bounds = []
    for threads in args.threads:
        lat = latency_side_by_side(files, x, runs=args.runs, threads=threads, rounds=5)
        # the probes take other inputs, so they run in a loop of their own, right after the variants
        probe_lat = {
            name: latency_side_by_side(
                {name: per},
                x if probe_x[name] is None else probe_x[name],
                runs=args.runs,
                threads=threads,
                rounds=5,
            )[name]
            for name, per in probes.items()
        }
        for rt in probes.get("peak", {}):
            rate = peak_macs / (probe_lat["peak"][rt].median_ms * 1e-3)  # MACs per second
            bounds.append(
                {
                    "runtime": rt,
                    "threads": threads,
                    "peak_gmacs_per_s": rate / 1e9,
                    "empty_call_ms": probe_lat["call"][rt].median_ms,
                }
            )
        for tag, vs in variants.items():
            dense = next(v for v in manifests[tag].variants if v.kind == "dense")
            for v in vs:
                for rt, m in lat[tag + v.name].items():
                    speedup = lat[tag + dense.name][rt].median_ms / m.median_ms
                    macs_ratio = dense.macs / v.macs
                    bound = next((b for b in bounds if b["runtime"] == rt and b["threads"] == threads), None)
                    ceiling = None
                    if bound is not None:
                        floor_ms = v.macs / (bound["peak_gmacs_per_s"] * 1e9) * 1e3 + bound["empty_call_ms"]
                        ceiling = lat[tag + dense.name][rt].median_ms / floor_ms / macs_ratio
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
                            "ceiling": ceiling,
                        }
                    )
    header = (
        f"{'variant':<20}{'runtime':<11}{'thr':>4}{'MACs':>9}{'acc %':>8}{'median ms':>11}{'speed-up':>10}"
    )
    header += f"{'MACs ratio':>12}{'efficiency':>12}{'ceiling':>9}"
    print(f"bundle {manifest.model_id} {manifest.bundle_version} on {host_description()}")
    print(header)
    print("-" * len(header))
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}"
        print(
            f"{r['variant']:<20}{r['runtime']:<11}{r['threads']:>4}{r['macs'] / 1e6:>8.2f}M{acc:>8}"
            f"{r['median_ms']:>11.3f}{r['speedup']:>9.2f}x{r['macs_ratio']:>11.2f}x{r['efficiency']:>12.2f}"
            + ("        -" if r["ceiling"] is None else f"{r['ceiling']:>9.2f}")
        )
    for b in bounds:
        print(
            f"{b['runtime']}, {b['threads']} thread(s): best rate {b['peak_gmacs_per_s']:.1f} GMAC/s "
            f"(one {PEAK_CONV[0]}-channel 3x3 conv at {PEAK_CONV[1]}x{PEAK_CONV[1]}), "
            f"empty call {1e3 * b['empty_call_ms']:.1f} us"
        )
    shutil.rmtree(tmp, ignore_errors=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "host": host_description(),
                "bundle": str(args.bundle),
                "baseline": None if args.baseline is None else str(args.baseline),
                "runs": args.runs,
                "rows": rows,
                "bounds": bounds,
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
