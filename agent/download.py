"""HTTP(S) downloads that survive a cut: resume from a ``.part`` file with ``Range``, cap the bandwidth,
retry with backoff, and check the sha256 before the file gets its final name. urllib only.

>>> download("http://fleet/artifacts/bundles/m/2/dense.onnx", Path("dense.onnx"),
...          sha256="ab12...", size=123456, max_bytes_per_s=50_000)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from agent.errors import UserError

__all__ = ["DownloadError", "NotFound", "download", "fetch_bytes"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int | None], None]
"""Called with (bytes on disk, total bytes or None) after every chunk."""

_CHUNK = 64 * 1024


class DownloadError(UserError):
    """A download failed after its retries, or its bytes do not match the expected hash or size."""


class NotFound(DownloadError):
    """The server answered 404: the artifact does not exist (e.g. no delta for this version)."""


def _sha256_file(path: Path) -> hashlib._Hash:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest


def fetch_bytes(url: str, *, timeout_s: float = 10.0, max_bytes: int = 16 << 20) -> bytes:
    """GET a small document (a manifest) whole; :class:`NotFound` on 404."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            data: bytes = resp.read(max_bytes + 1)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{url}: not found") from exc
        raise DownloadError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    if len(data) > max_bytes:
        raise DownloadError(f"{url}: larger than {max_bytes} bytes")
    return data


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    size: int | None = None,
    max_bytes_per_s: float | None = None,
    timeout_s: float = 10.0,
    retries: int = 5,
    backoff_s: float = 0.5,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> Path:
    """Fetch ``url`` into ``dest``, resuming ``dest.part`` if present; return ``dest``.

    The body goes to ``dest.part`` (fsynced); only when its size and sha256 match is it renamed to
    ``dest``. A 404 raises :class:`NotFound` at once; other failures retry ``retries`` times with
    exponential backoff. A ``.part`` whose bytes fail the hash is deleted (the next call starts over).
    ``stop()`` returning true aborts between chunks (the ``.part`` stays for a later resume).
    """
    if dest.exists() and sha256 is not None and _sha256_file(dest).hexdigest() == sha256:
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        try:
            _fetch_once(
                url, part, size, rate=max_bytes_per_s, timeout_s=timeout_s, progress=progress, stop=stop
            )
            break
        except NotFound:
            raise
        except DownloadError as exc:
            if attempt >= retries or (stop is not None and stop()):
                raise
            delay = backoff_s * (2**attempt)
            attempt += 1
            log.info("download of %s failed (%s); retry %d in %.1f s", url, exc, attempt, delay)
            time.sleep(delay)
    have = part.stat().st_size
    if size is not None and have != size:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: got {have} bytes, expected {size}")
    if sha256 is not None and _sha256_file(part).hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: sha256 mismatch (corrupt or tampered); the partial file was removed")
    os.replace(part, dest)
    return dest


def _open(url: str, part: Path, have: int, timeout_s: float) -> http.client.HTTPResponse:
    request = urllib.request.Request(url)
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        resp: http.client.HTTPResponse = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise NotFound(f"{url}: not found") from exc
        if exc.code == 416 and have:
            part.unlink()  # our .part is longer than the file: start over
            raise DownloadError(f"{url}: range not satisfiable, restarting") from exc
        raise DownloadError(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"{url}: {exc}") from exc
    return resp


def _fetch_once(
    url: str,
    part: Path,
    size: int | None,
    *,
    rate: float | None,
    timeout_s: float,
    progress: Progress | None,
    stop: Callable[[], bool] | None,
) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    if size is not None and have == size:
        return
    with _open(url, part, have, timeout_s) as resp:
        if have and resp.status != 206:
            have = 0  # the server ignored the range: take the whole body
        length = resp.headers.get("Content-Length")
        total = size if size is not None else (None if length is None else have + int(length))
        with part.open("ab" if have else "wb") as f:
            try:
                got = _copy(url, resp, f, have, total, rate=rate, progress=progress, stop=stop)
            finally:
                f.flush()
                os.fsync(f.fileno())
    if total is not None and have + got < total:
        raise DownloadError(f"{url}: connection closed after {have + got} of {total} bytes")


def _copy(
    url: str,
    resp: http.client.HTTPResponse,
    f: BinaryIO,
    have: int,
    total: int | None,
    *,
    rate: float | None,
    progress: Progress | None,
    stop: Callable[[], bool] | None,
) -> int:
    began, got = time.monotonic(), 0
    try:
        while True:
            if stop is not None and stop():
                raise DownloadError(f"{url}: stopped")
            chunk = resp.read(_CHUNK if rate is None else max(min(_CHUNK, int(rate / 10)), 1))
            if not chunk:
                return got
            f.write(chunk)
            got += len(chunk)
            if progress is not None:
                progress(have + got, total)
            if rate is not None:
                ahead = got / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as exc:
        raise DownloadError(f"{url}: connection lost after {have + got} bytes ({exc})") from exc
