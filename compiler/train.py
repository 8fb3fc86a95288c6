"""Training and fine-tuning loops: seeded, with progress, optional knowledge distillation.

Built for the CPU; a model moved to a GPU trains there too (``bench/train_recipe.py --device cuda``,
how the defaults were chosen). ``train`` runs SGD with Nesterov momentum and a one-cycle learning
rate; when a ``teacher`` is given, the loss mixes cross-entropy with the KL divergence to the teacher's
softened outputs (Hinton et al.), which is how pruned variants recover accuracy from the dense model.

Without augmentation a sample is the same image in every epoch, so the teacher's outputs are too:
``teacher_logits`` computes them once for the whole training set and ``train`` takes that table in
place of the teacher, which saves one dense forward pass per fine-tuning step (docs/compiler.md).
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compiler.data import TensorData, augment
from compiler.progress import progress

__all__ = [
    "TEACHER_TABLE_LIMIT",
    "TrainConfig",
    "check_teacher_table",
    "default_precision",
    "evaluate",
    "kd_loss",
    "native_bf16",
    "teacher_batch",
    "teacher_logits",
    "train",
]

log = logging.getLogger(__name__)


@functools.cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where bf16 autocast trains the
    reference model about 1.6x faster than float32 (docs/compiler.md). Elsewhere bf16 is emulated and
    slower, so float32 stays the default there."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):  # private helpers: absent in another torch, float32 then
        return False


def default_precision() -> str:
    """``bf16`` where the CPU has it natively, else ``fp32``: the training configs' default."""
    return "bf16" if native_bf16() else "fp32"


@dataclass(frozen=True)
class TrainConfig:
    """How long and how hard to train. ``precision`` is the forward/backward compute type: ``bf16``
    (autocast; weights, optimiser and exported files stay float32) or ``fp32``; by default bf16 where
    the CPU has it natively. It is part of the dense checkpoint's cache key.

    ``augment`` (random shifts by up to 2 pixels and horizontal flips) is off by default: on
    Fashion-MNIST, whose items are centred and whose shoes all face one way, it cost the reference model
    about a point at every schedule measured (5 epochs: 93.73% without, 92.30% with; docs/compiler.md),
    so 5 epochs without it beat 12 with it. Turn it on for data where those transforms keep the label
    and the look of the test images."""

    epochs: float = 5.0
    batch_size: int = 128
    lr: float = 0.2
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0
    kd_alpha: float = 0.7  # weight of the distillation term when a teacher is given
    kd_temperature: float = 4.0
    augment: bool = False
    precision: str = field(default_factory=default_precision)

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32 or bf16, not {self.precision!r}")


def evaluate(model: nn.Module, data: TensorData, *, batch_size: int = 1000) -> float:
    """Top-1 accuracy of ``model`` on ``data`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            logits = model(data.x[i : i + batch_size].to(device))
            correct += int((logits.argmax(1) == data.y[i : i + batch_size].to(device)).sum())
    model.train(was_training)
    return correct / max(len(data), 1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


TEACHER_TABLE_LIMIT = 512 * 2**20
"""Largest table of teacher outputs (bytes) :func:`teacher_logits` builds; past it (a data set of millions
of images, or thousands of classes) the teacher runs in every step instead."""


def teacher_logits(
    teacher: nn.Module, data: TensorData, *, precision: str = "fp32", batch_size: int = 128
) -> torch.Tensor | None:
    """The teacher's logits for every sample of ``data`` in order (float32 ``[N, classes]``, on the CPU),
    computed in eval mode with ``precision`` as :func:`train` would compute them, or None where the table
    would pass :data:`TEACHER_TABLE_LIMIT` bytes.

    Only for training without augmentation: ``train`` refuses the table when ``augment`` is on, because
    the images it trains on would no longer be the ones the table was computed on.
    """
    if len(data) == 0:
        raise ValueError("no training data to compute the teacher's outputs on")
    # a channels-last copy: oneDNN's fast path on the CPU wants weights and images both in that layout
    # (in batches of 128: 1.5-2x faster than the model as exported, or than batches of 1,000)
    teacher = copy.deepcopy(teacher).eval().to(memory_format=torch.channels_last)
    device = _device(teacher)
    rows: list[torch.Tensor] = []
    with torch.inference_mode(), progress(total=len(data), desc="teacher outputs", unit="img") as bar:
        for i in range(0, len(data), batch_size):
            x = data.x[i : i + batch_size].to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = teacher(x)
            rows.append(out.float().cpu())
            if len(rows) == 1 and out.shape[1] * len(data) * 4 > TEACHER_TABLE_LIMIT:
                return None
            bar.update(len(x))
    return torch.cat(rows)


def check_teacher_table(table: torch.Tensor, data: TensorData, *, augment: bool) -> None:
    """Refuse a table of teacher outputs (:func:`teacher_logits`) that cannot stand for the teacher while
    training on ``data``: augmented images, or not one row per sample. A ValueError says which."""
    if augment:
        raise ValueError(
            "teacher outputs computed once cannot distil augmented images: pass the teacher model"
        )
    if table.ndim != 2 or table.shape[0] != len(data):
        raise ValueError(
            f"teacher outputs have shape {tuple(table.shape)}; "
            f"expected one row per sample ({len(data)}, classes)"
        )


def teacher_batch(
    teacher: nn.Module | torch.Tensor | None, x: torch.Tensor, idx: torch.Tensor, device: torch.device
) -> torch.Tensor | None:
    """The teacher's logits for the batch ``x`` = samples ``idx``: looked up in a table, or computed."""
    if teacher is None:
        return None
    if isinstance(teacher, torch.Tensor):
        return teacher[idx.to(teacher.device)].to(device)
    with torch.no_grad():
        return teacher(x).float()


def _loss(
    logits: torch.Tensor, y: torch.Tensor, soft: torch.Tensor | None, config: TrainConfig
) -> torch.Tensor:
    """Cross-entropy with label smoothing, mixed with the distillation term when there are teacher logits."""
    loss = F.cross_entropy(logits, y, label_smoothing=config.label_smoothing)
    if soft is None:
        return loss
    return (1 - config.kd_alpha) * loss + config.kd_alpha * kd_loss(
        logits, soft.float(), config.kd_temperature
    )


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: KL divergence between the softened outputs, times T^2."""
    return (
        F.kl_div(
            F.log_softmax(student / temperature, dim=1),
            F.log_softmax(teacher / temperature, dim=1),
            log_target=True,
            reduction="batchmean",
        )
        * temperature**2
    )


def train(
    model: nn.Module,
    data: TensorData,
    config: TrainConfig,
    *,
    teacher: nn.Module | torch.Tensor | None = None,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` in place on ``data`` and return it (in eval mode).

    ``config.epochs`` may be fractional (0.5 = half an epoch), which keeps fine-tuning budgets exact.
    Batches move to the model's device (``teacher`` must be on it too); the shuffling and augmentation
    draws stay on the CPU, so a seed means the same batches on any device. ``teacher`` is a model, run on
    every batch, or its outputs for every sample of ``data`` from :func:`teacher_logits` (no
    augmentation then): the same batches and the same loss without the teacher's forward passes.
    """
    if isinstance(teacher, torch.Tensor):
        check_teacher_table(teacher, data, augment=config.augment)
    device = _device(model)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total = max(1, round(config.epochs * steps_per_epoch))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        momentum=0.9,
        nesterov=True,
    )
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=total, pct_start=0.2)
    if isinstance(teacher, nn.Module):
        # channels last, as the batches: the model as exported (the default layout) ran 2x slower here
        teacher = copy.deepcopy(teacher).eval().to(memory_format=torch.channels_last)
    model.train()
    started = time.monotonic()
    step = 0
    with progress(total=total, desc=desc, unit="step") as bar:
        while step < total:
            order = torch.randperm(len(data), generator=gen).to(data.x.device)
            for i in range(0, len(data), config.batch_size):
                if step >= total:
                    break
                idx = order[i : i + config.batch_size]
                x, y = data.x[idx].to(device), data.y[idx].to(device)
                if config.augment:
                    x = augment(x, gen)
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                    logits = model(x).float()
                    soft = teacher_batch(teacher, x, idx, device)
                loss = _loss(logits, y, soft, config)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    log.info("%s: %d steps in %.0fs (%s)", desc, total, time.monotonic() - started, config.precision)
    # channels_last speeds up CPU training; exporters expect the default layout back.
    return model.to(memory_format=torch.contiguous_format).eval()
