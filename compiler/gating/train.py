"""Training a :class:`~compiler.gating.slim.SlimNet`: shared weights first, then the gates.

1. **Slimmable fine-tuning** from the dense weights, with the sandwich rule and in-place distillation
   (Yu & Huang, "Universally Slimmable Networks"): each step trains the full width on the labels and the
   dense teacher, and the narrowest width plus random per-block widths on the full width's outputs.
2. **Gate training** with the backbone frozen: a straight-through Gumbel-softmax picks a width per sample
   and block; the loss is distillation from the full width plus a compute penalty that pulls the batch's
   mean share of gated MACs to the budget drawn for that step. The budget enters the scores (see
   :meth:`SlimNet.scores`), so one set of gates serves every budget at run time.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compiler.data import TensorData, augment
from compiler.gating.slim import SlimNet
from compiler.progress import progress
from compiler.train import check_teacher_table, default_precision, kd_loss, teacher_batch

__all__ = ["BudgetResult", "GateTrainConfig", "evaluate_gated", "train_gates", "train_slim"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateTrainConfig:
    """How long and how hard to train the shared weights and the gates."""

    slim_epochs: float = 2.0
    gate_epochs: float = 1.0
    batch_size: int = 128
    lr: float = 0.02
    gate_lr: float = 0.01
    weight_decay: float = 5e-4
    random_widths: int = 2
    budget_min: float = 0.25
    budget_max: float = 1.0
    penalty: float = 20.0
    tau: float = 1.0
    kd_temperature: float = 4.0
    seed: int = 0
    precision: str = field(default_factory=default_precision)  # the shared-width step only
    augment: bool = False  # random shifts and flips, as in TrainConfig (off: see its docstring)


@contextlib.contextmanager
def _channels_last(net: nn.Module) -> Iterator[None]:
    """Train ``net`` in the channels-last layout, its batches too (:func:`_batches`): oneDNN's fast path on
    the CPU, 1.2x a shared-width step here (docs/compiler.md); back to the default layout after, which
    the exporters and the deployment forms expect."""
    net.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        net.to(memory_format=torch.contiguous_format)


def _batches(
    data: TensorData, config: GateTrainConfig, epochs: float, gen: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(images, labels, their indices in ``data``) for ``epochs`` epochs of shuffled batches."""
    steps = max(1, round(epochs * math.ceil(len(data) / config.batch_size)))
    done = 0
    while done < steps:
        order = torch.randperm(len(data), generator=gen)
        for i in range(0, len(data), config.batch_size):
            if done >= steps:
                return
            idx = order[i : i + config.batch_size]
            x = data.x[idx]
            x = augment(x, gen) if config.augment else x
            yield x.contiguous(memory_format=torch.channels_last), data.y[idx], idx
            done += 1


def _steps(data: TensorData, config: GateTrainConfig, epochs: float) -> int:
    return max(1, round(epochs * math.ceil(len(data) / config.batch_size)))


def train_slim(
    net: SlimNet, data: TensorData, config: GateTrainConfig, *, teacher: nn.Module | torch.Tensor
) -> SlimNet:
    """Step 1 (see the module docstring): train the shared weights at every width, in place.

    ``teacher`` is the dense model, run on every batch, or its outputs for every sample of ``data``
    (:func:`compiler.train.teacher_logits`, no augmentation then): the compile computes those once for
    the static ladder and the gated variant both.
    """
    if isinstance(teacher, torch.Tensor):
        check_teacher_table(teacher, data, augment=config.augment)
    else:  # a channels-last copy, as the batches: in the default layout it ran 1.5-2x slower
        teacher = copy.deepcopy(teacher).eval().to(memory_format=torch.channels_last)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    params = [p for n, p in net.named_parameters() if not n.startswith("gates.")]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        momentum=0.9,
        nesterov=True,
    )
    total = _steps(data, config, config.slim_epochs)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    net.train()
    counts = net.width_count
    started = time.monotonic()
    with _channels_last(net), progress(total=total, desc="train gated: shared widths", unit="step") as bar:
        for step, (x, y, idx) in enumerate(_batches(data, config, config.slim_epochs, gen)):
            configs: list[Sequence[int]] = [[0] * len(counts)]
            for _ in range(config.random_widths):
                configs.append([int(torch.randint(c, (1,), generator=gen)) for c in counts])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.precision == "bf16"):
                soft = teacher_batch(teacher, x, idx, x.device)
                assert soft is not None  # a teacher is always given here
                full = net(x).float()
                narrow = [net(x, widths).float() for widths in configs]
            loss = 0.5 * F.cross_entropy(full, y) + 0.5 * kd_loss(full, soft, config.kd_temperature)
            target = full.detach()
            for out in narrow:
                loss = loss + kd_loss(out, target, config.kd_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    log.info("shared widths: %d steps in %.0fs", total, time.monotonic() - started)
    return net.eval()


def train_gates(net: SlimNet, data: TensorData, config: GateTrainConfig) -> SlimNet:
    """Step 2 (see the module docstring): train the gates with the backbone frozen, in place."""
    torch.manual_seed(config.seed + 1)
    gen = torch.Generator().manual_seed(config.seed + 1)
    for name, p in net.named_parameters():
        p.requires_grad_(name.startswith("gates."))
    opt = torch.optim.Adam(net.gates.parameters(), lr=config.gate_lr)
    total = _steps(data, config, config.gate_epochs)
    net.eval()  # frozen batch norms; the Gumbel noise is what samples
    started = time.monotonic()
    with _channels_last(net), progress(total=total, desc="train gated: gates", unit="step") as bar:
        for step, (x, _, _) in enumerate(_batches(data, config, config.gate_epochs, gen)):
            budget = config.budget_min + (config.budget_max - config.budget_min) * float(
                torch.rand((), generator=gen)
            )
            with torch.no_grad():
                target = net(x)
            logits, share, _ = net.gated(x, budget, tau=config.tau)
            loss = (
                kd_loss(logits, target, config.kd_temperature) + config.penalty * (share.mean() - budget) ** 2
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", share=f"{share.mean().item():.2f}", refresh=False)
    for p in net.parameters():
        p.requires_grad_(True)
    log.info("gates: %d steps in %.0fs", total, time.monotonic() - started)
    return net.eval()


@dataclass(frozen=True)
class BudgetResult:
    """What the gated net does at one budget on a data set."""

    budget: float
    accuracy: float
    macs: float
    density: float


@torch.no_grad()
def evaluate_gated(
    net: SlimNet,
    data: TensorData,
    budgets: Sequence[float],
    *,
    batch_size: int = 500,
    full_from: float | None = None,
) -> list[BudgetResult]:
    """Accuracy, mean MACs and mean density (share of gated channels computed) at each budget; budgets
    from ``full_from`` up run every block at full width (the deployed ``full`` segment)."""
    net.eval()
    results = []
    full_width = sum(b.widths[-1] for b in net.blocks)
    for budget in budgets:
        correct, macs, channels = 0, 0.0, 0.0
        for i in range(0, len(data), batch_size):
            x, y = data.x[i : i + batch_size], data.y[i : i + batch_size]
            if full_from is not None and budget >= full_from:
                logits = net(x)
                picks = torch.tensor([len(b.widths) - 1 for b in net.blocks]).expand(x.shape[0], -1)
            else:
                logits, _, picks = net.gated(x, budget)
            correct += int((logits.argmax(1) == y).sum())
            for b, block in enumerate(net.blocks):
                idx = picks[:, b]
                macs += float(torch.tensor(net.block_macs[b], dtype=torch.float64)[idx].sum())
                channels += float(torch.tensor(block.widths, dtype=torch.float64)[idx].sum())
        n = max(len(data), 1)
        results.append(
            BudgetResult(
                budget=budget,
                accuracy=correct / n,
                macs=net.fixed_macs + macs / n,
                density=channels / n / full_width,
            )
        )
    return results
