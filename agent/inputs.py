"""Where the agent's inference inputs come from: image files, an ``.npz`` data set, raw frames on stdin, or
a function (the simulator).

Every source is an iterable of :class:`Sample` -- the raw array (as :func:`agent.runtime.preprocess`
accepts it), its label when the source knows it, and where it came from -- and :func:`open_source`
picks one from a command-line argument.

>>> for sample in open_source("data/fixture.npz", shape=(28, 28)):  # doctest: +SKIP
...     print(sample.source, sample.data.shape, sample.label)
data/fixture.npz[0] (28, 28) 9
"""

from __future__ import annotations

import logging
import math
import sys
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from agent.errors import UserError

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "IMAGE_SUFFIXES",
    "DirectorySource",
    "GeneratorSource",
    "InputSource",
    "NpzSource",
    "Sample",
    "StdinSource",
    "open_source",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".pgm"})
"""Image files :class:`DirectorySource` reads with Pillow (case-insensitive); ``.npy`` files are read too."""
_PILLOW_HINT = "pip install pillow (or feed .npy files, an .npz data set or raw frames on stdin)"
# Pillow modes kept as they are; single-channel modes become "L", every other mode "RGB".
_KEEP_MODES = frozenset({"L", "RGB"})
_GRAY_MODES = frozenset({"1", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


@dataclass(frozen=True, slots=True)
class Sample:
    """One input: ``data`` is raw (``uint8`` image or an array as stored), ``label`` the true class index
    if the source knows it, ``source`` a human-readable origin (a path, ``file.npz[3]``, ``stdin[0]``)."""

    data: np.ndarray
    label: int | None
    source: str


@runtime_checkable
class InputSource(Protocol):
    """Anything that yields :class:`Sample` objects.

    >>> isinstance(GeneratorSource(lambda: None), InputSource)
    True
    """

    def __iter__(self) -> Iterator[Sample]: ...


class DirectorySource:
    """The image (``.png .jpg .jpeg .bmp .pgm``, read with Pillow) and ``.npy`` files of a directory that
    match ``pattern``, in sorted order, without labels. Other files are skipped.

    Grayscale images give ``uint8 [H, W]``, colour ones ``[H, W, 3]``. Pillow is imported only when the
    directory holds images; without it, :class:`~agent.errors.UserError` says how to install it. A
    directory with no usable file is a ``UserError`` too.

    >>> [s.source for s in DirectorySource(Path("frames"), pattern="*.png")]  # doctest: +SKIP
    ['frames/000.png', 'frames/001.png']
    """

    def __init__(self, path: Path | str, *, pattern: str = "*") -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise UserError(f"{self.path} is not a directory")
        self.files = sorted(
            p
            for p in self.path.glob(pattern)
            if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix.lower() == ".npy")
        )
        if not self.files:
            raise UserError(
                f"{self.path} has no image or .npy files matching {pattern!r}",
                hint=f"supported: {', '.join(sorted(IMAGE_SUFFIXES))}, .npy",
            )
        if any(p.suffix.lower() in IMAGE_SUFFIXES for p in self.files):
            _pillow()  # fail now, not at the first image

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files:
            data = _read_npy(path) if path.suffix.lower() == ".npy" else _read_image(path)
            yield Sample(data=data, label=None, source=str(path))

    def __repr__(self) -> str:
        return f"DirectorySource({str(self.path)!r}, {len(self.files)} files)"


class NpzSource:
    """The images of an ``.npz`` data set (``np.savez`` output; pickles refused), with labels if present.

    Images are ``images_key`` or, if the file has no such array, its first array other than
    ``labels_key``; labels are ``labels_key`` when present (optional). The arrays are read once, here.

    >>> source = NpzSource(Path("fixture.npz"))  # doctest: +SKIP
    >>> next(iter(source)).label  # doctest: +SKIP
    9
    """

    def __init__(self, path: Path | str, *, images_key: str = "x_test", labels_key: str = "y_test") -> None:
        self.path = Path(path)
        try:
            loaded = np.load(self.path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise UserError(f"{self.path} is a single array, not an .npz archive", hint="use np.savez")
            with loaded as npz:
                names = list(npz.files)
                key = images_key if images_key in names else next((n for n in names if n != labels_key), None)
                if key is None:
                    raise UserError(f"{self.path} holds no image array")
                if key != images_key:
                    log.info("%s has no %r array; reading images from %r", self.path, images_key, key)
                images = np.asarray(npz[key])
                labels = np.asarray(npz[labels_key]) if labels_key in names else None
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
            raise UserError(f"cannot read {self.path} as an .npz file: {exc}") from exc
        if images.ndim < 2:
            raise UserError(f"{self.path}: {key!r} has shape {images.shape}; need [N, ...] images")
        if labels is not None and (labels.shape != images.shape[:1] or labels.dtype.kind not in "iu"):
            raise UserError(
                f"{self.path}: {labels_key!r} is {labels.dtype} {labels.shape}; need integer labels of "
                f"shape ({images.shape[0]},), one per image"
            )
        self.key = key
        self.images = images
        self.labels = labels

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            label = None if self.labels is None else int(self.labels[i])
            yield Sample(data=self.images[i], label=label, source=f"{self.path}[{i}]")

    def __repr__(self) -> str:
        return f"NpzSource({str(self.path)!r}, {self.key!r}, {len(self)} images)"


class StdinSource:
    """Raw ``uint8`` frames of exactly ``prod(shape)`` bytes each, read from ``stream`` until end of file.

    ``stream`` defaults to the standard input (unbuffered, looked up when the source is made). A stream
    that ends inside a frame is a :class:`~agent.errors.UserError`; frames carry no label.

    >>> frames = io.BytesIO(bytes(2 * 28 * 28))  # doctest: +SKIP
    >>> [s.data.shape for s in StdinSource(frames, shape=(28, 28))]  # doctest: +SKIP
    [(28, 28), (28, 28)]
    """

    def __init__(self, stream: IO[bytes] | None = None, *, shape: Sequence[int]) -> None:
        self.shape = tuple(int(d) for d in shape)
        if not self.shape or any(d <= 0 for d in self.shape):
            raise UserError(f"frame shape must have dimensions > 0, got {self.shape}")
        self.frame_bytes = math.prod(self.shape)
        if stream is None:
            # the unbuffered file under sys.stdin.buffer: the agent reads frames in a thread of its own, and
            # a thread blocked inside the buffered reader's lock would abort the interpreter's shutdown
            stdin = sys.stdin.buffer
            stream = getattr(stdin, "raw", stdin)
        self.stream = stream

    def __iter__(self) -> Iterator[Sample]:
        index = 0
        while True:
            frame = bytearray()
            while len(frame) < self.frame_bytes:
                chunk = self.stream.read(self.frame_bytes - len(frame))
                if not chunk:
                    break
                frame += chunk
            got = len(frame)
            if got == 0:
                return
            if got < self.frame_bytes:
                raise UserError(
                    f"stdin ended inside frame {index}: got {got} of {self.frame_bytes} bytes",
                    hint=f"each frame must be exactly {self.frame_bytes} bytes (uint8 {self.shape})",
                )
            data = np.frombuffer(frame, np.uint8).reshape(self.shape)
            yield Sample(data=data, label=None, source=f"stdin[{index}]")
            index += 1

    def __repr__(self) -> str:
        return f"StdinSource(shape={self.shape})"


class GeneratorSource:
    """Samples made by calling ``fn`` until it returns ``None`` (the simulator's synthetic inputs).

    >>> frames = iter([Sample(np.zeros((2, 2), np.uint8), 0, "sim[0]")])
    >>> [s.source for s in GeneratorSource(lambda: next(frames, None))]
    ['sim[0]']
    """

    def __init__(self, fn: Callable[[], Sample | None]) -> None:
        self.fn = fn

    def __iter__(self) -> Iterator[Sample]:
        while (sample := self.fn()) is not None:
            yield sample


def open_source(spec: str, *, shape: Sequence[int]) -> Iterator[Sample]:
    """The samples named by ``spec``: ``-`` = raw frames of ``shape`` on stdin, ``*.npz`` = a data set,
    a directory = its image and ``.npy`` files. ``shape`` is used only for stdin.

    >>> next(open_source("frames/", shape=(28, 28))).source  # doctest: +SKIP
    'frames/000.png'
    """
    if spec == "-":
        return iter(StdinSource(shape=shape))
    path = Path(spec)
    if path.suffix.lower() == ".npz":
        return iter(NpzSource(path))
    if path.is_dir():
        return iter(DirectorySource(path))
    raise UserError(
        f"cannot read inputs from {spec!r}: not '-', an .npz file or a directory",
        hint="give '-' for raw uint8 frames on stdin, a .npz data set, or a directory of images/.npy files",
    )


def _pillow() -> None:
    try:
        import PIL.Image  # noqa: F401
    except ImportError as exc:
        raise UserError(
            "reading image files needs Pillow, which is not installed", hint=_PILLOW_HINT
        ) from exc


def _read_image(path: Path) -> np.ndarray:
    _pillow()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(_normalise_mode(img))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {exc}") from exc


def _normalise_mode(img: Image) -> Image:
    if img.mode in _KEEP_MODES:
        return img
    return img.convert("L" if img.mode in _GRAY_MODES else "RGB")


def _read_npy(path: Path) -> np.ndarray:
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except (OSError, EOFError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a .npy array: {exc}") from exc
