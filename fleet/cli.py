"""``edgeprune fleet serve|devices|bundles|rollouts``: run the fleet manager, or talk to a running one.

>>> # edgeprune fleet serve --db sqlite:///fleet.db --broker mqtt://127.0.0.1:1883 --data-dir fleet-data
>>> # edgeprune fleet devices
>>> # edgeprune fleet bundles upload bundle.tar
>>> # edgeprune fleet rollouts create --model fmnist-resnet --version 1.1.0 --stages 1,10,50,100
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from agent.errors import UserError

__all__ = ["FleetClientError", "add_fleet_parser"]

TOKEN_ENV = "EDGEPRUNE_FLEET_TOKEN"
URL_ENV = "EDGEPRUNE_FLEET_URL"


class FleetClientError(UserError):
    """The fleet manager's API answered with an error or could not be reached."""


def _cmd_serve(args: argparse.Namespace) -> int:
    from agent.cli import DEFAULT_PUBLIC_KEY
    from fleet.server import FleetServer, ServeConfig, parse_http

    host, port = parse_http(args.http)
    if not 0 <= args.session_expiry < 2**32:
        raise UserError(
            f"--session-expiry {args.session_expiry} is out of range",
            hint="seconds from 0 (clean session) to 4294967295",
        )
    public_key = args.public_key
    if public_key is None and DEFAULT_PUBLIC_KEY.is_file():
        public_key = DEFAULT_PUBLIC_KEY
    broker = _broker_address(args)
    data_dir: Path = args.data_dir
    config = ServeConfig(
        db=args.db or str(data_dir / "fleet.db"),
        broker=broker,
        data_dir=data_dir,
        http_host=host,
        http_port=port,
        public_url=args.public_url,
        public_key=public_key,
        token=os.environ.get(TOKEN_ENV) or None,
        fleet=args.fleet,
        group=args.group,
        tick_s=args.tick_s,
        client_id=args.client_id or f"edgeprune-fleet-{socket.gethostname()}-{port}",
        session_expiry_s=args.session_expiry,
    )
    server = FleetServer(config)
    if server.generated_token:
        print(f"==> API token (set {TOKEN_ENV} to choose one): {server.token}", flush=True)
    print(
        f"==> fleet manager on {server.url} (db {config.db}, broker {broker.url}); Ctrl-C stops", flush=True
    )
    server.serve_forever()
    return 0


def _request(
    args: argparse.Namespace, method: str, path: str, *, body: Any = None, raw: bytes | None = None
) -> Any:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise FleetClientError(
            f"{TOKEN_ENV} is not set", hint="export the token `edgeprune fleet serve` printed"
        )
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(args.url.rstrip("/") + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    req.add_header("Content-Type", "application/x-tar" if raw is not None else "application/json")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        with err:
            text = err.read().decode(errors="replace")
        try:
            detail = json.loads(text)
        except ValueError:
            detail = {"message": text}
        message = detail.get("message") or detail.get("detail") or text
        raise FleetClientError(
            f"{method} {path}: HTTP {err.code}: {message}", hint=detail.get("hint")
        ) from err
    except OSError as exc:
        raise FleetClientError(
            f"cannot reach the fleet manager at {args.url}: {exc}", hint=f"start it, or set {URL_ENV} / --url"
        ) from exc


def _print(data: Any, args: argparse.Namespace) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _cmd_devices(args: argparse.Namespace) -> int:
    devices = _request(args, "GET", "/api/devices")
    if args.json:
        _print(devices, args)
        return 0
    print(
        f"{'device':20} {'fleet':10} {'state':8} {'profile':10} {'bundle':24} {'variant':12} {'battery':>7}"
    )
    for d in devices:
        bundle = f"{d['model_id']} {d['bundle_version']}" if d["bundle_version"] else "-"
        battery = f"{d['battery_pct']:.0f}%" if d["battery_pct"] is not None else "-"
        state = "online" if d["online"] else "offline"
        print(
            f"{d['device_id']:20} {d['fleet']:10} {state:8} {d['profile'] or '-':10} {bundle:24} "
            f"{d['active_variant'] or '-':12} {battery:>7}"
        )
    return 0


def _cmd_configure(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FleetClientError(f"--set {item!r} is not KEY=VALUE", hint="e.g. --set low_battery_pct=30")
        overrides[key] = (
            json.loads(value) if value in ("true", "false", "null") or _is_number(value) else value
        )
    body = {
        "pinned_variant": args.pin,
        "policy_overrides": overrides,
        "metrics_period_s": args.metrics_period,
        "heartbeat_period_s": args.heartbeat_period,
    }
    path = f"/api/devices/{urllib.parse.quote(args.device)}/config?fleet={urllib.parse.quote(args.fleet)}"
    device = _request(args, "PUT", path, body=body)
    print(
        f"{args.device}: desired revision {device['desired_revision']}, "
        f"config {json.dumps(body, sort_keys=True)}"
    )
    return 0


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


def _cmd_bundles(args: argparse.Namespace) -> int:
    if args.action == "upload":
        from agent.bundle import pack_bundle

        path: Path = args.path
        if path.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                raw = pack_bundle(path, Path(tmp) / "bundle.tar").read_bytes()
        else:
            raw = path.read_bytes()
        row = _request(args, "POST", "/api/bundles", raw=raw)
        print(
            f"uploaded {row['model_id']} {row['bundle_version']} "
            f"(manifest sha256 {row['manifest_sha256'][:12]})"
        )
        return 0
    for b in _request(args, "GET", "/api/bundles"):
        print(f"{b['model_id']:24} {b['bundle_version']:16} {b['manifest_sha256'][:12]}")
    return 0


def _spec(args: argparse.Namespace) -> dict[str, Any]:
    cohort: dict[str, Any] = {"percentage": args.percentage}
    if args.tag:
        cohort["tags"] = dict(t.split("=", 1) for t in args.tag)
    if args.profile:
        cohort["profile"] = args.profile
    if args.devices:
        cohort["devices"] = args.devices.split(",")
    spec: dict[str, Any] = {
        "fleet": args.fleet,
        "model_id": args.model,
        "bundle_version": args.version,
        "cohort": cohort,
        "stages": [float(s) for s in args.stages.split(",")],
        "soak_s": args.soak_s,
    }
    gates = {
        k: v
        for k, v in (("max_failure_rate", args.max_failure_rate), ("max_p90_ratio", args.max_p90_ratio))
        if v is not None
    }
    if gates:
        spec["gates"] = gates
    return spec


def _show_rollout(r: dict[str, Any]) -> None:
    head = f"{r['id']}  {r['model_id']} {r['bundle_version']}  fleet {r['fleet']}  {r['state']}"
    print(f"{head}  stage {r['stage'] + 1}/{len(r['stages'])}")
    if r.get("reason"):
        print(f"  reason: {r['reason']}")
    for p in r["progress"]:
        states = ", ".join(f"{v} {k}" for k, v in sorted(p["states"].items()))
        print(f"  stage {p['stage'] + 1} ({p['percent']:g}%): {p['devices']} devices: {states}")


def _cmd_rollouts(args: argparse.Namespace) -> int:
    if args.action == "list":
        for r in _request(args, "GET", "/api/rollouts"):
            _show_rollout(r)
    elif args.action == "show":
        _show_rollout(_request(args, "GET", f"/api/rollouts/{args.id}"))
    elif args.action == "create":
        _show_rollout(_request(args, "POST", "/api/rollouts", body=_spec(args)))
    else:
        body = {"reason": args.reason}
        _show_rollout(_request(args, "POST", f"/api/rollouts/{args.id}/{args.action}", body=body))
    return 0


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, "http://127.0.0.1:8080"),
        help=f"the fleet manager (default ${URL_ENV} or http://127.0.0.1:8080); token from ${TOKEN_ENV}",
    )


def _broker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="mqtt[s]://[USER@]HOST[:PORT]")
    p.add_argument("--broker-user", default=None, help="broker user name (when not in the URL)")
    p.add_argument("--broker-password-file", type=Path, default=None)
    p.add_argument("--broker-password-env", default=None, help="environment variable holding the password")
    p.add_argument("--ca-file", type=Path, default=None, help="CA certificate of an mqtts:// broker")


def _broker_address(args: argparse.Namespace) -> Any:
    """The broker of :func:`_broker_options`, credentials and CA file resolved."""
    from agent.mqtt import resolve_address

    return resolve_address(
        args.broker,
        username=args.broker_user,
        password_file=args.broker_password_file,
        password_env=args.broker_password_env,
        ca_file=args.ca_file,
    )


def _cmd_leave(args: argparse.Namespace) -> int:
    from fleet.ingest import discard_session

    broker = _broker_address(args)
    discard_session(broker, args.client_id)
    print(f"discarded the broker session of {args.client_id} on {broker.url}")
    return 0


def _leave_parser(fleet_sub: Any) -> None:
    leave = fleet_sub.add_parser(
        "leave",
        help="end the broker session of a manager retired for good (fleet serve keeps one while it is down)",
    )
    leave.add_argument("--client-id", required=True, help="the retired manager's --client-id")
    _broker_options(leave)
    leave.set_defaults(func=_cmd_leave)


def _serve_parser(fleet_sub: Any) -> None:
    serve = fleet_sub.add_parser("serve", help="ingestion + rollouts + HTTP API and dashboard in one process")
    serve.add_argument(
        "--db",
        default=None,
        help="sqlite:///PATH, a file path, or postgresql+psycopg://USER@HOST/DB (default DATA_DIR/fleet.db)",
    )
    _broker_options(serve)
    serve.add_argument(
        "--data-dir", type=Path, default=Path("fleet-data"), help="bundles and updates (default ./fleet-data)"
    )
    serve.add_argument("--http", default="127.0.0.1:8080", help="HOST:PORT to serve the API and dashboard on")
    serve.add_argument(
        "--public-url", default=None, help="URL devices reach this manager at (default from --http)"
    )
    serve.add_argument(
        "--public-key", type=Path, default=None, help="Ed25519 key uploaded bundles must be signed with"
    )
    serve.add_argument("--fleet", default=None, help="ingest only this fleet id (default: every fleet)")
    serve.add_argument("--group", default="edgeprune-fleet", help="MQTT v5 shared-subscription group")
    serve.add_argument("--tick-s", type=float, default=2.0, help="seconds between rollout steps")
    serve.add_argument(
        "--client-id",
        default=None,
        help="MQTT client id, the same across restarts (default edgeprune-fleet-HOSTNAME-HTTPPORT)",
    )
    serve.add_argument(
        "--session-expiry",
        type=int,
        default=300,
        metavar="S",
        help="seconds the broker keeps this manager's session while it is down, so what it received but "
        "had not stored is redelivered after a crash (default 300; 0 = clean session)",
    )
    serve.set_defaults(func=_cmd_serve)


def _cmd_provision(args: argparse.Namespace) -> int:
    from fleet.security import (
        provision_devices,
        provision_manager,
        revoke_device,
        rotate_device,
        write_broker_files,
    )

    sec: Path = args.security_dir
    if args.revoke:
        for device in args.revoke:
            revoke_device(device, sec)
            print(f"revoked {device}")
    if args.rotate:
        for device in args.rotate:
            print(f"new credentials for {device}: {rotate_device(device, sec)}")
    if args.devices:
        creds = provision_devices(args.fleet, [d for d in args.devices.split(",") if d], sec)
        for device, path in creds.items():
            print(f"{device}: {path}")
    if args.manager:
        print(f"fleet manager credentials: {provision_manager(sec)}")
    files = write_broker_files(sec, tls_hosts=args.tls_host or None)
    print(f"broker config: {files.config_file} (password file {files.password_file}, acl {files.acl_file})")
    print("reload a running mosquitto (SIGHUP) to apply; install each credentials file on its device")
    return 0


def _provision_parser(fleet_sub: Any) -> None:
    prov = fleet_sub.add_parser(
        "provision",
        help="per-device broker credentials, Mosquitto password file and ACL (docs/security.md)",
        description="Issue, rotate or revoke broker credentials and regenerate the Mosquitto files.",
    )
    prov.add_argument("--security-dir", type=Path, required=True, help="keep it private (0700)")
    prov.add_argument("--fleet", default="default")
    prov.add_argument("--devices", default="", help="comma-separated device ids to issue credentials for")
    prov.add_argument("--manager", action="store_true", help="also issue the fleet manager's account")
    prov.add_argument("--rotate", nargs="*", default=[], metavar="DEVICE", help="new passwords for these")
    prov.add_argument("--revoke", nargs="*", default=[], metavar="DEVICE", help="remove these devices")
    prov.add_argument("--tls-host", action="append", default=[], help="TLS listener for this host name/IP")
    prov.set_defaults(func=_cmd_provision)


def add_fleet_parser(sub: Any) -> None:
    """Register `edgeprune fleet` on the top-level subparsers."""
    p = sub.add_parser("fleet", help="run the fleet manager, or list devices and drive rollouts through it")
    fleet_sub = p.add_subparsers(dest="fleet_command", required=True, metavar="COMMAND")

    _serve_parser(fleet_sub)
    _leave_parser(fleet_sub)
    _provision_parser(fleet_sub)

    devices = fleet_sub.add_parser("devices", help="list the registered devices")
    _client_options(devices)
    devices.add_argument("--json", action="store_true")
    devices.set_defaults(func=_cmd_devices)

    configure = fleet_sub.add_parser(
        "configure",
        help="set a device's pinned variant, policy overrides and telemetry periods (replaces the last)",
        description="Replace one device's desired configuration (rollouts keep it); no options clear it.",
    )
    _client_options(configure)
    configure.add_argument("device")
    configure.add_argument("--fleet", default="default")
    configure.add_argument("--pin", default=None, metavar="VARIANT", help="serve only this variant")
    configure.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a policy setting, e.g. low_battery_pct=30",
    )
    configure.add_argument("--metrics-period", type=float, default=None, metavar="S")
    configure.add_argument("--heartbeat-period", type=float, default=None, metavar="S")
    configure.set_defaults(func=_cmd_configure)

    bundles = fleet_sub.add_parser("bundles", help="list or upload bundles")
    _client_options(bundles)
    bundles_sub = bundles.add_subparsers(dest="action", required=True)
    bundles_sub.add_parser("list")
    upload = bundles_sub.add_parser("upload", help="a bundle directory or .tar")
    upload.add_argument("path", type=Path)
    bundles.set_defaults(func=_cmd_bundles)

    rollouts = fleet_sub.add_parser("rollouts", help="create, show, pause, resume, abort rollouts")
    _client_options(rollouts)
    r_sub = rollouts.add_subparsers(dest="action", required=True)
    r_sub.add_parser("list")
    for action in ("show", "pause", "resume", "abort"):
        a = r_sub.add_parser(action)
        a.add_argument("id")
        a.add_argument("--reason", default="")
    create = r_sub.add_parser("create")
    create.add_argument("--model", required=True)
    create.add_argument("--version", required=True)
    create.add_argument("--fleet", default="default")
    create.add_argument(
        "--stages", default="1,10,50,100", help="cumulative percentages (default 1,10,50,100)"
    )
    create.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE")
    create.add_argument("--profile", default=None)
    create.add_argument("--percentage", type=float, default=100.0)
    create.add_argument("--devices", default=None, help="comma-separated device ids")
    create.add_argument("--soak-s", type=float, default=300.0)
    create.add_argument("--max-failure-rate", type=float, default=None)
    create.add_argument("--max-p90-ratio", type=float, default=None)
    rollouts.set_defaults(func=_cmd_rollouts)
