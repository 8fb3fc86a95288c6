"""agent.inputs: directory, npz, stdin and generator sources, and open_source's dispatch."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.errors import UserError
from agent.inputs import (
    DirectorySource,
    GeneratorSource,
    InputSource,
    NpzSource,
    Sample,
    StdinSource,
    open_source,
)


def gradient(h: int = 6, w: int = 4) -> np.ndarray:
    return (np.arange(h * w, dtype=np.uint16) * 7 % 256).astype(np.uint8).reshape(h, w)


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """b.png (grayscale), a.npy, c.png (RGB), notes.txt (ignored)."""
    Image.fromarray(gradient()).save(tmp_path / "b.png")
    np.save(tmp_path / "a.npy", np.full((6, 4), 9, np.uint8))
    Image.fromarray(np.dstack([gradient()] * 3)).save(tmp_path / "c.png")
    (tmp_path / "notes.txt").write_text("not an input")
    return tmp_path


def test_directory_reads_pngs_and_npy_in_sorted_order(image_dir: Path) -> None:
    samples = list(DirectorySource(image_dir))
    assert [Path(s.source).name for s in samples] == ["a.npy", "b.png", "c.png"]
    np.testing.assert_array_equal(samples[0].data, np.full((6, 4), 9, np.uint8))
    np.testing.assert_array_equal(samples[1].data, gradient())
    assert samples[2].data.shape == (6, 4, 3) and samples[2].data.dtype == np.uint8
    assert all(s.label is None for s in samples)


def test_directory_pattern_filters(image_dir: Path) -> None:
    assert [Path(s.source).name for s in DirectorySource(image_dir, pattern="*.png")] == ["b.png", "c.png"]


def test_directory_converts_palette_images_to_rgb(tmp_path: Path) -> None:
    Image.fromarray(gradient()).convert("P").save(tmp_path / "p.png")
    (sample,) = DirectorySource(tmp_path)
    assert sample.data.shape == (6, 4, 3)


def test_empty_directory_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing usable")
    with pytest.raises(UserError, match=r"no image or \.npy files"):
        DirectorySource(tmp_path)


def test_directory_source_on_a_file_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not a directory"):
        DirectorySource(tmp_path / "missing")


def test_unreadable_image_is_a_user_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(UserError, match=r"broken\.png"):
        list(DirectorySource(tmp_path))


def test_missing_pillow_is_a_user_error_with_hint(image_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(UserError, match="Pillow") as info:
        DirectorySource(image_dir)
    assert "pip install pillow" in info.value.hint


def test_npz_with_labels(npz_data: Path) -> None:
    source = NpzSource(npz_data)
    samples = list(source)
    with np.load(npz_data) as npz:
        x, y = npz["x_test"], npz["y_test"]
    assert len(samples) == len(source) == len(x) == 100
    np.testing.assert_array_equal(samples[7].data, x[7])
    assert [s.label for s in samples] == [int(v) for v in y]
    assert samples[7].source == f"{npz_data}[7]"


def test_npz_without_labels_falls_back_to_the_first_array(tmp_path: Path) -> None:
    path = tmp_path / "frames.npz"
    frames = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    np.savez(path, frames=frames)
    samples = list(NpzSource(path))
    assert len(samples) == 3 and all(s.label is None for s in samples)
    np.testing.assert_array_equal(samples[2].data, frames[2])


def test_npz_label_count_mismatch_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, x_test=np.zeros((3, 4, 4), np.uint8), y_test=np.zeros(2, np.int64))
    with pytest.raises(UserError, match="one per image"):
        NpzSource(path)


def test_npz_refuses_pickles(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x_test=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UserError, match=r"pickled\.npz"):
        NpzSource(path)


def test_stdin_reads_frames_until_eof() -> None:
    frames = np.arange(3 * 2 * 5, dtype=np.uint8).reshape(3, 2, 5)
    samples = list(StdinSource(io.BytesIO(frames.tobytes()), shape=(2, 5)))
    assert [s.source for s in samples] == ["stdin[0]", "stdin[1]", "stdin[2]"]
    for sample, frame in zip(samples, frames, strict=True):
        np.testing.assert_array_equal(sample.data, frame)
        assert sample.label is None


def test_stdin_empty_stream_gives_no_samples() -> None:
    assert list(StdinSource(io.BytesIO(b""), shape=(2, 5))) == []


def test_stdin_short_last_frame_is_a_user_error() -> None:
    source = StdinSource(io.BytesIO(bytes(10 + 4)), shape=(2, 5))
    it = iter(source)
    assert next(it).source == "stdin[0]"
    with pytest.raises(UserError, match="frame 1: got 4 of 10 bytes"):
        next(it)


def test_stdin_reassembles_frames_from_short_reads() -> None:
    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data

        def readable(self) -> bool:
            return True

        def read(self, size: int = -1) -> bytes:
            chunk, self.data = self.data[: min(3, size)], self.data[min(3, size) :]
            return chunk

    samples = list(StdinSource(Trickle(bytes(range(20))), shape=(10,)))  # type: ignore[arg-type]
    assert [s.data.tolist() for s in samples] == [list(range(10)), list(range(10, 20))]


def test_stdin_shape_must_be_positive() -> None:
    with pytest.raises(UserError, match="dimensions > 0"):
        StdinSource(io.BytesIO(), shape=(0, 5))


def test_generator_source_stops_at_none() -> None:
    made = iter(range(3))

    def fn() -> Sample | None:
        i = next(made, None)
        return None if i is None else Sample(np.full((2, 2), i, np.uint8), i, f"sim[{i}]")

    source = GeneratorSource(fn)
    assert isinstance(source, InputSource)
    assert [s.label for s in source] == [0, 1, 2]


def test_open_source_dispatches(image_dir: Path, npz_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert next(open_source(str(npz_data), shape=(28, 28))).label is not None
    assert Path(next(open_source(str(image_dir), shape=(28, 28))).source).name == "a.npy"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(bytes(8))))
    assert [s.data.shape for s in open_source("-", shape=(2, 2))] == [(2, 2), (2, 2)]


def test_open_source_unknown_spec_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="cannot read inputs"):
        open_source(str(tmp_path / "video.mp4"), shape=(28, 28))
