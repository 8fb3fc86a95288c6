"""Run a private Eclipse Mosquitto broker: free port on 127.0.0.1, config in a temp dir, no persistence.

Used by the tests (one per session), the demo and the embedded fleet set-up. The broker is the real
``mosquitto`` binary from the Debian package of the same name; nothing here imitates one.

>>> with MosquittoBroker() as broker:  # doctest: +SKIP
...     print(broker.url)
mqtt://127.0.0.1:41234
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import ClassVar

from agent.errors import UserError

__all__ = ["BrokerError", "MosquittoBroker", "find_mosquitto", "free_port", "port_is_free"]

log = logging.getLogger(__name__)

_SEARCH = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/usr/bin/mosquitto")


class BrokerError(UserError):
    """The broker cannot be found or did not come up."""


def find_mosquitto() -> Path | None:
    """The ``mosquitto`` binary: on ``PATH`` or in the usual sbin directories (not always on PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return Path(found)
    return next((Path(p) for p in _SEARCH if os.access(p, os.X_OK)), None)


def port_is_free(host: str, port: int) -> bool:
    """Whether ``port`` on ``host`` can be bound right now by a server (which, like mosquitto, sets
    SO_REUSEADDR: connections of a previous server in TIME_WAIT do not count, a live listener does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _service_user() -> tuple[int, int] | None:
    """(uid, gid) of the ``mosquitto`` user when we run as root (mosquitto switches to it), else None."""
    if os.geteuid() != 0:
        return None
    try:
        import pwd

        entry = pwd.getpwnam("mosquitto")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


class MosquittoBroker:
    """A Mosquitto process of our own, stopped by pid when the context exits.

    The config listens on ``host`` only, keeps nothing on disk and logs to stdout, which goes to
    ``<workdir>/mosquitto.log``. By default it allows anonymous clients (it is private to this machine).

    Access control (see :mod:`fleet.security`, which writes these files): ``password_file`` and
    ``acl_file`` switch anonymous access off (unless ``allow_anonymous=True``); ``certfile`` + ``keyfile``
    (+ ``cafile``, the CA clients trust, for the record) make the listener TLS, and :attr:`url` then reads
    ``mqtts://``. The files are copied into the broker's private directory (readable by the ``mosquitto``
    user, to which mosquitto drops when started as root); :meth:`reload` copies them again and sends
    SIGHUP, the way a running broker picks up new or revoked credentials.

    >>> MosquittoBroker(password_file=Path("passwd"), acl_file=Path("acl"))  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 10.0,
        extra_config: str = "",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
        certfile: Path | None = None,
        keyfile: Path | None = None,
        cafile: Path | None = None,
    ) -> None:
        if (certfile is None) != (keyfile is None):
            raise BrokerError("a TLS listener needs both certfile and keyfile")
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.start_timeout_s = start_timeout_s
        self.extra_config = extra_config
        self._files = {
            "passwd": password_file,
            "acl": acl_file,
            "server.crt": certfile,
            "server.key": keyfile,
            "ca.crt": cafile,
        }
        self.allow_anonymous = (
            allow_anonymous if allow_anonymous is not None else password_file is None and acl_file is None
        )
        self.tls = certfile is not None
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def log_path(self) -> Path:
        if self._dir is None:
            raise BrokerError("the broker has not been started")
        return Path(self._dir.name) / "mosquitto.log"

    def start(self) -> MosquittoBroker:
        binary = find_mosquitto()
        if binary is None:
            raise BrokerError(
                "the mosquitto binary was not found on PATH or in /usr/sbin",
                hint="install it: sudo apt-get install mosquitto (make demo / make test do this for you)",
            )
        # free_port() releases the port before mosquitto binds it, so another process may take it in
        # between; when we picked the port ourselves, try a fresh one.
        for attempt in range(3):
            try:
                return self._start_once(binary)
            except BrokerError:
                if self._fixed_port or attempt == 2:
                    raise
                self.port = free_port(self.host)
        raise AssertionError("unreachable")

    def _start_once(self, binary: Path) -> MosquittoBroker:
        # A busy port would let the readiness probe below connect to somebody else's server.
        if not port_is_free(self.host, self.port):
            raise BrokerError(
                f"port {self.port} on {self.host} is already in use",
                hint="pick another port, or leave it out to get a free one",
            )
        self._dir = tempfile.TemporaryDirectory(prefix="edgeprune-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        try:
            access = self._copy_files()
        except BrokerError:
            self._cleanup()
            raise
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
            f"{access}"
            f"{self.extra_config}\n"
        )
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(
                [str(binary), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                self._cleanup()
                raise BrokerError(f"mosquitto exited with {self._proc.returncode} on start: {tail.strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    pass
                if self._proc.poll() is None:
                    log.info("mosquitto pid %d listening on %s", self._proc.pid, self.url)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerError(
            f"mosquitto did not accept connections on {self.url} within {self.start_timeout_s}s"
        )

    @property
    def _events_path(self) -> Path:
        return self.log_path.with_name("events.log")

    _OPTION: ClassVar[dict[str, str]] = {
        "passwd": "password_file",
        "acl": "acl_file",
        "server.crt": "certfile",
        "server.key": "keyfile",
        "ca.crt": "cafile",
    }

    def _copy_files(self) -> str:
        """Copy the access-control files into the private dir; the config lines that name the copies.

        Started as root, mosquitto drops to the ``mosquitto`` user before it reads them, so the copies
        belong to that user (mode 0600) and the private dir is made traversable (0711, not listable).
        """
        assert self._dir is not None
        workdir = Path(self._dir.name)
        owner = _service_user()
        if owner is not None:
            os.chmod(workdir, 0o711)
        lines = []
        if any(self._files.values()):
            # reload() waits for "Reloading config." (logged at level information); stdout is block-buffered
            # when it is a file, so that line goes to a log file of its own, which mosquitto flushes per
            # line. Mosquitto opens it after dropping privileges: create it for that user.
            events = self._events_path
            events.touch()
            if owner is not None:
                os.chown(events, *owner)
            lines += [f"log_dest file {events}\n", "log_type information\n"]
        for name, source in self._files.items():
            if source is None:
                continue
            target = workdir / name
            try:
                shutil.copyfile(source, target)
            except OSError as exc:
                raise BrokerError(f"cannot copy {source} for the broker: {exc.strerror}") from exc
            os.chmod(target, 0o600)
            if owner is not None:
                os.chown(target, *owner)
            lines.append(f"{self._OPTION[name]} {target}\n")
        if self.tls:
            # The TLS handshake's small writes meet Nagle + delayed ACK: 48 ms per connect without this,
            # 7.5 ms with it (bench/broker_security.py).
            lines.append("set_tcp_nodelay true\n")
        return "".join(lines)

    def reload(self) -> None:
        """Copy the password/ACL/TLS files again and send SIGHUP: mosquitto re-reads them, so new
        credentials work and revoked ones fail from the next CONNECT on. Mosquitto 2.0 also re-checks the
        clients already connected and disconnects those whose user name and password no longer pass.

        >>> broker.reload()  # doctest: +SKIP
        """
        if self._proc is None or self._proc.poll() is not None:
            raise BrokerError("the broker is not running")
        if not any(self._files.values()):
            raise BrokerError("this broker has no password, ACL or TLS files to reload")
        self._copy_files()
        before = self._events_path.read_text(errors="replace").count("Reloading config")
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._events_path.read_text(errors="replace").count("Reloading config") > before:
                return
            time.sleep(0.02)
        raise BrokerError(f"mosquitto did not log a reload within {self.start_timeout_s}s")

    def stop(self) -> None:
        """Terminate the broker by pid (kill after 5 s) and remove its temp dir. Safe to call twice."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> MosquittoBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
