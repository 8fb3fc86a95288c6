"""A residual network whose blocks run at several inner widths, with a gate per block.

Analysis and surgery for input-dependent channel gating (DS-Net / slimmable style):

- :func:`gating_parts` splits a model into stem, residual blocks and head. The reference model provides
  them (``ReferenceNet.gating_parts``); a user model can too, by defining the same method.
- :func:`order_channels` permutes each block's inner channels by importance, so that a prefix of width
  ``k`` is the best ``k`` channels; then one set of weights serves every width.
- :class:`SlimNet` runs each block at a chosen width (weights shared across widths; the second batch norm
  is private per width, "switchable BN", because its statistics depend on how many channels feed it) and
  has one gate per block: a linear layer on the pooled block input that scores the widths. The run-time
  ``budget`` is added to the scores times each width's relative cost, so a larger budget can only
  choose wider blocks (the argmax of ``score_j + budget * cost_j`` never moves to a cheaper ``j`` as the
  budget grows). After training, :attr:`SlimNet.budget_map` (set by the compiler's calibration) maps the
  run-time budget through a non-decreasing piecewise-linear function first, so that the budget reads as
  the share of the gated compute the gates actually spend (:func:`budget_shift`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from compiler.errors import CompileError
from compiler.reference import ReferenceNet

__all__ = [
    "BUDGET_SCALE",
    "DEFAULT_FRACTIONS",
    "BudgetMap",
    "GatingError",
    "SlimBlock",
    "SlimNet",
    "budget_shift",
    "gating_parts",
    "map_tensors",
    "order_channels",
    "width_choices",
]

DEFAULT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# How strongly the budget moves the scores: a budget step of 0.1 shifts the full width's score by 1
# against a zero-cost choice, comparable to what the gates learn to output.
BUDGET_SCALE = 10.0


BudgetMap = tuple[tuple[float, ...], tuple[float, ...]]
"""Knots ``(budgets, raw budgets)`` of a piecewise-linear map; budgets strictly increasing."""


def budget_shift(
    budget: float | torch.Tensor, starts: torch.Tensor, spans: torch.Tensor, slopes: torch.Tensor, base: float
) -> torch.Tensor:
    """The piecewise-linear map with segments from ``starts`` of length ``spans`` and ``slopes``, value
    ``base`` at (and below) the first knot, flat past the last; elementwise over ``budget`` (any shape).
    Written with sub, relu, minimum, mul and sum so that it exports to ONNX and ExecuTorch as is.

    >>> t = map_tensors(((0.25, 0.5, 1.0), (0.0, 0.5, 0.6)))
    >>> [round(float(budget_shift(b, *t)), 3) for b in (0.1, 0.25, 0.375, 0.75, 2.0)]
    [0.0, 0.0, 0.25, 0.55, 0.6]
    """
    b = torch.as_tensor(budget, dtype=torch.float32).unsqueeze(-1)
    return base + (torch.minimum(F.relu(b - starts), spans) * slopes).sum(-1)


def map_tensors(knots: BudgetMap) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(starts, spans, slopes, base)`` of :func:`budget_shift` for ``knots``."""
    xs = torch.tensor(knots[0], dtype=torch.float32)
    ys = torch.tensor(knots[1], dtype=torch.float32)
    spans = xs[1:] - xs[:-1]
    if len(xs) < 2 or len(xs) != len(ys) or not bool((spans > 0).all()):
        raise ValueError(f"budget map knots must be >= 2 strictly increasing budgets, got {knots}")
    return xs[:-1], spans, (ys[1:] - ys[:-1]) / spans, float(ys[0])


class GatingError(CompileError):
    """The model cannot be gated as asked."""


class _Block(Protocol):
    conv1: nn.Conv2d
    bn1: nn.BatchNorm2d
    conv2: nn.Conv2d
    bn2: nn.BatchNorm2d
    shortcut: nn.Module


class _Pool(nn.Module):
    """Global average pooling to a (batch, channels) matrix (``keepdim=True`` so XNNPACK lowers it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True).flatten(1)


def _reference_parts(model: ReferenceNet) -> tuple[nn.Module, list[nn.Module], nn.Module, list[str]]:
    stem = nn.Sequential(model.stem, model.stem_bn, nn.ReLU())
    head = nn.Sequential(_Pool(), model.dropout, model.head)
    return stem, list(model.blocks), head, [f"blocks.{i}" for i in range(len(model.blocks))]


def gating_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module], nn.Module, list[str]]:
    """``(stem, blocks, head, block names)`` of ``model``, where ``head(blocks(stem(x)))`` is its output.

    Each block must compute ``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))`` with plain (not
    grouped) convolutions; the model says so by defining ``gating_parts()``.
    """
    parts = getattr(model, "gating_parts", None)
    if parts is None and isinstance(model, ReferenceNet):
        parts = lambda: _reference_parts(model)  # noqa: E731
    if parts is None:
        raise GatingError(
            f"{type(model).__name__} does not say where its residual blocks are",
            hint="define gating_parts() -> (stem, [blocks], head, [names]) (see compiler/gating/slim.py); "
            "each block needs conv1, bn1, conv2, bn2 and shortcut",
        )
    stem, blocks, head, names = parts()
    for name, block in zip(names, blocks, strict=True):
        for attr, kind in (("conv1", nn.Conv2d), ("bn1", nn.BatchNorm2d), ("conv2", nn.Conv2d)):
            if not isinstance(getattr(block, attr, None), kind):
                raise GatingError(f"block {name} has no {kind.__name__} {attr}")
        if block.conv1.groups != 1 or block.conv2.groups != 1:
            raise GatingError(f"block {name} uses grouped convolutions; gating needs plain ones")
    return stem, list(blocks), head, list(names)


def width_choices(channels: int, fractions: Sequence[float], *, align: int = 8) -> tuple[int, ...]:
    """Inner channel counts for ``fractions`` of ``channels``, multiples of ``align`` where possible.

    >>> width_choices(128, (0.25, 0.5, 0.75, 1.0))
    (32, 64, 96, 128)
    """
    out = []
    for f in fractions:
        k = round(channels * f / align) * align if channels >= 2 * align else round(channels * f)
        out.append(min(channels, max(1, k)))
    widths = tuple(sorted(set(out)))
    if widths[-1] != channels:
        widths = (*widths, channels)
    if len(widths) < 2:
        raise GatingError(f"a block with {channels} inner channels leaves nothing to choose from")
    return widths


@torch.no_grad()
def order_channels(block: nn.Module) -> None:
    """Permute ``block``'s inner channels, most important first (in place; the function is unchanged).

    Importance of inner channel ``c``: ``|gamma_c|`` of ``bn1`` times the L1 norm of the ``conv2`` weights
    that read it, i.e. how strongly the channel can move the block's output.
    """
    b = cast(_Block, block)
    score = b.bn1.weight.abs() * b.conv2.weight.abs().sum(dim=(0, 2, 3))
    perm = torch.argsort(score, descending=True)
    b.conv1.weight.copy_(b.conv1.weight[perm])
    if b.conv1.bias is not None:
        b.conv1.bias.copy_(b.conv1.bias[perm])
    for t in (b.bn1.weight, b.bn1.bias, b.bn1.running_mean, b.bn1.running_var):
        t.copy_(t[perm])
    b.conv2.weight.copy_(b.conv2.weight[:, perm])


class SlimBlock(nn.Module):
    """One residual block that runs at any of ``widths`` inner channels (a prefix of its channels)."""

    def __init__(self, block: nn.Module, widths: Sequence[int]) -> None:
        super().__init__()
        b = cast(_Block, block)
        self.conv1, self.bn1, self.conv2, self.shortcut = b.conv1, b.bn1, b.conv2, b.shortcut
        self.widths = tuple(widths)
        self.bn2s = nn.ModuleList(copy.deepcopy(b.bn2) for _ in self.widths)

    def forward(self, x: torch.Tensor, j: int) -> torch.Tensor:
        k = self.widths[j]
        y = F.conv2d(x, self.conv1.weight[:k], None, self.conv1.stride, self.conv1.padding)
        bn = self.bn1
        y = F.batch_norm(
            y,
            cast(torch.Tensor, bn.running_mean)[:k],
            cast(torch.Tensor, bn.running_var)[:k],
            bn.weight[:k],
            bn.bias[:k],
            self.training,
            0.1 if bn.momentum is None else bn.momentum,
            bn.eps,
        )
        y = F.conv2d(F.relu(y), self.conv2.weight[:, :k], None, self.conv2.stride, self.conv2.padding)
        return F.relu(self.bn2s[j](y) + self.shortcut(x))


def _conv_macs(conv: nn.Conv2d, cin: int, cout: int, out_hw: tuple[int, int]) -> int:
    kh, kw = conv.kernel_size
    return cin * cout * kh * kw * out_hw[0] * out_hw[1]


class SlimNet(nn.Module):
    """Stem, :class:`SlimBlock` s with a gate each, head. See the module docstring.

    ``forward(x, widths)`` runs fixed width indices per block (training the shared weights);
    ``gated(x, budget)`` lets the gates choose per input. ``block_macs[i][j]`` is block ``i``'s MACs at
    width index ``j`` and ``fixed_macs`` the rest (stem, gates, head), for one ``example``-shaped input.
    """

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        *,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        align: int = 8,
    ) -> None:
        super().__init__()
        stem, blocks, head, names = gating_parts(copy.deepcopy(model).eval())
        self.stem, self.head, self.names = stem, head, names
        for block in blocks:
            order_channels(block)
        self.blocks = nn.ModuleList(
            SlimBlock(b, width_choices(cast(_Block, b).conv1.out_channels, fractions, align=align))
            for b in blocks
        )
        self.gates = nn.ModuleList(
            nn.Linear(cast(_Block, b).conv1.in_channels, len(s.widths))
            for b, s in zip(blocks, self.blocks, strict=True)
        )
        for gate, block in zip(self.gates, self.blocks, strict=True):
            nn.init.zeros_(gate.weight)
            # Start wide: the untrained gate prefers the full width, so gate training begins from the
            # slimmable net's best accuracy and the compute penalty pulls widths down.
            with torch.no_grad():
                gate.bias.copy_(torch.linspace(-1.0, 1.0, len(block.widths)))
        self.costs = [
            torch.tensor([w / b.widths[-1] for w in b.widths], dtype=torch.float32) for b in self.blocks
        ]
        self.block_macs, self.fixed_macs = self._count_macs(example)
        self.budget_map = None  # while training the raw budget goes to the gates as is
        total = sum(m[-1] for m in self.block_macs)
        # Share of the gated blocks' full MACs each width costs: the compute penalty's unit.
        self.mac_share = [torch.tensor(m, dtype=torch.float32) / total for m in self.block_macs]

    @property
    def width_count(self) -> list[int]:
        """How many widths each block offers."""
        return [len(cast(SlimBlock, b).widths) for b in self.blocks]

    @torch.no_grad()
    def _count_macs(self, example: torch.Tensor) -> tuple[list[list[int]], int]:
        from compiler.measure import count_macs_params

        was = self.training
        self.eval()
        h = self.stem(example[:1])
        fixed = count_macs_params(self.stem, example[:1])[0]
        block_macs = []
        for block, gate in zip(self.blocks, self.gates, strict=True):
            assert isinstance(block, SlimBlock)
            cin = block.conv1.in_channels
            fixed += gate.in_features * gate.out_features
            out = block(h, len(block.widths) - 1)
            cout, hw = out.shape[1], (out.shape[2], out.shape[3])
            short = 0
            for m in block.shortcut.modules():
                if isinstance(m, nn.Conv2d):
                    short += _conv_macs(m, m.in_channels, m.out_channels, hw)
            block_macs.append(
                [
                    _conv_macs(block.conv1, cin, k, hw) + _conv_macs(block.conv2, k, cout, hw) + short
                    for k in block.widths
                ]
            )
            h = out
        fixed += count_macs_params(self.head, h)[0]
        self.train(was)
        return block_macs, int(fixed)

    def forward(self, x: torch.Tensor, widths: Sequence[int] | None = None) -> torch.Tensor:
        h = self.stem(x)
        for i, block in enumerate(self.blocks):
            h = block(h, len(block.widths) - 1 if widths is None else widths[i])
        out: torch.Tensor = self.head(h)
        return out

    @property
    def budget_map(self) -> BudgetMap | None:
        """The calibrated budget map (see the module docstring); ``None``: the raw budget as is."""
        return self._budget_map

    @budget_map.setter
    def budget_map(self, knots: BudgetMap | None) -> None:
        self._budget_map = knots
        self._map = None if knots is None else map_tensors(knots)  # built once, not per gate call

    def raw_budget(self, budget: float | torch.Tensor) -> float | torch.Tensor:
        """``budget`` through :attr:`budget_map` (unchanged when there is none)."""
        return budget if self._map is None else budget_shift(budget, *self._map)

    def scores(self, i: int, h: torch.Tensor, budget: float | torch.Tensor) -> torch.Tensor:
        """Gate ``i``'s scores for input ``h``: ``gate(mean(h)) + BUDGET_SCALE * raw_budget * cost``."""
        raw = self.raw_budget(budget)
        return cast(torch.Tensor, self.gates[i](h.mean(dim=(2, 3)))) + BUDGET_SCALE * raw * self.costs[i]

    def gated(
        self, x: torch.Tensor, budget: float | torch.Tensor, *, tau: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, share of the gated MACs computed per sample, chosen index per sample and block)``.

        With ``tau`` (training), a straight-through Gumbel-softmax picks one width per sample and block;
        every width is computed and the one-hot mixes them, so the gates get gradients. Without it, the
        argmax picks, and each sample runs only its width.
        """
        h = self.stem(x)
        share = torch.zeros(x.shape[0])
        picks = []
        for i, block in enumerate(self.blocks):
            s = self.scores(i, h, budget)
            if tau is not None:
                onehot = F.gumbel_softmax(s, tau=tau, hard=True)
                outs = torch.stack([block(h, j) for j in range(len(block.widths))], dim=1)
                h = (onehot[:, :, None, None, None] * outs).sum(dim=1)
                share = share + onehot @ self.mac_share[i]
                picks.append(onehot.argmax(1))
            else:
                idx = s.argmax(1)
                out: torch.Tensor | None = None
                for j in idx.unique().tolist():
                    sel = (idx == j).nonzero().squeeze(1)
                    y = block(h[sel], j)
                    if out is None:
                        out = y.new_empty((h.shape[0], *y.shape[1:]))
                    out[sel] = y
                assert out is not None
                h = out
                share = share + self.mac_share[i][idx]
                picks.append(idx)
        return self.head(h), share, torch.stack(picks, dim=1)
