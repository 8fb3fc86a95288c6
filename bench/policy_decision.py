"""Benchmark: what does one :meth:`agent.policy.Policy.decide` cost? Goal: <= 50 microseconds.

Times every decision on its own with ``time.perf_counter_ns`` (so the numbers include the ~0.1 us
cost of the clock itself), cycling through readings that hit every branch: calm, unknown sensors,
low battery, busy CPU, heat, critical, hysteresis and dwell holds. Prints mean / p50 / p99 / max in
microseconds and writes them as JSON.

    python bench/policy_decision.py [--n 100000] [--manifest out/bundle/manifest.json] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from agent.contract import (
    ArtifactFile,
    BudgetInput,
    BundleManifest,
    CreationInfo,
    GatedBlock,
    Gating,
    InputSpec,
    Latency,
    Normalization,
    Readings,
    Variant,
)
from agent.policy import Policy, PolicyConfig

GOAL_US = 50.0

SCENARIOS = (
    Readings(battery_pct=90.0, charging=False, cpu_load_pct=10.0, temperature_c=45.0, free_memory_mb=900.0),
    Readings(),
    Readings(battery_pct=18.0, charging=False, cpu_load_pct=20.0, temperature_c=50.0),
    Readings(battery_pct=22.0, charging=False, cpu_load_pct=92.0, temperature_c=50.0),
    Readings(battery_pct=40.0, charging=None, cpu_load_pct=50.0, temperature_c=74.0),
    Readings(battery_pct=8.0, charging=False, cpu_load_pct=95.0, temperature_c=88.0),
    Readings(battery_pct=12.0, charging=True, cpu_load_pct=30.0, temperature_c=60.0),
    Readings(battery_pct=60.0, charging=False, cpu_load_pct=82.0, temperature_c=68.0),
)


def bench_manifest() -> BundleManifest:
    """Three variants like a compiled bundle: dense, gated (budget 0..1), static-50."""
    digest = "ab" * 32

    def variant(name: str, kind: str, macs: int, acc: float, ms: float, **extra: object) -> Variant:
        return Variant.model_validate(
            {
                "name": name,
                "kind": kind,
                "files": [ArtifactFile(runtime="onnx", path=f"{name}.onnx", sha256=digest, size_bytes=1)],
                "macs": macs,
                "params": macs // 100,
                "accuracy": acc,
                "latency": {"onnx": Latency(median_ms=ms, p90_ms=ms * 1.2, threads=2, runs=200)},
                **extra,
            }
        )

    return BundleManifest(
        model_id="bench",
        bundle_version="1.0.0",
        input=InputSpec(
            shape=(1, 1, 28, 28),
            normalization=Normalization(mean=(0.286,), std=(0.353,), scale=255.0),
            class_names=tuple(str(i) for i in range(10)),
        ),
        variants=(
            variant("dense", "dense", 40_000_000, 0.935, 2.0),
            variant(
                "gated",
                "gated",
                40_000_000,
                0.931,
                1.4,
                budget=BudgetInput(minimum=0, maximum=1, default=0.5),
                gating=Gating(
                    blocks=(
                        GatedBlock(name="blocks.0", widths=(16, 32), macs=(3_000_000, 6_000_000)),
                        GatedBlock(name="blocks.1", widths=(32, 64), macs=(8_000_000, 16_000_000)),
                    ),
                    fixed_macs=18_000_000,
                ),
            ),
            variant("static-50", "static", 11_000_000, 0.925, 0.7),
        ),
        created=CreationInfo(
            created_at=datetime(2026, 1, 1, tzinfo=UTC),
            tool_version="0",
            source_model="bench",
            dataset="none",
        ),
    )


def run(policy: Policy, n: int) -> list[int]:
    """Per-decision times in nanoseconds; simulated time advances 7 s per decision (dwell 30 s)."""
    times = [0] * n
    clock = time.perf_counter_ns
    decide = policy.decide
    k = len(SCENARIOS)
    for i in range(n):
        readings = SCENARIOS[(i // 3) % k]
        now = i * 7.0
        t0 = clock()
        decide(readings, now)
        times[i] = clock() - t0
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000, help="decisions to time")
    parser.add_argument("--manifest", type=Path, help="a bundle's manifest.json instead of the built-in one")
    parser.add_argument("--json", type=Path, default=Path("out/bench-policy.json"))
    args = parser.parse_args(argv)

    manifest = BundleManifest.from_json(args.manifest.read_bytes()) if args.manifest else bench_manifest()
    rows = []
    for label, config in (
        ("defaults", PolicyConfig()),
        ("latency goal 1.5 ms", PolicyConfig(latency_goal_ms=1.5)),
        ("pinned gated", PolicyConfig(pinned_variant="gated")),
    ):
        policy = Policy(manifest, config)
        run(policy, min(args.n, 10_000))  # warm-up
        ns = sorted(run(Policy(manifest, config), args.n))
        us = [t / 1000 for t in ns]
        rows.append(
            {
                "config": label,
                "decisions": args.n,
                "mean_us": statistics.fmean(us),
                "p50_us": us[len(us) // 2],
                "p99_us": us[min(len(us) - 1, int(len(us) * 0.99))],
                "max_us": us[-1],
            }
        )

    print(f"{'config':<22}{'decisions':>10}{'mean us':>10}{'p50 us':>9}{'p99 us':>9}{'max us':>10}")
    for r in rows:
        print(
            f"{r['config']:<22}{r['decisions']:>10}{r['mean_us']:>10.2f}{r['p50_us']:>9.2f}"
            f"{r['p99_us']:>9.2f}{r['max_us']:>10.1f}"
        )
    worst_p99 = max(r["p99_us"] for r in rows)
    met = worst_p99 <= GOAL_US
    print(
        f"goal: p99 <= {GOAL_US:g} us per decision -> {'met' if met else 'NOT met'} "
        f"(worst p99 {worst_p99:.2f} us)"
    )

    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "goal_us": GOAL_US,
        "met": met,
        "python": sys.version.split()[0],
        "host": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
