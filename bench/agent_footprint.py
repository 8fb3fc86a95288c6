"""Benchmark: memory and CPU of the agent process serving the reference bundle, per backend.

Starts a private Mosquitto, then `edgeprune agent run` as a separate process for each backend, with and
without the working-set trim (`--no-trim-memory`, see agent/memory.py), side by side in one run. Each
agent first serves raw frames from stdin (`--input -`, `--serve-rate` inferences/s for `--serve` seconds,
so the trim 5 s after start happens while it serves and the code serving needs faults back in), then
idles. It reads from /proc: resident memory (RSS) at the end of serving and at the end of the idle
window, the anonymous (private, modified) part of it, unique memory (USS), CPU used while idle, and
whether torch's library is mapped into the process at all.

    python bench/agent_footprint.py --bundle out/bundle --public-key ~/.config/edgeprune/keys/edgeprune.pub
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from fleet.broker import MosquittoBroker

MB = 2**20


def _anonymous_mb(pid: int) -> float:
    """Resident memory that exists only in this process's own writes (heap, stacks, relocated data):
    what no trim and no page cache can take back."""
    total = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            total += int(line.split()[1])
    return total / 1024


def _feed(stdin: object, *, frames: np.ndarray, rate: float, until: float, stop: threading.Event) -> int:
    """Write raw frames to the agent at ``rate`` per second until ``until`` (monotonic); count them."""
    sent, start = 0, time.monotonic()
    while not stop.is_set() and time.monotonic() < until:
        try:
            stdin.write(frames[sent % len(frames)].tobytes())  # type: ignore[attr-defined]
            stdin.flush()  # type: ignore[attr-defined]
        except (BrokenPipeError, ValueError):
            break
        sent += 1
        delay = start + sent / rate - time.monotonic()
        if delay > 0:
            stop.wait(delay)
    return sent


def measure(
    *,
    exe: Path,
    bundle: Path,
    key: Path,
    backend: str,
    url: str,
    trim: bool,
    serve_s: float,
    serve_rate: float,
    idle_s: float,
) -> dict[str, object]:
    frames = np.random.default_rng(0).integers(0, 256, size=(64, 28, 28), dtype=np.uint8)
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
            f"bench-{backend}-{'trim' if trim else 'notrim'}",
            "--state-dir",
            state,
            "--backend",
            backend,
            "--metrics-period",
            "10",
            "--heartbeat-period",
            "30",
            "--input",
            "-",
        ]
        if not trim:
            cmd.append("--no-trim-memory")
        with subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=False
        ) as proc:
            assert proc.stdout is not None and proc.stdin is not None
            line = proc.stdout.readline().decode(errors="replace")
            if "serving" not in line:
                proc.kill()
                raise SystemExit(f"{backend}: agent did not start: {line!r}")
            p = psutil.Process(proc.pid)
            stop = threading.Event()
            sent: list[int] = []
            feeder = threading.Thread(
                target=lambda: sent.append(
                    _feed(
                        proc.stdin,
                        frames=frames,
                        rate=serve_rate,
                        until=time.monotonic() + serve_s,
                        stop=stop,
                    )
                ),
                daemon=True,
            )
            feeder.start()
            peak = 0
            while feeder.is_alive():
                peak = max(peak, p.memory_info().rss)
                time.sleep(0.25)
            rss_serving = p.memory_info().rss
            peak = max(peak, rss_serving)
            anon_serving = _anonymous_mb(proc.pid)
            time.sleep(2.0)  # stdin stays open: the agent waits for frames, i.e. idles
            cpu0, t0 = p.cpu_times(), time.monotonic()
            time.sleep(idle_s)
            cpu1, t1 = p.cpu_times(), time.monotonic()
            rss = p.memory_info().rss
            uss = p.memory_full_info().uss  # pages only this process holds (no shared library code)
            anon = _anonymous_mb(proc.pid)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            stop.set()
            proc.terminate()
            proc.wait(timeout=30)
    used = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return {
        "backend": backend,
        "trim": trim,
        "inferences": sent[0] if sent else 0,
        "rss_serving_mb": rss_serving / MB,
        "rss_serving_peak_mb": peak / MB,
        "anonymous_serving_mb": anon_serving,
        "rss_mb": rss / MB,
        "uss_mb": uss / MB,
        "anonymous_mb": anon,
        "idle_cpu_pct": 100 * used / (t1 - t0),
        "torch_loaded": "libtorch" in maps,
        "serve_s": serve_s,
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
    parser.add_argument("--backends", default="onnx,executorch", help="comma-separated")
    parser.add_argument("--serve", type=float, default=12.0, help="seconds of serving (the trim is at 5 s)")
    parser.add_argument("--serve-rate", type=float, default=50.0, help="inferences per second while serving")
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle to measure CPU over")
    parser.add_argument("--json", type=Path, default=Path("out/bench-agent-footprint.json"))
    args = parser.parse_args(argv)
    exe = Path(sys.executable).parent / "edgeprune"
    rows = []
    with MosquittoBroker() as broker:
        for backend in args.backends.split(","):
            for trim in (True, False):
                rows.append(
                    measure(
                        exe=exe,
                        bundle=args.bundle,
                        key=args.public_key,
                        backend=backend,
                        url=broker.url,
                        trim=trim,
                        serve_s=args.serve,
                        serve_rate=args.serve_rate,
                        idle_s=args.idle,
                    )
                )
    print(
        f"{'backend':<12}{'trim':>6}{'served':>8}{'RSS serving':>13}{'(peak)':>8}{'RSS idle':>10}"
        f"{'anon':>7}{'USS':>7}{'idle CPU %':>12}{'torch mapped':>14}   (MB)"
    )
    for r in rows:
        print(
            f"{r['backend']:<12}{'on' if r['trim'] else 'off':>6}{r['inferences']:>8}"
            f"{r['rss_serving_mb']:>13.1f}{r['rss_serving_peak_mb']:>8.1f}{r['rss_mb']:>10.1f}"
            f"{r['anonymous_mb']:>7.1f}{r['uss_mb']:>7.1f}{r['idle_cpu_pct']:>12.2f}{r['torch_loaded']!s:>14}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"bundle": str(args.bundle), "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
