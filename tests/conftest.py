"""Shared fixtures: a private Mosquitto for the session, sample contract objects, fixture data on disk."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.contract import BundleManifest
from agent.data import make_fixture, write_idx
from agent.signing import KeyPair, generate_keys
from fleet.broker import MosquittoBroker, find_mosquitto
from tests.samples import sample_manifest


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
