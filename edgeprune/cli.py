"""``edgeprune`` console script.

Exit status: 0 success; 1 a domain error, printed as ``TypeName: message`` plus a hint; 2 a usage
error (argparse); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.errors import EdgepruneError, UserError

log = logging.getLogger("edgeprune")

EPILOG = """\
examples:
  edgeprune demo                                 run the end-to-end demo on embedded defaults
  edgeprune data info --split test               check the Fashion-MNIST files and show their classes
  edgeprune contract schema manifest             print the bundle manifest's JSON Schema
  edgeprune contract validate bundle/manifest.json
  edgeprune bundle inspect bundle/ --public-key ~/.config/edgeprune/keys/edgeprune.pub
  edgeprune keys new                             create the Ed25519 signing key pair
  edgeprune compile --model reference --data fashion-mnist --out bundle/
  edgeprune bundle finetune bundle/ --data fashion-mnist --out bundle-1.0.1/ --bundle-version 1.0.1
  edgeprune bundle diff bundle/ bundle-1.0.1/ --out update/   the over-the-air update between them
  edgeprune agent run --bundle bundle/ --broker mqtt://127.0.0.1:1883 --device-id pi-01 --state-dir st/

docs: README.md, docs/architecture.md, docs/protocol.md
"""


def _cmd_demo(args: argparse.Namespace) -> int:
    from edgeprune.demo import run_demo

    run_demo(
        data_root=args.data,
        devices=args.devices,
        fleet=args.fleet,
        out=args.out,
        model=args.model,
        epochs=args.epochs,
        gated=args.gated,
        min_run_s=args.min_run,
    )
    return 0


def _cmd_data_info(args: argparse.Namespace) -> int:
    import numpy as np

    from agent.data import fashion_mnist_dir, load_fashion_mnist

    data = load_fashion_mnist(args.split, root=args.root)
    counts = np.bincount(data.labels, minlength=len(data.class_names))
    print(f"Fashion-MNIST {args.split} split from {fashion_mnist_dir(args.root)}")
    print(
        f"  {len(data)} images of {data.images.shape[1]}x{data.images.shape[2]}, "
        f"pixel mean {data.images.mean():.1f}"
    )
    for name, count in zip(data.class_names, counts, strict=True):
        print(f"  {name:<12} {count:>6}")
    return 0


def _cmd_contract_schema(args: argparse.Namespace) -> int:
    from pydantic import TypeAdapter

    from agent.contract import BundleManifest, Message

    schema = (
        BundleManifest.model_json_schema() if args.what == "manifest" else TypeAdapter(Message).json_schema()
    )
    print(json.dumps(schema, indent=2))
    return 0


def _cmd_contract_validate(args: argparse.Namespace) -> int:
    from agent.contract import BundleManifest, parse_message

    path: Path = args.file
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}", hint="check the path") from exc
    kind = args.kind or ("manifest" if path.name == "manifest.json" else "message")
    if kind == "manifest":
        manifest = BundleManifest.from_json(data)
        print(
            f"ok: manifest of {manifest.model_id} {manifest.bundle_version}, "
            f"{len(manifest.variants)} variant(s), {'signed' if manifest.signature else 'unsigned'}"
        )
    else:
        message = parse_message(data)
        print(f"ok: {message.kind} message from {message.device_id}, seq {message.seq}")
    return 0


def _cmd_bundle_inspect(args: argparse.Namespace) -> int:
    from agent.bundle import file_sha256, open_bundle
    from agent.signing import load_public_key

    key = load_public_key(args.public_key) if args.public_key else None
    m = open_bundle(args.bundle, public_key=key)
    signed = "unsigned" if m.signature is None else f"signed by {m.signature.key_id}"
    checked = "signature verified" if key else "signature NOT checked (no --public-key)"
    print(
        f"{m.model_id} {m.bundle_version}: {len(m.variants)} variant(s), {signed}, {checked}, all files match"
    )
    digest = file_sha256(args.bundle / "manifest.json")
    print(f"manifest.json sha256 {digest} (what UpdateInstruction.manifest_sha256 names)")
    print(
        f"input {m.input.name} {list(m.input.shape)} {m.input.dtype} {m.input.layout}, "
        f"{len(m.input.class_names)} classes; made {m.created.created_at:%Y-%m-%d %H:%M} UTC from "
        f"{m.created.source_model} on {m.created.dataset}"
    )
    head = f"{'variant':<12}{'kind':<8}{'MACs':>9}{'params':>9}{'accuracy':>10}"
    print(f"{head}{'onnx ms':>9}{'pte ms':>9}  files")
    for v in m.variants:
        acc = "-" if v.accuracy is None else f"{100 * v.accuracy:.2f}%"
        lat = [f"{v.latency[rt].median_ms:.3f}" if rt in v.latency else "-" for rt in ("onnx", "executorch")]
        files = ", ".join(f"{f.path} ({f.size_bytes / 1e6:.2f} MB)" for f in v.files)
        size = f"{v.macs / 1e6:>8.2f}M{v.params / 1e3:>8.0f}k"
        print(f"{v.name:<12}{v.kind:<8}{size}{acc:>10}{lat[0]:>9}{lat[1]:>9}  {files}")
    return 0


def _cmd_bundle_diff(args: argparse.Namespace) -> int:
    from agent.delta import make_update

    variants = None if not args.variants else [v for v in args.variants.split(",") if v]
    update = make_update(args.old, args.new, args.out, variants=variants)
    print(f"{update.model_id} {update.from_version} -> {update.to_version}: update written to {args.out}")
    print(f"{'file':<28}{'method':<11}{'base':<24}{'full bytes':>12}{'wire bytes':>12}{'ratio':>8}")
    for f in update.files:
        base = f.base_path or "-"
        ratio = f.artifact_size / f.target_size if f.target_size else 0.0
        print(f"{f.path:<28}{f.method:<11}{base:<24}{f.target_size:>12}{f.artifact_size:>12}{ratio:>8.1%}")
    wire = update.wire_bytes() + (args.out / "update.json").stat().st_size
    print(
        f"total: {wire} bytes on the wire (artifacts + update.json) vs {update.full_bytes} for the full new "
        f"bundle = {wire / update.full_bytes:.1%}"
    )
    return 0


def _cmd_bundle_pack(args: argparse.Namespace) -> int:
    from agent.bundle import pack_bundle

    path = pack_bundle(args.bundle, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def _cmd_bundle_finetune(args: argparse.Namespace) -> int:
    from compiler.finetune import finetune_bundle

    if not 0 <= args.bits <= 8:
        raise SystemExit("edgeprune bundle finetune: --bits must be 0 (not snapped) or 1-8")
    print(f"==> fine-tuning the variants of {args.old} on {args.data} ({args.steps} steps each)", flush=True)
    finetune_bundle(
        args.old,
        args.out,
        data=args.data,
        key=args.key,
        bundle_version=args.bundle_version,
        steps=args.steps,
        lr=args.lr,
        bits=args.bits or None,
    )
    print(f"==> wrote {args.out}; the update: edgeprune bundle diff {args.old} {args.out} --out UPDATE")
    return 0


def _cmd_bundle_unpack(args: argparse.Namespace) -> int:
    from agent.bundle import unpack_bundle
    from agent.signing import load_public_key

    key = load_public_key(args.public_key) if args.public_key else None
    m = unpack_bundle(args.archive, args.out, public_key=key)
    print(f"unpacked {m.model_id} {m.bundle_version} into {args.out}")
    return 0


def _add_bundle_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    bundle = sub.add_parser("bundle", help="inspect, diff, pack and unpack bundles")
    bundle_sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    inspect = bundle_sub.add_parser("inspect", help="check every file of a bundle and show its variants")
    inspect.add_argument("bundle", type=Path)
    inspect.add_argument(
        "--public-key", type=Path, default=None, help="also verify the signature with this key"
    )
    inspect.set_defaults(func=_cmd_bundle_inspect)
    diff = bundle_sub.add_parser(
        "diff",
        help="write the update artifact that turns bundle OLD into NEW; print bytes per file",
        description="Per file of NEW: unchanged, whole-file zstd, zstd against an OLD file (like "
        "--patch-from), XOR of same-size files, or the float grid delta, whichever is smallest.",
    )
    diff.add_argument("old", type=Path)
    diff.add_argument("new", type=Path)
    diff.add_argument("--out", type=Path, required=True, help="directory for update.json and files/")
    diff.add_argument(
        "--variants", default="", help="comma-separated variants of NEW to include (default all)"
    )
    diff.set_defaults(func=_cmd_bundle_diff)
    finetune = bundle_sub.add_parser(
        "finetune",
        help="fine-tune a bundle's variants into a new version that ships as a small update",
        description="Fine-tune every whole-model variant of bundle OLD on --data and write the new version "
        "to --out, signed: each variant is rebuilt from its own files, fine-tuned with Adam, snapped to a "
        "--bits grid around its old weights (so `edgeprune bundle diff OLD NEW` ships it as a few bits per "
        "weight; --bits 0: not snapped) and exported to .onnx and .pte again, verified as a compile does. "
        "Gated variants are copied unchanged. Check the accuracy it prints before rolling it out.",
    )
    finetune.add_argument("old", type=Path)
    finetune.add_argument("--data", required=True, help="data set, as for `edgeprune compile --data`")
    finetune.add_argument("--out", type=Path, required=True, help="new bundle directory (must not exist)")
    finetune.add_argument("--bundle-version", required=True, help="version of the new bundle")
    finetune.add_argument("--steps", type=int, default=200, help="Adam steps per variant (default 200)")
    finetune.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    finetune.add_argument(
        "--bits", type=int, default=6, help="grid bits for the weight changes (default 6; 0: not snapped)"
    )
    from compiler.cli import DEFAULT_KEY  # argparse only, as build_parser's own import below

    finetune.add_argument(
        "--key", type=Path, default=DEFAULT_KEY, help=f"Ed25519 private key (default {DEFAULT_KEY})"
    )
    finetune.set_defaults(func=_cmd_bundle_finetune)
    pack = bundle_sub.add_parser("pack", help="write a bundle directory as one .tar file")
    pack.add_argument("bundle", type=Path)
    pack.add_argument("--out", type=Path, required=True)
    pack.set_defaults(func=_cmd_bundle_pack)
    unpack = bundle_sub.add_parser("unpack", help="extract and check a bundle .tar file")
    unpack.add_argument("archive", type=Path)
    unpack.add_argument("--out", type=Path, required=True)
    unpack.add_argument("--public-key", type=Path, default=None)
    unpack.set_defaults(func=_cmd_bundle_unpack)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Compile PyTorch models into adaptive, signed bundles; run them on edge devices; "
        "manage the fleet.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo",
        help="run the end-to-end demo on embedded defaults",
        description="Run the whole product on this machine: compile (or reuse) the reference bundle and make "
        "a second version of it; start a private Mosquitto and the fleet manager (dashboard URL printed); "
        "run a simulated fleet of mixed device profiles whose batteries drain, so each agent steps down its "
        "variants; roll the new version out in stages behind health gates (shipped as a delta); print a "
        "summary and write plots under --out. Ctrl-C stops everything cleanly.",
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="Fashion-MNIST directory (default: $EDGEPRUNE_FASHION_MNIST_DIR or the Debian path)",
    )
    demo.add_argument("--devices", type=int, default=8, help="simulated devices (default 8)")
    demo.add_argument("--fleet", default="demo", help="fleet id (default 'demo')")
    demo.add_argument(
        "--out", type=Path, default=Path("out/demo"), help="bundles, keys, fleet database and plots go here"
    )
    demo.add_argument("--model", default="reference", help="model to compile (default reference)")
    demo.add_argument("--epochs", type=float, default=None, help="dense training epochs (default 5)")
    demo.add_argument(
        "--gated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the input-dependent gated variant too (default: yes for the reference model, "
        "which has gates; --no-gated halves the first run's compile)",
    )
    demo.add_argument(
        "--min-run",
        type=float,
        default=40.0,
        metavar="SECONDS",
        help="keep the fleet running at least this long, so batteries drain and variants change (default 40)",
    )
    demo.set_defaults(func=_cmd_demo)

    data = sub.add_parser("data", help="inspect reference data")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    info = data_sub.add_parser("info", help="load a Fashion-MNIST split and show its classes")
    info.add_argument("--split", choices=("train", "test"), default="test")
    info.add_argument("--root", type=Path, default=None, help="directory of the IDX files")
    info.set_defaults(func=_cmd_data_info)

    contract = sub.add_parser("contract", help="the manifest and message schemas")
    contract_sub = contract.add_subparsers(dest="contract_command", required=True, metavar="ACTION")
    schema = contract_sub.add_parser("schema", help="print a JSON Schema")
    schema.add_argument("what", choices=("manifest", "message"))
    schema.set_defaults(func=_cmd_contract_schema)
    validate = contract_sub.add_parser("validate", help="validate a manifest or message JSON file")
    validate.add_argument("file", type=Path)
    validate.add_argument(
        "--kind",
        choices=("manifest", "message"),
        default=None,
        help="default: manifest for manifest.json, message otherwise",
    )
    validate.set_defaults(func=_cmd_contract_validate)

    _add_bundle_parser(sub)

    from agent.cli import add_agent_parser
    from compiler.cli import add_compile_parser, add_keys_parser
    from devices.cli import add_devices_parser
    from fleet.cli import add_fleet_parser

    for add in (add_compile_parser, add_keys_parser, add_agent_parser, add_fleet_parser, add_devices_parser):
        add(sub)

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except EdgepruneError as exc:
        print(f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
