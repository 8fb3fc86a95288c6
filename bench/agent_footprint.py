"""Benchmark: memory and CPU of the agent process serving the reference bundle, per backend.

Starts a private Mosquitto, then `edgeprune agent run` as a separate process for each backend, waits
until it serves, lets it idle, and reads from /proc: resident memory (RSS), CPU used while idle, and
whether torch's library is mapped into the process at all.

    python bench/agent_footprint.py --bundle out/bundle --public-key ~/.config/edgeprune/keys/edgeprune.pub
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fleet.broker import MosquittoBroker


def measure(
    *, exe: Path, bundle: Path, key: Path, backend: str, url: str, idle_s: float
) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as state:
        cmd = [
            str(exe),
            "agent",
            "run",
            "--bundle",
            str(bundle),
            "--public-key",
            str(key),
            "--broker",
            url,
            "--device-id",
            f"bench-{backend}",
            "--state-dir",
            state,
            "--backend",
            backend,
            "--metrics-period",
            "10",
            "--heartbeat-period",
            "30",
        ]
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if "serving" not in line:
                proc.kill()
                raise SystemExit(f"{backend}: agent did not start: {line!r}")
            p = psutil.Process(proc.pid)
            time.sleep(2.0)  # let start-up work settle
            cpu0, t0 = p.cpu_times(), time.monotonic()
            time.sleep(idle_s)
            cpu1, t1 = p.cpu_times(), time.monotonic()
            rss = p.memory_info().rss
            uss = p.memory_full_info().uss  # pages only this process holds (no shared library code)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            proc.terminate()
            proc.wait(timeout=30)
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "backend": backend,
        "rss_mb": rss / 2**20,
        "uss_mb": uss / 2**20,
        "idle_cpu_pct": 100 * used / (t1 - t0),
        "torch_loaded": "libtorch" in maps,
        "idle_s": idle_s,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("out/bundle"))
    parser.add_argument(
        "--public-key", type=Path, default=Path.home() / ".config" / "edgeprune" / "keys" / "edgeprune.pub"
    )
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle to measure CPU over")
    parser.add_argument("--json", type=Path, default=Path("out/bench-agent-footprint.json"))
    args = parser.parse_args(argv)
    exe = Path(sys.executable).parent / "edgeprune"
    rows = []
    with MosquittoBroker() as broker:
        for backend in ("onnx", "executorch"):
            rows.append(
                measure(
                    exe=exe,
                    bundle=args.bundle,
                    key=args.public_key,
                    backend=backend,
                    url=broker.url,
                    idle_s=args.idle,
                )
            )
    print(f"{'backend':<12}{'RSS MB':>9}{'USS MB':>9}{'idle CPU %':>12}{'torch mapped':>14}")
    for r in rows:
        print(
            f"{r['backend']:<12}{r['rss_mb']:>9.1f}{r['uss_mb']:>9.1f}{r['idle_cpu_pct']:>12.2f}"
            f"{r['torch_loaded']!s:>14}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"bundle": str(args.bundle), "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
