"""`--data` forms the compiler accepts, and what a bad one gets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agent.data import make_fixture
from compiler.data import augment, load_splits
from compiler.errors import CompileError


def test_npz(npz_data: Path) -> None:
    splits = load_splits(npz_data)
    assert splits.train.x.shape == (500, 1, 28, 28) and splits.test.x.shape == (100, 1, 28, 28)
    assert splits.class_names[0] == "class-0"
    assert abs(float(splits.train.x.mean())) < 0.05 and abs(float(splits.train.x.std()) - 1) < 0.05


def test_idx_directory(fixture_data_dir: Path) -> None:
    splits = load_splits(fixture_data_dir)
    assert splits.input_shape == (1, 1, 28, 28)
    assert len(splits.class_names) == 10


def test_image_folder(tmp_path: Path) -> None:
    data = make_fixture(n=40)
    for split in ("train", "test"):
        for i, (img, label) in enumerate(zip(data.images, data.labels, strict=True)):
            folder = tmp_path / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(folder / f"{i}.png")
    splits = load_splits(tmp_path)
    assert len(splits.train) == 40 and splits.class_names == tuple(f"c{i}" for i in range(10))


def test_missing_path() -> None:
    with pytest.raises(CompileError, match="no such file or directory"):
        load_splits("/nonexistent/place")


def test_npz_without_the_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(CompileError, match="lacks arrays"):
        load_splits(tmp_path / "d.npz")


def test_npz_with_float_images(tmp_path: Path) -> None:
    z = np.zeros((4, 28, 28), np.float32)
    y = np.zeros(4, np.int64)
    np.savez(tmp_path / "d.npz", x_train=z, y_train=y, x_test=z, y_test=y)
    with pytest.raises(CompileError, match="must be uint8"):
        load_splits(tmp_path / "d.npz")


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_bytes(b"garbage")
    with pytest.raises(CompileError, match="cannot read"):
        load_splits(tmp_path / "d.npz")


def test_augment_keeps_shape_and_is_seeded() -> None:
    x = torch.randn(8, 1, 28, 28)
    a = augment(x, torch.Generator().manual_seed(0))
    b = augment(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("channels", [1, 3])
def test_augment_is_a_shifted_crop_of_the_replicate_padded_image_then_maybe_a_flip(channels: int) -> None:
    """Each output is the input moved by (dy, dx) in [-2, 2] with edge pixels repeated, then possibly
    mirrored: checked sample by sample against that definition, with the same random draws."""
    x = torch.randn(64, channels, 28, 28)
    out = augment(x, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws, in augment's order: dx, dy, flips
    dx, dy = torch.randint(0, 5, (64,), generator=gen), torch.randint(0, 5, (64,), generator=gen)
    flips = torch.rand(64, generator=gen) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    for i in range(64):
        want = padded[i, :, dy[i] : dy[i] + 28, dx[i] : dx[i] + 28]
        assert torch.equal(out[i], want.flip(2) if flips[i] else want), i
    assert 0 < int(flips.sum()) < 64 and len(set(zip(dx.tolist(), dy.tolist(), strict=True))) > 5
