"""Shared fixtures: a private Mosquitto for the session, sample contract objects, fixture data on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.contract import BundleManifest
from agent.data import make_fixture, write_idx
from agent.signing import KeyPair, generate_keys
from fleet.broker import MosquittoBroker, find_mosquitto
from tests.samples import sample_manifest

if TYPE_CHECKING:
    from compiler.pipeline import CompileOptions, CompileResult


@pytest.fixture(scope="session")
def broker() -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free 127.0.0.1 port with a private config, stopped by pid at the end."""
    if find_mosquitto() is None:
        reason = "mosquitto binary not installed (Debian package 'mosquitto'; `make test` installs it)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must have it")
        pytest.skip(reason)
    with MosquittoBroker() as running:
        yield running


@pytest.fixture
def fixture_data_dir(tmp_path: Path) -> Path:
    """A directory laid out like the Debian package, holding the in-code fixture as gzipped IDX."""
    data = make_fixture(n=100, seed=1)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", data.images, compress=True)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", data.labels.astype("uint8"), compress=True)
    return tmp_path


@pytest.fixture
def manifest() -> BundleManifest:
    return sample_manifest()


@pytest.fixture(scope="session")
def npz_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-code fixture saved as an .npz data set (500 train, 100 test), as a user would supply it."""
    import numpy as np

    data = make_fixture(n=600, seed=0)
    path = tmp_path_factory.mktemp("data") / "fixture.npz"
    np.savez(
        path,
        x_train=data.images[:500],
        y_train=data.labels[:500],
        x_test=data.images[500:],
        y_test=data.labels[500:],
        class_names=np.array(data.class_names),
    )
    return path


@pytest.fixture(scope="session")
def signing_keys(tmp_path_factory: pytest.TempPathFactory) -> KeyPair:
    return generate_keys(tmp_path_factory.mktemp("keys"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or fill the user's checkpoint cache."""
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


FAST_TRAIN_EPOCHS = 2.0


def options(out: Path, keys: KeyPair, data: Path, **kw: object) -> CompileOptions:
    """Compile options for a tiny model on the fixture data: seconds, not minutes."""
    from compiler.pipeline import CompileOptions
    from compiler.train import TrainConfig

    base: dict[str, object] = dict(
        out=out,
        key=keys.private,
        model="tests.tiny_models:residual",
        data=str(data),
        ratios=(0.5,),
        train=TrainConfig(epochs=FAST_TRAIN_EPOCHS, batch_size=64, lr=0.1),
        finetune_epochs=1,
        latency_runs=20,
        calibration_samples=64,
        validation_samples=100,
        verify_samples=4,
    )
    base.update(kw)
    return CompileOptions(**base)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def compiled(
    tmp_path_factory: pytest.TempPathFactory, npz_data: Path, signing_keys: KeyPair
) -> CompileResult:
    """A real bundle (dense + static-50 of the tiny residual model, .onnx and .pte), compiled once.

    Treat it as read-only: copy it (shutil.copytree) before damaging it.
    """
    from compiler.pipeline import compile_bundle

    old = os.environ.get("EDGEPRUNE_CACHE")
    os.environ["EDGEPRUNE_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    try:
        return compile_bundle(options(tmp_path_factory.mktemp("bundles") / "b", signing_keys, npz_data))
    finally:
        if old is None:
            os.environ.pop("EDGEPRUNE_CACHE", None)
        else:
            os.environ["EDGEPRUNE_CACHE"] = old
