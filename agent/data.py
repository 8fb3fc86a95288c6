"""Reference data: Fashion-MNIST from IDX files, and a tiny synthetic fixture made in code.

numpy only (no torch), so the agent, the simulator and the compiler all read data the same way.

The Debian package ``dataset-fashion-mnist`` installs the four IDX files (gzipped) under
``/usr/share/datasets/fashion-mnist/``. Another directory can be given as ``root`` or through the
environment variable ``EDGEPRUNE_FASHION_MNIST_DIR``; plain and ``.gz`` files are both accepted.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agent.errors import DataError

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_ENV",
    "ImageDataset",
    "fashion_mnist_dir",
    "load_fashion_mnist",
    "make_fixture",
    "read_idx",
    "write_idx",
]

DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "EDGEPRUNE_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type codes (third byte of the magic number) -> numpy big-endian dtype.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_CODES = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}


@dataclass(frozen=True)
class ImageDataset:
    """Images ``uint8 [N, H, W]`` and labels ``int64 [N]`` with the class names."""

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise DataError(f"images must be uint8 [N, H, W], got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels have shape {self.labels.shape}")
        if self.labels.size and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise DataError(f"labels must lie in 0..{len(self.class_names) - 1}")

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (optionally gzipped); :class:`DataError` if it is not valid IDX."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DataError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise DataError(
            f"{path} holds {len(raw) - header} data bytes, its header {shape} promises {expected}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> None:
    """Write ``array`` as an IDX file (gzipped if ``compress``); the inverse of :func:`read_idx`."""
    native = array.dtype.newbyteorder("=")
    if native not in _IDX_CODES:
        raise DataError(f"IDX cannot hold dtype {array.dtype}")
    header = bytes([0, 0, _IDX_CODES[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array).astype(_IDX_DTYPES[_IDX_CODES[native]]).tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)


def fashion_mnist_dir(root: Path | str | None = None) -> Path:
    """The directory to read from: ``root``, else ``$EDGEPRUNE_FASHION_MNIST_DIR``, else the Debian path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else DEFAULT_FASHION_MNIST_DIR


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(split: Literal["train", "test"], *, root: Path | str | None = None) -> ImageDataset:
    """Load a split of Fashion-MNIST: 60,000 train or 10,000 test images of 28x28.

    >>> test = load_fashion_mnist("test")  # doctest: +SKIP
    >>> test.images.shape, test.class_names[0]  # doctest: +SKIP
    ((10000, 28, 28), 'T-shirt/top')
    """
    if split not in _FILES:
        raise DataError(f"unknown split {split!r}", hint="use 'train' or 'test'")
    directory = fashion_mnist_dir(root)
    stems = _FILES[split]
    paths = [_find(directory, stem) for stem in stems]
    missing = [stem for stem, p in zip(stems, paths, strict=True) if p is None]
    if missing:
        raise DataError(
            f"Fashion-MNIST {split} split not found in {directory} (missing {', '.join(missing)}[.gz])",
            hint=(
                "install the Debian package: sudo apt-get install dataset-fashion-mnist; "
                f"or point ${FASHION_MNIST_ENV} (or --data) at a directory holding the IDX files"
            ),
        )
    images = read_idx(paths[0])  # type: ignore[arg-type]
    labels = read_idx(paths[1])  # type: ignore[arg-type]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{paths[0]} should hold uint8 images [N, H, W], holds {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise DataError(f"{paths[1]} should hold one label per image, holds shape {labels.shape}")
    return ImageDataset(images=images, labels=labels.astype(np.int64), class_names=FASHION_MNIST_CLASSES)


def make_fixture(*, n: int = 200, size: int = 28, classes: int = 10, seed: int = 0) -> ImageDataset:
    """A tiny learnable data set made in code, shaped like Fashion-MNIST, for fast tests.

    Each class is a fixed random blurred template; samples are shifted, scaled and noised copies, so a
    small CNN separates them in a few steps while a constant predictor does not.
    """
    if n < classes:
        raise DataError(f"need n >= classes, got n={n}, classes={classes}")
    rng = np.random.default_rng(seed)
    templates = rng.random((classes, size, size))
    for _ in range(2):  # cheap blur, so templates have shapes, not just pixel noise
        templates = (templates + np.roll(templates, 1, 1) + np.roll(templates, 1, 2)) / 3
    templates = (templates - templates.min(axis=(1, 2), keepdims=True)) / np.ptp(
        templates, axis=(1, 2), keepdims=True
    )
    labels = np.arange(n, dtype=np.int64) % classes
    rng.shuffle(labels)
    shifts = rng.integers(-2, 3, size=(n, 2))
    contrast = rng.uniform(0.7, 1.0, size=(n, 1, 1))
    images = np.stack(
        [np.roll(templates[y], tuple(s), axis=(0, 1)) for y, s in zip(labels, shifts, strict=True)]
    )
    images = images * contrast + rng.normal(0, 0.08, size=images.shape)
    pixels = np.clip(images * 255, 0, 255).astype(np.uint8)
    names = tuple(f"class-{i}" for i in range(classes))
    return ImageDataset(images=pixels, labels=labels, class_names=names)
