"""Benchmark: what the agent adds over the bare runtime, and what a hot variant switch costs.

In one process, interleaved: a bare onnxruntime session on a preprocessed input, `ModelServer.infer`
and `Agent.infer` (telemetry queued to the on-disk outbox; no broker needed) on the same input, for
every variant of the bundle; then `ModelServer.switch` between preloaded variants.

    python bench/agent_overhead.py --bundle out/bundle --public-key ~/.config/edgeprune/keys/edgeprune.pub
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from agent.contract import Readings
from agent.core import Agent, AgentConfig
from agent.policy import PolicyConfig
from agent.runtime import OnnxBackend, preprocess
from agent.sensors import StaticSensors
from fleet.broker import free_port


def timed(fn: object, runs: int) -> np.ndarray:
    out = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        out[i] = time.perf_counter() - start
    return out * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bundle", type=Path, default=Path("out/bundle"))
    parser.add_argument(
        "--public-key", type=Path, default=Path.home() / ".config" / "edgeprune" / "keys" / "edgeprune.pub"
    )
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("out/bench-agent-overhead.json"))
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory() as state:
        # A port nobody listens on: telemetry waits in the outbox, as during an outage.
        config = AgentConfig(
            bundle=args.bundle,
            public_key=args.public_key,
            broker_url=f"mqtt://127.0.0.1:{free_port()}",
            device_id="bench",
            state_dir=Path(state),
            metrics_period_s=3600,
            heartbeat_period_s=3600,
            decide_period_s=3600,
            policy=PolicyConfig(min_dwell_s=0),
        )
        agent = Agent(config, sensors=StaticSensors(Readings()))
        agent.start()
        try:
            x = preprocess(
                np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8), agent.manifest.input
            )
            for v in agent.manifest.variants:
                if v.kind == "gated":  # two inputs and a dispatcher: bench/gated_bundle.py times those
                    continue
                file = v.file_for("onnx")
                assert file is not None
                opts = OnnxBackend(threads=1).session_options()  # the agent's own session settings
                session = ort.InferenceSession(
                    str(args.bundle / file.path), opts, providers=["CPUExecutionProvider"]
                )
                name = session.get_inputs()[0].name
                agent.server.switch(v.name)
                agent.policy.reconfigure(PolicyConfig(min_dwell_s=0, pinned_variant=v.name))
                bare, server, full = [], [], []
                for _ in range(args.rounds):
                    bare.append(
                        timed(
                            lambda session=session, name=name: session.run(None, {name: x}),
                            args.runs // args.rounds,
                        )
                    )
                    server.append(timed(lambda: agent.server.infer(x), args.runs // args.rounds))
                    full.append(timed(lambda: agent.infer(x), args.runs // args.rounds))
                b, s, f = (float(np.median(np.concatenate(a))) for a in (bare, server, full))
                rows.append(
                    {
                        "variant": v.name,
                        "bare_ms": b,
                        "server_ms": s,
                        "agent_ms": f,
                        "agent_overhead_pct": 100 * (f / b - 1),
                    }
                )
            names = list(agent.server.available)
            switches = []
            for i in range(2000):
                start = time.perf_counter()
                agent.server.switch(names[i % len(names)])
                switches.append(time.perf_counter() - start)
            switch_us = np.array(switches) * 1e6
        finally:
            agent.stop(flush_timeout_s=0.1)
    print(f"{'variant':<11}{'bare ms':>9}{'server ms':>11}{'agent ms':>10}{'overhead':>10}")
    for r in rows:
        print(
            f"{r['variant']:<11}{r['bare_ms']:>9.3f}{r['server_ms']:>11.3f}{r['agent_ms']:>10.3f}"
            f"{r['agent_overhead_pct']:>9.1f}%"
        )
    print(
        f"hot switch between preloaded variants: median {np.median(switch_us):.1f} us, "
        f"p99 {np.percentile(switch_us, 99):.1f} us"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "rows": rows,
                "switch_median_us": float(np.median(switch_us)),
                "switch_p99_us": float(np.percentile(switch_us, 99)),
            },
            indent=1,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
