"""Energy measured in simulation: the adaptive policy vs always-dense vs always-smallest, side by side.

The same fleet (profiles, starting charge, phases, seeds) and the same workload (the same inputs in the
same order per device) run three times against a private Mosquitto: once with the adaptive policy, once
pinned to the dense variant, once pinned to the cheapest rung of the ladder (``PolicyConfig.pinned_variant``).
Charging is off, so every battery drains; a run ends when every battery is empty or after ``--sim-hours``.

Reported per policy: battery life (mean simulated hours until empty, per profile and overall),
inference energy per 1,000 inferences (from the latencies measured on this host, scaled per profile),
and the accuracy of the served predictions against their labels.

    .venv/bin/python bench/energy.py --bundle B --public-key K.pub --devices 8 --json out/bench/energy.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import open_bundle
from agent.cli import DEFAULT_PUBLIC_KEY
from agent.policy import Policy, PolicyConfig
from agent.signing import load_public_key
from devices.plots import plot_energy_accuracy
from devices.simulator import SimConfig, SimResult, Simulator, load_inputs
from fleet.broker import MosquittoBroker


def run_one(args: argparse.Namespace, broker_url: str, pinned: str | None, data: Any) -> SimResult:
    state = Path(tempfile.mkdtemp(prefix="energy-"))
    try:
        config = SimConfig(
            bundle=args.bundle,
            public_key=args.public_key,
            broker_url=broker_url,
            state_root=state,
            devices=args.devices,
            fleet=f"energy-{pinned or 'adaptive'}",
            speedup=args.speedup,
            infer_hz=args.infer_hz,
            workload_hz=args.workload_hz,
            charging=False,
            battery_pct=(100.0, 100.0),
            policy=PolicyConfig(min_dwell_s=1.0),
            pinned_variant=pinned,
            metrics_period_s=5.0,
            heartbeat_period_s=10.0,
            decide_period_s=0.25,
            sample_period_s=0.5,
            seed=args.seed,
            stop_when_empty=True,
        )
        sim = Simulator(config, data=data, progress=lambda line: print("   ", line, flush=True))
        return sim.run(sim_hours=args.sim_hours)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def row_of(result: SimResult) -> dict[str, Any]:
    summary = result.summary()
    per_profile: dict[str, float | None] = {}
    for profile in sorted({d.profile for d in result.devices}):
        hours = [d.empty_at_h for d in result.devices if d.profile == profile]
        per_profile[profile] = float(np.mean(hours)) if all(h is not None for h in hours) else None  # type: ignore[arg-type]
    return {
        "battery_life_h": summary["mean_hours_to_empty"]
        if summary["devices_emptied"] == summary["devices"]
        else None,
        "battery_life_h_by_profile": per_profile,
        "inference_j_per_1000": summary["inference_j_per_1000"],
        "accuracy": summary["accuracy"],
        "real_inferences": summary["real_inferences"],
        "device_inferences": summary["device_inferences"],
        "switches": summary["switches"],
        "sim_hours": summary["sim_hours"],
        "errors": summary["errors"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--public-key", type=Path, default=DEFAULT_PUBLIC_KEY)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--speedup", type=float, default=3600.0, help="simulated seconds per real second")
    ap.add_argument("--infer-hz", type=float, default=20.0, help="real inferences per device per second")
    ap.add_argument("--workload-hz", type=float, default=30.0, help="device inferences per simulated second")
    ap.add_argument(
        "--sim-hours", type=float, default=48.0, help="stop a run after this many simulated hours"
    )
    ap.add_argument("--data", default="fixture", help="fashion-mnist, fixture or an .npz file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("out/bench/energy.json"))
    ap.add_argument("--plot", type=Path, default=None, help="also write accuracy vs energy here (PNG)")
    args = ap.parse_args()

    manifest = open_bundle(args.bundle, public_key=load_public_key(args.public_key))
    ladder = Policy(manifest, PolicyConfig()).ladder
    data = load_inputs(args.data)
    policies = {"adaptive": None, f"always-{ladder[0]}": ladder[0], f"always-{ladder[-1]}": ladder[-1]}
    rows: dict[str, dict[str, Any]] = {}
    with MosquittoBroker() as broker:
        for name, pinned in policies.items():
            print(f"==> {name}", flush=True)
            rows[name] = row_of(run_one(args, broker.url, pinned, data))

    def fmt(value: object, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    profiles = sorted({p for r in rows.values() for p in r["battery_life_h_by_profile"]})
    print()
    header = f"{'policy':22} {'life h':>7} " + " ".join(f"{p[:11]:>11}" for p in profiles)
    print(header + f" {'J/1000 inf':>10} {'accuracy':>8} {'switches':>8}")
    for name, r in rows.items():
        by = " ".join(f"{fmt(r['battery_life_h_by_profile'][p], '.2f'):>11}" for p in profiles)
        print(
            f"{name:22} {fmt(r['battery_life_h'], '.2f'):>7} {by} "
            f"{fmt(r['inference_j_per_1000'], '.3f'):>10} {fmt(r['accuracy'], '.3f'):>8} {r['switches']:>8}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": " ".join(sys.argv),
                "bundle": f"{manifest.model_id} {manifest.bundle_version}",
                "ladder": ladder,
                "workload_hz": args.workload_hz,
                "speedup": args.speedup,
                "results": rows,
            },
            indent=2,
        )
    )
    print(f"\nwrote {args.json}")
    if args.plot is not None:
        path = plot_energy_accuracy(rows, args.plot)
        if path is not None:
            print(f"plot: {path}")
    return 0 if all(r["errors"] == 0 for r in rows.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
