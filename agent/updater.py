"""The agent's updater: one explicit state machine that moves a device to a new bundle or back.

States are :data:`agent.contract.UpdateState`; every move goes through :data:`TRANSITIONS` (one table,
in the manner of Mender) and is persisted atomically in ``state_dir/update/state.json`` (temp file,
fsync, rename, fsync of the directory) *before* the work of the new state starts, then published as an
:class:`agent.contract.UpdateStatus`.

======================  ===============  ===============================================================
state                   event            next
======================  ===============  ===============================================================
idle/committed/failed/  start            downloading
rolled_back
downloading             downloaded       verifying
verifying               verified         staged
staged                  activate         activating
activating              activated        health_check
health_check            healthy          committed
downloading/verifying/  fail             failed (nothing replaced; staging removed)
staged
activating/health_check fail             rolling_back
activating/health_check interrupted      rolling_back (found on disk at start: the process died there)
rolling_back            restored         rolled_back
======================  ===============  ===============================================================

After a restart (:meth:`Updater.recover`, before the agent opens any bundle): ``downloading``,
``verifying`` and ``staged`` resume where they were (downloads resume from their ``.part`` files);
``activating`` and ``health_check`` roll back (the new bundle never proved itself); ``rolling_back``
finishes. Each restart inside an unfinished update counts a boot; past ``max_boots`` the update fails
(before activation) or rolls back (after), so a crash loop cannot keep a device updating forever.

Bundles live side by side in ``state_dir/bundles/<version>/``; ``state_dir/update/current`` is a
symlink to the one to serve, switched atomically (new link, rename). The previous bundle stays on disk
until the update is committed.

>>> updater = Updater(state_dir, public_key=key, runtime="onnx")  # doctest: +SKIP
>>> bundle = updater.recover(Path("factory-bundle"))  # what to serve after a restart  # doctest: +SKIP
>>> updater.run(instruction, host)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from agent.bundle import BundleError, file_sha256
from agent.contract import MANIFEST_FILENAME, BundleManifest, UpdateInstruction, UpdateState
from agent.delta import UPDATE_FILENAME, DeltaError, UpdateManifest, apply_file, write_atomic
from agent.download import NotFound, download, fetch_bytes
from agent.errors import UserError
from agent.signing import PublicKey, verify_manifest

__all__ = [
    "TRANSITIONS",
    "HealthSample",
    "UpdateError",
    "UpdateHost",
    "Updater",
    "UpdaterConfig",
    "open_for_runtime",
]

log = logging.getLogger(__name__)

Trigger = Literal[
    "start", "downloaded", "verified", "activate", "activated", "healthy", "fail", "interrupted", "restored"
]

_RESTARTABLE: tuple[UpdateState, ...] = ("idle", "committed", "failed", "rolled_back")
TRANSITIONS: dict[tuple[UpdateState, Trigger], UpdateState] = {
    **{(s, "start"): "downloading" for s in _RESTARTABLE},
    ("downloading", "downloaded"): "verifying",
    ("verifying", "verified"): "staged",
    ("staged", "activate"): "activating",
    ("activating", "activated"): "health_check",
    ("health_check", "healthy"): "committed",
    ("downloading", "fail"): "failed",
    ("verifying", "fail"): "failed",
    ("staged", "fail"): "failed",
    ("activating", "fail"): "rolling_back",
    ("health_check", "fail"): "rolling_back",
    ("activating", "interrupted"): "rolling_back",
    ("health_check", "interrupted"): "rolling_back",
    ("rolling_back", "restored"): "rolled_back",
}
"""The only moves the updater makes: ``(state, event) -> next state``."""

TERMINAL: frozenset[UpdateState] = frozenset(_RESTARTABLE)


class UpdateError(UserError):
    """An update step failed; the updater takes the ``fail`` edge with this message."""


class _Superseded(UpdateError):
    """A newer desired update arrived before this one was activated."""


@dataclass(frozen=True)
class HealthSample:
    """What the serving process saw since a mark: inferences, failed ones, 90th percentile latency."""

    inferences: int
    errors: int
    p90_ms: float | None


class UpdateHost(Protocol):
    """What the updater needs from the process that serves models (the :class:`agent.core.Agent`)."""

    def activate(self, bundle: Path) -> BundleManifest:
        """Verify and serve ``bundle``; raise (and keep serving the old one) if it cannot."""
        ...

    def self_test(self) -> float:
        """Run a fixed input through every served variant; raise on failure; return the slowest ms."""
        ...

    def health_mark(self) -> int:
        """A mark to measure health from."""
        ...

    def health_since(self, mark: int) -> HealthSample:
        """Inferences, errors and latency since ``mark``."""
        ...

    def publish(self, state: UpdateState, record: dict[str, Any]) -> None:
        """Report a state change (an UpdateStatus, and an error event when ``record['error']``)."""
        ...


@dataclass(frozen=True)
class UpdaterConfig:
    """Limits of the updater. ``max_latency_ms=None`` takes 5x the slowest latency the manifest records
    (at least 50 ms); ``variants=None`` installs every variant with a file for the runtime."""

    variants: tuple[str, ...] | None = None
    max_error_rate: float = 0.05
    max_latency_ms: float | None = None
    max_boots: int = 3
    free_margin_bytes: int = 1 << 20
    timeout_s: float = 10.0
    retries: int = 5
    health_poll_s: float = 0.1
    disk_free: Callable[[Path], int] | None = None
    """Free bytes of the filesystem holding a path; ``None`` asks the OS (tests inject a full disk)."""


def open_for_runtime(directory: Path, *, public_key: PublicKey | None, runtime: str) -> BundleManifest:
    """Like :func:`agent.bundle.open_bundle` but only the files for ``runtime`` must be present.

    A device installs only its runtime's files; every file that is present and listed is still checked.
    """
    try:
        data = (directory / MANIFEST_FILENAME).read_bytes()
    except OSError as exc:
        raise BundleError(f"{directory} is not a bundle: cannot read {MANIFEST_FILENAME}") from exc
    manifest = BundleManifest.from_json(data)
    if public_key is not None:
        verify_manifest(manifest, public_key)
    for variant in manifest.variants:
        for f in variant.files:
            target = directory / f.path
            if f.runtime != runtime and not target.exists():
                continue
            if not target.is_file():
                raise BundleError(f"bundle file {f.path} of variant {variant.name} is missing")
            if target.stat().st_size != f.size_bytes or file_sha256(target) != f.sha256:
                raise BundleError(
                    f"bundle file {f.path} does not match its size/sha256 (corrupt or tampered)"
                )
    return manifest


KILL_ENV = "EDGEPRUNE_UPDATER_KILL_AT"
"""Fault injection for tests: the agent SIGKILLs itself right after persisting this state."""


def _kill_hook() -> Callable[[UpdateState], None] | None:
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return None

    def kill(state: UpdateState) -> None:
        if state == wanted:
            log.warning("%s=%s: killing this process (SIGKILL)", KILL_ENV, wanted)
            os.kill(os.getpid(), signal.SIGKILL)

    return kill


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_free(path: Path) -> int:
    return shutil.disk_usage(path).free


@dataclass
class _Record:
    """What state.json holds."""

    state: UpdateState = "idle"
    update_id: str | None = None
    instruction: dict[str, Any] | None = None
    previous: str | None = None
    boots: int = 0
    bytes_done: int = 0
    bytes_total: int | None = None
    error: str | None = None
    history: list[str] = field(default_factory=list)


class Updater:
    """See the module docstring. One update runs at a time (:meth:`run` holds a lock)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        public_key: PublicKey,
        runtime: str,
        config: UpdaterConfig | None = None,
        free_bytes: Callable[[Path], int] = _disk_free,
        crash_at: Callable[[UpdateState], None] | None = None,
    ) -> None:
        self.root = state_dir
        self.dir = state_dir / "update"
        self.bundles = state_dir / "bundles"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.bundles.mkdir(parents=True, exist_ok=True)
        self._state_path = self.dir / "state.json"
        self._current = self.dir / "current"
        self._key = public_key
        self.runtime = runtime
        self.config = config or UpdaterConfig()
        self._free_bytes = self.config.disk_free or free_bytes
        self._crash_at = crash_at if crash_at is not None else _kill_hook()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._halt = threading.Event()
        self._pending: list[tuple[UpdateState, dict[str, Any]]] = []
        self.host: UpdateHost | None = None
        self.record = self._load()

    # ---- persistence ---------------------------------------------------------------------------

    def _load(self) -> _Record:
        try:
            data = json.loads(self._state_path.read_text())
            return _Record(**data)
        except FileNotFoundError:
            return _Record()
        except (ValueError, TypeError) as exc:
            log.warning("unreadable %s (%s): treating the update as interrupted", self._state_path, exc)
            return _Record(state="rolling_back", error="unreadable updater state")

    def _save(self) -> None:
        tmp = self._state_path.with_suffix(".tmp")
        with tmp.open("w") as f:
            json.dump(self.record.__dict__, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_path)
        _fsync_dir(self.dir)

    @property
    def state(self) -> UpdateState:
        return self.record.state

    @property
    def instruction(self) -> UpdateInstruction | None:
        i = self.record.instruction
        return None if i is None else UpdateInstruction.model_validate(i)

    def _move(self, trigger: Trigger, *, error: str | None = None) -> UpdateState:
        old = self.record.state
        new = TRANSITIONS.get((old, trigger))
        if new is None:
            raise UpdateError(f"no transition from {old} on {trigger}")  # a bug: the table is the law
        self.record.state = new
        self.record.history.append(new)
        if error is not None:
            self.record.error = error
        self._save()
        log.info("update %s: %s -> %s%s", self.record.update_id, old, new, f" ({error})" if error else "")
        self._announce()
        if self._crash_at is not None:
            self._crash_at(new)
        return new

    def _announce(self) -> None:
        state, record = self.record.state, dict(self.record.__dict__)
        if self.host is None:
            self._pending.append((state, record))
        else:
            self.host.publish(state, record)

    def attach(self, host: UpdateHost) -> None:
        """Connect the serving process; statuses recorded before (during :meth:`recover`) go out now."""
        self.host = host
        pending, self._pending = self._pending, []
        for state, record in pending:
            host.publish(state, record)

    # ---- pointer ---------------------------------------------------------------------------------

    def serving(self, default: Path) -> Path:
        """The bundle to serve: where ``current`` points, else ``default`` (the factory bundle)."""
        if self._current.is_symlink():
            return Path(os.readlink(self._current))
        return default

    def _point(self, bundle: Path) -> None:
        tmp = self.dir / "current.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(bundle.resolve())
        os.replace(tmp, self._current)
        _fsync_dir(self.dir)

    # ---- recovery --------------------------------------------------------------------------------

    def recover(self, default: Path) -> Path:
        """Settle what a restart found on disk; return the bundle to serve. Call before opening it."""
        state = self.record.state
        if state in TERMINAL:
            if state == "committed":
                self._cleanup(keep=self.serving(default))
            return self.serving(default)
        self.record.boots += 1
        self._save()
        if state in ("activating", "health_check"):
            self._move("interrupted", error=f"restarted during {state}")
            self._restore_pointer(default)
            self._move("restored")
        elif state == "rolling_back":
            self._restore_pointer(default)
            self._move("restored")
        elif self.record.boots > self.config.max_boots:
            self._move("fail", error=f"gave up after {self.record.boots - 1} restarts during {state}")
            self._discard_staging()
        return self.serving(default)

    def pending(self) -> bool:
        """Whether an update was interrupted before activation and should resume (:meth:`resume`)."""
        return self.record.state in ("downloading", "verifying", "staged")

    def _restore_pointer(self, default: Path) -> None:
        previous = Path(self.record.previous) if self.record.previous else default
        self._point(previous)
        instr = self.instruction
        if instr is not None:
            target = self.bundles / instr.target.bundle_version
            if target.exists() and target.resolve() != previous.resolve():
                shutil.rmtree(target, ignore_errors=True)
        self._discard_staging()

    # ---- running ---------------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask a running update to stop before activation (a newer desired state superseded it)."""
        self._cancel.set()

    def halt(self) -> None:
        """The process is stopping: leave the state on disk as it is (a restart resumes or rolls back)."""
        self._halt.set()

    def _stopping(self) -> bool:
        return self._cancel.is_set() or self._halt.is_set()

    def run(self, instruction: UpdateInstruction, host: UpdateHost, *, current: Path) -> UpdateState:
        """Take ``instruction`` to a terminal state and return it; ``current`` is the bundle served now."""
        with self._lock:
            self._cancel.clear()
            if self.host is not host:
                self.attach(host)
            if self.record.state not in TERMINAL:  # an interrupted older update, not yet activated
                self._move("fail", error=f"superseded by update {instruction.update_id}")
                self._discard_staging()
            self.record = _Record(
                state=self.record.state,
                update_id=instruction.update_id,
                instruction=instruction.model_dump(mode="json"),
                previous=str(current.resolve()),
            )
            self._move("start")
            return self._drive(current)

    def resume(self, host: UpdateHost, *, current: Path) -> UpdateState:
        """Continue an update :meth:`recover` found before activation."""
        with self._lock:
            self._cancel.clear()
            if self.host is not host:
                self.attach(host)
            if not self.pending():
                return self.record.state
            self._announce()  # tell the fleet where it resumes
            return self._drive(current)

    def _drive(self, current: Path) -> UpdateState:
        instr = self.instruction
        assert instr is not None
        while self.record.state not in TERMINAL:
            state = self.record.state
            if self._halt.is_set():
                return state
            try:
                new = self._move(self._step(state, instr, current))
            except (UserError, OSError) as exc:
                if self._halt.is_set():
                    return state  # stopping, not failing: the next start resumes or rolls back
                message = f"{type(exc).__name__}: {exc}"
                if state == "rolling_back":
                    log.error("rollback failed (%s); will retry at the next start", message)
                    self.record.error = f"rollback failed: {message}"
                    self._save()
                    return state
                new = self._move("fail", error=message)
                if new == "failed":
                    self._discard_staging()
                    target = self.bundles / instr.target.bundle_version
                    if target.exists() and target.resolve() != current.resolve():
                        shutil.rmtree(target, ignore_errors=True)
            if new == "committed":
                self._cleanup(keep=self.bundles / instr.target.bundle_version)
        return self.record.state

    def _step(self, state: UpdateState, instr: UpdateInstruction, current: Path) -> Trigger:
        """Do the work of ``state``; return the event it ends with (or raise for ``fail``)."""
        assert self.host is not None
        target = self.bundles / instr.target.bundle_version
        if state == "downloading":
            self._download(instr, current)
            return "downloaded"
        if state == "verifying":
            self._verify(instr, current)
            return "verified"
        if state == "staged":
            self._check_cancel()
            return "activate"
        if state == "activating":
            self._point(target)
            self.host.activate(target)
            return "activated"
        if state == "health_check":
            self._health(instr)
            return "healthy"
        if state == "rolling_back":
            previous = Path(self.record.previous or current)
            self._restore_pointer(previous)
            self.host.activate(previous)
            return "restored"
        raise UpdateError(f"nothing to do in state {state}")

    def _check_cancel(self) -> None:
        if self._cancel.is_set():
            raise _Superseded("superseded by a newer desired update")

    # ---- steps -----------------------------------------------------------------------------------

    def _staging(self) -> Path:
        return self.dir / "staging" / (self.record.update_id or "none")

    def _discard_staging(self) -> None:
        shutil.rmtree(self.dir / "staging", ignore_errors=True)

    def _cleanup(self, *, keep: Path) -> None:
        self._discard_staging()
        keep = keep.resolve()
        for child in self.bundles.iterdir():
            if child.resolve() != keep:
                shutil.rmtree(child, ignore_errors=True)

    def _wanted(self, manifest: BundleManifest) -> dict[str, tuple[str, int]]:
        """Files this device installs: path -> (sha256, size), for its runtime and variants."""
        out = {}
        for v in manifest.variants:
            if self.config.variants is not None and v.name not in self.config.variants:
                continue
            for f in v.files_for(self.runtime):  # type: ignore[arg-type]
                out[f.path] = (f.sha256, f.size_bytes)  # one file, or one per segment of a gated variant
        if not out:
            raise UpdateError(f"the target bundle has no {self.runtime} file for this device's variants")
        return out

    def _progress(self, done: int, total: int | None) -> None:
        self.record.bytes_done = done
        if total is not None:
            self.record.bytes_total = total

    def _download(self, instr: UpdateInstruction, current: Path) -> None:
        base = instr.base_url.rstrip("/")
        target = instr.target
        stage = self._staging()
        stage.mkdir(parents=True, exist_ok=True)
        bundle_url = f"{base}/bundles/{target.model_id}/{target.bundle_version}"
        raw = fetch_bytes(f"{bundle_url}/{MANIFEST_FILENAME}", timeout_s=self.config.timeout_s)
        if hashlib.sha256(raw).hexdigest() != instr.manifest_sha256:
            raise UpdateError("the target manifest.json does not match manifest_sha256 of the instruction")
        manifest = BundleManifest.from_json(raw)
        verify_manifest(manifest, self._key)
        if (manifest.model_id, manifest.bundle_version) != (target.model_id, target.bundle_version):
            raise UpdateError("the target manifest names another bundle than the instruction")
        wanted = self._wanted(manifest)
        write_atomic(stage / MANIFEST_FILENAME, raw)
        old = BundleManifest.from_json((current / MANIFEST_FILENAME).read_bytes())
        update: UpdateManifest | None = None
        update_url = f"{base}/updates/{target.model_id}/{old.bundle_version}/{target.bundle_version}"
        try:
            update_raw = fetch_bytes(f"{update_url}/{UPDATE_FILENAME}", timeout_s=self.config.timeout_s)
            update = UpdateManifest.from_json(update_raw)
            current_sha = file_sha256(current / MANIFEST_FILENAME)
            if update.from_manifest_sha256 != current_sha or any(update.entry(p) is None for p in wanted):
                log.info("the update artifact does not start from this bundle; fetching full files")
                update = None
            else:
                write_atomic(stage / UPDATE_FILENAME, update_raw)
        except NotFound:
            log.info("no update artifact from %s; fetching full files", old.bundle_version)
        jobs: list[tuple[str, Path, str, int]] = []
        if update is not None:
            for path in wanted:
                entry = update.entry(path)
                assert entry is not None
                if entry.artifact is not None and entry.artifact_sha256 is not None:
                    jobs.append(
                        (
                            f"{update_url}/{entry.artifact}",
                            stage / "artifacts" / entry.artifact,
                            entry.artifact_sha256,
                            entry.artifact_size,
                        )
                    )
        else:
            (stage / UPDATE_FILENAME).unlink(missing_ok=True)
            for path, (sha, size) in wanted.items():
                jobs.append((f"{bundle_url}/{path}", stage / "full" / path, sha, size))
        total = sum(size for _, _, _, size in jobs)
        need = total + sum(size for _, size in wanted.values()) + self.config.free_margin_bytes
        free = self._free_bytes(self.root)
        if free < need:
            raise UpdateError(
                f"not enough disk space: the update needs {need} bytes, {free} are free",
                hint="free space in the agent's state_dir",
            )
        self.record.bytes_total = total
        done = 0

        def progress(now: int, _total: int | None) -> None:
            self._progress(done + now, total)

        for url, dest, sha, size in jobs:
            self._check_cancel()
            download(
                url,
                dest,
                sha256=sha,
                size=size,
                max_bytes_per_s=instr.max_bytes_per_s,
                timeout_s=self.config.timeout_s,
                retries=self.config.retries,
                progress=progress,
                stop=self._stopping,
            )
            done += size
        self.record.bytes_done = done

    def _verify(self, instr: UpdateInstruction, current: Path) -> None:
        stage = self._staging()
        raw = (stage / MANIFEST_FILENAME).read_bytes()
        if hashlib.sha256(raw).hexdigest() != instr.manifest_sha256:
            raise UpdateError("the staged manifest.json changed on disk")
        manifest = BundleManifest.from_json(raw)
        verify_manifest(manifest, self._key)
        wanted = self._wanted(manifest)
        out = stage / "bundle"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        update_path = stage / UPDATE_FILENAME
        update = UpdateManifest.from_json(update_path.read_bytes()) if update_path.exists() else None
        for path, (sha, _) in wanted.items():
            self._check_cancel()
            if update is not None:
                entry = update.entry(path)
                assert entry is not None
                artifact = (
                    b"" if entry.artifact is None else (stage / "artifacts" / entry.artifact).read_bytes()
                )
                try:
                    data = apply_file(entry, artifact, current, expected_sha256=sha)
                except DeltaError as exc:
                    raise UpdateError(f"delta refused: {exc}") from exc
                write_atomic(out / path, data)
            else:
                (out / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stage / "full" / path, out / path)
        write_atomic(out / MANIFEST_FILENAME, raw)
        open_for_runtime(out, public_key=self._key, runtime=self.runtime)
        dest = self.bundles / instr.target.bundle_version
        if dest.exists():
            if dest.resolve() == current.resolve():
                raise UpdateError("the target version is the bundle being served")
            shutil.rmtree(dest)
        os.replace(out, dest)
        _fsync_dir(self.bundles)

    def _health(self, instr: UpdateInstruction) -> None:
        assert self.host is not None
        manifest = BundleManifest.from_json(
            (self.bundles / instr.target.bundle_version / MANIFEST_FILENAME).read_bytes()
        )
        bound = self.config.max_latency_ms
        if bound is None:
            recorded = [lat.p90_ms for v in manifest.variants for lat in v.latency.values()]
            bound = max(50.0, 5 * max(recorded, default=10.0))
        mark = self.host.health_mark()
        slowest = self.host.self_test()
        if slowest > bound:
            raise UpdateError(f"self-test took {slowest:.2f} ms, over the {bound:.2f} ms bound")
        deadline = time.monotonic() + instr.health_window_s
        while time.monotonic() < deadline:
            if self._halt.is_set():
                raise UpdateError("stopped during the health check")
            sample = self.host.health_since(mark)
            self._judge(sample, bound)
            time.sleep(min(self.config.health_poll_s, max(deadline - time.monotonic(), 0)))
        self._judge(self.host.health_since(mark), bound)

    def _judge(self, sample: HealthSample, bound: float) -> None:
        if sample.inferences and sample.errors / sample.inferences > self.config.max_error_rate:
            raise UpdateError(
                f"{sample.errors} of {sample.inferences} inferences failed, over the "
                f"{self.config.max_error_rate:.0%} bound"
            )
        if sample.p90_ms is not None and sample.p90_ms > bound:
            raise UpdateError(f"p90 latency {sample.p90_ms:.2f} ms is over the {bound:.2f} ms bound")
