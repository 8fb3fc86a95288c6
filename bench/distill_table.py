"""Benchmark: fine-tuning with distillation, the teacher run in every step against its outputs computed once.

The compiler fine-tunes every static variant with knowledge distillation from the dense model
(``compiler.pipeline``). Without augmentation it computes the dense model's logits for the whole training
split once (:func:`compiler.train.teacher_logits`) and every step reads its batch's rows, instead of running
the dense model on the batch. This times both on the reference model and the real training split: the
dense model (untrained: the time does not depend on the weights) distils into a student of the width
of each ladder step (every channel group at that ratio), ``--steps`` steps per round each way,
alternating, ``--rounds`` times (the first is a warm-up and dropped), plus the one-off cost of the table.
It then projects one compile's fine-tuning (``--epochs`` per variant) both ways. The gated variant's
shared-width training (``--gated``, :func:`compiler.gating.train.train_slim`) distils from the same
table: it is timed the same way and projected over its ``slim_epochs``.

    python bench/distill_table.py [--steps 60] [--rounds 3] [--gated] [--json out/bench-distill-table.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from compiler.data import TensorData, load_splits
from compiler.gating.slim import SlimNet
from compiler.gating.train import GateTrainConfig, train_slim
from compiler.models import load_model
from compiler.prune.static import prunable_groups, prune
from compiler.train import TrainConfig, native_bf16, teacher_logits, train


def _both_ways(run: Callable[[str, int], float], rounds: int, steps: int) -> dict:
    """Median ms per step of ``run(way, round)``, the teacher and the table alternating, round 0 dropped."""
    times: dict[str, list[float]] = {"teacher": [], "table": []}
    for r in range(rounds):
        for way, values in times.items():
            seconds = run(way, r)
            if r > 0:
                values.append(seconds / steps)
    return {f"{way}_ms": statistics.median(v) * 1e3 for way, v in times.items()} | {"rounds": times}


def _print(
    args: argparse.Namespace,
    train_data: TensorData,
    rows: list[dict],
    gated: dict | None,
    *,
    table_s: float,
    steps_per_epoch: int,
) -> dict[str, float]:
    """Print the table and return the projected fine-tuning seconds of a compile, both ways."""
    steps = args.epochs * steps_per_epoch
    live_s = sum(r["teacher_ms"] for r in rows) * steps / 1e3
    table_total_s = sum(r["table_ms"] for r in rows) * steps / 1e3 + table_s
    print()
    print(
        f"{args.model} on {args.data} ({len(train_data)} training images), batch "
        f"{TrainConfig().batch_size}, {torch.get_num_threads()} threads, precision {TrainConfig().precision}"
    )
    print(f"{'variant':<12}{'teacher ms/step':>17}{'table ms/step':>15}{'ratio':>8}")
    for r in rows:
        name = f"static-{round(r['ratio'] * 100)}"
        print(
            f"{name:<12}{r['teacher_ms']:>17.1f}{r['table_ms']:>15.1f}"
            f"{r['teacher_ms'] / r['table_ms']:>7.2f}x"
        )
    if gated is not None:
        slim_steps = GateTrainConfig().slim_epochs * steps_per_epoch
        print(
            f"{'gated':<12}{gated['teacher_ms']:>17.1f}{gated['table_ms']:>15.1f}"
            f"{gated['teacher_ms'] / gated['table_ms']:>7.2f}x   (its shared widths: "
            f"{gated['teacher_ms'] * slim_steps / 1e3:.0f} s -> {gated['table_ms'] * slim_steps / 1e3:.0f} s)"
        )
    print(f"table of teacher outputs: {table_s:.1f} s once")
    print(
        f"fine-tuning {len(rows)} variants x {args.epochs:g} epochs: teacher in every step {live_s:.0f} s, "
        f"table {table_total_s:.0f} s (incl. the table): {live_s / table_total_s:.2f}x"
    )
    return {"teacher": live_s, "table": table_total_s}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps per round and way")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (the first is a warm-up)")
    parser.add_argument(
        "--epochs", type=float, default=2.0, help="fine-tuning epochs per variant (projection)"
    )
    parser.add_argument("--gated", action="store_true", help="also time the gated variant's shared widths")
    parser.add_argument("--json", type=Path, default=Path("out/bench-distill-table.json"))
    args = parser.parse_args(argv)

    splits = load_splits(args.data)
    classes, channels = len(splits.class_names), splits.input_shape[1]
    example = torch.zeros(splits.input_shape)
    dense = load_model(args.model, classes=classes, in_channels=channels).eval()
    started = time.perf_counter()
    table = teacher_logits(dense, splits.train, precision=TrainConfig().precision)
    table_s = time.perf_counter() - started
    if table is None:
        raise SystemExit("the teacher's outputs pass the table size limit: nothing to compare")
    calib = (splits.train.x[:64], splits.train.y[:64])
    steps_per_epoch = -(-len(splits.train) // TrainConfig().batch_size)
    epochs = args.steps / steps_per_epoch
    teachers = {"teacher": dense, "table": table}

    def static_step(ratio: float, teacher: torch.nn.Module | torch.Tensor, seed: int, desc: str) -> float:
        model = load_model(args.model, classes=classes, in_channels=channels)
        ratios = {g.root: ratio for g in prunable_groups(model, example)}
        prune(model, example, ratios=ratios, criterion="l1", calibration=calib, source_model=args.model)
        model = model.to(memory_format=torch.channels_last)
        cfg = TrainConfig(epochs=epochs, lr=0.05, seed=seed)
        start = time.perf_counter()
        train(model, splits.train, cfg, teacher=teacher, desc=desc)
        return time.perf_counter() - start

    def gated_step(teacher: torch.nn.Module | torch.Tensor, seed: int) -> float:
        net = SlimNet(copy.deepcopy(dense), example)
        start = time.perf_counter()
        train_slim(net, splits.train, GateTrainConfig(slim_epochs=epochs, seed=seed), teacher=teacher)
        return time.perf_counter() - start

    rows = []
    for ratio in args.ratios:
        name = f"static-{round(ratio * 100)}"
        times = _both_ways(
            lambda way, r, ratio=ratio, name=name: static_step(
                ratio, teachers[way], r, f"{name} {way} round {r + 1}"
            ),
            args.rounds,
            args.steps,
        )
        rows.append({"ratio": ratio, **times})
    gated = (
        _both_ways(lambda way, r: gated_step(teachers[way], r), args.rounds, args.steps)
        if args.gated
        else None
    )
    projected = _print(args, splits.train, rows, gated, table_s=table_s, steps_per_epoch=steps_per_epoch)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": {"cpus": os.cpu_count(), "native_bf16": native_bf16()},
                "table_s": table_s,
                "rows": rows,
                "gated": gated,
                "projected_s": projected,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
