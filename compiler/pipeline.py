"""``edgeprune compile``: dense model -> static ladder -> exported, verified, measured, signed bundle.

Stages, each timed and reported: data, dense (train or reuse the cached checkpoint), scan (per-layer
sensitivity), prune+finetune per ladder step, export+verify, latency, bundle. Everything is written to a
temporary directory beside ``out`` and renamed into place only after the finished bundle passed
:func:`agent.bundle.open_bundle` with the public key: a failure at any point leaves no half-written bundle.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from agent import __version__
from agent.bundle import file_sha256, open_bundle
from agent.contract import (
    MANIFEST_FILENAME,
    ArtifactFile,
    BundleManifest,
    CreationInfo,
    InputSpec,
    Latency,
    Normalization,
    Runtime,
    Variant,
)
from agent.signing import load_private_key, public_key_of, sign_manifest
from compiler import cache
from compiler.data import Splits, load_splits
from compiler.errors import CompileError
from compiler.export import EXPORTERS, verify
from compiler.gating.build import GatedBuild, budget_points, build_gated, export_and_verify, gated_latency
from compiler.gating.deploy import GatedFiles
from compiler.gating.train import GateTrainConfig
from compiler.measure import count_macs_params, host_description, latency_side_by_side
from compiler.models import load_model
from compiler.prune.importance import criterion as get_criterion
from compiler.prune.plan import PlanStep, PruningPlan
from compiler.prune.sensitivity import allocate, scan
from compiler.prune.static import MAX_RATIO, prunable_groups, prune
from compiler.prune.unstructured import sparsify
from compiler.report import markdown_report, pareto_plot
from compiler.train import TrainConfig, evaluate, teacher_logits, train

__all__ = ["CompileOptions", "CompileResult", "aligned_channels", "compile_bundle"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompileOptions:
    """Everything ``edgeprune compile`` takes; defaults compile the reference bundle."""

    out: Path
    key: Path
    model: str = "reference"
    data: str = "fashion-mnist"
    ratios: tuple[float, ...] = (0.25, 0.5, 0.75)
    criterion: str = "l1"
    auto: bool = True
    max_drop: float = 0.05
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_epochs: float = 2.0
    iterations: int = 2
    align_channels: int = 8
    sparsity: float = 0.0
    model_id: str = "fmnist-resnet"
    bundle_version: str = "1.0.0"
    runtimes: tuple[Runtime, ...] = ("onnx", "executorch")
    latency_runs: int = 600
    threads: int = 1
    calibration_samples: int = 256
    validation_samples: int = 2000
    verify_samples: int = 8
    gated: bool = False
    gate: GateTrainConfig = field(default_factory=GateTrainConfig)
    force: bool = False


@dataclass(frozen=True)
class CompileResult:
    out: Path
    manifest: BundleManifest
    breakdown: dict[str, float]


@dataclass
class _Built:
    name: str
    model: nn.Module
    plan: PruningPlan | None
    accuracy: float
    macs: int
    params: int


class _Clock:
    def __init__(self) -> None:
        self.breakdown: dict[str, float] = {}
        self.started = time.monotonic()

    @contextmanager
    def stage(self, name: str, text: str) -> Iterator[None]:
        print(f"==> {text}", flush=True)
        start = time.monotonic()
        yield
        self.breakdown[name] = self.breakdown.get(name, 0.0) + time.monotonic() - start


def _validate(opts: CompileOptions) -> None:
    for r in opts.ratios:
        if not 0.0 < r <= MAX_RATIO:
            raise CompileError(
                f"--ratios value {r} is out of range", hint=f"each ratio must be in (0, {MAX_RATIO}]"
            )
    if len(set(opts.ratios)) != len(opts.ratios):
        raise CompileError(f"--ratios has duplicates: {opts.ratios}")
    get_criterion(opts.criterion)
    if not 0.0 <= opts.sparsity < 1.0:
        raise CompileError(f"--sparsity {opts.sparsity} is out of range", hint="use 0 <= sparsity < 1")
    if opts.out.exists() and not opts.force:
        raise CompileError(
            f"{opts.out} already exists", hint="pass --force to replace it, or choose another --out"
        )
    blocker = next((p for p in (opts.out.parent, *opts.out.parent.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise CompileError(f"--out {opts.out} lies under {blocker}, which is a file, not a directory")
    load_private_key(opts.key)  # fail now, not after training


def _dense_key(opts: CompileOptions, splits: Splits) -> str:
    return cache.cache_key(
        model=opts.model, data=splits.name, train=opts.train, n=len(splits.train), shape=splits.input_shape
    )


def _dense(opts: CompileOptions, splits: Splits) -> nn.Module:
    model = load_model(opts.model, classes=len(splits.class_names), in_channels=splits.input_shape[1])
    key = _dense_key(opts, splits)
    if cache.load_cached(model, key):
        print(f"    reusing cached dense checkpoint {key} from {cache.cache_dir()}")
        return model.eval()
    model = model.to(memory_format=torch.channels_last)
    train(model, splits.train, opts.train, desc="train dense")
    path = cache.store(model, key)
    print(f"    cached the dense checkpoint at {path}")
    return model.eval()


def _teachers(
    opts: CompileOptions, dense: nn.Module, splits: Splits, clock: _Clock
) -> tuple[nn.Module | torch.Tensor, nn.Module | torch.Tensor]:
    """What the static ladder's fine-tuning and the gated variant's shared widths distil from, in that
    order: the dense model's outputs on every training image, computed once, where they can stand for
    the model (no augmentation: each image, so its outputs, is the same in every epoch; for the gated
    variant also the same precision); else, or past :data:`~compiler.train.TEACHER_TABLE_LIMIT`, the
    dense model itself, run in every step."""
    ladder = bool(opts.ratios) and opts.finetune_epochs > 0 and not opts.train.augment
    gated = opts.gated and not opts.gate.augment and opts.gate.precision == opts.train.precision
    if not (ladder or gated):
        return dense, dense
    with clock.stage(
        "teacher outputs", f"dense outputs on {len(splits.train)} training images, for distillation"
    ):
        table = teacher_logits(dense, splits.train, precision=opts.train.precision)
    if table is None:
        return dense, dense
    return (table if ladder else dense), (table if gated else dense)


def _ladder(
    opts: CompileOptions,
    dense: nn.Module,
    splits: Splits,
    example: torch.Tensor,
    clock: _Clock,
    *,
    teacher: nn.Module | torch.Tensor,
) -> list[_Built]:
    calib = splits.train.subset(opts.calibration_samples, seed=1)
    validation = splits.train.subset(opts.validation_samples, seed=2)
    calibration = (calib.x, calib.y)
    dense_macs = count_macs_params(dense, example)[0]
    groups = prunable_groups(dense, example)
    if not groups:
        raise CompileError("the model has no prunable channel groups (every layer is the output head?)")

    def real_macs(ratios: dict[str, float]) -> int:
        clone = copy.deepcopy(dense)
        prune(
            clone,
            example,
            ratios=ratios,
            criterion=opts.criterion,
            calibration=calibration,
            source_model=opts.model,
        )
        return count_macs_params(clone, example)[0]

    sens = None
    if opts.auto:
        with clock.stage("sensitivity scan", f"scanning the sensitivity of {len(groups)} channel groups"):
            baseline, sens = scan(
                dense, example, criterion=opts.criterion, calibration=calibration, validation=validation
            )
    built = []
    for ratio in sorted(opts.ratios):
        name = f"static-{round(ratio * 100)}"
        with clock.stage(
            "prune + finetune", f"{name}: pruning ({opts.criterion}) and fine-tuning with distillation"
        ):
            uniform = {g.root: ratio for g in groups}
            ratios = uniform
            if sens is not None:
                ratios = allocate(
                    sens,
                    baseline=baseline,
                    dense_macs=dense_macs,
                    target_macs=real_macs(uniform),
                    max_drop=opts.max_drop,
                    measure=real_macs,
                )
            model, plan = _prune_iteratively(
                opts=opts,
                dense=dense,
                teacher=teacher,
                ratios=ratios,
                splits=splits,
                example=example,
                calibration=calibration,
                name=name,
            )
            if opts.sparsity:
                sparsify(model, opts.sparsity)
            macs, params = count_macs_params(model, example)
            acc = evaluate(model, splits.test)
            print(f"    {name}: {macs / 1e6:.2f}M MACs ({dense_macs / macs:.2f}x fewer), accuracy {acc:.4f}")
            built.append(_Built(name, model.eval(), plan, acc, macs, params))
    return built


def aligned_channels(target: float, align: int, current: int) -> int:
    """``target`` channels rounded to a multiple of ``align`` (at least ``align``, at most ``current``).

    A layer already at ``align`` channels or fewer is not cut further.
    """
    if align <= 1:
        return min(current, max(1, round(target)))
    if current <= align:
        return current
    return min(current, max(align, round(target / align) * align))


def _prune_iteratively(
    *,
    opts: CompileOptions,
    dense: nn.Module,
    teacher: nn.Module | torch.Tensor,
    ratios: dict[str, float],
    splits: Splits,
    example: torch.Tensor,
    calibration: tuple[torch.Tensor, torch.Tensor],
    name: str,
) -> tuple[nn.Module, PruningPlan]:
    """Reach ``ratios`` in ``opts.iterations`` prune -> distil steps, rescoring channels after each step.

    After step ``i`` of ``k`` a group keeps about ``C * (1 - r) ** ((i + 1) / k)`` of its ``C`` dense
    channels, rounded to a multiple of ``opts.align_channels``: onnxruntime runs its fast blocked (NCHWc)
    convolutions only on channel counts that are multiples of 8 or 16, and falls back to a generic kernel
    several times slower otherwise. The steps of all iterations form one plan, which replays on the
    dense model.
    """
    model = copy.deepcopy(dense)
    k = max(1, opts.iterations)
    dense_channels = {g.root: g.channels for g in prunable_groups(dense, example)}
    steps: list[PlanStep] = []
    for i in range(k):
        current = {g.root: g.channels for g in prunable_groups(model, example)}
        step_ratios = {}
        for g, r in ratios.items():
            keep = aligned_channels(
                dense_channels[g] * (1 - r) ** ((i + 1) / k), opts.align_channels, current[g]
            )
            # Torch-Pruning keeps int(channels * (1 - ratio)); the half channel makes that exactly `keep`
            step_ratios[g] = (current[g] - keep - 0.5) / current[g] if keep < current[g] else 0.0
        part = prune(
            model,
            example,
            ratios=step_ratios,
            criterion=opts.criterion,
            calibration=calibration,
            source_model=opts.model,
        )
        steps += part.steps
        if opts.finetune_epochs > 0:
            cfg = TrainConfig(
                **{
                    **opts.train.__dict__,
                    "epochs": opts.finetune_epochs / k,
                    "lr": opts.train.lr * 0.25,
                    "seed": opts.train.seed + 1 + i,
                }
            )
            train(
                model.to(memory_format=torch.channels_last),
                splits.train,
                cfg,
                teacher=teacher,
                desc=f"finetune {name} ({i + 1}/{k})",
            )
    plan = PruningPlan(
        source_model=opts.model,
        input_shape=tuple(example.shape),
        criterion=opts.criterion,
        ratios={g: float(r) for g, r in sorted(ratios.items())},
        steps=tuple(steps),
    )
    return model, plan


def _export_all(
    opts: CompileOptions, built: list[_Built], example: torch.Tensor, splits: Splits, tmp: Path
) -> dict[str, dict[Runtime, Path]]:
    files: dict[str, dict[Runtime, Path]] = {}
    checks = torch.cat(
        [torch.randn(opts.verify_samples, *example.shape[1:]), splits.test.x[: opts.verify_samples]]
    )
    for b in built:
        for rt in opts.runtimes:
            suffix, exporter = EXPORTERS[rt]
            path = tmp / f"{b.name}{suffix}"
            exporter(b.model, example, path)
            worst = verify(b.model, path, rt, checks)
            log.info("%s verified in %s: max |diff| %.2e", path.name, rt, worst)
            files.setdefault(b.name, {})[rt] = path
        print(f"    {b.name}: exported and verified in {', '.join(opts.runtimes)}")
    return files


def compile_bundle(opts: CompileOptions) -> CompileResult:
    """Run the whole compile; see the module docstring."""
    _validate(opts)
    torch.manual_seed(opts.train.seed)
    clock = _Clock()
    with clock.stage("data", f"loading data: {opts.data}"):
        splits = load_splits(opts.data)
    example = torch.zeros(splits.input_shape)
    with clock.stage("dense", f"dense model: {opts.model}"):
        dense = _dense(opts, splits)
        dense_acc = evaluate(dense, splits.test)
        dense_macs, dense_params = count_macs_params(dense, example)
        print(
            f"    dense: {dense_macs / 1e6:.2f}M MACs, {dense_params / 1e3:.0f}k params, "
            f"accuracy {dense_acc:.4f}"
        )
    built = [_Built("dense", dense, None, dense_acc, dense_macs, dense_params)]
    ladder_teacher, gate_teacher = _teachers(opts, dense, splits, clock)
    built += _ladder(opts, dense, splits, example, clock, teacher=ladder_teacher)
    gated: GatedBuild | None = None
    if opts.gated:
        with clock.stage("gated", "gated variant: shared widths, then gates with a compute penalty"):
            gated = build_gated(
                dense, splits, example, opts.gate, dense_key=_dense_key(opts, splits), teacher=gate_teacher
            )

    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{opts.out.name}.tmp-", dir=opts.out.parent))
    try:
        with clock.stage(
            "export + verify", "exporting to " + " and ".join(opts.runtimes) + ", verifying each file"
        ):
            files = _export_all(opts, built, example, splits, tmp)
            gated_files: dict[Runtime, GatedFiles] = {}
            if gated is not None:
                checks = torch.cat([torch.randn(4, *example.shape[1:]), splits.test.x[:4]])
                gated_files = export_and_verify(gated, example, checks, opts.runtimes, tmp, name="gated")
                print(f"    gated: exported and verified in {', '.join(opts.runtimes)} at every budget")
        with clock.stage(
            "latency", f"measuring batch-1 latency side by side ({opts.latency_runs} runs each)"
        ):
            # torch's own worker threads would compete with the runtimes' for the same cores
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                lat = latency_side_by_side(
                    files, splits.test.x[:1].numpy().copy(), runs=opts.latency_runs, threads=opts.threads
                )
                gated_lat = (
                    gated_latency(
                        gated,
                        gated_files,
                        splits.test.x[:64].numpy(),
                        runs=opts.latency_runs,
                        threads=opts.threads,
                    )
                    if gated is not None
                    else {}
                )
            finally:
                torch.set_num_threads(torch_threads)
        with clock.stage("bundle", "writing, signing and checking the bundle"):
            extra = [_gated_variant(gated, gated_files, gated_lat)] if gated is not None else []
            manifest = _write_bundle(
                opts=opts, splits=splits, built=built, files=files, lat=lat, tmp=tmp, clock=clock, extra=extra
            )
        tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read and served
        if opts.out.exists():
            shutil.rmtree(opts.out)
        tmp.rename(opts.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"==> bundle written to {opts.out} in {time.monotonic() - clock.started:.0f}s")
    return CompileResult(opts.out, manifest, clock.breakdown)


def _gated_variant(
    gated: GatedBuild, files: dict[Runtime, GatedFiles], lat: dict[float, dict[Runtime, Latency]]
) -> Variant:
    point = gated.default_point
    artifacts = []
    for rt, form in files.items():
        parts: list[tuple[str | None, Path]] = (
            [(None, form)] if isinstance(form, Path) else list(form.items())
        )
        artifacts += [
            ArtifactFile(
                runtime=rt, path=p.name, sha256=file_sha256(p), size_bytes=p.stat().st_size, segment=seg
            )
            for seg, p in parts
        ]
    return Variant(
        name="gated",
        kind="gated",
        files=tuple(artifacts),
        macs=gated.gating.fixed_macs + sum(b.macs[-1] for b in gated.gating.blocks),
        params=gated.params,
        accuracy=point.accuracy,
        latency=lat.get(point.budget, {}),
        budget=gated.budget,
        budget_curve=budget_points(gated, lat),
        gating=gated.gating,
    )


def _write_bundle(
    *,
    opts: CompileOptions,
    splits: Splits,
    built: list[_Built],
    files: dict[str, dict[Runtime, Path]],
    lat: dict[str, dict[Runtime, Latency]],
    tmp: Path,
    clock: _Clock,
    extra: list[Variant],
) -> BundleManifest:
    import importlib.metadata as md

    variants = []
    for b in built:
        plan_path = None
        if b.plan is not None:
            plan_path = f"{b.name}.plan.json"
            (tmp / plan_path).write_text(b.plan.model_dump_json(indent=1))
        artifacts = tuple(
            ArtifactFile(runtime=rt, path=p.name, sha256=file_sha256(p), size_bytes=p.stat().st_size)
            for rt, p in files[b.name].items()
        )
        variants.append(
            Variant(
                name=b.name,
                kind="dense" if b.plan is None else "static",
                files=artifacts,
                macs=b.macs,
                params=b.params,
                accuracy=b.accuracy,
                latency=lat[b.name],
                plan=plan_path,
            )
        )
    variants[1:1] = extra  # dense, then the gated variant, then the static ladder
    versions = {}
    for dist in ("torch", "executorch", "onnxruntime", "onnx", "torch-pruning"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[dist] = md.version(dist)
    manifest = BundleManifest(
        model_id=opts.model_id,
        bundle_version=opts.bundle_version,
        input=InputSpec(
            shape=splits.input_shape,
            normalization=Normalization(mean=splits.mean, std=splits.std, scale=255.0),
            class_names=splits.class_names,
        ),
        variants=tuple(variants),
        created=CreationInfo(
            created_at=datetime.now(UTC),
            tool_version=__version__,
            source_model=opts.model,
            dataset=splits.name,
            seed=opts.train.seed,
            host=host_description(),
            versions=versions,
        ),
    )
    key = load_private_key(opts.key)
    manifest = sign_manifest(manifest, key)
    (tmp / MANIFEST_FILENAME).write_text(manifest.model_dump_json(indent=1))
    open_bundle(tmp, public_key=public_key_of(key))  # the last check before it is visible
    notes = [
        f"criterion `{opts.criterion}`, per-layer ratios from the sensitivity scan: {opts.auto}, "
        f"fine-tune {opts.finetune_epochs} epoch(s) with distillation from dense",
        "latency: median of interleaved batch-1 runs, one process, "
        f"{opts.threads} thread(s), onnxruntime and ExecuTorch (XNNPACK) side by side",
    ]
    if extra:
        notes.append(
            f"gated: shared widths {opts.gate.slim_epochs} epoch(s) (sandwich rule, in-place distillation), "
            f"gates {opts.gate.gate_epochs} epoch(s) (straight-through Gumbel, compute penalty); latency at "
            "each budget cycles through 64 test images, since the widths depend on the input"
        )
    if opts.sparsity:
        notes.append(
            f"unstructured sparsity {opts.sparsity:.0%} on static variants: smaller downloads, no speed-up"
        )
    report_dir = tmp / "report"
    report_dir.mkdir()
    pareto_plot(manifest, report_dir / "pareto.png")
    (report_dir / "report.md").write_text(markdown_report(manifest, breakdown=clock.breakdown, notes=notes))
    return manifest
