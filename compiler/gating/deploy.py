"""Deployment forms of a gated net that really skip compute, one per runtime, and their export.

Masking channels saves nothing on a CPU, so every width of every block becomes its own pre-sliced,
BN-folded pair of convolutions, and the gate's choice selects which pair runs (docs/compiler.md has the
measurements behind these choices):

- **ONNX**: one small graph per segment, ``stem`` and ``block{i}_w{j}``, each ending with the next
  block's gate decision; the device dispatches (:class:`agent.runtime.OnnxBackend`). The alternative,
  one graph where each block is a tree of ``torch.cond`` exported as ONNX ``If`` (built only by
  ``bench/_gated_if.py`` for comparison), ran within noise of the segments on the reference model
  (``bench/gated_speed.py``), and the segments keep one design for both runtimes.
- **ExecuTorch**: XNNPACK does not delegate convolutions inside ``torch.cond`` branches (they run ~50x
  slower on portable kernels), so the ``.pte`` holds one method per segment, lowered together:
  ``stem`` and ``block{i}_w{j}``, each ending with the next block's gate decision; the device runs
  them with a small dispatcher (:class:`agent.runtime.ExecutorchBackend`).

Both forms compute exactly what :meth:`SlimNet.gated` computes at batch 1; :func:`verify_gated` checks
every exported file against eager at several budgets before it enters a bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agent.contract import BudgetInput, GatedBlock, Gating, Runtime
from agent.runtime import make_backend
from compiler.errors import ExportError, VerificationError
from compiler.export import _quiet
from compiler.gating.slim import BUDGET_SCALE, BudgetMap, SlimBlock, SlimNet, budget_shift, map_tensors

__all__ = [
    "GatedDeploy",
    "export_gated",
    "export_gated_onnx_segments",
    "export_gated_pte",
    "gating_spec",
    "verify_gated",
]


def _fold(weight: torch.Tensor, bn: nn.BatchNorm2d, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (output channels ``rows`` of a conv) with batch norm ``bn`` folded in: (w, b)."""
    mean = cast(torch.Tensor, bn.running_mean)[rows]
    var = cast(torch.Tensor, bn.running_var)[rows]
    scale = bn.weight[rows] / torch.sqrt(var + bn.eps)
    return weight * scale[:, None, None, None], bn.bias[rows] - mean * scale


class _Branch(nn.Module):
    """Block ``block`` at width index ``j``: two folded convolutions with their own weight tensors."""

    def __init__(self, block: SlimBlock, j: int) -> None:
        super().__init__()
        k = block.widths[j]
        c1, c2 = block.conv1, block.conv2
        w1, b1 = _fold(c1.weight[:k], block.bn1, slice(0, k))
        w2, b2 = _fold(c2.weight[:, :k], cast(nn.BatchNorm2d, block.bn2s[j]), slice(None))
        self.conv1 = nn.Conv2d(c1.in_channels, k, c1.kernel_size, c1.stride, c1.padding)
        self.conv2 = nn.Conv2d(k, c2.out_channels, c2.kernel_size, c2.stride, c2.padding)
        with torch.no_grad():
            # Clones: views of one tensor make torch.cond's export (bench/_gated_if.py) fail with an
            # aliasing error.
            for conv, w, b in ((self.conv1, w1, b1), (self.conv2, w2, b2)):
                conv.weight.copy_(w.detach().clone())
                cast(torch.Tensor, conv.bias).copy_(b.detach().clone())

    def forward(self, x: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + shortcut)


class _Gate(nn.Module):
    """``argmax(linear(mean(h)) + BUDGET_SCALE * raw_budget * cost)`` as a 1-element int64 tensor; the raw
    budget is the budget through the net's calibrated map (:func:`budget_shift`), when it has one."""

    def __init__(self, linear: nn.Linear, cost: torch.Tensor, budget_map: BudgetMap | None = None) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("cost", (BUDGET_SCALE * cost).clone())
        self.mapped = budget_map is not None
        if budget_map is not None:
            starts, spans, slopes, self.base = map_tensors(budget_map)
            self.register_buffer("starts", starts)
            self.register_buffer("spans", spans)
            self.register_buffer("slopes", slopes)

    def forward(self, h: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        cost = cast(torch.Tensor, self.cost)
        # keepdim=True, then flatten: XNNPACK lowers that as global average pooling, so the whole gate
        # runs in the segment's one delegate call; a plain mean ran in ExecuTorch's portable kernel
        # (~100 us on the stem's 32x28x28 map) between two delegate calls
        pooled = h.mean(dim=(2, 3), keepdim=True).flatten(1)
        if self.mapped:
            budget = budget_shift(budget, self.starts, self.spans, self.slopes, self.base)
        return (self.linear(pooled) + budget * cost).argmax(dim=1)


class GatedDeploy(nn.Module):
    """Every segment in one eager module, ``(input, budget) -> (logits, width index per block)`` at batch 1:
    what the exported segments are verified against."""

    def __init__(self, net: SlimNet, *, full_from: float | None = None) -> None:
        super().__init__()
        self.full_from = full_from  # budgets from here up run every block at full width, no gates
        net = net.eval()
        self.stem, self.head = net.stem, net.head
        self.gates = nn.ModuleList(
            _Gate(cast(nn.Linear, g), c, net.budget_map) for g, c in zip(net.gates, net.costs, strict=True)
        )
        self.shortcuts = nn.ModuleList(cast(SlimBlock, b).shortcut for b in net.blocks)
        self.branches = nn.ModuleList(
            nn.ModuleList(_Branch(cast(SlimBlock, b), j) for j in range(len(cast(SlimBlock, b).widths)))
            for b in net.blocks
        )

    def forward(self, x: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.full_from is not None and float(budget) >= self.full_from:
            return self.full(x), torch.tensor([len(b) - 1 for b in self.branches])
        h = self.stem(x)
        picks = []
        for gate, shortcut, branches in zip(self.gates, self.shortcuts, self.branches, strict=True):
            idx = gate(h, budget)
            picks.append(idx)
            h = self.run_block(cast(nn.ModuleList, branches), idx[0], h, shortcut(h))
        return self.head(h), torch.cat(picks)

    def full(self, x: torch.Tensor) -> torch.Tensor:
        """Every block at its largest width, no gates: the ``full`` segment."""
        h = self.stem(x)
        for shortcut, branches in zip(self.shortcuts, self.branches, strict=True):
            h = cast(nn.ModuleList, branches)[-1](h, shortcut(h))
        return cast(torch.Tensor, self.head(h))

    def run_block(
        self, branches: nn.ModuleList, idx: torch.Tensor, h: torch.Tensor, shortcut: torch.Tensor
    ) -> torch.Tensor:
        """The block whose width choices are ``branches``, at width index ``idx`` (a 0-d tensor)."""
        return cast(torch.Tensor, branches[int(idx)](h, shortcut))


class _StemSegment(nn.Module):
    def __init__(self, deploy: GatedDeploy) -> None:
        super().__init__()
        self.stem, self.gate = deploy.stem, deploy.gates[0]

    def forward(self, x: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        return h, self.gate(h, budget)


class _FullSegment(nn.Module):
    def __init__(self, deploy: GatedDeploy) -> None:
        super().__init__()
        self.deploy = deploy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deploy.full(x)


class _BlockSegment(nn.Module):
    def __init__(self, deploy: GatedDeploy, i: int, j: int) -> None:
        super().__init__()
        self.branch = cast(nn.ModuleList, deploy.branches[i])[j]
        self.shortcut = deploy.shortcuts[i]
        self.last = i == len(deploy.branches) - 1
        self.next: nn.Module = deploy.head if self.last else deploy.gates[i + 1]

    def forward(self, h: torch.Tensor, budget: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.branch(h, self.shortcut(h))
        if self.last:
            return (self.next(h),)
        return h, self.next(h, budget)


def gating_spec(net: SlimNet, *, full_from: float | None = None) -> Gating:
    """The manifest's description of ``net``'s gated blocks."""
    return Gating(
        blocks=tuple(
            GatedBlock(name=name, widths=cast(SlimBlock, b).widths, macs=tuple(m))
            for name, b, m in zip(net.names, net.blocks, net.block_macs, strict=True)
        ),
        fixed_macs=net.fixed_macs,
        full_from=full_from,
    )


def export_gated_pte(deploy: GatedDeploy, example: torch.Tensor, path: Path) -> None:
    """``deploy`` -> one ``.pte`` with a method per segment, all lowered to XNNPACK together."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        with torch.no_grad():
            programs = {
                segment: torch.export.export(module, args, strict=False)
                for segment, module, args in _segments(deploy.eval(), example)
            }
            lowered = to_edge_transform_and_lower(
                programs, partitioner=[XnnpackPartitioner()]
            ).to_executorch()
    except Exception as exc:
        raise ExportError(f"gated ExecuTorch export failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    path.write_bytes(lowered.buffer)


def _segments(
    deploy: GatedDeploy, example: torch.Tensor
) -> list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]]:
    """``(name, module, example inputs)`` of every segment, in execution order."""
    b = torch.tensor(0.0)
    x = example[:1].contiguous()
    out: list[tuple[str, nn.Module, tuple[torch.Tensor, ...]]] = [
        ("stem", _StemSegment(deploy).eval(), (x, b))
    ]
    with torch.no_grad():
        h = deploy.stem(x)
        for i, branches in enumerate(deploy.branches):
            for j in range(len(cast(nn.ModuleList, branches))):
                out.append((f"block{i}_w{j}", _BlockSegment(deploy, i, j).eval(), (h, b)))
            h = cast(nn.ModuleList, branches)[-1](h, deploy.shortcuts[i](h))
    if deploy.full_from is not None:
        out.append(("full", _FullSegment(deploy).eval(), (x,)))
    return out


def export_gated_onnx_segments(
    deploy: GatedDeploy, example: torch.Tensor, out: Path, *, name: str
) -> dict[str, Path]:
    """One ONNX graph per segment, ``out/NAME.SEGMENT.onnx``; returns segment -> path."""
    paths = {}
    try:
        for segment, module, args in _segments(deploy.eval(), example):
            path = out / f"{name}.{segment}.onnx"
            with _quiet():
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    input_names=["features", "budget"] if len(args) == 2 else ["input"],
                    optimize=True,
                    verbose=False,
                )
                program.save(str(path))
            paths[segment] = path
    except Exception as exc:
        raise ExportError(f"gated ONNX export failed: {type(exc).__name__}: {str(exc)[:500]}") from exc
    return paths


GatedFiles = Path | dict[str, Path]
"""One file holding the whole gated model, or one file per segment."""


def export_gated(
    deploy: GatedDeploy, example: torch.Tensor, out: Path, runtime: Runtime, *, name: str
) -> GatedFiles:
    """Export ``deploy`` for ``runtime`` into directory ``out``: ONNX as one graph per segment, ExecuTorch
    as one multi-method ``NAME.pte``."""
    if runtime == "onnx":
        return export_gated_onnx_segments(deploy, example, out, name=name)
    path = out / f"{name}.pte"
    export_gated_pte(deploy, example, path)
    return path


def gated_runner(
    files: GatedFiles, runtime: Runtime, *, gating: Gating, budget: BudgetInput, threads: int = 1
) -> Callable[[np.ndarray, float], tuple[np.ndarray, tuple[int, ...]]]:
    """``(x, budget) -> (logits, width indices)`` through the agent's runtime facade, as a device runs it."""
    return make_backend(runtime, threads=threads).load_gated(files, gating=gating, budget=budget).run


@torch.no_grad()
def verify_gated(
    deploy: GatedDeploy,
    files: GatedFiles,
    runtime: Runtime,
    inputs: torch.Tensor,
    budgets: Sequence[float],
    *,
    gating: Gating,
    budget: BudgetInput,
    atol: float = 1e-4,
) -> float:
    """Every input at every budget: the file picks the same widths as eager and its logits are within
    ``atol``; raises :class:`VerificationError` otherwise. Returns the largest difference seen."""
    label = files.name if isinstance(files, Path) else f"the gated {runtime} segments"
    try:
        run = gated_runner(files, runtime, gating=gating, budget=budget)
    except Exception as exc:
        raise VerificationError(f"{label} does not load in {runtime}: {exc}") from exc
    deploy.eval()
    worst = 0.0
    for b in budgets:
        for i in range(inputs.shape[0]):
            x = inputs[i : i + 1].contiguous()
            expected, picks = deploy(x, torch.tensor(b, dtype=torch.float32))
            got, got_picks = run(x.numpy(), b)
            if tuple(int(p) for p in picks) != tuple(got_picks):
                raise VerificationError(
                    f"{label} in {runtime} picks widths {got_picks} at budget {b}, eager {picks.tolist()}"
                )
            worst = max(worst, float(np.abs(got - expected.numpy()).max()))
    if not worst <= atol:
        raise VerificationError(f"{label} differs from eager by {worst:.3g} in {runtime} (limit {atol})")
    return worst
