"""Fashion-MNIST IDX loading, its errors, and the in-code fixture."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from agent.data import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_ENV,
    load_fashion_mnist,
    make_fixture,
    read_idx,
    write_idx,
)
from agent.errors import DataError


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
def test_idx_round_trip(tmp_path: Path, dtype: str, compress: bool) -> None:
    array = (np.arange(2 * 3 * 4) - 7).reshape(2, 3, 4).astype(dtype)
    path = tmp_path / "a.idx"
    write_idx(path, array, compress=compress)
    back = read_idx(path)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "a.idx"
    write_idx(path, np.zeros((10, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(DataError, match="promises"):
        read_idx(path)


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "a.idx"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(path)


def test_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "a.idx.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x05abcde")[:-6])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path)


def test_missing_data_names_the_debian_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found") as info:
        load_fashion_mnist("test", root=tmp_path / "nowhere")
    assert "apt-get install dataset-fashion-mnist" in info.value.hint
    assert FASHION_MNIST_ENV in info.value.hint


def test_environment_variable_overrides_path(fixture_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(FASHION_MNIST_ENV, str(fixture_data_dir))
    data = load_fashion_mnist("train")
    assert len(data) == 100
    assert data.class_names == FASHION_MNIST_CLASSES


def test_plain_files_accepted(tmp_path: Path) -> None:
    fx = make_fixture(n=20)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", fx.images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", fx.labels.astype(np.uint8))
    data = load_fashion_mnist("test", root=tmp_path)
    np.testing.assert_array_equal(data.images, fx.images)
    np.testing.assert_array_equal(data.labels, fx.labels)


def test_label_count_mismatch(tmp_path: Path) -> None:
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((4,), np.uint8))
    with pytest.raises(DataError, match="5 images but labels"):
        load_fashion_mnist("test", root=tmp_path)


def test_unknown_split() -> None:
    with pytest.raises(DataError, match="unknown split"):
        load_fashion_mnist("validation")  # type: ignore[arg-type]


def test_fixture_is_deterministic_and_balanced() -> None:
    a, b = make_fixture(n=100, seed=3), make_fixture(n=100, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert np.bincount(a.labels).tolist() == [10] * 10
    assert not np.array_equal(a.images, make_fixture(n=100, seed=4).images)


def test_fixture_is_learnable() -> None:
    # A nearest-centroid classifier fit on 200 samples must beat chance (10%) by far on 100 held-out
    # ones: the fixture carries class signal, so a training test on it can fail when training is broken.
    data = make_fixture(n=300, seed=0)
    images, labels = data.images.astype(float), data.labels
    centroids = np.stack([images[:200][labels[:200] == c].mean(0) for c in range(10)])
    dist = ((images[200:, None] - centroids[None]) ** 2).sum(axis=(2, 3))
    assert (dist.argmin(1) == labels[200:]).mean() > 0.6


@pytest.mark.skipif(
    not DEFAULT_FASHION_MNIST_DIR.exists(),
    reason="Debian package dataset-fashion-mnist not installed (`make test` installs it)",
)
def test_real_fashion_mnist() -> None:
    test = load_fashion_mnist("test", root=DEFAULT_FASHION_MNIST_DIR)
    assert test.images.shape == (10000, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    train = load_fashion_mnist("train", root=DEFAULT_FASHION_MNIST_DIR)
    assert train.images.shape == (60000, 28, 28)
