"""The device agent: serves a verified bundle, adapts the variant to the device, reports over MQTT.

One object, :class:`Agent`, owns the pieces:

- the bundle, opened with :func:`agent.bundle.open_bundle` (every file's hash and the signature checked
  before anything is loaded) and served by a :class:`agent.runtime.ModelServer`;
- the sensors and the :class:`agent.policy.Policy`, consulted every ``decide_period_s`` by the agent's
  own thread (never per inference: reading sensors costs more than deciding);
- telemetry: every message goes through the on-disk :class:`agent.outbox.Outbox` first, then to the
  broker (QoS 1), so an outage or a restart loses nothing; consumers drop duplicates by ``message_id``;
- the fleet's retained ``desired`` state: validated, applied in revision order, rejected with an
  ``command_rejected`` event when malformed (never a crash).

paho's network thread only enqueues (``on_message``) or sets flags (``on_connect``/``on_disconnect``);
all work happens in :meth:`Agent.infer` (the caller's thread) and in the agent's loop thread.

>>> agent = Agent(AgentConfig(bundle=Path("b"), public_key=Path("k.pub"), broker_url="mqtt://127.0.0.1:1883",
...               device_id="pi-01", state_dir=Path("state")))  # doctest: +SKIP
>>> agent.start(); agent.infer(image).label; agent.stop()  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import os
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from agent import __version__
from agent.contract import (
    CHANNELS,
    Birth,
    BundleManifest,
    BundleRef,
    Channel,
    ContractError,
    DesiredState,
    Event,
    EventName,
    Message,
    Metrics,
    Percentiles,
    Readings,
    Scalar,
    Status,
    UpdateInstruction,
    UpdateState,
    UpdateStatus,
    device_topic,
    envelope,
    parse_message,
)
from agent.errors import UserError
from agent.memory import release_free_heap, trim_code_pages
from agent.mqtt import make_client, parse_broker_url, resolve_address
from agent.outbox import Outbox, OutboxError
from agent.policy import Decision, Policy, PolicyConfig
from agent.runtime import Inference, ModelServer, make_backend
from agent.sensors import SensorSource, SystemSensors
from agent.signing import load_public_key
from agent.updater import HealthSample, Updater, UpdaterConfig, open_for_runtime

__all__ = ["Agent", "AgentConfig"]

log = logging.getLogger(__name__)

_trim_lock = threading.Lock()
_last_trim = [-math.inf]  # monotonic time of this process's last working-set trim


@dataclass(frozen=True)
class AgentConfig:
    """How one agent runs. Paths are on the device; ``state_dir`` survives restarts."""

    bundle: Path
    public_key: Path
    broker_url: str
    device_id: str
    state_dir: Path
    fleet: str = "default"
    backend: str = "onnx"
    profile: str = "host"
    threads: int = 1
    metrics_period_s: float = 10.0
    heartbeat_period_s: float = 30.0
    decide_period_s: float = 1.0
    shadow_rate: float = 0.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    keepalive_s: int = 15
    reconnect_min_s: int = 1
    reconnect_max_s: int = 30
    memory_cap_mb: float | None = None
    # Seconds after start (and after each bundle swap) to unmap library code start-up touched once
    # (agent.memory.trim_code_pages); None: never.
    trim_memory_after_s: float | None = 5.0
    seed: int | None = None
    updater: UpdaterConfig = field(default_factory=UpdaterConfig)
    loop_period_s: float = 0.05  # how often the agent's thread wakes; raised by the simulator for scale
    # Broker credentials (see agent.mqtt.resolve_address): the user name is the URL's or else device_id;
    # the password from a file (0600) or an environment variable rather than the URL; the CA that
    # signed the broker's certificate for mqtts:// URLs (else the system's CAs).
    broker_password_file: Path | None = None
    broker_password_env: str | None = None
    broker_ca_file: Path | None = None


@dataclass
class _Window:
    """Accumulates one metrics window."""

    started: float
    latencies: list[float] = field(default_factory=list)
    macs: float = 0.0
    density: float = 0.0
    errors: int = 0
    shadow_runs: int = 0
    shadow_agree: int = 0


class Agent:
    """See the module docstring. Thread-safe: :meth:`infer` may be called from any thread."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        sensors: SensorSource | None = None,
        server: ModelServer | None = None,
    ) -> None:
        """``server``: serve through this model server instead of loading the bundle again (the simulator
        gives many agents in one process views of one shared server); it must serve ``config.bundle``."""
        self.config = config
        self.sensors: SensorSource = sensors if sensors is not None else SystemSensors()
        self._address = parse_broker_url(config.broker_url)
        self._public_key = load_public_key(config.public_key)
        self._backend = make_backend(config.backend, threads=config.threads)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        # The updater first: a restart inside an update settles (resume or roll back) before anything loads.
        self.updater = Updater(
            config.state_dir, public_key=self._public_key, runtime=self._backend.name, config=config.updater
        )
        self.bundle_path = self.updater.recover(config.bundle)
        self.manifest: BundleManifest = open_for_runtime(
            self.bundle_path, public_key=self._public_key, runtime=self._backend.name
        )
        self.server = (
            server
            if server is not None
            else ModelServer(
                self.bundle_path, self.manifest, self._backend, memory_cap_mb=config.memory_cap_mb
            )
        )
        self.outbox = Outbox(config.state_dir / "outbox.sqlite")
        self.policy = Policy(self.manifest, config.policy, runtime=self._backend.name)
        self._desired_path = config.state_dir / "desired.json"
        self._desired_revision = -1
        self._metrics_period = config.metrics_period_s
        self._heartbeat_period = config.heartbeat_period_s
        self._lock = threading.Lock()
        self._window = _Window(started=time.monotonic())
        self._started_at = time.monotonic()
        self._inbox: queue.Queue[bytes] = queue.Queue()
        self._connected = threading.Event()
        self._ever_connected = False
        self._announce = threading.Event()  # reconnected: the retained status may be our last will
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._trim_at: float | None = None  # monotonic time of the next working-set trim
        self._random = random.Random(config.seed)
        self.decision: Decision | None = None
        self.readings = Readings()
        self._client = self._make_client()
        # the health list shares the metrics window's lock: one acquisition per inference (see infer)
        self._health_lock = self._lock
        self._health: list[tuple[bool, float]] = []  # (failed, latency_ms) per inference, for the updater
        self._health_base = 0
        self._update_thread: threading.Thread | None = None
        self._next_update: UpdateInstruction | None = None
        self.updater.attach(self)
        self._restore_desired()

    # ---- lifecycle -------------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        address = resolve_address(
            self.config.broker_url,
            username=self.config.device_id,
            password_file=self.config.broker_password_file,
            password_env=self.config.broker_password_env,
            ca_file=self.config.broker_ca_file,
        )
        client = make_client(self.config.device_id, address)
        will = Status(
            **envelope(device_id=self.config.device_id, seq=self.outbox.next_seq()),
            state="offline",
            uptime_s=0,
            active_variant=None,
        )
        client.will_set(self._topic("status"), will.to_json(), qos=1, retain=True)
        client.reconnect_delay_set(
            min_delay=self.config.reconnect_min_s, max_delay=self.config.reconnect_max_s
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Queue the birth, connect in the background (retrying with backoff), start the loop."""
        self._tick_policy(time.monotonic(), force=True)
        self._send_birth()
        self._send_status("online")
        self._event(
            "started",
            f"agent {__version__} serving {self.manifest.model_id} "
            f"{self.manifest.bundle_version} with {self._backend.name}",
        )
        self._client.connect_async(self._address.host, self._address.port, keepalive=self.config.keepalive_s)
        self._client.loop_start()
        if self.config.trim_memory_after_s is not None:
            self._trim_memory()  # the import and model-load code now; the connect's at the scheduled trim
            self._schedule_trim()
        self._thread = threading.Thread(target=self._loop, name=f"agent-{self.config.device_id}", daemon=True)
        self._thread.start()
        if self.updater.pending() or self._next_update is not None:
            self._start_update(None)

    def stop(self, *, flush_timeout_s: float = 5.0) -> None:
        """Clean shutdown: last metrics, an offline status, flush the outbox, disconnect, close."""
        self._stop.set()
        self.updater.halt()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._update_thread is not None:
            self._update_thread.join(timeout=30)
        self._flush_metrics(time.monotonic())
        self._event("stopping", "agent stopping")
        self._send_status("offline")
        if self._connected.wait(timeout=min(flush_timeout_s, 1.0)):
            try:
                self.outbox.drain(self._client, timeout_s=flush_timeout_s)
            except OutboxError as exc:
                log.warning("could not flush the outbox on stop: %s", exc)
        self._client.disconnect()
        self._client.loop_stop()
        log.info("stopped with %d message(s) still queued", self.outbox.pending())
        self.outbox.close()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- bundles ---------------------------------------------------------------------------------

    def load_bundle(self, bundle: Path) -> BundleManifest:
        """Verify ``bundle`` and every variant in it, then serve it; on any failure keep serving the old one.

        Everything that can fail (files, hashes, signature, loading each model, building the policy)
        happens before the swap; the swap itself is one reference assignment, so an inference in flight
        finishes on the old bundle and the next one starts on the new.
        """
        current = f"{self.manifest.model_id} {self.manifest.bundle_version}"
        try:
            manifest = open_for_runtime(bundle, public_key=self._public_key, runtime=self._backend.name)
            server = ModelServer(bundle, manifest, self._backend, memory_cap_mb=self.config.memory_cap_mb)
            policy = Policy(manifest, self.policy.config, runtime=self._backend.name)
        except UserError as exc:
            self._event(
                "error",
                f"bundle {bundle} refused ({type(exc).__name__}: {exc}); still serving {current}",
                severity="error",
            )
            raise
        with self._lock:
            self.server, self.manifest, self.policy = server, manifest, policy
            self.bundle_path = bundle
        self._event(
            "bundle_loaded",
            f"now serving {manifest.model_id} {manifest.bundle_version} (was {current})",
            data={"model_id": manifest.model_id, "bundle_version": manifest.bundle_version},
        )
        self._send_birth()
        self._tick_policy(time.monotonic(), force=True)
        self._schedule_trim()
        return manifest

    def _schedule_trim(self) -> None:
        if self.config.trim_memory_after_s is not None:
            self._trim_at = time.monotonic() + self.config.trim_memory_after_s

    def _trim_memory(self) -> None:
        """Give back the heap the last model loads freed and unmap the library code start-up touched
        once (agent.memory); what serving uses faults back in. Once per process per second: the trim
        reads /proc/self/smaps (10-30 ms), and the simulator starts many agents in one process."""
        self._trim_at = None
        with _trim_lock:
            if time.monotonic() - _last_trim[0] < 1.0:
                return
            _last_trim[0] = time.monotonic()
        release_free_heap()
        result = trim_code_pages()
        log.info(
            "trimmed the working set: %.1f MB of read-only library pages in %d mappings unmapped",
            result.released_bytes / 2**20,
            result.mappings,
        )

    # ---- updates (the host side of agent.updater.Updater) ----------------------------------------

    def _start_update(self, instruction: UpdateInstruction | None) -> None:
        """Queue ``instruction`` (``None``: resume an interrupted one) for the update worker thread.

        An update to the bundle already served, or one this updater already finished, is a no-op; a
        newer instruction cancels a running one that is not yet activated, then runs."""
        if instruction is not None:
            target = instruction.target
            rec = self.updater.record
            if (target.model_id, target.bundle_version) == (
                self.manifest.model_id,
                self.manifest.bundle_version,
            ) and not self.updater.pending():
                log.info("update %s: already serving %s", instruction.update_id, target.bundle_version)
                return
            if rec.update_id == instruction.update_id:
                if not self.updater.pending():
                    log.info("update %s is %s already", instruction.update_id, rec.state)
                    return  # ended (the fleet retries with a new update_id) or activating right now
                instruction = None  # the same update, interrupted or running: resume it / let it run
        with self._lock:
            if instruction is not None:
                self._next_update = instruction
                self.updater.cancel()
            if self._thread is None:
                return  # start() spawns the worker
            if self._update_thread is None or not self._update_thread.is_alive():
                self._update_thread = threading.Thread(
                    target=self._update_worker, name=f"updater-{self.config.device_id}", daemon=True
                )
                self._update_thread.start()

    def _update_worker(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                instruction, self._next_update = self._next_update, None
            try:
                if instruction is None:
                    if not self.updater.pending():
                        with self._lock:
                            if self._next_update is None:
                                return
                        continue
                    self.updater.resume(self, current=self.bundle_path)
                elif (instruction.target.model_id, instruction.target.bundle_version) == (
                    self.manifest.model_id,
                    self.manifest.bundle_version,
                ) or instruction.update_id == self.updater.record.update_id:
                    continue
                else:
                    self.updater.run(instruction, self, current=self.bundle_path)
            except Exception as exc:  # never let the worker die silently
                log.exception("updater error")
                self._safe_event("error", f"updater error: {type(exc).__name__}: {exc}", severity="error")
                return

    def activate(self, bundle: Path) -> BundleManifest:
        """Serve ``bundle`` (the updater's activation and rollback step)."""
        if bundle.resolve() == self.bundle_path.resolve() and self.manifest == open_for_runtime(
            bundle, public_key=self._public_key, runtime=self._backend.name
        ):
            return self.manifest
        return self.load_bundle(bundle)

    def self_test(self) -> float:
        """One fixed input (mid-grey) through every served variant; raise on a bad output; slowest ms."""
        server = self.server
        image = np.full(self.manifest.input.shape, 128, np.uint8)
        slowest = 0.0
        for name in server.available:
            result = server.infer(image, variant=name)
            if (
                result.logits.shape != (1, len(self.manifest.input.class_names))
                or not np.isfinite(result.logits).all()
            ):
                raise UserError(f"self-test of variant {name} gave a bad output {result.logits.shape}")
            slowest = max(slowest, result.latency_ms)
        return slowest

    def _note_health(self, *, failed: bool, latency_ms: float) -> None:
        with self._health_lock:
            self._note_health_locked(failed, latency_ms)

    def _note_health_locked(self, failed: bool, latency_ms: float) -> None:
        self._health.append((failed, latency_ms))
        if len(self._health) > 10_000:
            drop = len(self._health) - 5_000
            del self._health[:drop]
            self._health_base += drop

    def health_mark(self) -> int:
        with self._health_lock:
            return self._health_base + len(self._health)

    def health_since(self, mark: int) -> HealthSample:
        with self._health_lock:
            seen = self._health[max(mark - self._health_base, 0) :]
        latencies = [lat for failed, lat in seen if not failed]
        p90 = float(np.percentile(latencies, 90)) if latencies else None
        return HealthSample(inferences=len(seen), errors=sum(f for f, _ in seen), p90_ms=p90)

    def publish(self, state: UpdateState, record: dict[str, Any]) -> None:
        """Send the updater's state change as an UpdateStatus (and an error event when it failed)."""
        instruction = record.get("instruction")
        if instruction is None:
            return
        target = UpdateInstruction.model_validate(instruction).target
        error = record.get("error") if state in ("failed", "rolling_back", "rolled_back") else None
        self._send(
            "update",
            UpdateStatus(
                **self._env(),
                update_id=record["update_id"],
                target=target,
                state=state,
                bytes_done=record.get("bytes_done") or 0,
                bytes_total=record.get("bytes_total"),
                error=error,
            ),
        )
        if state in ("failed", "rolling_back"):
            self._event(
                "error",
                f"update {record['update_id']} to {target.bundle_version}: {state}: {error}",
                severity="error",
                data={"update_id": record["update_id"], "state": state},
            )

    # ---- inference -------------------------------------------------------------------------------

    def infer(self, x: np.ndarray) -> Inference:
        """Run one input on the variant the policy chose; optionally shadow-run dense to measure agreement."""
        server = self.server  # one bundle for this whole inference, even if load_bundle swaps it now
        try:
            decision = self.decision
            result = server.infer(x, budget=decision.budget if decision is not None else None)
        except Exception:
            with self._lock:
                self._window.errors += 1
            self._note_health(failed=True, latency_ms=0.0)
            raise
        shadow = None
        if (
            self.config.shadow_rate
            and result.variant != self._dense
            and self._random.random() < self.config.shadow_rate
        ):
            shadow = server.infer(x, variant=self._dense)
        with self._lock:
            self._note_health_locked(False, result.latency_ms)
            self._window.latencies.append(result.latency_ms)
            self._window.macs += result.macs
            self._window.density += result.density
            if shadow is not None:
                self._window.shadow_runs += 1
                self._window.shadow_agree += int(shadow.label == result.label)
        return result

    @property
    def _dense(self) -> str:
        return next(
            (v.name for v in self.manifest.variants if v.kind == "dense"), self.manifest.variants[0].name
        )

    # ---- the loop ------------------------------------------------------------------------------

    def _loop(self) -> None:
        now = time.monotonic()
        next_decide, next_metrics, next_heartbeat = (
            now,
            now + self._metrics_period,
            now + self._heartbeat_period,
        )
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                self._handle_commands()
                if now >= next_decide:
                    self._tick_policy(now)
                    next_decide = now + self.config.decide_period_s
                if now >= next_metrics:
                    self._flush_metrics(now)
                    next_metrics = now + self._metrics_period
                if now >= next_heartbeat or self._announce.is_set():
                    # after a reconnect the broker holds our last will ("offline") as the retained status:
                    # replace it at once instead of at the next heartbeat
                    self._announce.clear()
                    self._send_status("online")
                    next_heartbeat = now + self._heartbeat_period
                if self._connected.is_set() and self.outbox.pending():
                    self.outbox.drain(self._client, timeout_s=2.0, max_messages=500)
                if self._trim_at is not None and now >= self._trim_at:
                    self._trim_memory()
            except Exception as exc:  # the daemon's top loop: report, keep serving
                log.exception("agent loop error")
                self._safe_event("error", f"agent loop error: {type(exc).__name__}: {exc}", severity="error")
            self._stop.wait(self.config.loop_period_s)

    def _tick_policy(self, now: float, *, force: bool = False) -> None:
        self.readings = self.sensors.read()
        decision = self.policy.decide(self.readings, now)
        previous = self.decision
        self.decision = decision
        if decision.variant != self.server.active or force:
            old = self.server.active
            self.server.switch(decision.variant)
            if old != decision.variant:
                self._event(
                    "variant_switch",
                    decision.reason,
                    data={
                        "from_variant": old,
                        "to_variant": decision.variant,
                        "pressure": decision.pressure,
                        "battery_pct": self.readings.battery_pct,
                        "charging": self.readings.charging,
                        "cpu_load_pct": self.readings.cpu_load_pct,
                        "temperature_c": self.readings.temperature_c,
                    },
                )
        elif previous is not None and decision.budget != previous.budget:
            self._event("budget_change", decision.reason, data={"budget": decision.budget})

    def _flush_metrics(self, now: float) -> None:
        with self._lock:
            window, self._window = self._window, _Window(started=now)
        n = len(window.latencies)
        latency = None
        if n:
            p50, p90, p99 = (float(v) for v in np.percentile(window.latencies, [50, 90, 99]))
            latency = Percentiles(p50_ms=p50, p90_ms=p90, p99_ms=p99)
        self._send(
            "metrics",
            Metrics(
                **self._env(),
                window_s=max(now - window.started, 1e-3),
                inferences=n,
                errors=window.errors,
                latency=latency,
                mean_macs=window.macs / n if n else None,
                mean_density=window.density / n if n else None,
                active_variant=self.server.active,
                budget=self.decision.budget if self.decision else None,
                readings=self.readings,
                agreement=window.shadow_agree / window.shadow_runs if window.shadow_runs else None,
                shadow_runs=window.shadow_runs,
                outbox_dropped=self.outbox.dropped,
            ),
        )

    # ---- commands ------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._inbox.put(bytes(msg.payload))  # only enqueue: the loop thread does the work

    def _handle_commands(self) -> None:
        while True:
            try:
                payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not payload:
                continue  # a cleared retained message
            try:
                message = parse_message(payload, expect_kind="desired", expect_device=self.config.device_id)
                assert isinstance(message, DesiredState)
                self._apply_desired(message)
            except (ContractError, UserError) as exc:
                self._event(
                    "command_rejected",
                    f"desired state rejected: {exc}",
                    severity="warning",
                    data={"payload_bytes": len(payload)},
                )

    def _apply_desired(self, desired: DesiredState, *, persist: bool = True) -> None:
        if desired.revision <= self._desired_revision:
            return
        # Fleet overrides apply on top of this device's own configuration, not on the library defaults.
        policy = self.config.policy.with_overrides(
            {**desired.policy_overrides, "pinned_variant": desired.pinned_variant}
        )
        if desired.pinned_variant is not None and desired.pinned_variant not in self.server.available:
            raise UserError(
                f"pinned variant {desired.pinned_variant!r} is not in this bundle "
                f"({', '.join(self.server.available)})"
            )
        self.policy.reconfigure(policy)
        if desired.metrics_period_s is not None:
            self._metrics_period = desired.metrics_period_s
        if desired.heartbeat_period_s is not None:
            self._heartbeat_period = desired.heartbeat_period_s
        self._desired_revision = desired.revision
        if persist:
            tmp = self._desired_path.with_suffix(".tmp")
            tmp.write_text(desired.to_json())
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self._desired_path)
        note = ""
        if desired.update is not None:
            note = f"; update {desired.update.update_id} to {desired.update.target.bundle_version}"
            self._start_update(desired.update)
        self._event(
            "desired_applied",
            f"applied desired state revision {desired.revision}{note}",
            data={"revision": desired.revision, "pinned_variant": desired.pinned_variant},
        )
        self._tick_policy(time.monotonic())

    def _restore_desired(self) -> None:
        try:
            saved = DesiredState.from_json(self._desired_path.read_bytes())
        except FileNotFoundError:
            return
        except ContractError as exc:
            log.warning("ignoring unreadable %s: %s", self._desired_path, exc)
            return
        self._apply_desired(saved, persist=False)

    # ---- MQTT callbacks (network thread: flags only) -----------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        client.subscribe(self._topic("desired"), qos=1)
        if self._ever_connected:
            self._announce.set()
        self._ever_connected = True
        self._connected.set()
        log.info("connected to %s", self._address.url)  # never the password

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        log.info("disconnected (%s); paho reconnects with backoff", reason)

    # ---- sending -------------------------------------------------------------------------------

    def _topic(self, channel: Channel) -> str:
        return device_topic(self.config.fleet, self.config.device_id, channel)

    def _env(self) -> dict[str, Any]:
        return envelope(device_id=self.config.device_id, seq=self.outbox.next_seq())

    def _send_birth(self) -> None:
        """Who this device is and what it serves; retained, sent at start and after a bundle change."""
        self._send(
            "birth",
            Birth(
                **self._env(),
                profile=self.config.profile,
                agent_version=__version__,
                backend=self._backend.name,
                bundle=self._bundle_ref(),
                variants=self.server.available,
            ),
        )

    def _bundle_ref(self) -> BundleRef:
        return BundleRef(model_id=self.manifest.model_id, bundle_version=self.manifest.bundle_version)

    def _send(self, channel: Channel, message: Message) -> None:
        spec = CHANNELS[channel]
        self.outbox.put(
            self._topic(channel),
            message.to_json().encode(),
            qos=spec.qos,
            retain=spec.retained,
            message_id=message.message_id,
        )

    def _send_status(self, state: str) -> None:
        self._send(
            "status",
            Status(
                **self._env(),
                state=state,
                uptime_s=time.monotonic() - self._started_at,
                active_variant=self.server.active,
                budget=self.decision.budget if self.decision else None,
                outbox_pending=self.outbox.pending(),
            ),
        )

    def _event(
        self, name: EventName, message: str, *, severity: str = "info", data: dict[str, Scalar] | None = None
    ) -> None:
        # the wire refuses U+0000 in text (agent.contract.parse_message); an error text may quote a
        # malformed command that held one
        message = message.replace("\x00", "\\x00")
        data = {
            k.replace("\x00", "\\x00"): v.replace("\x00", "\\x00") if isinstance(v, str) else v
            for k, v in (data or {}).items()
        }
        self._send("events", Event(**self._env(), event=name, severity=severity, message=message, data=data))

    def _safe_event(self, name: EventName, message: str, *, severity: str) -> None:
        try:
            self._event(name, message, severity=severity)
        except Exception:  # the outbox itself failed (disk full): the log is all we have
            log.exception("could not queue the %s event", name)
