"""Unstructured magnitude pruning: zeros that shrink the compressed download, not the inference time.

Zeroing the smallest weights keeps every tensor's shape, so XNNPACK and onnxruntime run exactly the
same dense kernels: **no speed-up**. What it buys is a smaller over-the-air download, because runs of
zeros compress well; :func:`compressed_size` measures that with zstd.
"""

from __future__ import annotations

from pathlib import Path

import torch
import zstandard
from torch import nn

__all__ = ["compressed_size", "sparsify"]


def sparsify(model: nn.Module, sparsity: float) -> float:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of each conv/linear, in place.

    Returns the fraction of all conv/linear weights that are zero afterwards.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    zeros = total = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                w = module.weight
                k = int(w.numel() * sparsity)
                if k:
                    threshold = w.abs().flatten().kthvalue(k).values
                    w.mul_((w.abs() > threshold).to(w.dtype))
                zeros += int((w == 0).sum())
                total += w.numel()
    return zeros / max(total, 1)


def compressed_size(path: Path, *, level: int = 19) -> int:
    """Bytes of ``path`` after zstd at ``level``: what an OTA download of the whole file costs."""
    return len(zstandard.ZstdCompressor(level=level).compress(path.read_bytes()))
