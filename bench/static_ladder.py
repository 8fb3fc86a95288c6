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


def _bounds(
    x: np.ndarray, runtimes: set[Runtime], *, threads: list[int], runs: int
) -> dict[tuple[Runtime, int], dict]:
    """Per runtime and thread count: the best fp32 rate (GMAC/s, one :data:`PEAK_CONV` convolution) and
    the empty call (ms, a program that only flattens ``x``), each timed in a loop of its own."""
    channels, side = PEAK_CONV
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    conv_x = torch.randn(1, channels, side, side)
    peak_macs = count_macs_params(conv, conv_x)[0]
    tmp = Path(tempfile.mkdtemp(prefix="edgeprune-ceiling-"))
    try:
        peak: dict[Runtime, Path] = {}
        call: dict[Runtime, Path] = {}
        for rt in sorted(runtimes):
            suffix, export = EXPORTERS[rt]
            peak[rt], call[rt] = tmp / f"peak{suffix}", tmp / f"call{suffix}"
            export(conv, conv_x, peak[rt])
            export(nn.Flatten(), torch.from_numpy(x), call[rt])
        out = {}
        for n in threads:
            rate = latency_side_by_side({"": peak}, conv_x.numpy(), runs=runs, threads=n)[""]
            empty = latency_side_by_side({"": call}, x, runs=runs, threads=n)[""]
            for rt in peak:
                out[(rt, n)] = {
                    "runtime": rt,
                    "threads": n,
                    "peak_gmacs_per_s": peak_macs / (rate[rt].median_ms * 1e-3) / 1e9,
                    "empty_call_ms": empty[rt].median_ms,
                }
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    runtimes = {rt for per in files.values() for rt in per}
    bounds = {} if args.no_ceiling else _bounds(x, runtimes, threads=args.threads, runs=args.runs)
    rows = []
    for threads in args.threads:
        lat = latency_side_by_side(files, x, runs=args.runs, threads=threads, rounds=5)
        for tag, vs in variants.items():
            dense = next(v for v in manifests[tag].variants if v.kind == "dense")
            for v in vs:
                for rt, m in lat[tag + v.name].items():
                    speedup = lat[tag + dense.name][rt].median_ms / m.median_ms
                    macs_ratio = dense.macs / v.macs
                    bound = bounds.get((rt, threads))
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
    for b in bounds.values():
        print(
            f"{b['runtime']}, {b['threads']} thread(s): best rate {b['peak_gmacs_per_s']:.1f} GMAC/s "
            f"(one {PEAK_CONV[0]}-channel 3x3 conv at {PEAK_CONV[1]}x{PEAK_CONV[1]}), "
            f"empty call {1e3 * b['empty_call_ms']:.1f} us"
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
                "bounds": list(bounds.values()),
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
