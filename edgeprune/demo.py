"""``edgeprune demo``: the whole product in one command (issue #8).

What runs, all real, all on this machine:

1. the bundle is compiled (or reused from ``<out>/bundle``; the dense checkpoint is cached, so only the
   first run trains); a second version ``v2`` is made from it: its ONNX weights nudged onto the delta grid
   (:func:`compiler.finetune.perturb_onnx`, a stand-in for a fine-tune) and re-signed;
2. a private Mosquitto starts on a free port, then the fleet manager (:class:`fleet.server.FleetServer`:
   ingestion, rollout loop, HTTP API and dashboard on a free 127.0.0.1 port, SQLite under ``<out>``);
3. both versions are uploaded to the fleet's registry;
4. a simulated fleet of mixed device profiles (:class:`devices.simulator.Simulator`: real agents on
   simulated batteries, hours of battery life in a minute) serves Fashion-MNIST test images from v1; the
   policy steps each device down the variant ladder as its battery drains, with a reason;
5. once every device is registered, one malformed payload is sent (the manager rejects it, not fatal)
   and v2 is rolled out in stages behind health gates; each device downloads the delta the manager made
   (:func:`agent.delta.make_update`), verifies, activates and health-checks it, and commits;
6. when the rollout completes (or halts, which is said), the fleet stops cleanly and a summary is printed:
   devices, variant switches and why, energy, bytes shipped by the update vs the full bundle; plots and
   the simulator's result go under ``<out>/plots`` and ``<out>/result.json``.

Ctrl-C stops everything cleanly: agents offline, fleet manager stopped, broker stopped.
"""

from __future__ import annotations

import secrets
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from agent.contract import BundleManifest, device_topic
from agent.data import fashion_mnist_dir, load_fashion_mnist
from agent.errors import InternalError, UserError
from agent.mqtt import make_client
from agent.policy import PolicyConfig
from agent.signing import load_public_key
from fleet.broker import MosquittoBroker, free_port

__all__ = ["DemoError", "run_demo"]


class DemoError(UserError):
    """The demo could not show what it set out to show."""


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _say(text: str) -> None:
    print(f"    {text}", flush=True)


def _ensure_bundle(
    *, out: Path, data_root: Path | None, model: str, epochs: float | None, gated: bool
) -> tuple[Path, Path]:
    """The demo's bundle and public key under ``out``: reused when present and intact, else compiled
    (with the gated variant when ``gated``)."""
    from agent.bundle import BundleError, open_bundle
    from agent.signing import generate_keys, load_public_key
    from compiler.pipeline import CompileOptions, compile_bundle
    from compiler.train import TrainConfig

    keys, bundle = out / "keys", out / "bundle"
    if not (keys / "edgeprune.key").exists():
        generate_keys(keys)
        print(f"    made a demo signing key in {keys}")
    public = keys / "edgeprune.pub"
    if bundle.exists():
        try:
            open_bundle(bundle, public_key=load_public_key(public))
            print(f"    reusing {bundle} (delete it to compile again)")
            return bundle, public
        except (BundleError, UserError) as exc:
            print(f"    {bundle} is unusable ({exc}); compiling it again")
    # measured on the reference model, 2 cores (docs/compiler.md, "Numbers")
    took = (
        "about 11 minutes on 2 fast cores with native bf16, up to 90 on a slow AVX2-only CPU; --no-gated "
        "halves that"
        if gated
        else "5 minutes on 2 fast cores with native bf16, about 26 on a slow AVX2-only CPU"
    )
    print(
        "    the first run trains the dense model, the pruned ladder"
        + (" and the gated variant" if gated else "")
        + f" ({took});\n    later runs reuse the cached checkpoints, and a complete bundle is reused as is"
    )
    train = TrainConfig() if epochs is None else TrainConfig(epochs=epochs)
    compile_bundle(
        CompileOptions(
            out=bundle,
            key=keys / "edgeprune.key",
            model=model,
            data=str(data_root) if data_root else "fashion-mnist",
            train=train,
            gated=gated,
            force=True,
        )
    )
    return bundle, public


def _make_v2(bundle: Path, *, key: Path, out: Path, version: str) -> BundleManifest:
    """A copy of ``bundle`` at ``out`` whose ONNX weights moved a little (snapped to the delta grid, as a
    fine-tune with :mod:`compiler.finetune` would be), re-signed as ``version``."""
    from compiler.finetune import perturb_onnx, resign_bundle

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("report"))
    manifest = BundleManifest.from_json((out / "manifest.json").read_bytes())
    paths = sorted({f.path for v in manifest.variants for f in v.files if f.path.endswith(".onnx")})
    for seed, rel in enumerate(paths):
        path = out / rel
        tmp = path.with_name(path.name + ".tmp")
        perturb_onnx(path, tmp, seed=seed, relative=0.002, bits=6)
        tmp.replace(path)
    return resign_bundle(out, key, bundle_version=version)


def _onnx_bytes(directory: Path, manifest: BundleManifest) -> int:
    """What a device on the onnx runtime installs: the manifest and every variant's ONNX file."""
    files = {f.path: f.size_bytes for v in manifest.variants for f in v.files if f.path.endswith(".onnx")}
    return sum(files.values()) + (directory / "manifest.json").stat().st_size


def _send_malformed(broker: MosquittoBroker, fleet: str, device: str, timeout_s: float) -> None:
    rogue = make_client(f"{fleet}-rogue")
    rogue.connect(broker.host, broker.port)
    rogue.loop_start()
    try:
        payload = b'{"kind": "metrics", "inferences": -1}'
        rogue.publish(device_topic(fleet, device, "metrics"), payload, qos=1).wait_for_publish(timeout_s)
    finally:
        rogue.disconnect()
        rogue.loop_stop()


@dataclass
class _Driver:
    """The fleet operator, in a thread beside the simulator: waits for the devices to register, rolls v2
    out, follows it to its end, then stops the simulation (no earlier than ``min_run_s``)."""

    server: Any
    broker: MosquittoBroker
    fleet: str
    devices: int
    model_id: str
    v1: str
    v2: str
    min_run_s: float
    timeout_s: float
    sim: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    stopped_sim: bool = False
    rollout: dict[str, Any] | None = None
    rejected: int = 0
    error: BaseException | None = None

    def run(self) -> None:
        started = time.monotonic()
        try:
            self._run()
        except BaseException as exc:  # reported by run_demo after the fleet is stopped
            self.error = exc
        finally:
            while (
                self.error is None and not self.stop.is_set() and time.monotonic() - started < self.min_run_s
            ):
                self.stop.wait(0.2)  # let the batteries drain a little more: more variant switches
            if self.sim is not None and not self.stop.is_set():
                self.stopped_sim = True
                self.sim.stop()

    def _wait(self, what: str, predicate: Any, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.stop.is_set():
            if predicate():
                return True
            if time.monotonic() > deadline:
                raise DemoError(f"timed out after {timeout_s:.0f}s waiting for {what}")
            self.stop.wait(0.25)
        return False

    def _run(self) -> None:
        from fleet.gates import Gates
        from fleet.rollouts import RolloutSpec

        store, manager = self.server.store, self.server.manager

        def registered() -> list[dict[str, Any]]:
            return [d for d in store.devices(fleet=self.fleet) if d["bundle_version"] == self.v1]

        if not self._wait("every device to register", lambda: len(registered()) >= self.devices, 120):
            return
        _say(f"fleet manager: {len(registered())}/{self.devices} devices registered, all on {self.v1}")

        _step("sending one malformed payload; the fleet manager must reject it, not crash")
        before = sum(v for k, v in self._counters().items() if k.startswith("reject."))
        _send_malformed(self.broker, self.fleet, registered()[0]["device_id"], 10.0)
        self._wait(
            "the malformed payload to be rejected",
            lambda: sum(v for k, v in self._counters().items() if k.startswith("reject.")) > before,
            30,
        )
        self.rejected = sum(v for k, v in self._counters().items() if k.startswith("reject.")) - before
        _say(f"rejected: {self._counters()}")

        spec = RolloutSpec(
            fleet=self.fleet,
            model_id=self.model_id,
            bundle_version=self.v2,
            stages=(25.0, 50.0, 100.0),
            # no latency gate: the policy switches variants under each device by design, so its p90
            # after the update says more about its battery than about the bundle
            gates=Gates(max_failure_rate=0.2, max_error_rate=0.05, max_p90_ratio=None),
            soak_s=2.0,
            health_window_s=2.0,
            stuck_timeout_s=90.0,
        )
        _step(
            f"rolling out {self.v2} in stages {'/'.join(f'{p:g}%' for p in spec.stages)}, health gates: "
            f"failed updates <= {spec.gates.max_failure_rate:.0%}, inference errors <= "
            f"{spec.gates.max_error_rate:.0%}; each device health-checks the new bundle before it commits"
        )
        r = manager.create(spec)
        _say(f"rollout {r['id']}: {len(r.get('members') or []) or self.devices} device(s)")
        last = ""

        def progressed() -> bool:
            nonlocal last
            got = manager.get(r["id"])
            assert got is not None
            self.rollout = got
            stages = ", ".join(
                f"stage {p['stage'] + 1} ({p['percent']:g}%): "
                + (" ".join(f"{k} {v}" for k, v in sorted(p["states"].items())) or "-")
                for p in got["progress"]
            )
            line = f"rollout {got['state']}, at stage {got['stage'] + 1}/{len(got['stages'])}; {stages}"
            if line != last:
                _say(line)
                last = line
            return bool(got["state"] != "running")

        if not self._wait("the rollout to end", progressed, self.timeout_s):
            return
        assert self.rollout is not None
        if self.rollout["state"] == "completed":
            _say(f"rollout completed: every device committed {self.v2}")
        else:
            _say(
                f"rollout {self.rollout['state'].upper()}: {self.rollout.get('reason') or 'no reason given'}"
            )

    def _counters(self) -> dict[str, int]:
        return {k: v for k, v in self.server.store.counters().items() if k.startswith("reject.")}


def _update_bytes(store: Any, fleet: str, version: str) -> list[int]:
    """Bytes each device downloaded for its committed update to ``version``."""
    from fleet.store import schema as s

    u = s.update_statuses.c
    with store.read() as conn:
        rows = conn.execute(
            select(u.device_id, u.bytes_done, u.bytes_total).where(
                u.fleet == fleet, u.bundle_version == version, u.state == "committed"
            )
        ).all()
    seen: dict[str, int] = {}
    for row in rows:
        seen[row.device_id] = max(seen.get(row.device_id, 0), int(row.bytes_total or row.bytes_done or 0))
    return list(seen.values())


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) if directory.is_dir() else 0


def _path(switches: list[Any]) -> str:
    """``dense -> static-50 -> [new bundle] dense -> static-75``: a bundle load (the update) starts over."""
    parts = [switches[0].from_variant]
    for s in switches:
        if s.from_variant != parts[-1]:
            parts.append(f"[new bundle] {s.from_variant}")
        parts.append(s.to_variant)
    return " -> ".join(parts)


def _print_summary(
    result: Any,
    registry: list[dict[str, Any]],
    *,
    manifest: BundleManifest,
    full_bytes: int,
    update_bytes: list[int],
    delta_dir_bytes: int,
) -> None:
    macs = {v.name: v.macs for v in manifest.variants}
    dense_macs = max(macs.values())
    by_id = {d["device_id"]: d for d in registry}
    print(
        f"    {'device':<18}{'battery':>13}{'served':>8}{'accuracy':>10}{'compute':>9}  {'bundle':<16}"
        "variants (why)"
    )
    fractions = []
    for d in result.devices:
        row = by_id.get(d.device_id, {})
        samples = d.variant or ["?"]
        compute = float(np.mean([macs.get(v, dense_macs) for v in samples])) / dense_macs
        fractions.append((compute, d.inference_energy_j))
        battery = f"{d.battery_pct[0]:.0f}%->{d.battery_pct[-1]:.0f}%" if d.battery_pct else "?"
        path = _path(d.switches) if d.switches else samples[-1]
        accuracy = d.correct / d.labelled if d.labelled else 0.0
        print(
            f"    {d.device_id:<18}{battery:>13}{d.inferences:>8}{accuracy:>10.3f}{compute:>8.0%}  "
            f"{row.get('bundle_version')!s:<16}{path}"
        )
        for s in d.switches:
            at = f"{s.battery_pct:.0f}%" if s.battery_pct is not None else "?"
            print(
                f"    {'':<18}  - {s.t_h:4.1f} h, battery {at}: {s.from_variant} -> {s.to_variant}: "
                f"{s.reason}"
            )
    summary = result.summary()
    energy = sum(e for _, e in fractions)
    dense_energy = sum(e / c for c, e in fractions if c > 0)
    print(
        f"    compute = mean MACs per inference relative to always-dense ({dense_macs / 1e6:.2f}M MACs); "
        f"{summary['switches']} variant switch(es) in {summary['sim_hours']:.1f} simulated hours"
    )
    if energy > 0:
        print(
            f"    inference energy: {energy / 3600:.2f} Wh for {summary['device_inferences']:,} device "
            f"inferences; always-dense estimate {dense_energy / 3600:.2f} Wh "
            f"(saved {1 - energy / dense_energy:.0%}, assuming energy scales with MACs)"
        )
    if update_bytes:
        shipped = int(np.mean(update_bytes))
        print(
            f"    update shipped: {shipped:,} bytes per device (delta) vs {full_bytes:,} bytes for the full "
            f"bundle ({shipped / max(full_bytes, 1):.1%}); the delta on the manager: "
            f"{delta_dir_bytes:,} bytes"
        )
    registered = [d for d in registry if d.get("bundle_version")]
    versions = sorted({str(d["bundle_version"]) for d in registered})
    print(
        f"    fleet manager registered {len(registered)} device(s); "
        f"bundle versions now: {', '.join(versions)}"
    )


@dataclass
class _Bundles:
    v1: Path
    v2: Path
    public: Path
    manifest: BundleManifest
    v2_manifest: BundleManifest
    full_bytes: int


def _prepare(
    *, data_root: Path | None, out: Path, model: str, epochs: float | None, gated: bool
) -> tuple[Any, _Bundles]:
    """Load the test split, compile (or reuse) v1 and make v2."""
    from agent.bundle import open_bundle
    from agent.signing import load_public_key

    _step(f"loading Fashion-MNIST from {fashion_mnist_dir(data_root)}")
    test = load_fashion_mnist("test", root=data_root)
    counts = np.bincount(test.labels, minlength=len(test.class_names))
    _say(
        f"{len(test)} test images of {test.images.shape[1]}x{test.images.shape[2]}, "
        f"{len(test.class_names)} classes, {counts.min()}-{counts.max()} per class"
    )

    _step(f"compiling the {model} bundle into {out / 'bundle'}")
    bundle, public = _ensure_bundle(out=out, data_root=data_root, model=model, epochs=epochs, gated=gated)
    key = load_public_key(public)
    manifest = open_bundle(bundle, public_key=key)
    _say(
        f"{manifest.model_id} {manifest.bundle_version}: "
        + ", ".join(
            f"{v.name} ({v.macs / 1e6:.1f}M MACs, {100 * (v.accuracy or 0):.1f}%)" for v in manifest.variants
        )
        + "; signature verified"
    )
    version = f"{manifest.bundle_version}-ft1"
    _step(f"making {version}: the same bundle, weights nudged (a stand-in for a fine-tune), re-signed")
    v2_dir = out / "bundle-v2"
    v2 = _make_v2(bundle, key=out / "keys" / "edgeprune.key", out=v2_dir, version=version)
    open_bundle(v2_dir, public_key=key)
    full = _onnx_bytes(v2_dir, v2)
    _say(f"{v2.model_id} {v2.bundle_version}: signature verified; {full:,} bytes for an onnx device")
    return test, _Bundles(bundle, v2_dir, public, manifest, v2, full)


@dataclass
class _Outcome:
    result: Any
    registry: list[dict[str, Any]]
    update_bytes: list[int]
    delta_bytes: int
    driver: _Driver
    interrupted: bool


def _sim_config(
    b: _Bundles, *, broker: MosquittoBroker, out: Path, devices: int, fleet: str, speedup: float
) -> Any:
    from devices.simulator import SimConfig

    return SimConfig(
        bundle=b.v1,
        public_key=b.public,
        broker_url=broker.url,
        state_root=out / "state",
        devices=devices,
        fleet=fleet,
        speedup=speedup,
        infer_hz=2.0,
        workload_hz=10.0,
        battery_pct=(25.0, 75.0),
        charging=True,
        policy=PolicyConfig(min_dwell_s=1.0),
        metrics_period_s=1.0,
        heartbeat_period_s=2.0,
        decide_period_s=0.25,
        loop_period_s=0.1,
        sample_period_s=0.5,
        online_timeout_s=60.0,
    )


def _run_fleet(
    test: Any,
    b: _Bundles,
    *,
    out: Path,
    devices: int,
    fleet: str,
    timeout_s: float,
    min_run_s: float,
    speedup: float,
) -> _Outcome:
    """Broker, fleet manager, simulated fleet and the rollout; everything stopped on return."""
    from devices.simulator import Simulator
    from fleet.registry import update_dir, upload_bundle
    from fleet.server import FleetServer, ServeConfig

    v1, v2 = b.manifest.bundle_version, b.v2_manifest.bundle_version
    for stale in ("state", "fleet-data", "plots"):  # a fresh fleet each run; the bundle is what is reused
        shutil.rmtree(out / stale, ignore_errors=True)
    for db in out.glob("fleet.db*"):
        db.unlink()

    _step("starting a private Mosquitto broker")
    with MosquittoBroker() as broker:
        _say(f"{broker.url} (pid {broker.pid})")
        _step("starting the fleet manager (ingestion, rollouts, HTTP API, dashboard)")
        config = ServeConfig(
            db=str(out / "fleet.db"),
            broker=broker.url,
            data_dir=out / "fleet-data",
            http_host="127.0.0.1",
            http_port=free_port(),
            public_key=b.public,
            token=secrets.token_urlsafe(16),
            fleet=fleet,
            group=f"{fleet}-demo",
            tick_s=0.5,
        )
        with FleetServer(config) as server:
            assert server.store is not None and server.manager is not None
            _say(f"dashboard: {server.url}/?token={server.token}")
            _say(f"API: curl -H 'Authorization: Bearer {server.token}' {server.url}/api/devices")
            _say(f"registry database: {out / 'fleet.db'} (SQLite)")
            _step(f"uploading {v1} and {v2} to the registry")
            key = load_public_key(b.public)
            for source in (b.v1, b.v2):
                row = upload_bundle(server.store, data_dir=config.data_dir, source=source, public_key=key)
                _say(f"stored {row['model_id']} {row['bundle_version']}")

            sim_config = _sim_config(b, broker=broker, out=out, devices=devices, fleet=fleet, speedup=speedup)
            _step(
                f"starting {devices} simulated device(s) ({', '.join(sim_config.profiles)}, round robin) on "
                f"{v1}; {speedup:g}x time, batteries drain, each policy steps down"
            )
            driver = _Driver(
                server=server,
                broker=broker,
                fleet=fleet,
                devices=devices,
                model_id=b.manifest.model_id,
                v1=v1,
                v2=v2,
                min_run_s=min_run_s,
                timeout_s=timeout_s,
            )
            sim = Simulator(sim_config, data=test, progress=_say, progress_period_s=5.0)
            driver.sim = sim
            thread = threading.Thread(target=driver.run, name="demo-driver", daemon=True)
            thread.start()
            try:
                # Ctrl-C (or this cap) returns early, with every agent stopped
                result = sim.run(duration_s=120.0 + timeout_s + min_run_s + 60.0)
                interrupted = not driver.stopped_sim
            finally:
                driver.stop.set()
                thread.join(30)
            _say(
                f"all {len(result.devices)} simulated device(s) stopped: "
                "offline status sent, outboxes flushed"
            )
            time.sleep(0.5)  # the last statuses reach the manager
            outcome = _Outcome(
                result=result,
                registry=server.store.devices(fleet=fleet),
                update_bytes=_update_bytes(server.store, fleet, v2),
                delta_bytes=_dir_bytes(update_dir(config.data_dir, b.manifest.model_id, v1, v2)),
                driver=driver,
                interrupted=interrupted,
            )
            _step("stopping the fleet manager and the broker")
    return outcome


def run_demo(
    *,
    data_root: Path | None,
    devices: int,
    fleet: str,
    out: Path,
    model: str = "reference",
    epochs: float | None = None,
    gated: bool | None = None,
    timeout_s: float = 180.0,
    min_run_s: float = 40.0,
    speedup: float = 1000.0,
) -> None:
    """Run the demo; a missing part raises a :class:`~agent.errors.UserError` subclass.

    >>> run_demo(data_root=None, devices=8, fleet="demo", out=Path("out/demo"))  # doctest: +SKIP
    """
    from devices.plots import write_plots

    if devices < 1:
        raise UserError(f"--devices must be at least 1, got {devices}")
    started = time.monotonic()
    print(
        "edgeprune demo -- the whole product: a signed bundle of pruned variants, a fleet manager, a\n"
        "simulated fleet whose agents step down the variants as their batteries drain, and a staged\n"
        "rollout of a new bundle version, shipped as a delta, behind health gates.\n"
    )
    if gated is None:  # the reference model has gates; a user model may not (--gated asks anyway)
        gated = model == "reference"
    test, b = _prepare(data_root=data_root, out=out, model=model, epochs=epochs, gated=gated)
    o = _run_fleet(
        test,
        b,
        out=out,
        devices=devices,
        fleet=fleet,
        timeout_s=timeout_s,
        min_run_s=min_run_s,
        speedup=speedup,
    )
    if o.interrupted:
        print(
            "interrupted before the demo's end: the simulated fleet, the fleet manager and the broker "
            "were stopped cleanly",
            flush=True,
        )
        raise KeyboardInterrupt
    if o.driver.error is not None:
        if isinstance(o.driver.error, UserError):
            raise o.driver.error
        raise InternalError(f"the demo's rollout driver failed: {o.driver.error!r}") from o.driver.error

    _step("summary")
    _print_summary(
        o.result,
        o.registry,
        manifest=b.manifest,
        full_bytes=b.full_bytes,
        update_bytes=o.update_bytes,
        delta_dir_bytes=o.delta_bytes,
    )
    v2 = b.v2_manifest.bundle_version
    rollout = o.driver.rollout or {}
    state = rollout.get("state", "not started")
    print(f"    rollout of {v2}: {state}" + (f" ({rollout['reason']})" if rollout.get("reason") else ""))
    if o.result.errors:
        print(f"    simulator errors: {len(o.result.errors)}, first: {o.result.errors[0]}")
    plots = write_plots(o.result, out / "plots")
    (out / "result.json").write_text(o.result.to_json())
    report = b.v1 / "report"
    print(f"\nplots: {', '.join(str(p) for p in plots) or 'none (matplotlib is missing)'}")
    print(f"simulator result: {out / 'result.json'}")
    print(f"bundle report: {report / 'report.md'}  (Pareto plot: {report / 'pareto.png'})")
    docs = "docs/fleet.md, docs/devices.md, docs/ota.md, docs/agent.md, docs/architecture.md"
    print(f"done in {time.monotonic() - started:.1f}s. Docs: {docs}")
    if state != "completed":
        print(
            f"NOTE: the rollout of {v2} did not complete ({state}): the health gates stopped it and the "
            "devices it reached went back to the bundle they ran before; that is the product working, "
            "but not the happy path this demo means to show"
        )
