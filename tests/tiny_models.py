"""Tiny models built in code, one per structure the pruner must keep consistent. A registry feeds
``pytest.mark.parametrize``, so a new structure is tested by adding it here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
    """A residual add: the block output and the shortcut must lose the same channels."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 2, 1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.conv1 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


class Depthwise(nn.Module):
    """Depthwise-separable convs: a depthwise conv's input and output channels are coupled."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 2, 1)
        self.dw = nn.Conv2d(16, 16, 3, 1, 1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.head = nn.Linear(24, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.pw(F.relu(self.bn(self.dw(x)))))
        return self.head(x.mean((2, 3)))


class Concat(nn.Module):
    """Two branches concatenated: the consumer's input channels split between them."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, 2, 1)
        self.a = nn.Conv2d(8, 12, 3, 1, 1)
        self.b = nn.Conv2d(8, 12, 1)
        self.mix = nn.Conv2d(24, 16, 3, 2, 1)
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return self.head(F.relu(self.mix(x)).mean((2, 3)))


class LinearHead(nn.Module):
    """Conv features flattened into a two-layer MLP head: flatten couples channels with many inputs."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, 2, 1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc1 = nn.Linear(8 * 16, 32)
        self.fc2 = nn.Linear(32, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv(x))).flatten(1)
        return self.fc2(F.relu(self.fc1(x)))


TINY_MODELS: dict[str, type[nn.Module]] = {
    "residual": Residual,
    "depthwise": Depthwise,
    "concat": Concat,
    "linear-head": LinearHead,
}


def residual() -> nn.Module:
    """Factory for ``--model tests.tiny_models:residual``."""
    return Residual()


class Unprunable(nn.Module):
    """Holds a weight in a custom layer type the pruner has no rule for."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, 2, 1)
        self.scale = ChannelScale(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.scale(F.relu(self.conv(x))).mean((2, 3)))


class ChannelScale(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


class DataDependent(nn.Module):
    """Python control flow on tensor values: torch.export cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, 2, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return self.head(y.mean((2, 3)))


def data_dependent() -> nn.Module:
    return DataDependent()


def small_reference(*, classes: int = 10, in_channels: int = 1) -> nn.Module:
    """Factory for ``--model tests.tiny_models:small_reference``: the reference architecture, 1/4 wide,
    so the gated stage runs in seconds."""
    from compiler.reference import ReferenceNet

    return ReferenceNet(widths=(8, 16, 32, 64), classes=classes, in_channels=in_channels)
