"""Data for the compiler: torch tensors from :mod:`agent.data`, user data sets, augmentation.

Accepted ``--data`` values: ``fashion-mnist`` (the Debian package, or ``$EDGEPRUNE_FASHION_MNIST_DIR``),
a directory of IDX files laid out like Fashion-MNIST, an ``.npz`` file with ``x_train, y_train, x_test,
y_test`` (uint8 images [N, H, W] or [N, H, W, C], integer labels) and optional ``class_names``, or an
image folder ``DIR/{train,test}/<class>/*.png``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agent.data import ImageDataset, load_fashion_mnist
from compiler.errors import CompileError

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "Splits",
    "TensorData",
    "augment",
    "load_splits",
    "to_tensors",
]

# Pixel statistics of the Fashion-MNIST training split, after dividing by 255.
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


@dataclass(frozen=True)
class TensorData:
    """Normalised images ``float32 [N, C, H, W]`` and labels ``int64 [N]``."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def subset(self, n: int, *, seed: int = 0) -> TensorData:
        """A fixed random subset of ``n`` samples (all of them if ``n`` is larger)."""
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return TensorData(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Splits:
    """Train and test tensors plus how they were normalised, for the manifest's input spec."""

    train: TensorData
    test: TensorData
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        _, c, h, w = self.test.x.shape
        return (1, int(c), int(h), int(w))


def to_tensors(data: ImageDataset, mean: tuple[float, ...], std: tuple[float, ...]) -> TensorData:
    """uint8 [N, H, W] (or [N, H, W, C]) -> normalised float32 [N, C, H, W]."""
    images = data.images if data.images.ndim == 4 else data.images[..., None]
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return TensorData((x - m) / s, torch.from_numpy(data.labels.astype(np.int64)))


def _npz(path: Path) -> tuple[ImageDataset, ImageDataset]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise CompileError(f"cannot read {path} as .npz: {exc}") from exc
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(arrays)
    if missing:
        raise CompileError(
            f"{path} lacks arrays {sorted(missing)}", hint="save x_train, y_train, x_test, y_test"
        )
    labels = np.concatenate([arrays["y_train"], arrays["y_test"]])
    names = (
        tuple(str(n) for n in arrays["class_names"])
        if "class_names" in arrays
        else tuple(str(i) for i in range(int(labels.max()) + 1))
    )

    def ds(x: np.ndarray, y: np.ndarray) -> ImageDataset:
        if x.dtype != np.uint8:
            raise CompileError(f"{path}: images must be uint8, got {x.dtype}")
        return ImageDataset(images=x, labels=y.astype(np.int64), class_names=names)

    return ds(arrays["x_train"], arrays["y_train"]), ds(arrays["x_test"], arrays["y_test"])


def _image_folder(root: Path) -> tuple[ImageDataset, ImageDataset]:
    try:
        from PIL import Image
    except ImportError as exc:  # pillow comes with matplotlib, which [compiler] installs
        raise CompileError("reading an image folder needs pillow", hint="pip install pillow") from exc
    names = tuple(sorted(p.name for p in (root / "train").iterdir() if p.is_dir()))
    if not names:
        raise CompileError(
            f"{root}/train has no class folders", hint="lay out DIR/{train,test}/<class>/*.png"
        )

    def load(split: str) -> ImageDataset:
        images, labels = [], []
        for label, name in enumerate(names):
            for file in sorted((root / split / name).glob("*")):
                if file.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"):
                    images.append(np.asarray(Image.open(file).convert("L")))
                    labels.append(label)
        if not images:
            raise CompileError(f"{root}/{split} holds no images")
        return ImageDataset(
            images=np.stack(images).astype(np.uint8), labels=np.array(labels), class_names=names
        )

    return load("train"), load("test")


def load_splits(data: str | Path) -> Splits:
    """Load ``--data`` (see the module docstring) into normalised tensors."""
    text = str(data)
    if text == "fashion-mnist":
        train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
        mean, std = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
        return Splits(
            to_tensors(train, mean, std),
            to_tensors(test, mean, std),
            train.class_names,
            mean,
            std,
            "fashion-mnist",
        )
    path = Path(text)
    if not path.exists():
        raise CompileError(
            f"--data {text!r}: no such file or directory",
            hint="use 'fashion-mnist', an IDX directory, an .npz file or an image folder",
        )
    if path.suffix == ".npz":
        train, test = _npz(path)
    elif (path / "train").is_dir():
        train, test = _image_folder(path)
    else:
        train, test = load_fashion_mnist("train", root=path), load_fashion_mnist("test", root=path)
    images = train.images.astype(np.float32) / 255.0
    channels = 1 if images.ndim == 3 else images.shape[-1]
    flat = images.reshape(-1, channels)
    mean = tuple(float(v) for v in flat.mean(0))
    std = tuple(max(float(v), 1e-3) for v in flat.std(0))
    return Splits(
        to_tensors(train, mean, std), to_tensors(test, mean, std), train.class_names, mean, std, str(path)
    )


def augment(x: torch.Tensor, generator: torch.Generator, *, pad: int = 2, flip: bool = True) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels and random horizontal flips, per sample.

    The random draws come from ``generator`` (on the CPU) whatever device ``x`` is on, so a seed gives the
    same batches on a CPU and a GPU; the crops are two gathers, not a loop over samples."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)
    cols = dx[:, None] + torch.arange(w, device=x.device)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    out = out.gather(3, cols[:, None, None, :].expand(n, c, h, w))
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask.view(n, 1, 1, 1), out.flip(3), out)
    return out
