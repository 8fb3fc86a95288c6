"""Benchmark: a compiled bundle's gated variant against its dense and static variants, through the agent.

Loads the bundle once per runtime in the agent's :class:`agent.runtime.ModelServer` (what a device
runs: preprocessing of the raw image, the variant, the gated dispatcher) and times, in ONE process,
interleaved, at batch 1, cycling through real test images (the gated widths depend on the input):
dense, every static variant, and the gated variant at every budget of its manifest curve. Prints the
speed-up over dense per runtime next to the accuracy and mean MACs the manifest records, and writes JSON.

    python bench/gated_bundle.py --bundle out/reference-gated [--runs 600] [--threads 1] [--json FILE]

``--threads`` is each runtime's thread count (onnxruntime's intra-op threads, ExecuTorch's thread pool,
which is one per process: hence one count per run). The agent's default is 1. With more than one
thread, time one runtime per run (``--runtimes executorch``): onnxruntime's idle workers spin for a
while after each run and take the cores ExecuTorch's pool needs, and the reverse.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from pathlib import Path

from agent.bundle import open_bundle
from agent.data import load_fashion_mnist
from agent.runtime import ModelServer, make_backend
from compiler.measure import host_description, time_interleaved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--images", type=int, default=64, help="test images to cycle through")
    parser.add_argument("--threads", type=int, default=1, help="threads of each runtime (default 1)")
    parser.add_argument("--runtimes", default="", help="comma-separated runtimes to time (default: all)")
    parser.add_argument("--data", default=None, help="Fashion-MNIST IDX directory (default: the system's)")
    parser.add_argument("--json", type=Path, default=Path("out/bench-gated-bundle.json"))
    args = parser.parse_args(argv)

    manifest = open_bundle(args.bundle, public_key=None)
    gated = next((v for v in manifest.variants if v.kind == "gated"), None)
    if gated is None or gated.budget is None:
        raise SystemExit(f"{args.bundle} has no gated variant: compile it with --gated")
    test = load_fashion_mnist("test", root=args.data)
    images = [test.images[i] for i in range(min(args.images, len(test.images)))]
    points: list[tuple[str, float | None]] = [(v.name, None) for v in manifest.variants if v.kind != "gated"]
    points += [(gated.name, p.budget) for p in gated.budget_curve]
    runtimes = sorted({f.runtime for f in gated.files})
    if args.runtimes:
        wanted = args.runtimes.split(",")
        if unknown := sorted(set(wanted) - set(runtimes)):
            raise SystemExit(f"{args.bundle}'s gated variant has no {', '.join(unknown)} files")
        runtimes = [rt for rt in runtimes if rt in wanted]
    calls: dict[tuple[str, str, float | None], Callable[[], object]] = {}
    for rt in runtimes:
        server = ModelServer(args.bundle, manifest, make_backend(rt, threads=args.threads))
        for name, budget in points:
            next_image = itertools.cycle(images).__next__
            calls[(rt, name, budget)] = lambda s=server, n=name, b=budget, nxt=next_image: s.infer(
                nxt(), variant=n, budget=b
            )
    timed = time_interleaved(calls, runs=args.runs, rounds=args.rounds, warmup=50)

    curve = {p.budget: p for p in gated.budget_curve}
    rows = []
    for name, budget in points:
        v = manifest.variant(name)
        point = curve.get(budget) if budget is not None else None
        row: dict[str, object] = {
            "variant": name,
            "budget": budget,
            "accuracy": point.accuracy if point else v.accuracy,
            "macs": point.macs if point else v.macs,
        }
        for rt in runtimes:
            ms = timed[(rt, name, budget)].median_ms
            dense_ms = timed[(rt, "dense", None)].median_ms
            row[f"{rt}_ms"], row[f"{rt}_speedup"] = ms, dense_ms / ms
        rows.append(row)
    head = f"{'variant':<11}{'budget':>7}{'acc %':>8}{'MACs':>9}"
    head += "".join(f"{rt + ' ms':>15}{'x dense':>9}" for rt in runtimes)
    print(
        f"bundle {manifest.model_id} {manifest.bundle_version} on {host_description()}, through ModelServer, "
        f"{args.threads} thread(s)"
    )
    print(head)
    for r in rows:
        acc = "-" if r["accuracy"] is None else f"{100 * float(r['accuracy']):.2f}"  # type: ignore[arg-type]
        budget = "-" if r["budget"] is None else f"{r['budget']:.2f}"
        line = f"{r['variant']:<11}{budget:>7}{acc:>8}{int(r['macs']) / 1e6:>8.2f}M"  # type: ignore[call-overload]
        line += "".join(f"{r[rt + '_ms']:>15.3f}{r[rt + '_speedup']:>8.2f}x" for rt in runtimes)
        print(line)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "host": host_description(),
                "bundle": str(args.bundle),
                "runs": args.runs,
                "threads": args.threads,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
