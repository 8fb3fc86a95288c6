"""Benchmark: what broker security costs. Provisioning N devices (hash + files), starting and reloading a
real Mosquitto with N accounts, and the time of one connect (CONNECT..CONNACK, then DISCONNECT):
anonymous, with a password (PBKDF2 at the broker), with a password over TLS (EC P-256 handshake).

    python bench/broker_security.py --devices 10000 --connects 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from agent.mqtt import BrokerAddress, connect_client
from fleet.broker import MosquittoBroker
from fleet.security import provision_devices, provision_manager, write_broker_files


def connect_ms(address: BrokerAddress, runs: int) -> list[float]:
    out = []
    for i in range(runs):
        start = time.perf_counter()
        client = connect_client(address, client_id=f"bench-{i}")
        out.append((time.perf_counter() - start) * 1e3)
        client.disconnect()
        client.loop_stop()
    return out


def start_reload_connect(
    passwd: Path, acl: Path, password: str, connects: int
) -> tuple[float, float, list[float]]:
    """Seconds to start a broker with these files, seconds from SIGHUP to the next CONNACK, connect times."""
    start = time.perf_counter()
    with MosquittoBroker(password_file=passwd, acl_file=acl) as broker:
        started = time.perf_counter() - start
        address = BrokerAddress(broker.host, broker.port, username="dev-00000", password=password)
        start = time.perf_counter()
        broker.reload()  # returns once mosquitto logs "Reloading config.", before it re-reads the files
        connect_ms(address, 1)  # answered only after the re-read: mosquitto is single-threaded
        reloaded = time.perf_counter() - start
        return started, reloaded, connect_ms(address, connects)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--connects", type=int, default=200)
    parser.add_argument("--json", type=Path, default=Path("out/bench-broker-security.json"))
    args = parser.parse_args(argv)
    result: dict[str, object] = {"devices": args.devices, "connects": args.connects}
    with tempfile.TemporaryDirectory() as tmp:
        sec = Path(tmp)
        start = time.perf_counter()
        creds = provision_devices("bench", [f"dev-{i:05d}" for i in range(args.devices)], sec)
        result["provision_s"] = time.perf_counter() - start
        provision_manager(sec)
        start = time.perf_counter()
        files = write_broker_files(sec, tls_hosts=["127.0.0.1"])
        result["write_broker_files_s"] = time.perf_counter() - start
        result["passwd_bytes"] = files.password_file.stat().st_size
        result["acl_bytes"] = files.acl_file.stat().st_size
        assert files.tls is not None
        password = (creds["dev-00000"] / "password").read_text().strip()

        with MosquittoBroker() as anon:
            result["connect_ms_anonymous"] = connect_ms(BrokerAddress(anon.host, anon.port), args.connects)
        result["start_with_accounts_s"], result["reload_s"], result["connect_ms_password"] = (
            start_reload_connect(files.password_file, files.acl_file, password, args.connects)
        )
        pattern = write_broker_files(sec, acl_style="pattern")  # same accounts, constant-size ACL
        result["acl_bytes_pattern"] = pattern.acl_file.stat().st_size
        result["start_with_accounts_pattern_s"], result["reload_pattern_s"], _ = start_reload_connect(
            pattern.password_file, pattern.acl_file, password, 1
        )
        with MosquittoBroker(
            password_file=files.password_file,
            acl_file=files.acl_file,
            certfile=files.tls.certfile,
            keyfile=files.tls.keyfile,
        ) as tls:
            address = BrokerAddress(
                tls.host,
                tls.port,
                tls=True,
                username="dev-00000",
                password=password,
                ca_file=files.tls.cafile,
            )
            result["connect_ms_password_tls"] = connect_ms(address, args.connects)

    print(f"{args.devices} devices: provision {result['provision_s']:.2f} s, broker files "
          f"{result['write_broker_files_s']:.2f} s, passwd {result['passwd_bytes'] / 1e6:.2f} MB, "
          f"acl {result['acl_bytes'] / 1e6:.2f} MB")  # fmt: skip
    for style, suffix in (("per-user", ""), ("pattern", "_pattern")):
        start_s, reload_s = result[f"start_with_accounts{suffix}_s"], result[f"reload{suffix}_s"]
        print(
            f"{style} ACL ({result[f'acl_bytes{suffix}']} bytes): mosquitto start {start_s:.2f} s, "
            f"reload until the next CONNACK {reload_s:.2f} s"
        )
    print(f"{'connect (ms)':<24}{'median':>8}{'p90':>8}")
    for key in ("connect_ms_anonymous", "connect_ms_password", "connect_ms_password_tls"):
        values = result[key]
        assert isinstance(values, list)
        p90 = statistics.quantiles(values, n=10)[-1]
        print(f"{key.removeprefix('connect_ms_'):<24}{statistics.median(values):>8.2f}{p90:>8.2f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
