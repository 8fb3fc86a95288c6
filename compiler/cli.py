"""Argument parsing for ``edgeprune compile`` and ``edgeprune keys`` (wired up by :mod:`edgeprune.cli`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["DEFAULT_KEY", "add_compile_parser", "add_keys_parser"]

DEFAULT_KEY = Path(
    os.environ.get("EDGEPRUNE_KEY", Path.home() / ".config" / "edgeprune" / "keys" / "edgeprune.key")
)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ratios takes comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("--ratios needs at least one value")
    return values


def add_compile_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "compile",
        help="compile a model into a signed bundle of pruned variants",
        description="Train (or reuse) the dense model, prune a ladder of static variants, fine-tune them "
        "with distillation, export each to ExecuTorch (.pte, XNNPACK) and ONNX, verify every file against "
        "eager, measure, sign and write the bundle.",
        epilog="examples:\n"
        "  edgeprune keys new\n"
        "  edgeprune compile --model reference --data fashion-mnist --out bundle/\n"
        "  edgeprune compile --model mypkg.nets:small --data data.npz --ratios 0.3,0.6 \\\n"
        "      --criterion taylor --out b/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default="reference", help="'reference' or package.module:factory (default reference)"
    )
    p.add_argument(
        "--data",
        default="fashion-mnist",
        help="'fashion-mnist', an IDX directory, an .npz file or an image folder (default fashion-mnist)",
    )
    p.add_argument(
        "--out", type=Path, required=True, help="bundle directory to write (must not exist, or --force)"
    )
    p.add_argument(
        "--key", type=Path, default=DEFAULT_KEY, help=f"Ed25519 private key (default {DEFAULT_KEY})"
    )
    p.add_argument(
        "--ratios",
        type=_ratios,
        default=(0.25, 0.5, 0.75),
        help="fractions of channels to remove, one static variant each (default 0.25,0.5,0.75)",
    )
    p.add_argument("--criterion", default="l1", help="l1, l2, bn, taylor or activation (default l1)")
    p.add_argument(
        "--uniform",
        action="store_true",
        help="the same ratio for every layer instead of per-layer ratios from a sensitivity scan",
    )
    p.add_argument(
        "--max-drop",
        type=float,
        default=0.05,
        help="scan accuracy loss past which a layer group is cut only after all others (default 0.05)",
    )
    p.add_argument("--epochs", type=float, default=None, help="dense training epochs (default 5)")
    p.add_argument(
        "--finetune-epochs", type=float, default=2.0, help="fine-tuning epochs per variant (default 2)"
    )
    p.add_argument(
        "--iterations",
        type=int,
        default=2,
        help="prune -> fine-tune rounds per variant, rescoring channels each round (default 2)",
    )
    p.add_argument(
        "--align-channels",
        type=int,
        default=8,
        help="keep each pruned layer's channel count a multiple of this (default 8; 1 = exact ratios)",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=0.0,
        help="zero this fraction of weights in static variants: smaller OTA downloads, no speed-up",
    )
    p.add_argument(
        "--gated",
        action="store_true",
        help="add the input-dependent gated variant (a budget knob the agent turns at run time)",
    )
    p.add_argument(
        "--slim-epochs", type=float, default=2.0, help="gated: epochs training the shared widths (default 2)"
    )
    p.add_argument(
        "--gate-epochs", type=float, default=1.0, help="gated: epochs training the gates (default 1)"
    )
    p.add_argument("--model-id", default="fmnist-resnet")
    p.add_argument("--bundle-version", default="1.0.0")
    p.add_argument("--latency-runs", type=int, default=600)
    p.add_argument(
        "--threads", type=int, default=1, help="runtime threads for latency measurement (default 1)"
    )
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="training compute type: auto = bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX, "
        "~1.6x faster), else fp32; weights and exported files are float32 either way",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="train with random shifts and horizontal flips (off by default: they cost the reference "
        "model about a point on Fashion-MNIST; use them where they keep the label, e.g. natural photos)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_run_compile)


def _run_compile(args: argparse.Namespace) -> int:
    from compiler.gating.train import GateTrainConfig
    from compiler.pipeline import CompileOptions, compile_bundle
    from compiler.train import TrainConfig

    precision = {} if args.precision == "auto" else {"precision": args.precision}
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    train = TrainConfig(**precision, **epochs, augment=args.augment, seed=args.seed)
    opts = CompileOptions(
        out=args.out,
        key=args.key,
        model=args.model,
        data=args.data,
        ratios=args.ratios,
        criterion=args.criterion,
        auto=not args.uniform,
        max_drop=args.max_drop,
        train=train,
        finetune_epochs=args.finetune_epochs,
        iterations=args.iterations,
        align_channels=args.align_channels,
        sparsity=args.sparsity,
        model_id=args.model_id,
        bundle_version=args.bundle_version,
        latency_runs=args.latency_runs,
        threads=args.threads,
        gated=args.gated,
        gate=GateTrainConfig(
            **precision,
            slim_epochs=args.slim_epochs,
            gate_epochs=args.gate_epochs,
            augment=args.augment,
            seed=args.seed,
        ),
        force=args.force,
    )
    result = compile_bundle(opts)
    print(f"report: {result.out / 'report' / 'report.md'}")
    return 0


def add_keys_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("keys", help="manage Ed25519 signing keys")
    ks = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    new = ks.add_parser("new", help="create a key pair (private .key mode 0600, public .pub)")
    new.add_argument("--dir", type=Path, default=DEFAULT_KEY.parent)
    new.add_argument("--name", default="edgeprune")
    new.add_argument("--force", action="store_true", help="overwrite an existing key pair")
    new.set_defaults(func=_run_keys_new)


def _run_keys_new(args: argparse.Namespace) -> int:
    from agent.signing import generate_keys

    pair = generate_keys(args.dir, name=args.name, overwrite=args.force)
    print(f"private key: {pair.private}\npublic key:  {pair.public}\nkey id:      {pair.key_id}")
    return 0
