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
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

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


class MosquittoBroker:
    """A Mosquitto process of our own, stopped by pid when the context exits.

    The config listens on ``host`` only, allows anonymous clients (it is private to this machine),
    keeps nothing on disk and logs to stdout, which goes to ``<workdir>/mosquitto.log``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        start_timeout_s: float = 10.0,
        extra_config: str = "",
    ) -> None:
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.start_timeout_s = start_timeout_s
        self.extra_config = extra_config
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

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
        conf.write_text(
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\nlog_type warning\nlog_type notice\n"
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
