"""``edgeprune agent run``: the device daemon. Imports only the agent (never torch on the ONNX backend)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

__all__ = ["DEFAULT_PUBLIC_KEY", "add_agent_parser"]

log = logging.getLogger(__name__)

DEFAULT_PUBLIC_KEY = Path(
    os.environ.get("EDGEPRUNE_PUBLIC_KEY", Path.home() / ".config" / "edgeprune" / "keys" / "edgeprune.pub")
)


def add_agent_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("agent", help="run the device agent")
    actions = p.add_subparsers(dest="agent_command", required=True, metavar="ACTION")
    run = actions.add_parser(
        "run",
        help="serve a bundle, adapt to the device, report over MQTT until SIGTERM",
        description="Verify and serve a bundle; pick the variant from battery, charging, CPU load and "
        "temperature; send telemetry through an on-disk outbox to the broker; follow the fleet's desired "
        "state. SIGTERM or Ctrl-C stops cleanly (last metrics, offline status, outbox flushed).",
        epilog="example:\n  edgeprune agent run --bundle out/bundle --broker mqtt://127.0.0.1:1883 "
        "--device-id pi-01 \\\n      --state-dir /var/lib/edgeprune --input images/ --rate 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    run.add_argument(
        "--broker",
        required=True,
        help="mqtt://[USER@]HOST[:PORT] or mqtts://... for TLS (user name defaults to --device-id)",
    )
    run.add_argument(
        "--password-file",
        type=Path,
        default=None,
        help="file holding this device's broker password (from the fleet's provisioning; chmod 600)",
    )
    run.add_argument(
        "--password-env", default=None, metavar="VAR", help="environment variable holding the broker password"
    )
    run.add_argument(
        "--ca-file",
        type=Path,
        default=None,
        help="CA certificate that signed the broker's (mqtts:// only; default: the system's CAs)",
    )
    run.add_argument("--device-id", required=True)
    run.add_argument("--state-dir", type=Path, required=True, help="outbox, sequence counter, desired state")
    run.add_argument(
        "--public-key",
        type=Path,
        default=DEFAULT_PUBLIC_KEY,
        help=f"Ed25519 public key that must have signed the bundle (default {DEFAULT_PUBLIC_KEY})",
    )
    run.add_argument("--fleet", default="default")
    run.add_argument("--backend", choices=("onnx", "executorch"), default="onnx")
    run.add_argument("--profile", default="host", help="device profile name reported in the birth message")
    run.add_argument("--threads", type=int, default=1, help="runtime threads (default 1)")
    run.add_argument(
        "--memory-cap-mb",
        type=float,
        default=None,
        help="load variants lazily, keeping at most this many MB of model files loaded (default: "
        "preload every variant, so a switch costs microseconds)",
    )
    run.add_argument(
        "--no-trim-memory",
        dest="trim_memory",
        action="store_false",
        help="keep the library code start-up touched mapped (by default the agent unmaps it 5 s after "
        "start and after each bundle swap; docs/agent.md)",
    )
    run.add_argument(
        "--input",
        default=None,
        help="inputs to serve: a directory of images/.npy, an .npz, or '-' for raw frames on stdin",
    )
    run.add_argument(
        "--rate", type=float, default=0.0, help="inferences per second from --input (0: unpaced)"
    )
    run.add_argument("--exit-when-done", action="store_true", help="stop after the last --input sample")
    run.add_argument(
        "--metrics-period", type=float, default=10.0, help="seconds between metrics (default 10)"
    )
    run.add_argument("--heartbeat-period", type=float, default=30.0)
    run.add_argument(
        "--shadow-rate",
        type=float,
        default=0.0,
        help="fraction of inferences also run on dense to report agreement (default 0)",
    )
    run.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from agent.core import Agent, AgentConfig
    from agent.inputs import open_source

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    config = AgentConfig(
        bundle=args.bundle,
        public_key=args.public_key,
        broker_url=args.broker,
        device_id=args.device_id,
        state_dir=args.state_dir,
        fleet=args.fleet,
        backend=args.backend,
        profile=args.profile,
        threads=args.threads,
        memory_cap_mb=args.memory_cap_mb,
        trim_memory_after_s=5.0 if args.trim_memory else None,
        metrics_period_s=args.metrics_period,
        heartbeat_period_s=args.heartbeat_period,
        shadow_rate=args.shadow_rate,
        broker_password_file=args.password_file,
        broker_password_env=args.password_env,
        broker_ca_file=args.ca_file,
    )
    agent = Agent(config)
    agent.start()
    print(
        f"agent {args.device_id}: serving {agent.manifest.model_id} {agent.manifest.bundle_version} "
        f"({', '.join(agent.server.available)}) with {args.backend}; telemetry to {args.broker}",
        flush=True,
    )
    failure: list[BaseException] = []

    def serve_inputs() -> None:
        # In its own thread: reading a pipe or stdin blocks, and SIGTERM must still stop the agent.
        served = 0
        try:
            period = 1.0 / args.rate if args.rate > 0 else 0.0
            for sample in open_source(args.input, shape=agent.manifest.input.shape):
                if stop.is_set():
                    break
                started = time.monotonic()
                agent.infer(sample.data)
                served += 1
                if period:
                    stop.wait(max(0.0, period - (time.monotonic() - started)))
            print(f"served {served} input(s)", flush=True)
        except BaseException as exc:  # handed to the main thread, which stops the agent and reports it
            failure.append(exc)
            stop.set()
        if args.exit_when_done:
            stop.set()

    try:
        if args.input is not None:
            threading.Thread(target=serve_inputs, name="inputs", daemon=True).start()
        elif args.exit_when_done:
            stop.set()
        stop.wait()
        if failure:
            raise failure[0]
    finally:
        agent.stop()
    print(f"agent {args.device_id}: stopped cleanly", flush=True)
    return 0
