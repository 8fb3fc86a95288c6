"""Benchmark: test accuracy of the dense model against training epochs, with and without augmentation.

How the compiler's training defaults were chosen (docs/compiler.md, "Training recipe"). For each epoch
count, augmentation setting and seed it trains the model from scratch with the compiler's own
:func:`compiler.train.train` (SGD + Nesterov, one-cycle schedule, label smoothing; everything else at
:class:`compiler.train.TrainConfig`'s defaults) and records the test accuracy and the training time.
On a 2-core CPU one reference epoch takes one to four minutes, so a whole grid belongs on a GPU
(``--device cuda``; the random draws stay on the CPU, so a seed gives the same batches on either).

    python bench/train_recipe.py [--epochs 4,5,6,8,12] [--augment off,on] [--seeds 0,1] [--device cpu]
                                 [--json out/bench-train-recipe.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from compiler.data import TensorData, load_splits
from compiler.models import load_model
from compiler.train import TrainConfig, evaluate, train


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--epochs", type=_floats, default=_floats("4,5,6,8,12"))
    parser.add_argument("--augment", default="off,on", help="off, on, or both (comma-separated)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (where torch trains)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--json", type=Path, default=Path("out/bench-train-recipe.json"))
    args = parser.parse_args(argv)
    augments = [{"off": False, "on": True}[v.strip()] for v in args.augment.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]

    splits = load_splits(args.data)
    device = torch.device(args.device)
    train_data = TensorData(splits.train.x.to(device), splits.train.y.to(device))
    test_data = TensorData(splits.test.x.to(device), splits.test.y.to(device))
    classes, channels = len(splits.class_names), splits.input_shape[1]
    base = TrainConfig(precision=args.precision)
    runs: list[dict[str, Any]] = []
    for epochs in args.epochs:
        for aug in augments:
            for seed in seeds:
                model = load_model(args.model, classes=classes, in_channels=channels).to(device)
                model = model.to(memory_format=torch.channels_last)
                cfg = replace(base, epochs=epochs, augment=aug, seed=seed)
                start = time.perf_counter()
                train(model, train_data, cfg, desc=f"{epochs:g} epochs, augment {aug}, seed {seed}")
                seconds = time.perf_counter() - start
                acc = evaluate(model, test_data)
                runs.append(
                    {"epochs": epochs, "augment": aug, "seed": seed, "accuracy": acc, "seconds": seconds}
                )
                print(
                    f"    {epochs:g} epochs, augment {aug}, seed {seed}: {acc:.2%} in {seconds:.0f}s",
                    flush=True,
                )

    print()
    print(
        f"{args.model} on {args.data}, {args.device}, {args.precision}, batch {base.batch_size}, lr {base.lr}"
    )
    print(f"{'epochs':>6} {'augment':>8} {'accuracy (mean)':>16} {'per seed':>24} {'s per run':>10}")
    table = []
    for epochs in args.epochs:
        for aug in augments:
            rows = [r for r in runs if r["epochs"] == epochs and r["augment"] == aug]
            accs = [r["accuracy"] for r in rows]
            secs = statistics.median(r["seconds"] for r in rows)
            mean = statistics.mean(accs)
            table.append({"epochs": epochs, "augment": aug, "mean_accuracy": mean})
            per_seed = " ".join(f"{a:.2%}" for a in accs)
            print(f"{epochs:6g} {'on' if aug else 'off':>8} {mean:16.2%} {per_seed:>24} {secs:10.0f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "command": " ".join(["python", *sys.argv]) if argv is None else " ".join(argv),
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "torch": torch.__version__,
                },
                "runs": runs,
                "table": table,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
