"""The artifact endpoint over a real uvicorn server, and the device's resuming downloader against it."""

from __future__ import annotations

import hashlib
import http.client
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn

from agent.download import DownloadError, NotFound, download, fetch_bytes
from fleet.artifacts import artifacts_app, parse_range, resolve_artifact
from fleet.broker import free_port


@contextmanager
def serving(root: Path, *, max_bytes_per_s: float | None = None, port: int | None = None) -> Iterator[str]:
    """A real uvicorn server on 127.0.0.1 serving ``artifacts_app(root)``; yields its base URL."""
    port = port or free_port()
    config = uvicorn.Config(
        artifacts_app(root, max_bytes_per_s=max_bytes_per_s),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        server.force_exit = True
        thread.join(timeout=10)


def _request(base: str, method: str, path: str, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "artifacts"
    (r / "bundles" / "m" / "1").mkdir(parents=True)
    (r / "bundles" / "m" / "1" / "dense.onnx").write_bytes(bytes(range(256)) * 40)  # 10240 bytes
    (tmp_path / "secret.txt").write_text("outside")
    (r / "bundles" / "m" / "1" / "link").symlink_to(tmp_path / "secret.txt")
    return r


def test_parse_range_forms() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=-1000", 100) == (0, 99)
    assert parse_range("bytes=50-1000", 100) == (50, 99)
    assert parse_range("bytes=100-", 100) is False
    assert parse_range("bytes=-0", 100) is False
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("items=0-1", 100) is None


def test_resolve_refuses_escapes(root: Path) -> None:
    assert resolve_artifact(root, "bundles/m/1/dense.onnx") is not None
    for bad in (
        "../secret.txt",
        "/etc/passwd",
        "bundles/../../secret.txt",
        "bundles/m/1/link",
        "bundles\\m",
        "bundles//m/1/dense.onnx",
        "bundles/m/1",
        "",
    ):
        assert resolve_artifact(root, bad) is None, bad


def test_get_head_ranges_and_errors(root: Path) -> None:
    data = (root / "bundles/m/1/dense.onnx").read_bytes()
    path = "/bundles/m/1/dense.onnx"
    with serving(root) as base:
        status, headers, body = _request(base, "GET", path)
        assert (status, body) == (200, data)
        assert headers["content-length"] == str(len(data)) and headers["accept-ranges"] == "bytes"
        etag = headers["etag"]
        status, headers, body = _request(base, "HEAD", path)
        assert (status, body, headers["content-length"], headers["etag"]) == (200, b"", str(len(data)), etag)
        status, headers, body = _request(base, "GET", path, {"Range": "bytes=10-19"})
        assert (status, body, headers["content-range"]) == (206, data[10:20], f"bytes 10-19/{len(data)}")
        status, headers, body = _request(base, "GET", path, {"Range": "bytes=10000-"})
        assert (status, body) == (206, data[10000:])
        status, headers, body = _request(base, "GET", path, {"Range": "bytes=-5"})
        assert (status, body, headers["content-length"]) == (206, data[-5:], "5")
        status, headers, _ = _request(base, "GET", path, {"Range": f"bytes={len(data)}-"})
        assert (status, headers["content-range"]) == (416, f"bytes */{len(data)}")
        status, _, body = _request(base, "GET", path, {"Range": "bytes=0-9", "If-Range": '"stale"'})
        assert (status, body) == (200, data)  # the file changed since: the whole file
        status, _, body = _request(base, "GET", path, {"Range": "bytes=0-9", "If-Range": etag})
        assert (status, body) == (206, data[:10])
        for bad in (
            "/bundles/m/1/link",
            "/bundles/m/2/dense.onnx",
            "/bundles/%2e%2e/%2e%2e/secret.txt",
            "/../secret.txt",
        ):
            assert _request(base, "GET", bad)[0] == 404, bad
        with pytest.raises(NotFound):
            fetch_bytes(f"{base}/nope.json")


def test_download_checks_hash_and_size(root: Path, tmp_path: Path) -> None:
    data = (root / "bundles/m/1/dense.onnx").read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    with serving(root) as base:
        url = f"{base}/bundles/m/1/dense.onnx"
        assert download(url, tmp_path / "ok", sha256=sha, size=len(data)).read_bytes() == data
        with pytest.raises(DownloadError, match="sha256"):
            download(url, tmp_path / "bad", sha256="0" * 64, size=len(data), retries=0)
        assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.part").exists()
        with pytest.raises(NotFound):
            download(f"{base}/bundles/m/1/missing", tmp_path / "x", retries=3)


def test_download_resumes_after_the_server_dies_mid_file(root: Path, tmp_path: Path) -> None:
    big = os.urandom(200_000)
    (root / "big.bin").write_bytes(big)
    sha = hashlib.sha256(big).hexdigest()
    dest = tmp_path / "big.bin"
    part = tmp_path / "big.bin.part"
    port = free_port()
    errors: list[BaseException] = []
    with serving(root, max_bytes_per_s=100_000, port=port) as base:
        url = f"{base}/big.bin"

        def run() -> None:
            try:
                download(url, dest, sha256=sha, size=len(big), retries=0, timeout_s=2)
            except DownloadError as exc:
                errors.append(exc)

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 10
        while not (part.exists() and part.stat().st_size > 30_000):
            assert time.monotonic() < deadline, "no progress"
            time.sleep(0.02)
    t.join(timeout=20)  # the server stopped mid-file: the download failed, the .part stays
    assert errors and not dest.exists()
    kept = part.stat().st_size
    assert 0 < kept < len(big)
    first: list[int] = []
    with serving(root, port=port) as base:
        download(
            url, dest, sha256=sha, size=len(big), progress=lambda d, t: first.append(d) if not first else None
        )
    assert dest.read_bytes() == big and not part.exists()
    assert first[0] > kept  # it continued from the bytes on disk instead of starting over


def test_bandwidth_cap_is_respected(root: Path, tmp_path: Path) -> None:
    data = os.urandom(60_000)
    (root / "f.bin").write_bytes(data)
    with serving(root) as base:
        start = time.monotonic()
        download(f"{base}/f.bin", tmp_path / "f.bin", max_bytes_per_s=100_000)
        elapsed = time.monotonic() - start
    # a floor, not a wall-clock target: 60 kB at 100 kB/s cannot arrive in less than ~0.5 s
    assert elapsed >= 0.45
    assert (tmp_path / "f.bin").read_bytes() == data
