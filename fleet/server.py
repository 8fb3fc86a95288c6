"""One fleet-manager process: ingestion, the rollout loop and the HTTP API, started and stopped together.

Run several of them against one PostgreSQL database and one (clustered) broker with the same share group
to scale out: the broker splits the device traffic, the store's lease lets one of them advance rollouts.

>>> with FleetServer(ServeConfig(db="fleet.db", broker="mqtt://127.0.0.1:1883",
...                              data_dir=Path("fleet-data"))) as server:  # doctest: +SKIP
...     print(server.url)
http://127.0.0.1:8080
"""

from __future__ import annotations

import logging
import secrets
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from agent.errors import UserError
from agent.mqtt import BrokerAddress
from agent.signing import load_public_key
from fleet.api import create_app
from fleet.ingest import Ingestor
from fleet.rollouts import RolloutManager
from fleet.store import Store

__all__ = ["FleetServer", "ServeConfig", "parse_http"]

log = logging.getLogger(__name__)


def parse_http(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> ``(host, port)``.

    >>> parse_http("127.0.0.1:8080")
    ('127.0.0.1', 8080)
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UserError(f"--http {text!r} is not HOST:PORT", hint="e.g. --http 127.0.0.1:8080")
    return host, int(port)


@dataclass(frozen=True)
class ServeConfig:
    """How one fleet-manager process runs."""

    db: str
    broker: str | BrokerAddress
    data_dir: Path
    http_host: str = "127.0.0.1"
    http_port: int = 8080
    public_url: str | None = None
    public_key: Path | None = None
    token: str | None = None
    fleet: str | None = None
    group: str = "edgeprune-fleet"
    tick_s: float = 2.0
    client_id: str | None = None
    """MQTT client id; keep it the same across restarts for ``session_expiry_s`` to help (None: random)."""
    session_expiry_s: int = 0
    """How long the broker keeps this manager's session (and what it had not acknowledged) while it is
    gone; 0 = a clean session. ``fleet serve`` keeps one for 300 s."""


class FleetServer:
    """See the module docstring. ``start`` returns once HTTP answers and the subscription is in place."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.token = config.token or secrets.token_urlsafe(24)
        self.generated_token = config.token is None
        self.store: Store | None = None
        self.ingestor: Ingestor | None = None
        self.manager: RolloutManager | None = None
        self._http: uvicorn.Server | None = None
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    @property
    def url(self) -> str:
        return f"http://{self.config.http_host}:{self.config.http_port}"

    def start(self, *, timeout_s: float = 15.0) -> FleetServer:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        key = load_public_key(c.public_key) if c.public_key else None
        if key is None:
            log.warning("no --public-key: uploaded bundles are not signature-checked")
        self.store = Store(c.db)
        try:
            self.ingestor = Ingestor(
                self.store,
                broker_url=c.broker,
                fleet=c.fleet,
                group=c.group,
                client_id=c.client_id,
                session_expiry_s=c.session_expiry_s,
            ).start()
            client = self.ingestor.client

            def publish(topic: str, payload: bytes) -> None:
                client.publish(topic, payload, qos=1, retain=True)

            self.manager = RolloutManager(
                self.store, data_dir=c.data_dir, public_url=c.public_url or self.url, publish=publish
            )
            app = create_app(
                store=self.store,
                manager=self.manager,
                token=self.token,
                data_dir=c.data_dir,
                public_key=key,
                ingest_stats=self.ingestor.stats,
            )
            self._http = uvicorn.Server(
                uvicorn.Config(app, host=c.http_host, port=c.http_port, log_level="warning", lifespan="off")
            )
            self._spawn(self._http.run, "fleet-http")
            self._spawn(self._rollout_loop, "fleet-rollouts")
            deadline = time.monotonic() + timeout_s
            while not self._http.started:
                if time.monotonic() > deadline or not self._threads[0].is_alive():
                    raise UserError(
                        f"the HTTP server did not start on {self.url}", hint="is the port already in use?"
                    )
                time.sleep(0.02)
        except BaseException:
            self.stop()
            raise
        log.info("fleet manager serving %s (db %s)", self.url, self.store.url)
        return self

    def _spawn(self, target: Callable[[], object], name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _rollout_loop(self) -> None:
        assert self.manager is not None
        while not self._stop.wait(self.config.tick_s):
            try:
                self.manager.tick()
            except Exception:  # the daemon's top loop: log and try again next tick
                log.exception("rollout tick failed")

    def stop(self) -> None:
        """Stop HTTP, the rollout loop and ingestion (writing what is queued), close the store."""
        self._stop.set()
        if self._http is not None:
            self._http.should_exit = True
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        if self.ingestor is not None:
            self.ingestor.stop()
            self.ingestor = None
        if self.store is not None:
            self.store.close()
            self.store = None

    def __enter__(self) -> FleetServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def serve_forever(self) -> None:
        """Start, then block until SIGTERM or Ctrl-C; stop cleanly."""
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("signal %d: stopping", signum)
            done.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not done.wait(0.5):
                pass
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
