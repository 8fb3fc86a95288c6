"""Delta-aware fine-tuning helpers: make an update cheap to ship before it is shipped.

A fine-tune changes every weight a little, so an update of a fine-tuned bundle is, byte for byte, almost a
new file. :func:`snap_to_grid` moves each new weight tensor onto ``old + k * scale`` with a small integer
``k`` (``bits`` bits, signed) and a power-of-two ``scale`` per tensor, so the device-side ``grid`` codec
(:mod:`agent.delta`) reproduces it exactly from about ``bits`` bits per weight before zstd. The cost is a
rounding of the fine-tune's deltas: measure accuracy after snapping (the benchmark does). The default,
6 bits, cost 0.4 points on the reference architecture where 4 bits cost 15 (docs/ota.md).

A real fine-tune goes through torch and both runtimes: :func:`rebuild_variant` rebuilds a bundle variant in
its deployed form (BatchNorms folded, as both exporters fold them) with the exact weights of its .onnx and
.pte (each re-exports byte-identical), :func:`finetune_deployed` fine-tunes it, :func:`snap_weights` snaps
against each runtime's old weights, :func:`export_deployed` re-exports and verifies with the compiler's
exporters, :func:`resign_bundle` re-hashes the bundle's files and signs it as a new version (docs/ota.md).
:func:`snap_onnx` / :func:`perturb_onnx` work on one .onnx file (tests, the demo).

>>> new = snap_to_grid(old_weights, tuned_weights, bits=4)  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.bundle import file_sha256
from agent.contract import MANIFEST_FILENAME, BundleManifest
from agent.signing import load_private_key, sign_manifest

__all__ = [
    "FinetunedVariant",
    "RebuiltVariant",
    "SnapStats",
    "batchnorm_pairs",
    "export_deployed",
    "finetune_bundle",
    "finetune_deployed",
    "perturb_onnx",
    "rebuild_model",
    "rebuild_variant",
    "resign_bundle",
    "snap_onnx",
    "snap_to_grid",
    "snap_weights",
    "weights_from_onnx",
    "weights_from_pte",
]


@dataclass(frozen=True)
class SnapStats:
    """What snapping touched: tensors, weights, and sum |error| / sum |delta| of the fine-tune."""

    tensors: int
    weights: int
    relative_error: float


def snap_to_grid(old: np.ndarray, new: np.ndarray, *, bits: int = 6) -> np.ndarray:
    """``new`` moved to ``old + k * 2**e`` (float32 arithmetic, the device's), ``|k| < 2**(bits-1)``.

    >>> snap_to_grid(np.zeros(3, np.float32), np.array([0.1, -0.05, 0.0], np.float32), bits=4).tolist()
    [0.09375, -0.046875, 0.0]
    """
    old32 = np.asarray(old, np.float32)
    delta = np.asarray(new, np.float64) - old32
    levels = 2 ** (bits - 1) - 1
    top = float(np.abs(delta).max(initial=0.0))
    if top == 0.0 or not np.isfinite(top):
        return np.asarray(new, np.float32).copy()
    scale = np.float32(2.0 ** np.ceil(np.log2(top / levels)))
    k = np.clip(np.rint(delta / scale), -levels, levels).astype(np.float32)
    return (old32 + k * scale).astype(np.float32)


def snap_onnx(old: Path, new: Path, out: Path, *, bits: int = 6) -> SnapStats:
    """Write ``new`` with each float32 initializer snapped against the same-named one of ``old``."""
    import onnx
    from onnx import numpy_helper

    old_model = onnx.load(str(old))
    new_model = onnx.load(str(new))
    before = {i.name: numpy_helper.to_array(i) for i in old_model.graph.initializer}
    tensors = weights = 0
    err = mag = 0.0
    for init in new_model.graph.initializer:
        ref = before.get(init.name)
        arr = numpy_helper.to_array(init)
        if ref is None or ref.shape != arr.shape or arr.dtype != np.float32 or arr.size < 2:
            continue
        snapped = snap_to_grid(ref, arr, bits=bits)
        err += float(np.abs(snapped - arr).sum())
        mag += float(np.abs(arr - ref).sum())
        tensors += 1
        weights += arr.size
        init.CopyFrom(numpy_helper.from_array(snapped, init.name))
    onnx.save(new_model, str(out))
    return SnapStats(tensors=tensors, weights=weights, relative_error=err / mag if mag else 0.0)


def perturb_onnx(path: Path, out: Path, *, seed: int, relative: float = 0.01, bits: int | None = 4) -> int:
    """A synthetic fine-tune for tests: every float32 initializer moves by N(0, relative * its std),
    snapped to the grid when ``bits`` is set. Returns the number of weights changed."""
    import onnx
    from onnx import numpy_helper

    rng = np.random.default_rng(seed)
    model = onnx.load(str(path))
    changed = 0
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype != np.float32 or arr.size < 2:
            continue
        tuned = (arr + rng.normal(0, relative * (float(arr.std()) or 1e-3), arr.shape)).astype(np.float32)
        if bits is not None:
            tuned = snap_to_grid(arr, tuned, bits=bits)
        init.CopyFrom(numpy_helper.from_array(tuned, init.name))
        changed += arr.size
    onnx.save(model, str(out))
    return changed


def resign_bundle(directory: Path, key: Path, *, bundle_version: str | None = None) -> BundleManifest:
    """Re-hash every listed file of ``directory`` (after files were replaced), set ``bundle_version``,
    sign with ``key`` and rewrite ``manifest.json``."""
    manifest = BundleManifest.from_json((directory / MANIFEST_FILENAME).read_bytes())
    variants = []
    for v in manifest.variants:
        files = tuple(
            f.model_copy(
                update={
                    "sha256": file_sha256(directory / f.path),
                    "size_bytes": (directory / f.path).stat().st_size,
                }
            )
            for f in v.files
        )
        variants.append(v.model_copy(update={"files": files}))
    update: dict[str, object] = {"variants": tuple(variants), "signature": None}
    if bundle_version is not None:
        update["bundle_version"] = bundle_version
    signed = sign_manifest(manifest.model_copy(update=update), load_private_key(key))
    (directory / MANIFEST_FILENAME).write_text(signed.model_dump_json(indent=1))
    return signed


# ---- fine-tuning a variant in torch and re-exporting it -------------------------------------------
#
# What a bundle file holds is not the torch state_dict: both exporters fold every BatchNorm into the
# convolution before it (onnxscript's optimizer for .onnx, ExecuTorch's XNNPACK pass with
# torch.nn.utils.fusion.fuse_conv_bn_weights for .pte), each with its own float32 arithmetic, so the two
# files of one variant carry folded weights that differ in the last bits, and the .pte stores them
# transposed (OHWI; IHWO for a single-input-channel conv). Snapping torch parameters therefore does not
# put the *file* on the grid: the fold multiplies every delta by gamma / sqrt(var + eps).
#
# So a variant is rebuilt in its *deployed form*: the same architecture (the source model, the pruning
# plan replayed), each conv holding its folded weight and each BatchNorm reduced to an exact identity plus
# the folded bias (gamma 1, mean 0, var + eps == 1 in float32: both folds then reproduce their input bit
# for bit). Loaded with the weights read from a runtime's old file, it re-exports that file byte for byte
# (checked); fine-tuned (BatchNorm frozen: the folded weights and biases are what trains) and snapped
# against each runtime's old weights, it exports files whose weights are exactly ``old + k * 2**e``.


_PERMS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (0, 2, 3, 1), (1, 2, 3, 0), (2, 3, 1, 0))


def batchnorm_pairs(model: Any) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names where a BatchNorm2d directly follows a bias-free Conv2d (torch.fx).

    Raises ``NotImplementedError`` for a BatchNorm that follows anything else (not foldable this way).
    """
    import torch
    from torch import nn

    mods = dict(model.named_modules())
    graph = torch.fx.symbolic_trace(model).graph
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(mods[node.target], nn.BatchNorm2d):
            continue
        src = node.args[0]
        conv = mods.get(src.target) if getattr(src, "op", None) == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or conv.bias is not None or len(src.users) != 1:
            raise NotImplementedError(
                f"{node.target}: only a BatchNorm2d right after a bias-free Conv2d folds"
            )
        pairs.append((str(src.target), str(node.target)))
    return pairs


def _identity_var(eps: float) -> float:
    """A running_var with float32(var) + float32(eps) == 1 exactly (the BatchNorm is then a pure bias)."""
    one, e = np.float32(1.0), np.float32(eps)
    v = one - e
    for cand in (v, np.nextafter(v, one), np.nextafter(v, np.float32(0))):
        if np.float32(cand) + e == one:
            return float(cand)
    raise ValueError(f"no float32 running_var makes var + {eps} == 1")


@dataclass
class RebuiltVariant:
    """A bundle variant as a torch model in deployed form plus the exact weights each of its files holds.

    ``weights[runtime]`` maps deployed parameter names (``conv.weight`` = folded weight, ``bn.bias`` =
    folded bias, every other parameter by its own name) to float32 arrays in torch layout.
    """

    name: str
    model: Any
    pairs: list[tuple[str, str]]
    example: Any
    files: dict[str, str]
    weights: dict[str, dict[str, np.ndarray]]
    batch_counts: list[int] = field(default_factory=list)

    def trainable(self) -> list[str]:
        """Deployed parameter names: what a fine-tune changes and what snapping moves onto the grid."""
        return list(self.weights["onnx"])

    def module(self, weights: dict[str, np.ndarray]) -> Any:
        """A copy of the model in deployed form carrying ``weights``."""
        import copy

        import torch
        from torch import nn

        model = copy.deepcopy(self.model).to(memory_format=torch.contiguous_format).eval()
        mods = dict(model.named_modules())
        params = dict(model.named_parameters())
        with torch.no_grad():
            for _, bn_name in self.pairs:
                bn = mods[bn_name]
                bn.weight.fill_(1.0)
                bn.running_mean.zero_()
                bn.running_var.fill_(_identity_var(bn.eps))
            counters = [m.num_batches_tracked for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
            counts = self.batch_counts
            if len(set(counts)) == 1:
                counts = counts[:1] * len(counters)
            if counts and len(counts) != len(counters):
                raise ValueError(
                    f"{len(counts)} BatchNorm counters in the .pte, {len(counters)} in the model"
                )
            for counter, count in zip(counters, counts, strict=False):
                counter.fill_(count)
            for name, arr in weights.items():
                params[name].copy_(torch.from_numpy(np.ascontiguousarray(arr, np.float32)))
        return model


def rebuild_model(manifest: BundleManifest, bundle: Path, variant: str) -> Any:
    """The torch structure of ``variant``: the source model, with the variant's pruning plan replayed."""
    from compiler.models import load_model
    from compiler.prune.plan import PruningPlan
    from compiler.prune.static import replay

    v = next(x for x in manifest.variants if x.name == variant)
    shape = manifest.input.shape
    model = load_model(
        manifest.created.source_model, classes=len(manifest.input.class_names), in_channels=shape[1]
    )
    if v.plan is not None:
        replay(model, PruningPlan.model_validate_json((bundle / v.plan).read_text()))
    return model.eval()


def _deployed_names(model: Any, pairs: list[tuple[str, str]]) -> list[str]:
    paired = {m for pair in pairs for m in pair}
    names = []
    for conv, bn in pairs:
        names += [f"{conv}.weight", f"{bn}.bias"]
    for name, _ in model.named_parameters():
        if name.rpartition(".")[0] not in paired:
            names.append(name)
    return names


def weights_from_onnx(model: Any, pairs: list[tuple[str, str]], path: Path) -> dict[str, np.ndarray]:
    """The deployed weights an exported .onnx holds (folded conv weights ``conv.weight``, folded biases
    ``conv.weight_bias``, the rest under their parameter names)."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    bias_of = {f"{bn}.bias": f"{conv}.weight_bias" for conv, bn in pairs}
    params = dict(model.named_parameters())
    out = {}
    for name in _deployed_names(model, pairs):
        src = bias_of.get(name, name)
        arr = inits.get(src)
        if arr is None or arr.shape != tuple(params[name].shape) or arr.dtype != np.float32:
            raise ValueError(
                f"{path.name}: no float32 initializer {src} of shape {tuple(params[name].shape)}"
            )
        out[name] = arr.copy()
    return out


def weights_from_pte(path: Path, reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The deployed weights an exported .pte holds, found by value: each tensor of ``reference`` (the
    .onnx file's, equal up to the folds' last bits) is looked up as raw float32 in the file, in torch
    layout or one of XNNPACK's (OHWI, IHWO, HWIO), and read back exactly. Raises ``ValueError`` if a
    tensor is missing or ambiguous."""
    data = path.read_bytes()
    views = [np.frombuffer(data, np.float32, count=(len(data) - p) // 4, offset=p) for p in range(4)]
    out = {}
    for name, ref in reference.items():
        found: dict[bytes, np.ndarray] = {}
        perms = _PERMS if ref.ndim == 4 else ((tuple(range(ref.ndim))),)
        for perm in perms:
            target = np.ascontiguousarray(ref.transpose(perm)).ravel()
            j = int(np.abs(target).argmax())
            tol = 1e-5 * np.abs(target) + 1e-7
            for f in views:
                with np.errstate(all="ignore"):  # the file's other bytes read as NaN/inf floats
                    hits = np.flatnonzero(np.abs(f - target[j]) <= tol[j]) - j
                for pos in hits:
                    if pos < 0 or pos + target.size > f.size:
                        continue
                    got = f[pos : pos + target.size]
                    with np.errstate(all="ignore"):
                        close = bool(np.all(np.abs(got - target) <= tol))
                    if close:
                        arr = np.ascontiguousarray(
                            got.reshape(ref.transpose(perm).shape).transpose(np.argsort(perm))
                        )
                        found[arr.tobytes()] = arr
        if len(found) != 1:
            raise ValueError(f"{path.name}: tensor {name} {ref.shape} found {len(found)} times (want once)")
        out[name] = next(iter(found.values())).copy()
    return out


def pte_batch_counts(path: Path) -> list[int]:
    """The int64 scalar constants of an exported .pte, in program order: BatchNorm's ``num_batches_tracked``
    (a training counter that inference never reads, yet torch.export keeps it as a constant and
    ExecuTorch writes it into the program's constant buffer; identical values share one buffer)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(path.read_bytes()).program
    counts = []
    for value in program.execution_plan[0].values:
        t = value.val
        if type(t).__name__ == "Tensor" and t.data_buffer_idx and t.scalar_type == 4 and not list(t.sizes):
            storage = bytes(program.constant_buffer[t.data_buffer_idx].storage)
            counts.append(int(np.frombuffer(storage[:8], "<i8")[0]))
    return counts


def export_deployed(
    rebuilt: RebuiltVariant,
    weights: dict[str, np.ndarray],
    runtime: str,
    path: Path,
    checks: Any,
) -> float:
    """Export the deployed form carrying ``weights`` with the compiler's own exporter for ``runtime`` and
    verify the file as the compiler does (:func:`compiler.export.verify`). Returns the largest |diff|."""
    from compiler.export import EXPORTERS, verify

    model = rebuilt.module(weights)
    EXPORTERS[runtime][1](model, rebuilt.example, path)  # type: ignore[index]
    return verify(rebuilt.module(weights), path, runtime, checks)  # type: ignore[arg-type]


def rebuild_variant(bundle: Path, variant: str, *, checks: Any, scratch: Path) -> RebuiltVariant:
    """Rebuild ``variant`` of ``bundle`` in deployed form with the exact weights of its .onnx and .pte
    files, and prove it: each file re-exported from the rebuilt model must be byte-identical to the old
    one, and the old file must match the rebuilt model's outputs on ``checks``."""
    import torch

    from compiler.export import verify

    manifest = BundleManifest.from_json((bundle / MANIFEST_FILENAME).read_bytes())
    v = next(x for x in manifest.variants if x.name == variant)
    files = {f.runtime: f.path for f in v.files if f.segment is None}
    if "onnx" not in files:
        raise ValueError(f"variant {variant} has no .onnx file to read its weights from")
    model = rebuild_model(manifest, bundle, variant)
    pairs = batchnorm_pairs(model)
    weights = {"onnx": weights_from_onnx(model, pairs, bundle / files["onnx"])}
    if "executorch" in files:
        weights["executorch"] = weights_from_pte(bundle / files["executorch"], weights["onnx"])
    counts = pte_batch_counts(bundle / files["executorch"]) if "executorch" in files else []
    rebuilt = RebuiltVariant(variant, model, pairs, torch.zeros(manifest.input.shape), files, weights, counts)
    scratch.mkdir(parents=True, exist_ok=True)
    for runtime, rel in files.items():
        verify(rebuilt.module(weights[runtime]), bundle / rel, runtime, checks)  # type: ignore[arg-type]
        again = scratch / f"{variant}.reexport{Path(rel).suffix}"
        export_deployed(rebuilt, weights[runtime], runtime, again, checks)
        if again.read_bytes() != (bundle / rel).read_bytes():
            raise ValueError(f"{rel}: re-exported from the rebuilt {variant} it is not byte-identical")
    return rebuilt


def finetune_deployed(
    rebuilt: RebuiltVariant,
    train: tuple[Any, Any],
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Fine-tune the variant from its .onnx weights with Adam on ``train`` (x, y tensors); BatchNorm stays
    frozen (the fold is fixed), dropout is on. Returns the tuned deployed weights (not snapped)."""
    import torch
    from torch import nn

    model = rebuilt.module(rebuilt.weights["onnx"])
    params = dict(model.named_parameters())
    names = set(rebuilt.trainable())
    for name, p in params.items():
        p.requires_grad_(name in names)
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
    torch.manual_seed(seed)
    opt = torch.optim.Adam([params[n] for n in names], lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {n: params[n].detach().numpy().astype(np.float32).copy() for n in rebuilt.trainable()}


def snap_weights(
    old: dict[str, np.ndarray], new: dict[str, np.ndarray], *, bits: int | None
) -> tuple[dict[str, np.ndarray], SnapStats]:
    """:func:`snap_to_grid` per tensor (``bits=None``: ``new`` unchanged) against ``old``, with stats."""
    if bits is None:
        return {k: v.copy() for k, v in new.items()}, SnapStats(
            len(new), sum(v.size for v in new.values()), 0.0
        )
    out = {}
    err = mag = 0.0
    for name, arr in new.items():
        snapped = snap_to_grid(old[name], arr, bits=bits)
        err += float(np.abs(snapped.astype(np.float64) - arr).sum())
        mag += float(np.abs(arr.astype(np.float64) - old[name]).sum())
        out[name] = snapped
    stats = SnapStats(len(out), sum(v.size for v in out.values()), err / mag if mag else 0.0)
    return out, stats


@dataclass(frozen=True)
class FinetunedVariant:
    """One variant of :func:`finetune_bundle`: test accuracy (its .onnx) before and after, the snap error."""

    name: str
    accuracy_before: float
    accuracy_after: float
    relative_error: float


def finetune_bundle(
    old: Path,
    out: Path,
    *,
    data: str,
    key: Path,
    bundle_version: str,
    steps: int = 200,
    lr: float = 1e-3,
    bits: int | None = 6,
    test_samples: int = 2000,
    progress: Any = print,
) -> list[FinetunedVariant]:
    """Fine-tune every whole-model variant of bundle ``old`` on ``data`` and write the result, re-signed as
    ``bundle_version``, to ``out``: the update from ``old`` to ``out`` is then small to ship.

    Per variant: rebuilt in deployed form from its own files (:func:`rebuild_variant`, which refuses
    unless both files re-export byte-identical), fine-tuned (:func:`finetune_deployed`), snapped against
    each runtime's old weights to a ``bits``-bit grid (``None``: not snapped), exported to .onnx and .pte
    with the compiler's exporters and verified. Gated variants are copied unchanged. The bundle is built
    in a temporary directory beside ``out`` and renamed into place at the end: a failure leaves nothing.
    """
    import tempfile

    import torch

    from compiler.data import TensorData, load_splits
    from compiler.errors import CompileError
    from compiler.train import evaluate

    manifest = BundleManifest.from_json((old / MANIFEST_FILENAME).read_bytes())
    if out.exists():
        raise CompileError(f"{out} already exists", hint="choose another --out")
    splits = load_splits(data)
    if splits.input_shape[1:] != tuple(manifest.input.shape[1:]):
        raise CompileError(
            f"--data {data!r} has inputs of shape {splits.input_shape[1:]}, the bundle "
            f"{tuple(manifest.input.shape[1:])}"
        )
    # the data set's own normalisation -> the bundle's (what the device applies before the model)
    norm = manifest.input.normalization
    shape = (1, -1, 1, 1)
    mean_d, std_d = torch.tensor(splits.mean).view(shape), torch.tensor(splits.std).view(shape)
    mean_m, std_m = torch.tensor(norm.mean).view(shape), torch.tensor(norm.std).view(shape)

    def renorm(x: Any) -> Any:
        return (((x * std_d + mean_d) - mean_m) / std_m).float()

    train_x = renorm(splits.train.x)
    test = splits.test.subset(test_samples, seed=3)
    test = TensorData(renorm(test.x), test.y)
    checks = torch.cat([torch.randn(8, *manifest.input.shape[1:]), test.x[:8]])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    results = []
    try:
        work = tmp / "bundle"
        shutil.copytree(old, work)
        for v in manifest.variants:
            if v.kind == "gated":  # its segments are not whole models: shipped unchanged
                progress(f"    {v.name}: gated, left unchanged")
                continue
            rebuilt = rebuild_variant(old, v.name, checks=checks, scratch=tmp / "scratch")
            before = evaluate(rebuilt.module(rebuilt.weights["onnx"]), test)
            tuned = finetune_deployed(rebuilt, (train_x, splits.train.y), steps=steps, lr=lr)
            errors, snapped = [], {}
            for runtime, rel in rebuilt.files.items():
                snapped[runtime], stats = snap_weights(rebuilt.weights[runtime], tuned, bits=bits)
                export_deployed(rebuilt, snapped[runtime], runtime, work / rel, checks)
                errors.append(stats.relative_error)
            after = evaluate(rebuilt.module(snapped["onnx"]), test)
            results.append(FinetunedVariant(v.name, before, after, max(errors)))
            progress(
                f"    {v.name}: test accuracy {before:.2%} -> {after:.2%}"
                + (f" (snapped to {bits} bits, {max(errors):.1%} of the change rounded)" if bits else "")
            )
        resign_bundle(work, key, bundle_version=bundle_version)
        work.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return results
