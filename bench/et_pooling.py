"""Benchmark: what global pooling outside XNNPACK cost the gated model, old and new gate side by side.

Builds the forced-gate reference model of ``bench/gated_speed.py`` and exports its segments twice, once
with the gate's pooling written ``h.mean(dim=(2, 3))`` (which ExecuTorch ran in its portable kernel
between two delegate calls) and once as shipped (``keepdim=True`` then ``flatten``: one delegate call),
then times both in both runtimes in ONE process, interleaved, at batch 1, at 25% and full inner width.

    python bench/et_pooling.py [--runs 500] [--json out/bench-et-pooling.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import gated_speed  # beside this script (python bench/et_pooling.py)
import numpy as np
import torch

from agent.contract import BudgetInput
from compiler.gating import deploy
from compiler.gating.deploy import export_gated, gated_runner, gating_spec
from compiler.measure import host_description, time_interleaved


def _plain_mean_gate(self: Any, h: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
    return (self.linear(h.mean(dim=(2, 3))) + budget * self.cost).argmax(dim=1)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--json", type=Path, default=Path("out/bench-et-pooling.json"))
    args = parser.parse_args(argv)
    _, slim, gated, example = gated_speed._build(None)
    gating = gating_spec(slim)
    budget = BudgetInput(minimum=0.0, maximum=1.0, default=0.9)
    x = np.ascontiguousarray(example.numpy())
    shipped = deploy._Gate.forward
    calls = {}
    for form, forward in (("plain mean", _plain_mean_gate), ("keepdim", shipped)):
        deploy._Gate.forward = forward  # type: ignore[method-assign]
        try:
            out = Path(tempfile.mkdtemp(prefix="et-pooling-"))
            for rt in ("executorch", "onnx"):
                files = export_gated(gated, example, out, rt, name="gated")
                run = gated_runner(files, rt, gating=gating, budget=budget, threads=1)
                for width, b in (("25%", 0.2), ("100%", 0.9)):
                    calls[(form, rt, width)] = lambda run=run, b=b: run(x, b)
        finally:
            deploy._Gate.forward = shipped  # type: ignore[method-assign]
    timed = time_interleaved(calls, runs=args.runs, rounds=10, warmup=50)
    rows = []
    print(f"{'runtime':<12}{'width':>6}{'plain mean ms':>15}{'keepdim ms':>12}{'change':>9}")
    for rt in ("executorch", "onnx"):
        for width in ("25%", "100%"):
            old, new = timed[("plain mean", rt, width)].median_ms, timed[("keepdim", rt, width)].median_ms
            rows.append({"runtime": rt, "width": width, "plain_mean_ms": old, "keepdim_ms": new})
            print(f"{rt:<12}{width:>6}{old:>15.3f}{new:>12.3f}{100 * (new / old - 1):>8.0f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"host": host_description(), "runs": args.runs, "rows": rows}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
