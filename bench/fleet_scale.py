"""How many simulated devices this machine holds: memory per device and messages per second.

Starts a private Mosquitto (after raising the open-file limit, which it inherits), runs the fleet
simulator with N real agents for a while, samples the resident memory of this process and its simulator
processes, and prints a table and writes JSON.

    .venv/bin/python bench/fleet_scale.py --bundle B --public-key K.pub --devices 1000 --duration 60 \
        --json out/bench/fleet_scale.json

Memory per device = (peak RSS of this process and its children while the fleet runs - RSS of this
process before the fleet starts) / N; it includes each simulator process's interpreter and its copy of
the bundle (``devices_per_process`` devices share one). The broker's RSS is reported apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import psutil

from agent.cli import DEFAULT_PUBLIC_KEY
from devices.simulator import SimConfig, Simulator, load_inputs, raise_fd_limit
from fleet.broker import MosquittoBroker

MB = 2**20


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--public-key", type=Path, default=DEFAULT_PUBLIC_KEY)
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=60.0, help="real seconds the fleet runs")
    ap.add_argument("--infer-hz", type=float, default=0.2, help="real inferences per device per second")
    ap.add_argument("--per-process", type=int, default=100, help="devices per simulator process")
    ap.add_argument("--data", default="fixture")
    ap.add_argument("--json", type=Path, default=Path("out/bench/fleet_scale.json"))
    args = ap.parse_args()

    limit = raise_fd_limit()
    me = psutil.Process()
    data = load_inputs(args.data)
    state = Path(
        tempfile.mkdtemp(prefix="fleet-scale-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    )
    peak = 0
    try:
        with MosquittoBroker() as broker:
            base = tree_rss(me) - psutil.Process(broker.pid).memory_info().rss if broker.pid else tree_rss(me)
            config = SimConfig(
                bundle=args.bundle,
                public_key=args.public_key,
                broker_url=broker.url,
                state_root=state,
                devices=args.devices,
                fleet="scale",
                speedup=600.0,
                infer_hz=args.infer_hz,
                metrics_period_s=10.0,
                heartbeat_period_s=30.0,
                decide_period_s=2.0,
                loop_period_s=1.0,
                sample_period_s=5.0,
                online_timeout_s=300.0,
            )

            def progress(line: str) -> None:
                nonlocal peak
                rss = tree_rss(me) - (psutil.Process(broker.pid).memory_info().rss if broker.pid else 0)
                peak = max(peak, rss)
                print(f"{line}  [rss {rss / MB:.0f} MiB]", flush=True)

            sim = Simulator(
                config,
                data=data,
                progress=progress,
                progress_period_s=5.0,
                devices_per_process=args.per_process,
            )
            result = sim.run(duration_s=args.duration)
            broker_rss = psutil.Process(broker.pid).memory_info().rss if broker.pid else 0
    finally:
        shutil.rmtree(state, ignore_errors=True)
    summary = result.summary()
    row = {
        "devices": args.devices,
        "devices_born": summary["devices_born"],
        "peak_online": summary["devices_online"],
        "processes": -(-args.devices // args.per_process) if args.devices > args.per_process else 1,
        "startup_s": summary["startup_s"],
        "run_s": summary["wall_s"],
        "real_inferences": summary["real_inferences"],
        "messages": summary["messages"],
        "messages_per_s": round(summary["messages_per_s"], 1),
        "rss_before_mib": round(base / MB, 1),
        "rss_peak_mib": round(peak / MB, 1),
        "rss_per_device_kib": round((peak - base) / args.devices / 1024, 1) if peak else None,
        "broker_rss_mib": round(broker_rss / MB, 1),
        "errors": summary["errors"],
        "fd_limit": limit,
        "cpu_count": psutil.cpu_count(),
    }
    print()
    width = max(len(k) for k in row)
    for key, value in row.items():
        print(f"{key:{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"command": " ".join(sys.argv), "result": row}, indent=2))
    print(f"\nwrote {args.json}")
    return 0 if summary["errors"] == 0 and summary["devices_born"] == args.devices else 1


if __name__ == "__main__":
    raise SystemExit(main())
