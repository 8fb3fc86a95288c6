"""Benchmark: training steps per second in float32 and in bf16 autocast, side by side in one process.

The compiler trains the dense model and fine-tunes every variant with :func:`compiler.train.train`; by
default it autocasts to bf16 where the CPU computes bf16 natively (``compiler.train.native_bf16``). This
runs that same loop (augmentation, distillation off, SGD, one-cycle schedule) on the reference model and
the real Fashion-MNIST training split for ``--steps`` steps per round in each precision, alternating,
``--rounds`` times, and reports steps/s and the ratio; the first round of each is a warm-up and dropped.

    python bench/train_precision.py [--steps 150] [--rounds 4] [--json out/bench-train-precision.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from compiler.data import load_splits
from compiler.models import load_model
from compiler.train import TrainConfig, native_bf16, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--steps", type=int, default=150, help="training steps per round and precision")
    parser.add_argument("--rounds", type=int, default=4, help="rounds (the first is a warm-up)")
    parser.add_argument("--json", type=Path, default=Path("out/bench-train-precision.json"))
    args = parser.parse_args(argv)

    splits = load_splits(args.data)
    classes, channels = len(splits.class_names), splits.input_shape[1]
    steps_per_epoch = -(-len(splits.train) // 128)
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        for precision, done in rates.items():
            model = load_model(args.model, classes=classes, in_channels=channels)
            model = model.to(memory_format=torch.channels_last)
            cfg = TrainConfig(epochs=args.steps / steps_per_epoch, precision=precision, seed=r)
            start = time.perf_counter()
            train(model, splits.train, cfg, desc=f"{precision} round {r + 1}")
            rate = args.steps / (time.perf_counter() - start)
            if r > 0:
                done.append(rate)
            print(
                f"    round {r + 1} {precision}: {rate:.2f} steps/s{' (warm-up)' if r == 0 else ''}",
                flush=True,
            )
    fp32, bf16 = (statistics.median(rates[p]) for p in ("fp32", "bf16"))
    print()
    print(
        f"{args.model} on {args.data}, batch 128, {torch.get_num_threads()} threads, "
        f"native bf16: {native_bf16()}"
    )
    print(f"{'precision':10} {'steps/s (median)':>17} {'rounds':>30}")
    for p, values in rates.items():
        print(f"{p:10} {statistics.median(values):17.2f} {' '.join(f'{v:.2f}' for v in values):>30}")
    print(f"bf16 / fp32: {bf16 / fp32:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "native_bf16": native_bf16(),
                },
                "steps_per_s": rates,
                "median": {"fp32": fp32, "bf16": bf16},
                "ratio": bf16 / fp32,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
