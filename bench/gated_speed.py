"""Benchmark: does skipping channels with the gated deployment forms save wall-clock time, in both runtimes?

Builds the reference architecture's gated form (weights from ``--checkpoint``, a dense state_dict such as
the compiler's cached one, or random weights with batch-norm statistics from random batches: the speed
does not depend on the values), sets every gate so that the budget alone picks the width (budget 0.2 ->
25% of the inner channels in every block, 0.4 -> 50%, 0.6 -> 75%, 0.9 -> 100%), exports the gated ONNX
graph and the multi-method .pte exactly as ``edgeprune compile --gated`` does, plus the dense model and a
static network of each inner width, and times them all in ONE process, interleaved, at batch 1 through
the agent's runtime facade. Reports, per runtime: speed-up of the gated form over dense at each width,
the MACs ratio, and the gated form's time relative to the static net of the same width (how much the
gating costs over a network that was pruned to that width). For ONNX it also times the single-graph
form with ``If`` nodes (``bench/_gated_if.py``), which bundles do not ship.

    python bench/gated_speed.py [--checkpoint ~/.cache/edgeprune/dense-KEY.pt] [--runs 400] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import cast

import numpy as np
import torch
from _gated_if import export_gated_if, load_gated_if  # beside this script (python bench/gated_speed.py)
from torch import nn

from agent.contract import BudgetInput, Runtime
from compiler.export import export_onnx, export_pte, load_runner
from compiler.gating.deploy import GatedDeploy, export_gated, gated_runner, gating_spec
from compiler.gating.slim import BUDGET_SCALE, SlimNet
from compiler.measure import count_macs_params, host_description, time_interleaved
from compiler.reference import ReferenceNet

BUDGET_FOR_WIDTH = (0.2, 0.4, 0.6, 0.9)
BREAKS = (0.3, 0.5, 0.7)  # budgets where the forced gates move to the next width


class _Fixed(nn.Module):
    """The gated net's blocks at one fixed width index, no gates: a static net of that inner width."""

    def __init__(self, deploy: GatedDeploy, j: int) -> None:
        super().__init__()
        self.stem, self.head = deploy.stem, deploy.head
        self.shortcuts = deploy.shortcuts
        self.branches = nn.ModuleList(cast(nn.ModuleList, b)[j] for b in deploy.branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for shortcut, branch in zip(self.shortcuts, self.branches, strict=True):
            h = branch(h, shortcut(h))
        out: torch.Tensor = self.head(h)
        return out


def _force_gates(net: SlimNet) -> None:
    """Zero gate weights; biases making the width a step function of the budget (breaks at BREAKS)."""
    with torch.no_grad():
        for gate, cost in zip(net.gates, net.costs, strict=True):
            assert isinstance(gate, nn.Linear)
            gate.weight.zero_()
            bias = [0.0]
            for j, brk in enumerate(BREAKS):
                bias.append(bias[-1] - BUDGET_SCALE * brk * float(cost[j + 1] - cost[j]))
            gate.bias.copy_(torch.tensor(bias))


def _build(checkpoint: Path | None) -> tuple[ReferenceNet, SlimNet, GatedDeploy, torch.Tensor]:
    torch.manual_seed(0)
    net = ReferenceNet()
    if checkpoint:
        net.load_state_dict(torch.load(checkpoint, weights_only=True))
    else:
        net.train()
        with torch.no_grad():
            for _ in range(5):
                net(torch.randn(64, 1, 28, 28))
    net.eval()
    example = torch.randn(1, 1, 28, 28)
    slim = SlimNet(net, example).eval()
    if any(len(b.widths) != len(BUDGET_FOR_WIDTH) for b in slim.blocks):
        raise SystemExit("every block must offer 4 widths")
    _force_gates(slim)
    deploy = GatedDeploy(slim).eval()
    for j, b in enumerate(BUDGET_FOR_WIDTH):
        _, picks = deploy(example, torch.tensor(b))
        assert picks.tolist() == [j] * len(slim.blocks), (b, picks)
    return net, slim, deploy, example


Timers = dict[tuple[str, Runtime], Callable[[], object]]


def _export(
    net: ReferenceNet, slim: SlimNet, deploy: GatedDeploy, example: torch.Tensor, threads: int
) -> tuple[Timers, dict[str, int]]:
    """Export dense, the static net of every width and the gated forms; a timer per (model, runtime)."""
    out = Path(tempfile.mkdtemp(prefix="gated-bench-"))
    print(f"==> exporting into {out}", flush=True)
    gating = gating_spec(slim)
    budget = BudgetInput(minimum=0.0, maximum=1.0, default=0.9)
    models: dict[str, nn.Module] = {"dense": net}
    models |= {f"static-w{j}": _Fixed(deploy, j).eval() for j in range(len(BUDGET_FOR_WIDTH))}
    macs = {name: count_macs_params(m, example)[0] for name, m in models.items()}
    x = np.ascontiguousarray(example.numpy())
    timers: Timers = {}
    for name, model in models.items():
        export_onnx(model, example, out / f"{name}.onnx")
        export_pte(model, example, out / f"{name}.pte")
        for rt, suffix in (("onnx", ".onnx"), ("executorch", ".pte")):
            run = load_runner(out / f"{name}{suffix}", cast(Runtime, rt), threads=threads)
            timers[(name, cast(Runtime, rt))] = lambda run=run: run(x)
    for rt in ("onnx", "executorch"):
        files = export_gated(deploy, example, out, cast(Runtime, rt), name="gated")
        grun = gated_runner(files, cast(Runtime, rt), gating=gating, budget=budget, threads=threads)
        for j, b in enumerate(BUDGET_FOR_WIDTH):
            timers[(f"gated-w{j}", cast(Runtime, rt))] = lambda grun=grun, b=b: grun(x, b)
    # the single-graph ONNX form with If nodes, for comparison (bundles ship the segments)
    export_gated_if(slim, example, out / "gated-if.onnx", budget=budget, widths_output=gating.widths_output)
    irun = load_gated_if(out / "gated-if.onnx", budget=budget, threads=threads)
    for j, b in enumerate(BUDGET_FOR_WIDTH):
        timers[(f"gated-if-w{j}", "onnx")] = lambda b=b: irun(x, b)
    return timers, macs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=None, help="dense ReferenceNet state_dict")
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path("out/bench-gated.json"))
    args = parser.parse_args(argv)
    net, slim, deploy, example = _build(args.checkpoint)
    timers, macs = _export(net, slim, deploy, example, args.threads)
    torch.set_num_threads(1)
    print(f"==> timing {len(timers)} (model, runtime) pairs, {args.runs} runs each, interleaved", flush=True)
    timed = time_interleaved(timers, runs=args.runs, rounds=args.rounds, warmup=30, threads=args.threads)
    med = {key: latency.median_ms for key, latency in timed.items()}
    rows = []
    widths = [f"{round(100 * w / slim.blocks[0].widths[-1])}%" for w in slim.blocks[0].widths]
    for rt in ("onnx", "executorch"):
        dense_ms = med[("dense", rt)]
        for j, label in enumerate(widths):
            g, s = med[(f"gated-w{j}", rt)], med[(f"static-w{j}", rt)]
            rows.append(
                {
                    "runtime": rt,
                    "inner_width": label,
                    "dense_ms": dense_ms,
                    "gated_ms": g,
                    "static_ms": s,
                    "gated_speedup": dense_ms / g,
                    "static_speedup": dense_ms / s,
                    "macs_ratio": macs["dense"] / macs[f"static-w{j}"],
                    "gated_vs_static": s / g,
                    "gated_if_ms": med.get((f"gated-if-w{j}", rt)),
                }
            )
    print(
        f"\n{'runtime':<11}{'width':>6}{'dense ms':>10}{'gated ms':>10}{'static ms':>10}"
        f"{'gated x':>9}{'static x':>9}{'MACs x':>8}{'static/gated':>13}{'If-form ms':>11}"
    )
    for r in rows:
        print(
            f"{r['runtime']:<11}{r['inner_width']:>6}{r['dense_ms']:>10.3f}{r['gated_ms']:>10.3f}"
            f"{r['static_ms']:>10.3f}{r['gated_speedup']:>8.2f}x{r['static_speedup']:>8.2f}x"
            f"{r['macs_ratio']:>7.2f}x{r['gated_vs_static']:>12.2f}"
            + (f"{r['gated_if_ms']:>11.3f}" if r["gated_if_ms"] is not None else f"{'-':>11}")
        )
    print("\ngated x, static x: speed-up over dense; static/gated: how close gated runs to a static net")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    payload = {"host": host_description(), "threads": args.threads, "runs": args.runs, "rows": rows}
    args.json.write_text(json.dumps(payload, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
