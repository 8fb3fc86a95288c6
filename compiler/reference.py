"""The reference model: a small residual CNN for 28x28 grey images (Fashion-MNIST).

Four stages; each stride-2 residual block halves the resolution and doubles the width, so most compute
sits in wide, low-resolution convolutions: those run close to their MAC count in XNNPACK and
onnxruntime, which is what lets a pruned variant be faster by close to its MACs ratio.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ReferenceNet", "reference"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (1x1 conv + BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ReferenceNet(nn.Module):
    """stem conv -> stride-2 residual blocks -> global average pool -> dropout -> linear."""

    def __init__(
        self,
        *,
        widths: tuple[int, ...] = (32, 64, 128, 256),
        classes: int = 10,
        in_channels: int = 1,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.blocks = nn.Sequential(*(BasicBlock(a, b, stride=2) for a, b in itertools.pairwise(widths)))
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        # keepdim=True: XNNPACK takes it as global average pooling; without it the mean falls back to
        # ExecuTorch's slow portable kernel between two delegate calls
        return self.head(self.dropout(x.mean(dim=(2, 3), keepdim=True).flatten(1)))


def reference(*, classes: int = 10, in_channels: int = 1) -> ReferenceNet:
    """The model ``--model reference`` compiles."""
    return ReferenceNet(classes=classes, in_channels=in_channels)
