"""The artifact endpoint: files under one root over HTTP, with byte ranges so devices can resume.

Layout under ``root`` (the fleet manager mounts this app at ``<fleet>/artifacts``)::

    bundles/<model_id>/<bundle_version>/manifest.json    and every file that manifest lists
    updates/<model_id>/<from_version>/<to_version>/update.json   and the files/ it names

``GET`` answers 200 with the whole file or, for ``Range: bytes=a-b`` / ``a-`` / ``-n``, 206 with
``Content-Range``; an unsatisfiable range gets 416 with ``Content-Range: bytes */size``. ``If-Range``
with a stale ETag gets the whole file. ``HEAD`` gives the same headers without a body. Paths with
``..``, absolute paths, backslashes and symlinks that leave ``root`` are 404. ``max_bytes_per_s``
throttles every response (for tests and for sharing a thin uplink).

>>> app = artifacts_app(Path("/var/lib/edgeprune/artifacts"))  # doctest: +SKIP
>>> uvicorn.run(app, port=8080)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path, PurePosixPath

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

__all__ = ["artifacts_app", "parse_range", "resolve_artifact"]

_CHUNK = 64 * 1024
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def resolve_artifact(root: Path, rel: str) -> Path | None:
    """The file ``rel`` names under ``root``, or ``None`` if it is missing or would leave ``root``.

    >>> resolve_artifact(Path("/srv"), "../etc/passwd") is None
    True
    """
    if not rel or "\\" in rel or "\x00" in rel:
        return None
    path = PurePosixPath(rel)
    if path.is_absolute() or any(part in ("..", ".", "") for part in rel.split("/")):
        return None
    base = root.resolve()
    try:
        target = (base / path).resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    if not target.is_relative_to(base) or not target.is_file():
        return None
    return target


def parse_range(header: str, size: int) -> tuple[int, int] | bool | None:
    """``(start, end_inclusive)`` for one ``bytes=`` range; ``None`` if absent/ignorable; ``False`` if
    unsatisfiable.

    >>> parse_range("bytes=0-9", 100), parse_range("bytes=-10", 100), parse_range("bytes=100-", 100)
    ((0, 9), (90, 99), False)
    """
    m = _RANGE.match(header.strip())
    if m is None:
        return None  # malformed or multi-range: RFC 9110 lets us ignore it and send the whole file
    first, last = m.group(1), m.group(2)
    if not first and not last:
        return None
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            return False
        return max(size - n, 0), size - 1
    start = int(first)
    end = size - 1 if not last else min(int(last), size - 1)
    if last and int(last) < start:
        return None
    if start >= size:
        return False
    return start, end


async def _stream(path: Path, start: int, length: int, rate: float | None) -> AsyncIterator[bytes]:
    began = time.monotonic()
    sent = 0
    with path.open("rb") as f:
        f.seek(start)
        while sent < length:
            chunk = f.read(min(_CHUNK if rate is None else max(int(rate / 20), 1), length - sent))
            if not chunk:
                return
            sent += len(chunk)
            yield chunk
            if rate is not None:
                ahead = sent / rate - (time.monotonic() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)


def artifacts_app(root: Path, *, max_bytes_per_s: float | None = None) -> Starlette:
    """An ASGI app serving the files under ``root`` by path (see the module docstring)."""

    async def serve(request: Request) -> Response:
        rel = request.path_params["path"]
        path = resolve_artifact(root, rel)
        if path is None:
            return Response("not found\n", status_code=404, media_type="text/plain")
        st = path.stat()
        size = st.st_size
        etag = f'"{st.st_mtime_ns:x}-{size:x}"'
        headers = {"Accept-Ranges": "bytes", "ETag": etag, "Cache-Control": "no-cache"}
        span: tuple[int, int] | bool | None = None
        range_header = request.headers.get("range")
        if range_header is not None:
            if_range = request.headers.get("if-range")
            if if_range is None or if_range == etag:
                span = parse_range(range_header, size)
        if span is False:
            headers["Content-Range"] = f"bytes */{size}"
            return Response(status_code=416, headers=headers)
        if isinstance(span, tuple):
            start, end = span
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        else:
            start, end, status = 0, size - 1, 200
        length = end - start + 1
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers, media_type="application/octet-stream")
        return StreamingResponse(
            _stream(path, start, length, max_bytes_per_s),
            status_code=status,
            headers=headers,
            media_type="application/octet-stream",
        )

    return Starlette(routes=[Route("/{path:path}", serve, methods=["GET", "HEAD"])])
