"""Benchmark: bytes on the wire for over-the-air updates, ours vs bsdiff vs zstd --patch-from.

Scenarios (each "new" bundle is a real compiler product, signed with a throw-away key):

(a) fine-tune   every whole-model variant of ``--bundle`` (dense, static; gated segments stay) rebuilt in
                torch from its own files (source model + pruning plan, the weights read from the .onnx
                and .pte; each file must re-export byte-identical before anything else happens),
                fine-tuned once on the bundle's data set (Adam, ``--steps`` steps), then for each of
                ``--bits`` and raw: snapped against each runtime's old weights (``compiler/finetune.py``,
                delta-aware), re-exported to .onnx and .pte with the compiler's exporters and verified
                as the compiler does, re-signed. Rows per runtime: "onnx" and "pte" (what a device of
                that runtime fetches) and "all". Test accuracy before/after is reported per file.
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

RUNTIME_LABEL = {None: "all", "onnx": "onnx", "executorch": "pte"}


def _files(bundle: Path, runtime: str | None = None) -> list[str]:
    m = open_bundle(bundle, public_key=None)
    return [f.path for v in m.variants for f in v.files if runtime is None or f.runtime == runtime]


def _bases(old: Path, new: Path, path: str) -> list[str]:
    om = open_bundle(old, public_key=None)
    nm = open_bundle(new, public_key=None)
    f = next(f for v in nm.variants for f in v.files if f.path == path)
    return _candidates(path, f.runtime, om, f.size_bytes)


def measure(
    old: Path, new: Path, work: Path, *, runtimes: tuple[str | None, ...] = (None,)
) -> list[dict[str, Any]]:
    """Bytes on the wire for old -> new, once per entry of ``runtimes`` (that runtime's files; None: all).

    Each codec runs once over the whole bundle; every row counts the new manifest.json and the whole
    update.json index (a device fetches both) plus the artifacts of its files.
    """
    manifest_bytes = (new / MANIFEST_FILENAME).stat().st_size
    started = time.perf_counter()
    update = make_update(old, new, work / "ours")
    ours_s = time.perf_counter() - started
    index = (work / "ours" / UPDATE_FILENAME).stat().st_size  # every method needs such an index
    patch = make_update(old, new, work / "patch", methods=("unchanged", "patch", "zstd"))
    patch_index = (work / "patch" / UPDATE_FILENAME).stat().st_size
    whole = make_update(old, new, work / "zstd", methods=("unchanged", "zstd"))
    whole_index = (work / "zstd" / UPDATE_FILENAME).stat().st_size
    bsdiff_of: dict[str, int] = {}
    for p in _files(new):
        data = (new / p).read_bytes()
        if update.entry(p).method == "unchanged":  # type: ignore[union-attr]
            bsdiff_of[p] = 0
            continue
        candidates = [bz2.compress(data, 9)]
        for b in _bases(old, new, p):
            candidates.append(bsdiff4.diff((old / b).read_bytes(), data))
        bsdiff_of[p] = min(len(c) for c in candidates)
    rows = []
    for runtime in runtimes:
        paths = _files(new, runtime)
        full = manifest_bytes + sum((new / p).stat().st_size for p in paths)
        ours = update.wire_bytes(paths) + index + manifest_bytes
        zstd_patch = patch.wire_bytes(paths) + patch_index + manifest_bytes
        zstd_whole = whole.wire_bytes(paths) + whole_index + manifest_bytes
        bsdiff = manifest_bytes + index + sum(bsdiff_of[p] for p in paths)
        methods: dict[str, int] = {}
        for f in update.files:
            if f.path in paths:
                methods[f.method] = methods.get(f.method, 0) + 1
        rows.append(
            {
                "files": RUNTIME_LABEL[runtime],
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
        )
    return rows


def onnx_accuracy(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    correct = 0
    for i in range(len(x)):
        logits = session.run(None, {name: x[i : i + 1]})[0]
        correct += int(logits.argmax() == y[i])
    return correct / len(x)


def scenario_finetune(base: Path, work: Path, key: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """(a): every whole-model variant of ``base`` rebuilt in torch from its files (checked byte for byte),
    fine-tuned once, then per grid (and raw) snapped per runtime and re-exported to .onnx and .pte."""
    import torch

    from compiler.data import load_splits
    from compiler.finetune import (
        export_deployed,
        finetune_deployed,
        rebuild_variant,
        resign_bundle,
        snap_weights,
    )
    from compiler.train import evaluate

    manifest = BundleManifest.from_json((base / MANIFEST_FILENAME).read_bytes())
    splits = load_splits(args.data_finetune or manifest.created.dataset)
    train = (splits.train.x, splits.train.y)
    test = splits.test.subset(args.test_samples, seed=3)
    tx, ty = test.x.numpy().astype(np.float32), test.y.numpy()
    checks = torch.cat([torch.randn(8, *manifest.input.shape[1:]), splits.test.x[:8]])
    grids: list[int | None] = [*args.bits, None]
    bundles = {}
    for bits in grids:
        bundles[bits] = work / f"ft-{bits}"
        shutil.copytree(base, bundles[bits])
    accuracy: dict[int | None, dict[str, dict[str, float]]] = {b: {} for b in grids}
    snap_error: dict[int | None, dict[str, float]] = {b: {} for b in grids}
    verified: dict[str, float] = {}
    for v in manifest.variants:
        if v.kind == "gated":  # gated segments are not whole models: left unchanged
            continue
        started = time.perf_counter()
        rebuilt = rebuild_variant(base, v.name, checks=checks, scratch=work / "reexport")
        print(
            f"    {v.name}: rebuilt from its files, re-export byte-identical ({', '.join(rebuilt.files)}) "
            f"in {time.perf_counter() - started:.0f}s",
            flush=True,
        )
        before = {
            "onnx": onnx_accuracy(base / rebuilt.files["onnx"], tx, ty),
            "executorch": evaluate(rebuilt.module(rebuilt.weights["executorch"]), test),
        }
        tuned = finetune_deployed(rebuilt, train, steps=args.steps, lr=args.lr, seed=1)
        for bits in grids:
            for runtime, rel in rebuilt.files.items():
                weights, stats = snap_weights(rebuilt.weights[runtime], tuned, bits=bits)
                path = bundles[bits] / rel
                worst = export_deployed(rebuilt, weights, runtime, path, checks)
                verified[f"{bits}/{rel}"] = worst
                after = (
                    onnx_accuracy(path, tx, ty)
                    if runtime == "onnx"
                    else evaluate(rebuilt.module(weights), test)
                )
                accuracy[bits][f"{v.name} {RUNTIME_LABEL[runtime]}"] = {
                    "before": before[runtime],
                    "after": after,
                }
                snap_error[bits][f"{v.name} {RUNTIME_LABEL[runtime]}"] = stats.relative_error
        print(f"    {v.name}: fine-tuned, snapped, re-exported and verified", flush=True)
    rows = []
    for bits in grids:
        label = (
            "fine-tune, raw (not snapped)" if bits is None else f"fine-tune, snapped {bits}-bit (delta-aware)"
        )
        resign_bundle(bundles[bits], key, bundle_version=f"{manifest.bundle_version}-ft")
        w = work / f"m-ft-{bits}"
        w.mkdir()
        for measured in measure(base, bundles[bits], w, runtimes=("onnx", "executorch", None)):
            every = measured["files"] == "all"
            rows.append(
                {
                    "scenario": f"(a) {label}",
                    **measured,
                    "accuracy": accuracy[bits] if every else {},
                    "snap_relative_error": snap_error[bits] if every else {},
                }
            )
    rows[0]["verified_max_abs_diff"] = verified
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
    if args.finetune_only:
        return base, []
    added = build("c-added", (0.5, 0.75), "1.1.0")
    repruned = build("c-repruned", (0.4, 0.6), "2.0.0")
    rows = []
    for label, new in (("(b) new static variant added", added), ("(c) re-pruned ladder", repruned)):
        w = work / f"m-{new.name}"
        w.mkdir()
        for row in measure(base, new, w, runtimes=(None, "onnx", "executorch")):
            rows.append({"scenario": label, "model": args.model, **row})
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
    parser.add_argument("--skip-compile", action="store_true", help="only scenario (a), on --bundle")
    parser.add_argument(
        "--finetune-only", action="store_true", help="compile only the base, run only scenario (a) on it"
    )
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
        f"{'scenario':<44}{'files':<6}{'full B':>10}{'ours':>9}{'bsdiff':>9}{'zstd-pf':>9}{'zstd':>8}  methods"  # noqa: E501
    )
    for r in rows:
        print(
            f"{r['scenario']:<44}{r['files']:<6}{r['full_bytes']:>10}{r['ours_pct']:>8.1f}%{r['bsdiff_pct']:>8.1f}%"
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
