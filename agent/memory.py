"""Keep the agent's resident memory to what it uses: give freed heap back, and unmap start-up-only code.

Two things inflate a Python daemon's resident set (RSS) without being needed while it serves:

* heap that loading a model freed (the parsed protobuf, the optimiser's scratch), which glibc keeps
  for reuse: :func:`release_free_heap` hands it back (``malloc_trim``);
* library code and read-only data that start-up touched once: importing and initialising onnxruntime
  alone faults in about 17 MB of its code (static kernel registrations spread over the whole library,
  mapped 64 KiB at a time), of which running a convolutional network needs a few MB.
  :func:`trim_code_pages` unmaps the *clean, read-only, file-backed* pages of every library
  (``madvise(MADV_DONTNEED)``); code that runs again faults back in from the page cache (a minor fault,
  no disk read while the cache holds it). Writable mappings and any page that differs from its file
  (relocated data, copy-on-write) are never touched, so nothing can be lost: what is dropped is an
  exact copy of the file. Linux keeps mapped executable pages ahead of other memory when it reclaims,
  so a device short of memory gets those pages back for its other work.

Both are no-ops where they do not apply (not Linux, not glibc).

>>> trim_code_pages().released_bytes >= 0  # doctest: +SKIP
True
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

__all__ = ["TrimResult", "release_free_heap", "trim_code_pages", "trimmable_mappings"]

log = logging.getLogger(__name__)

_MADV_DONTNEED = 4  # linux/mman.h, the same on every Linux architecture


@dataclass(frozen=True)
class TrimResult:
    """What :func:`trim_code_pages` did: mappings unmapped and the resident bytes they held before."""

    mappings: int
    released_bytes: int


@dataclass(frozen=True)
class _Mapping:
    start: int
    end: int
    perms: str
    path: str
    rss_kb: int
    private_dirty_kb: int
    anonymous_kb: int


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:  # not glibc (musl, macOS): nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return cast(Callable[[int], int], trim)


def release_free_heap() -> None:
    """Give the heap that loading a model freed back to the OS. glibc keeps freed memory for reuse
    otherwise: about 6 MB of resident memory for the reference bundle's four variants. A no-op where the
    C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _mappings(smaps: str) -> list[_Mapping]:
    out: list[_Mapping] = []
    head: list[str] | None = None
    fields: dict[str, int] = {}

    def close() -> None:
        if head is not None:
            start, end = (int(v, 16) for v in head[0].split("-"))
            out.append(
                _Mapping(
                    start=start,
                    end=end,
                    perms=head[1],
                    path=" ".join(head[5:]),
                    rss_kb=fields.get("Rss", 0),
                    # unknown (a kernel without the field) counts as dirty: never dropped
                    private_dirty_kb=fields.get("Private_Dirty", 1),
                    anonymous_kb=fields.get("Anonymous", 1),
                )
            )

    for line in smaps.splitlines():
        parts = line.split()
        if not parts:
            continue
        if parts[0].endswith(":"):
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1])
            continue
        close()
        head, fields = parts, {}
    close()
    return out


def trimmable_mappings(smaps: str) -> list[tuple[int, int, str, int]]:
    """The mappings of ``smaps`` (the text of ``/proc/PID/smaps``) :func:`trim_code_pages` may drop, as
    ``(start, end, path, resident bytes)``: backed by a file, not writable, and with no page that differs
    from the file (no private dirty or anonymous page)."""
    return [
        (m.start, m.end, m.path, m.rss_kb * 1024)
        for m in _mappings(smaps)
        if m.path.startswith("/")
        and not m.path.startswith(("/dev/", "/memfd:", "/SYSV"))  # device memory, shared memory
        and "w" not in m.perms
        and m.private_dirty_kb == 0
        and m.anonymous_kb == 0
        and m.rss_kb > 0
    ]


def trim_code_pages() -> TrimResult:
    """Unmap the resident pages of read-only, unmodified file mappings (library code and constants);
    they fault back in from the page cache when used. See the module docstring. Linux only."""
    libc = _libc()
    if not sys.platform.startswith("linux") or libc is None:
        return TrimResult(0, 0)
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            smaps = f.read()
    except OSError as exc:
        log.debug("cannot read /proc/self/smaps: %s", exc)
        return TrimResult(0, 0)
    madvise = libc.madvise
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    mappings, released = 0, 0
    regular: dict[str, bool] = {}
    for start, end, path, rss in trimmable_mappings(smaps):
        if path not in regular:  # only pages of regular files (a driver's mapping is not a page cache copy)
            regular[path] = os.path.isfile(path.removesuffix(" (deleted)")) or path.endswith(" (deleted)")
        if not regular[path]:
            continue
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            mappings += 1
            released += rss
        else:  # e.g. a mapping that went away since smaps was read: nothing to do
            log.debug("madvise(%s) failed: errno %d", path, ctypes.get_errno())
    return TrimResult(mappings, released)
