"""Broker security against a real Mosquitto: per-device passwords, the ACL, TLS, rotation and revocation."""

from __future__ import annotations

import json
import queue
import shutil
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.contract import Birth, device_topic, parse_message, subscription
from agent.errors import UserError
from agent.mqtt import (
    BrokerAddress,
    BrokerConnectError,
    connect_client,
    make_client,
    parse_broker_url,
    resolve_address,
)
from fleet.broker import MosquittoBroker, find_mosquitto
from fleet.security import (
    ACL_STYLES,
    MANAGER_USERNAME,
    SecurityError,
    hash_password,
    load_accounts,
    provision_devices,
    provision_manager,
    render_acl,
    revoke_device,
    rotate_device,
    verify_password,
    write_broker_files,
)

FLEET = "lab"


def _password(creds: Path) -> str:
    return (creds / "password").read_text().strip()


# ---- URLs and credentials on the client side (no broker) -------------------------------------------


def test_mqtts_url_defaults_to_port_8883_and_tls() -> None:
    address = parse_broker_url("mqtts://broker.lan")
    assert (address.host, address.port, address.tls) == ("broker.lan", 8883, True)


def test_plain_url_keeps_its_old_shape() -> None:
    assert parse_broker_url("mqtt://127.0.0.1:1884") == BrokerAddress(host="127.0.0.1", port=1884)


def test_url_credentials_are_decoded_and_never_shown() -> None:
    address = parse_broker_url("mqtt://pi-01:p%40ss%3Aword@127.0.0.1")
    assert (address.username, address.password) == ("pi-01", "p@ss:word")
    assert "p@ss" not in repr(address) and "p%40ss" not in address.url
    assert address.url == "mqtt://pi-01@127.0.0.1:1883"


@pytest.mark.parametrize(
    "url", ["http://host", "mqtt://", "mqtt://host:99999", "mqtt://host/path", "mqtt://:pw@host"]
)
def test_bad_urls_are_user_errors(url: str) -> None:
    with pytest.raises(UserError):
        parse_broker_url(url)


def test_bad_url_error_does_not_echo_the_password() -> None:
    with pytest.raises(UserError) as info:
        parse_broker_url("http://pi-01:hunter2@host")
    assert "hunter2" not in str(info.value)


def test_password_file_gives_user_and_password(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("s3cret\n")
    (tmp_path / "pw").chmod(0o600)
    address = resolve_address("mqtt://127.0.0.1", username="pi-01", password_file=tmp_path / "pw")
    assert (address.username, address.password) == ("pi-01", "s3cret")


def test_password_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EP_TEST_PW", "from-env")
    address = resolve_address("mqtt://dev-7@127.0.0.1", username="ignored", password_env="EP_TEST_PW")
    assert (address.username, address.password) == ("dev-7", "from-env")


def test_unset_password_variable_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EP_TEST_PW", raising=False)
    with pytest.raises(UserError, match="EP_TEST_PW"):
        resolve_address("mqtt://127.0.0.1", password_env="EP_TEST_PW")


def test_password_in_url_and_file_is_ambiguous(tmp_path: Path) -> None:
    (tmp_path / "pw").write_text("a")
    with pytest.raises(UserError, match="twice"):
        resolve_address("mqtt://u:b@127.0.0.1", password_file=tmp_path / "pw")


def test_ca_file_needs_a_tls_url(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    with pytest.raises(UserError, match="not a TLS URL"):
        resolve_address("mqtt://127.0.0.1", ca_file=tmp_path / "ca.crt")


def test_no_password_stays_anonymous() -> None:
    address = resolve_address("mqtt://127.0.0.1", username="pi-01")
    assert address.username is None
    assert make_client("pi-01", address).username is None


# ---- hashes and files on the fleet side (no broker) ------------------------------------------------


def test_our_hash_is_read_by_mosquitto_passwd_and_its_hash_by_us(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed (Debian package 'mosquitto')")
    passwd = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(passwd), "alice", "wonder land"], check=True, capture_output=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert theirs.startswith("$7$101$")
    assert verify_password("wonder land", theirs)
    assert not verify_password("wonder-land", theirs)
    # Same salt, same password, same iterations: our hash is byte-identical to theirs.
    _, _, iterations, salt, _ = theirs.split("$")
    import base64

    assert hash_password("wonder land", iterations=int(iterations), salt=base64.b64decode(salt)) == theirs


def test_provisioning_keeps_only_hashes_on_the_fleet_side(tmp_path: Path) -> None:
    creds = provision_devices(FLEET, ["pi-01", "pi-02"], tmp_path)
    password = _password(creds["pi-01"])
    for path in (tmp_path / "registry.json", tmp_path / "broker" / "passwd", tmp_path / "broker" / "acl"):
        assert password not in path.read_text()
    account = load_accounts(tmp_path)["pi-01"]
    assert verify_password(password, account.password_hash)
    assert stat.S_IMODE((creds["pi-01"] / "password").stat().st_mode) == 0o600
    assert stat.S_IMODE(creds["pi-01"].stat().st_mode) == 0o700
    assert json.loads((creds["pi-01"] / "account.json").read_text())["fleet"] == FLEET
    assert _password(creds["pi-01"]) != _password(creds["pi-02"])


def test_provisioning_a_device_twice_is_refused(tmp_path: Path) -> None:
    provision_devices(FLEET, ["pi-01"], tmp_path)
    with pytest.raises(SecurityError, match="already provisioned"):
        provision_devices("other", ["pi-01"], tmp_path)


def test_manager_name_is_reserved(tmp_path: Path) -> None:
    with pytest.raises(SecurityError, match="reserved"):
        provision_devices(FLEET, [MANAGER_USERNAME], tmp_path)


@pytest.mark.parametrize("device_id", ["pi/01", "+", "#", "", "a b"])
def test_device_ids_that_would_break_topics_are_refused(tmp_path: Path, device_id: str) -> None:
    with pytest.raises(SecurityError):
        provision_devices(FLEET, [device_id], tmp_path)


def test_acl_gives_devices_their_own_topics_only(tmp_path: Path) -> None:
    provision_devices(FLEET, ["pi-01"], tmp_path)
    provision_manager(tmp_path)
    acl = render_acl(load_accounts(tmp_path).values())
    section = acl.split("user pi-01\n")[1].split("\n\n")[0].splitlines()
    assert sorted(section) == sorted(
        [
            f"topic write edgeprune/v1/lab/pi-01/{ch}"
            for ch in ("birth", "status", "metrics", "events", "update")
        ]
        + ["topic read edgeprune/v1/lab/pi-01/desired"]
    )
    manager = acl.split(f"user {MANAGER_USERNAME}\n")[1].split("\n\n")[0].splitlines()
    assert manager == ["topic read edgeprune/v1/#", "topic write edgeprune/v1/+/+/desired"]
    assert acl.split("user ")[0].count("topic") == 0  # nothing for anonymous clients


def test_pattern_acl_is_per_fleet_and_remembered(tmp_path: Path) -> None:
    provision_devices(FLEET, ["pi-01"], tmp_path)
    provision_manager(tmp_path)
    write_broker_files(tmp_path, acl_style="pattern")
    provision_devices("other", ["zz-1"], tmp_path)  # re-renders: the style stays
    acl = (tmp_path / "broker" / "acl").read_text()
    assert "pattern write edgeprune/v1/lab/%u/birth" in acl
    assert "pattern read edgeprune/v1/other/%u/desired" in acl
    assert "user pi-01" not in acl and f"user {MANAGER_USERNAME}" in acl
    with pytest.raises(SecurityError, match="unknown ACL style"):
        write_broker_files(tmp_path, acl_style="everyone")  # type: ignore[arg-type]


def test_broker_config_turns_anonymous_off_and_names_tls_files(tmp_path: Path) -> None:
    provision_devices(FLEET, ["pi-01"], tmp_path)
    files = write_broker_files(tmp_path, tls_hosts=["broker.lan", "10.0.0.2"])
    conf = files.config_file.read_text()
    assert "allow_anonymous false" in conf and "listener 8883 0.0.0.0" in conf
    assert files.tls is not None and f"certfile {files.tls.certfile}" in conf
    assert stat.S_IMODE(files.tls.keyfile.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca" / "ca.key").stat().st_mode) == 0o600


# ---- against a real Mosquitto ----------------------------------------------------------------------


@dataclass
class Secured:
    dir: Path
    broker: MosquittoBroker
    devices: dict[str, Path]
    manager: Path

    def address(self, user: str | None, password: str | None = None) -> BrokerAddress:
        base = parse_broker_url(self.broker.url)
        if user is not None and password is None:
            password = _password(self.manager if user == MANAGER_USERNAME else self.devices[user])
        return BrokerAddress(host=base.host, port=base.port, username=user, password=password)

    def connect(self, user: str, client_id: str | None = None) -> mqtt.Client:
        return connect_client(self.address(user), client_id=client_id or f"{user}-{time.monotonic_ns()}")


def _need_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary not installed (Debian package 'mosquitto'; `make test` installs it)")


@pytest.fixture(scope="module", params=ACL_STYLES)
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """A Mosquitto of our own started with the generated password and ACL files (plain TCP), once per
    ACL style: every broker test below holds for both."""
    _need_mosquitto()
    sec = tmp_path_factory.mktemp("security")
    # A second fleet on the same broker: its pattern lines must not open fleet lab's topics to anyone.
    provision_devices("other", ["zz-1"], sec)
    devices = provision_devices(FLEET, ["pi-01", "pi-02", "pi-03"], sec)
    manager = provision_manager(sec)
    files = write_broker_files(sec, acl_style=request.param)
    assert ("pattern " in files.acl_file.read_text()) == (request.param == "pattern")
    with MosquittoBroker(password_file=files.password_file, acl_file=files.acl_file) as broker:
        yield Secured(dir=sec, broker=broker, devices=devices, manager=manager)


class Watcher:
    """A connected client recording messages, SUBACK and PUBACK reason codes."""

    def __init__(self, client: mqtt.Client) -> None:
        self.client = client
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subacks: queue.Queue[list[str]] = queue.Queue()
        self.pubacks: dict[int, str] = {}
        self._acked = threading.Condition()
        client.on_message = lambda c, u, m: self.messages.put((m.topic, m.payload))
        client.on_subscribe = lambda c, u, mid, codes, props: self.subacks.put([str(r) for r in codes])
        client.on_publish = self._on_publish

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acked:
            self.pubacks[mid] = str(reason)
            self._acked.notify_all()

    def subscribe(self, topic: str) -> list[str]:
        self.client.subscribe(topic, qos=1)
        return self.subacks.get(timeout=5)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> str:
        """Publish at QoS 1 and return the PUBACK's reason (MQTT v5 brokers say why they refuse)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.pubacks, timeout=5), "no PUBACK"
            return self.pubacks[info.mid]

    def topics_within(self, seconds: float) -> list[str]:
        got = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                got.append(self.messages.get(timeout=left)[0])
            except queue.Empty:
                break
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet_sub(secured: Secured) -> Iterator[Watcher]:
    """The fleet manager's account on a shared subscription to the whole fleet, as ingestion uses it."""
    watcher = Watcher(secured.connect(MANAGER_USERNAME))
    assert watcher.subscribe(f"$share/ingest/{subscription(fleet=FLEET)}") == ["Granted QoS 1"]
    yield watcher
    watcher.close()


@pytest.fixture
def device(secured: Secured) -> Iterator[Watcher]:
    watcher = Watcher(secured.connect("pi-01", "pi-01"))
    yield watcher
    watcher.close()


@pytest.mark.broker
def test_device_connects_with_its_password(secured: Secured) -> None:
    client = secured.connect("pi-02")
    assert client.is_connected()
    client.disconnect()
    client.loop_stop()


@pytest.mark.broker
def test_wrong_password_is_refused(secured: Secured) -> None:
    with pytest.raises(BrokerConnectError, match="Not authorized"):
        connect_client(secured.address("pi-01", "not-the-password"), client_id="pi-01-bad")


@pytest.mark.broker
def test_another_devices_password_is_refused(secured: Secured) -> None:
    with pytest.raises(BrokerConnectError, match="Not authorized"):
        connect_client(secured.address("pi-01", _password(secured.devices["pi-02"])), client_id="pi-01-x")


@pytest.mark.broker
def test_anonymous_is_refused(secured: Secured) -> None:
    with pytest.raises(BrokerConnectError, match="Not authorized"):
        connect_client(secured.address(None), client_id="anon")


@pytest.mark.broker
def test_device_publishes_to_its_own_topics(fleet_sub: Watcher, device: Watcher) -> None:
    topic = device_topic(FLEET, "pi-01", "metrics")
    assert device.publish(topic, b"own") == "Success"
    assert fleet_sub.topics_within(5) == [topic]


@pytest.mark.broker
def test_device_cannot_publish_as_another_device(fleet_sub: Watcher, device: Watcher) -> None:
    forged = device_topic(FLEET, "pi-02", "birth")
    # Mosquitto 2 answers an MQTT v5 QoS 1 publish the ACL denies with PUBACK "Not authorized" and drops it.
    assert device.publish(forged, b"forged", retain=True) == "Not authorized"
    own = device_topic(FLEET, "pi-01", "events")
    assert device.publish(own, b"after") == "Success"  # same connection, ordered after the forged one
    assert fleet_sub.topics_within(3) == [own]


@pytest.mark.broker
def test_device_cannot_publish_outside_the_tree_or_to_desired(device: Watcher) -> None:
    assert device.publish("elsewhere/topic", b"x") == "Not authorized"
    assert device.publish(device_topic(FLEET, "pi-01", "desired"), b"x") == "Not authorized"
    assert device.publish(device_topic("other-fleet", "pi-01", "metrics"), b"x") == "Not authorized"


@pytest.mark.broker
def test_own_id_in_another_fleets_tree(secured: Secured, device: Watcher) -> None:
    """The documented difference between the styles: per-user is exact; pattern lets a device publish
    under its own id in another provisioned fleet's tree (never under another device's id)."""
    reason = device.publish(device_topic("other", "pi-01", "metrics"), b"x")
    pattern = "pattern " in (secured.dir / "broker" / "acl").read_text()
    assert reason == ("No matching subscribers" if pattern else "Not authorized")
    assert device.publish(device_topic("other", "zz-1", "metrics"), b"x") == "Not authorized"


@pytest.mark.broker
def test_device_cannot_read_another_devices_desired(secured: Secured, device: Watcher) -> None:
    other = device_topic(FLEET, "pi-02", "desired")
    # What mosquitto 2.0 does with an acl_file: the SUBACK grants the subscription (it checks only
    # plugins' subscribe ACLs), and the read ACL then withholds every message on delivery. A broker
    # that refuses the SUBACK instead is at least as safe; the delivery check below is what matters.
    assert device.subscribe(other) in (["Granted QoS 1"], ["Not authorized"])
    assert device.subscribe("edgeprune/v1/#") in (["Granted QoS 1"], ["Not authorized"])
    assert device.subscribe(device_topic(FLEET, "pi-01", "desired")) == ["Granted QoS 1"]
    manager = Watcher(secured.connect(MANAGER_USERNAME))
    try:
        assert manager.publish(other, b"for pi-02") in ("Success", "No matching subscribers")
        mine = device_topic(FLEET, "pi-01", "desired")
        assert manager.publish(mine, b"for pi-01") == "Success"
    finally:
        manager.close()
    got = device.topics_within(3)
    assert other not in got
    assert mine in got


@pytest.mark.broker
def test_fleet_manager_reads_everything_and_writes_only_desired(secured: Secured, fleet_sub: Watcher) -> None:
    senders = {d: Watcher(secured.connect(d, d)) for d in ("pi-02", "pi-03")}
    manager = Watcher(secured.connect(MANAGER_USERNAME))
    try:
        for d, w in senders.items():
            assert w.publish(device_topic(FLEET, d, "status"), b"s") == "Success"
        desired = device_topic(FLEET, "pi-03", "desired")
        assert manager.publish(desired, b"d") == "Success"
        assert manager.publish(device_topic(FLEET, "pi-03", "birth"), b"forged") == "Not authorized"
        got = fleet_sub.topics_within(3)
        assert sorted(got) == sorted(
            [device_topic(FLEET, "pi-02", "status"), device_topic(FLEET, "pi-03", "status"), desired]
        )
    finally:
        manager.close()
        for w in senders.values():
            w.close()


@pytest.mark.broker
def test_rotation_and_revocation_take_effect_on_reload(tmp_path: Path) -> None:
    _need_mosquitto()
    creds = provision_devices(FLEET, ["rot-1", "rev-1"], tmp_path)
    old_rot, old_rev = _password(creds["rot-1"]), _password(creds["rev-1"])
    files = write_broker_files(tmp_path)
    with MosquittoBroker(password_file=files.password_file, acl_file=files.acl_file) as broker:
        base = parse_broker_url(broker.url)

        def addr(user: str, password: str) -> BrokerAddress:
            return BrokerAddress(host=base.host, port=base.port, username=user, password=password)

        connected = Watcher(connect_client(addr("rev-1", old_rev), client_id="rev-1"))
        try:
            new_rot = _password(rotate_device("rot-1", tmp_path))
            revoke_device("rev-1", tmp_path)
            assert not (tmp_path / "credentials" / "rev-1").exists()
            broker.reload()
            with pytest.raises(BrokerConnectError, match="Not authorized"):
                connect_client(addr("rot-1", old_rot), client_id="rot-old")
            connect_client(addr("rot-1", new_rot), client_id="rot-new").disconnect()
            with pytest.raises(BrokerConnectError, match="Not authorized"):
                connect_client(addr("rev-1", old_rev), client_id="rev-again")
            # Mosquitto 2.0 re-checks connected clients on reload: the revoked device's live session ends
            # (paho's automatic reconnect is then refused like any other attempt).
            deadline = time.monotonic() + 5
            while connected.client.is_connected() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not connected.client.is_connected()
        finally:
            connected.close()


@pytest.mark.broker
@pytest.mark.export
def test_agent_with_its_credentials_reaches_the_fleet(
    secured: Secured, fleet_sub: Watcher, compiled: Any, signing_keys: Any, tmp_path: Path
) -> None:
    from agent.core import Agent, AgentConfig
    from agent.sensors import StaticSensors

    config = AgentConfig(
        bundle=compiled.out,
        public_key=signing_keys.public,
        broker_url=secured.broker.url,  # no user in the URL: the agent logs in as its device id
        device_id="pi-03",
        state_dir=tmp_path / "state",
        fleet=FLEET,
        metrics_period_s=0.5,
        heartbeat_period_s=1.0,
        broker_password_file=secured.devices["pi-03"] / "password",
    )
    agent = Agent(config, sensors=StaticSensors())
    agent.start()
    try:
        deadline = time.monotonic() + 30
        birth = None
        while birth is None and time.monotonic() < deadline:
            try:
                topic, payload = fleet_sub.messages.get(timeout=1)
            except queue.Empty:
                continue
            if topic == device_topic(FLEET, "pi-03", "birth"):
                birth = parse_message(payload, expect_kind="birth", expect_device="pi-03")
        assert isinstance(birth, Birth)
    finally:
        agent.stop()


# ---- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MosquittoBroker, Path, Path]]:
    """A TLS-only Mosquitto with a certificate from our private CA for 127.0.0.1 and localhost."""
    _need_mosquitto()
    sec = tmp_path_factory.mktemp("security-tls")
    files = write_broker_files(sec, tls_hosts=["127.0.0.1", "localhost"])
    creds = provision_devices(FLEET, ["tls-1"], sec)  # after the CA exists: gets a copy of ca.crt
    assert files.tls is not None
    with MosquittoBroker(
        password_file=files.password_file,
        acl_file=files.acl_file,
        certfile=files.tls.certfile,
        keyfile=files.tls.keyfile,
        cafile=files.tls.cafile,
    ) as broker:
        yield broker, creds["tls-1"], files.tls.cafile


@pytest.mark.broker
def test_tls_client_with_the_ca_connects(tls_broker: tuple[MosquittoBroker, Path, Path]) -> None:
    broker, creds, _ = tls_broker
    assert broker.url.startswith("mqtts://")
    address = resolve_address(
        broker.url, username="tls-1", password_file=creds / "password", ca_file=creds / "ca.crt"
    )
    client = connect_client(address, client_id="tls-1")
    client.disconnect()
    client.loop_stop()


@pytest.mark.broker
def test_tls_client_without_the_ca_fails_verification(tls_broker: tuple[MosquittoBroker, Path, Path]) -> None:
    broker, creds, _ = tls_broker
    address = resolve_address(broker.url, username="tls-1", password_file=creds / "password")
    with pytest.raises(BrokerConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        connect_client(address, client_id="tls-no-ca")


@pytest.mark.broker
def test_tls_host_name_is_checked(tls_broker: tuple[MosquittoBroker, Path, Path], tmp_path: Path) -> None:
    _, _, ca = tls_broker
    # Same CA, a certificate for another name: the client must refuse it even though the chain is valid.
    other = tmp_path / "other"
    shutil.copytree(ca.parent.parent, other)
    files = write_broker_files(other, tls_hosts=["broker.example"])
    assert files.tls is not None
    with MosquittoBroker(certfile=files.tls.certfile, keyfile=files.tls.keyfile) as wrong_name:
        address = resolve_address(wrong_name.url, ca_file=ca)
        with pytest.raises(BrokerConnectError, match=r"(?i)hostname|IP address mismatch"):
            connect_client(address, client_id="tls-name")


@pytest.mark.broker
def test_plain_client_cannot_talk_to_the_tls_listener(tls_broker: tuple[MosquittoBroker, Path, Path]) -> None:
    broker, creds, _ = tls_broker
    address = BrokerAddress(host=broker.host, port=broker.port, username="tls-1", password=_password(creds))
    with pytest.raises(BrokerConnectError):
        connect_client(address, client_id="tls-plain", timeout_s=3)


@pytest.fixture
def signed_bundle(compiled: Any, signing_keys: Any) -> tuple[Path, Path]:
    """(the session's compiled bundle, the public key that signed it)."""
    return compiled.out, signing_keys.public


def test_agent_cli_takes_a_password_file(
    secured: Secured, fleet_sub: Watcher, signed_bundle: tuple[Path, Path], npz_data: Path, tmp_path: Path
) -> None:
    bundle, public_key = signed_bundle
    exe = Path(sys.executable).parent / "edgeprune"
    cmd = [
        str(exe), "agent", "run",
        "--bundle", str(bundle),
        "--broker", secured.broker.url,
        "--password-file", str(secured.devices["pi-02"] / "password"),
        "--device-id", "pi-02",
        "--fleet", FLEET,
        "--state-dir", str(tmp_path),
        "--public-key", str(public_key),
        "--input", str(npz_data),
        "--metrics-period", "0.2",
        "--exit-when-done",
    ]  # fmt: skip
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "stopped cleanly" in proc.stdout
    topics = set(fleet_sub.topics_within(3))
    assert {device_topic(FLEET, "pi-02", ch) for ch in ("birth", "metrics", "status")} <= topics
    assert "Not authorized" not in proc.stderr


def test_fleet_provision_cli_writes_credentials_and_broker_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    sec = tmp_path / "sec"
    cmd = [sys.executable, "-m", "edgeprune.cli", "fleet", "provision", "--security-dir", str(sec)]
    out = subprocess.run(
        [*cmd, "--fleet", "lab", "--devices", "pi-01,pi-02", "--manager"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    passwd = (sec / "broker" / "passwd").read_text()
    assert {line.split(":")[0] for line in passwd.splitlines()} == {"pi-01", "pi-02", "fleet-manager"}
    assert "$7$" in passwd and (sec / "credentials" / "pi-01" / "password").is_file()
    revoked = subprocess.run([*cmd, "--revoke", "pi-02"], check=False, capture_output=True, text=True)
    assert revoked.returncode == 0, revoked.stderr
    assert "pi-02" not in (sec / "broker" / "passwd").read_text()
