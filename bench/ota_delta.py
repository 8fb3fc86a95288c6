"""Benchmark: bytes on the wire for over-the-air updates, ours vs bsdiff vs zstd --patch-from.

Scenarios (each "new" bundle is a real compiler product, signed with a throw-away key):

(a) fine-tune   every .onnx file of ``--bundle`` fine-tuned on the bundle's data set (Adam, ``--steps``
                steps, directly on the exported graph: same architecture, same layout), once snapped
                to a 4-bit grid per tensor (``compiler/finetune.py``, delta-aware) and once raw.
                Accuracy before/after on the test split is reported. .pte files are not fine-tuned
                (no pte writer here): the (a) rows count the onnx files, what an onnx device fetches.
(b) new variant a bundle compiled with ``compile_bundle`` (ratios 0.5) vs the same compile with one more
                static variant (ratios 0.5, 0.75), same cached dense checkpoint.
(c) re-pruned   the same base vs a compile with another ladder (ratios 0.4, 0.6).
(b) and (c) use ``--model``/``--data`` (default: ``tests.tiny_models:small_reference``, the reference
architecture at 1/4 width, on the in-code fixture) because they need the torch model. Without
``--bundle``, (a) fine-tunes the base compiled for (b).

Per scenario: the full new bundle's bytes (files + manifest.json), and what goes on the wire (new
manifest.json + an update.json index + the artifacts) with our codec (``agent.delta.make_update``, every
method), with bsdiff4 per file (same path, else the nearest old file of the same runtime, else bz2 of
the file: bsdiff4 is bz2-based), with zstd --patch-from (python-zstandard, the old file as raw-content
dictionary, level 19) per file, and with plain zstd -19 per changed file.

    python -m bench.ota_delta [--bundle out/reference/bundle] [--steps 200] [--json out/bench-ota.json]
"""

from __future__ import annotations

import argparse
import bz2
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bsdiff4
import numpy as np
import onnxruntime as ort

from agent.bundle import open_bundle
from agent.contract import MANIFEST_FILENAME, BundleManifest
from agent.delta import UPDATE_FILENAME, _candidates, make_update
from agent.signing import generate_keys


def _files(bundle: Path, runtime: str | None = None) -> list[str]:
    m = open_bundle(bundle, public_key=None)
    return [f.path for v in m.variants for f in v.files if runtime is None or f.runtime == runtime]


def _bases(old: Path, new: Path, path: str) -> list[str]:
    om = open_bundle(old, public_key=None)
    nm = open_bundle(new, public_key=None)
    f = next(f for v in nm.variants for f in v.files if f.path == path)
    return _candidates(path, f.runtime, om, f.size_bytes)


def measure(old: Path, new: Path, work: Path, *, runtime: str | None = None) -> dict[str, Any]:
    """Bytes on the wire for old -> new, restricted to ``runtime``'s files if given."""
    paths = _files(new, runtime)
    manifest_bytes = (new / MANIFEST_FILENAME).stat().st_size
    full = manifest_bytes + sum((new / p).stat().st_size for p in paths)
    started = time.perf_counter()
    update = make_update(old, new, work / "ours")
    ours_s = time.perf_counter() - started
    ours = update.wire_bytes(paths) + (work / "ours" / UPDATE_FILENAME).stat().st_size + manifest_bytes
    patch = make_update(old, new, work / "patch", methods=("unchanged", "patch", "zstd"))
    index = (work / "ours" / UPDATE_FILENAME).stat().st_size  # every method needs such an index
    zstd_patch = patch.wire_bytes(paths) + manifest_bytes + (work / "patch" / UPDATE_FILENAME).stat().st_size
    whole = make_update(old, new, work / "zstd", methods=("unchanged", "zstd"))
    zstd_whole = whole.wire_bytes(paths) + manifest_bytes + (work / "zstd" / UPDATE_FILENAME).stat().st_size
    bsdiff = manifest_bytes + index
    for p in paths:
        data = (new / p).read_bytes()
        candidates = [bz2.compress(data, 9)]
        for b in _bases(old, new, p):
            candidates.append(bsdiff4.diff((old / b).read_bytes(), data))
        bsdiff += min(len(c) for c in candidates)
    methods: dict[str, int] = {}
    for f in update.files:
        if f.path in paths:
            methods[f.method] = methods.get(f.method, 0) + 1
    return {
        "full_bytes": full,
        "ours_bytes": ours,
        "bsdiff_bytes": bsdiff,
        "zstd_patch_from_bytes": zstd_patch,
        "zstd_whole_bytes": zstd_whole,
        "ours_pct": 100 * ours / full,
        "bsdiff_pct": 100 * bsdiff / full,
        "zstd_patch_from_pct": 100 * zstd_patch / full,
        "zstd_whole_pct": 100 * zstd_whole / full,
        "methods": methods,
        "make_update_s": ours_s,
    }


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(len(x)):
        logits = session.run(None, {name: x[i : i + 1]})[0]
        correct += int(logits.argmax() == y[i])
    return correct / len(x)


def scenario_finetune(base: Path, work: Path, key: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    from compiler.data import load_splits
    from compiler.finetune import finetune_onnx, resign_bundle

    manifest = BundleManifest.from_json((base / MANIFEST_FILENAME).read_bytes())
    splits = load_splits(args.data_finetune or manifest.created.dataset)
    train = (splits.train.x, splits.train.y)
    test = splits.test.subset(args.test_samples, seed=3)
    tx, ty = test.x.numpy().astype(np.float32), test.y.numpy()
    rows = []
    variants: list[tuple[str, int | None]] = [
        (f"fine-tune, snapped {b}-bit (delta-aware)", b) for b in args.bits
    ]
    for label, bits in [*variants, ("fine-tune, raw", None)]:
        new = work / f"ft-{bits}"
        shutil.copytree(base, new)
        accuracy: dict[str, tuple[float, float]] = {}
        for v in manifest.variants:
            f = v.file_for("onnx")
            if f is None or v.kind == "gated":  # gated segments are not whole models: left unchanged
                continue
            before = onnx_accuracy(base / f.path, tx, ty)
            finetune_onnx(base / f.path, new / f.path, train, steps=args.steps, lr=args.lr, bits=bits, seed=1)
            accuracy[v.name] = (before, onnx_accuracy(new / f.path, tx, ty))
        resign_bundle(new, key, bundle_version=f"{manifest.bundle_version}-ft")
        w = work / f"m-ft-{bits}"
        w.mkdir()
        row = {"scenario": f"(a) {label}", "files": "onnx", **measure(base, new, w, runtime="onnx")}
        row["accuracy"] = {k: {"before": a, "after": b} for k, (a, b) in accuracy.items()}
        rows.append(row)
    return rows


def scenario_compile(work: Path, key: Path, args: argparse.Namespace) -> tuple[Path, list[dict[str, Any]]]:
    import os

    from agent.data import make_fixture
    from compiler.pipeline import CompileOptions, compile_bundle
    from compiler.train import TrainConfig

    data = args.data
    if data is None:
        fx = make_fixture(n=600, seed=0)
        data = str(work / "fixture.npz")
        np.savez(
            data,
            x_train=fx.images[:500],
            y_train=fx.labels[:500],
            x_test=fx.images[500:],
            y_test=fx.labels[500:],
            class_names=np.array(fx.class_names),
        )
        os.environ.setdefault("EDGEPRUNE_CACHE", str(work / "cache"))  # the tiny model: a private cache

    def build(name: str, ratios: tuple[float, ...], version: str) -> Path:
        opts = CompileOptions(
            out=work / name,
            key=key,
            model=args.model,
            data=data,
            ratios=ratios,
            bundle_version=version,
            train=TrainConfig(epochs=args.train_epochs, batch_size=64, lr=0.1),
            finetune_epochs=1,
            latency_runs=20,
            calibration_samples=64,
            validation_samples=100,
            verify_samples=4,
        )
        return compile_bundle(opts).out

    base = build("c-base", (0.5,), "1.0.0")
    added = build("c-added", (0.5, 0.75), "1.1.0")
    repruned = build("c-repruned", (0.4, 0.6), "2.0.0")
    rows = []
    for label, new in (("(b) new static variant added", added), ("(c) re-pruned ladder", repruned)):
        for runtime in (None, "onnx"):
            w = work / f"m-{new.name}-{runtime}"
            w.mkdir()
            rows.append(
                {
                    "scenario": label,
                    "files": runtime or "all",
                    "model": args.model,
                    **measure(base, new, w, runtime=runtime),
                }
            )
    return base, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--bundle", type=Path, default=None, help="base bundle for (a) (default: the base compiled for (b))"
    )
    parser.add_argument("--data-finetune", default=None, help="data set for (a) (default: the bundle's)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 6], help="snapping grids for (a)")
    parser.add_argument("--test-samples", type=int, default=1000)
    parser.add_argument("--model", default="tests.tiny_models:small_reference", help="model for (b) and (c)")
    parser.add_argument("--data", default=None, help="data for (b) and (c) (default: in-code fixture)")
    parser.add_argument("--train-epochs", type=float, default=2.0)
    parser.add_argument("--skip-compile", action="store_true", help="only scenario (a)")
    parser.add_argument("--json", type=Path, default=Path("out/bench-ota.json"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ota-bench-") as tmp:
        work = Path(tmp)
        keys = generate_keys(work / "keys")
        rows: list[dict[str, Any]] = []
        compiled_base = None
        if not args.skip_compile:
            compiled_base, rows = scenario_compile(work, keys.private, args)
        base = args.bundle or compiled_base
        if base is None:
            parser.error("--skip-compile needs --bundle")
        rows = scenario_finetune(base, work, keys.private, args) + rows

    print()
    print(
        f"{'scenario':<42}{'files':<6}{'full B':>10}{'ours':>9}{'bsdiff':>9}{'zstd-pf':>9}{'zstd':>8}  methods"  # noqa: E501
    )
    for r in rows:
        print(
            f"{r['scenario']:<42}{r['files']:<6}{r['full_bytes']:>10}{r['ours_pct']:>8.1f}%{r['bsdiff_pct']:>8.1f}%"
            f"{r['zstd_patch_from_pct']:>8.1f}%{r['zstd_whole_pct']:>7.1f}%  {r['methods']}"
        )
        for variant, acc in r.get("accuracy", {}).items():
            print(f"    {variant}: test accuracy {100 * acc['before']:.2f}% -> {100 * acc['after']:.2f}%")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {"bundle": str(args.bundle), "model": args.model, "steps": args.steps, "rows": rows}, indent=1
        )
    )
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
