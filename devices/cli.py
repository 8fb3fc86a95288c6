"""`edgeprune devices list|show|simulate`: device profiles and the fleet simulator.

>>> # edgeprune devices list
>>> # edgeprune devices show rpi4
>>> # edgeprune devices simulate --bundle b/ --devices 50 --duration 60 --out sim/
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

from agent.cli import DEFAULT_PUBLIC_KEY
from agent.mqtt import parse_broker_url
from devices.profiles import PROFILES, get_profile

__all__ = ["add_devices_parser"]


def _cmd_list(args: argparse.Namespace) -> int:
    header = f"{'name':12} {'speed':>5} {'cores':>5} {'battery':>8} {'idle':>6} {'active':>6} {'busy':>6}"
    print(f"{header}  description")
    for p in PROFILES.values():
        print(
            f"{p.name:12} {p.relative_speed:5.2f} {p.cores:5d} {p.battery_wh:6.1f}Wh {p.idle_w:5.2f}W "
            f"{p.active_w:5.2f}W {p.busy_w:5.2f}W  {p.description}"
        )
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(get_profile(args.name).model_dump_json(indent=2))
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    from devices.plots import write_plots
    from devices.simulator import SimConfig, Simulator, load_inputs, profile_mix

    profiles = profile_mix(args.profiles.split(",") if args.profiles else None)
    data = load_inputs(args.data)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    def run(broker_url: str) -> int:
        with tempfile.TemporaryDirectory(prefix="edgeprune-sim-") as state:
            config = SimConfig(
                bundle=args.bundle,
                public_key=args.public_key,
                broker_url=broker_url,
                state_root=Path(state),
                devices=args.devices,
                profiles=profiles,
                fleet=args.fleet,
                speedup=args.speedup,
                infer_hz=args.infer_hz,
                workload_hz=args.workload_hz,
                charging=not args.no_charging,
                pinned_variant=args.pin,
                sample_period_s=args.sample_period,
                seed=args.seed,
            )
            sim = Simulator(config, data=data, progress=lambda line: print(line, flush=True))
            where = parse_broker_url(broker_url).url  # never the password
            print(f"==> {args.devices} devices ({', '.join(profiles)}) on {where}; Ctrl-C stops")
            result = sim.run(duration_s=args.duration, sim_hours=args.sim_hours)
        summary = result.summary()
        (out / "result.json").write_text(result.to_json())
        for key, value in summary.items():
            print(f"{key:22} {value}")
        for path in write_plots(result, out):
            print(f"plot: {path}")
        print(f"result: {out / 'result.json'}")
        return 0

    return run(args.broker)


def add_devices_parser(sub: Any) -> None:
    """Register `edgeprune devices` on the top-level subparsers."""
    p = sub.add_parser("devices", help="device profiles and the fleet simulator")
    dsub = p.add_subparsers(dest="devices_command", required=True, metavar="ACTION")
    listing = dsub.add_parser("list", help="the known device profiles")
    listing.set_defaults(func=_cmd_list)
    show = dsub.add_parser("show", help="one profile's figures as JSON")
    show.add_argument("name")
    show.set_defaults(func=_cmd_show)
    sim = dsub.add_parser(
        "simulate", help="run N real agents on simulated sensors against a broker (Ctrl-C stops cleanly)"
    )
    sim.add_argument("--bundle", type=Path, required=True)
    sim.add_argument("--public-key", type=Path, default=DEFAULT_PUBLIC_KEY)
    sim.add_argument(
        "--broker", required=True, help="mqtt://HOST:PORT of a running broker (e.g. `edgeprune fleet ...`)"
    )
    sim.add_argument("--devices", type=int, default=20)
    sim.add_argument("--profiles", default="", help="comma-separated profile names (default: all, mixed)")
    sim.add_argument("--fleet", default="sim")
    sim.add_argument("--data", default="fashion-mnist", help="fashion-mnist, fixture or an .npz file")
    sim.add_argument("--duration", type=float, default=60.0, help="real seconds to run (default 60)")
    sim.add_argument("--sim-hours", type=float, default=None, help="stop after this many simulated hours")
    sim.add_argument("--speedup", type=float, default=600.0, help="simulated seconds per real second")
    sim.add_argument("--infer-hz", type=float, default=1.0, help="real inferences per device per second")
    sim.add_argument("--workload-hz", type=float, default=10.0, help="device inferences per simulated second")
    sim.add_argument("--no-charging", action="store_true", help="ignore the profiles' charge windows")
    sim.add_argument("--pin", default=None, help="pin every device to this variant (no adaptive policy)")
    sim.add_argument("--sample-period", type=float, default=0.25, help="real seconds between samples")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--out", type=Path, default=Path("out/sim"))
    sim.set_defaults(func=_cmd_simulate)
