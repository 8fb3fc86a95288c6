"""The console script: help with examples, exit codes 0 / 1 (domain error) / 2 (usage)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.samples import sample_manifest, sample_messages

EXE = shutil.which("edgeprune", path=str(Path(sys.executable).parent)) or "edgeprune"


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def test_console_script_is_installed() -> None:
    assert Path(EXE).is_file(), "pip install -e . must create the edgeprune script next to python"


def test_help_lists_subcommands_and_examples() -> None:
    out = run("--help")
    assert out.returncode == 0
    for word in ("compile", "agent", "fleet", "devices", "demo", "examples:"):
        assert word in out.stdout


def test_version() -> None:
    out = run("--version")
    assert out.returncode == 0 and out.stdout.startswith("edgeprune ")


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["data", "info", "--split", "validation"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    out = run(*args)
    assert out.returncode == 2
    assert "usage:" in out.stderr


def test_missing_data_is_a_domain_error(tmp_path: Path) -> None:
    out = run("data", "info", "--root", str(tmp_path / "none"))
    assert out.returncode == 1
    assert out.stderr.startswith("DataError: Fashion-MNIST test split not found")
    assert "hint: install the Debian package" in out.stderr
    assert "Traceback" not in out.stderr


def test_fleet_serve_refuses_a_negative_session_expiry(tmp_path: Path) -> None:
    out = run("fleet", "serve", "--data-dir", str(tmp_path / "fleet"), "--session-expiry", "-1")
    assert out.returncode == 1
    assert out.stderr.startswith("UserError: --session-expiry -1 is out of range")
    assert "hint: seconds from 0 (clean session)" in out.stderr
    assert not (tmp_path / "fleet").exists()  # refused before anything was created


def test_data_info_on_fixture(fixture_data_dir: Path) -> None:
    out = run("data", "info", "--root", str(fixture_data_dir))
    assert out.returncode == 0, out.stderr
    assert "100 images of 28x28" in out.stdout


def test_validate_manifest_ok_and_bad(tmp_path: Path) -> None:
    good = tmp_path / "manifest.json"
    good.write_text(sample_manifest().to_json())
    out = run("contract", "validate", str(good))
    assert out.returncode == 0 and "3 variant(s)" in out.stdout

    bad = tmp_path / "bad" / "manifest.json"
    bad.parent.mkdir()
    bad.write_text(sample_manifest().to_json().replace('"kind":"gated"', '"kind":"sparse"'))
    out = run("contract", "validate", str(bad))
    assert out.returncode == 1
    assert out.stderr.startswith("ContractError: invalid BundleManifest: variants.1.kind")
    assert "hint:" in out.stderr


def test_validate_message(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(sample_messages()[2].to_json())
    out = run("contract", "validate", str(path))
    assert out.returncode == 0 and "metrics message from pi-01" in out.stdout


def test_validate_missing_file(tmp_path: Path) -> None:
    out = run("contract", "validate", str(tmp_path / "nope.json"))
    assert out.returncode == 1 and out.stderr.startswith("UserError: cannot read")


@pytest.mark.parametrize("what", ["manifest", "message"])
def test_schema_is_json_schema(what: str) -> None:
    out = run("contract", "schema", what)
    assert out.returncode == 0
    schema = json.loads(out.stdout)
    assert "$defs" in schema


@pytest.mark.parametrize("command", ["compile", "agent", "fleet", "devices", "bundle", "keys", "demo"])
def test_every_part_has_a_command_with_help(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: edgeprune " + command)


@pytest.mark.broker
@pytest.mark.export
@pytest.mark.slow
def test_demo_runs_end_to_end_on_fixture_data(fixture_data_dir: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    args = [
        "demo",
        "--data",
        str(fixture_data_dir),
        "--devices",
        "2",
        "--out",
        str(tmp_path / "demo"),
        "--model",
        "tests.tiny_models:residual",
        "--epochs",
        "0.5",
        "--min-run",
        "5",
    ]
    out = run(*args, env={"PYTHONPATH": str(root)}, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "100 test images" in out.stdout
    assert "signature verified" in out.stdout
    version = out.stdout.split("==> making ")[1].split(":")[0]  # the second bundle version, e.g. 1.0.0-ft1
    assert "dashboard: http://127.0.0.1:" in out.stdout and "/?token=" in out.stdout
    # the fleet manager registered both devices before the rollout, and the malformed payload was rejected
    assert "fleet manager: 2/2 devices registered" in out.stdout
    assert "rejected: {'reject.invalid': 1}" in out.stdout
    assert f"rollout completed: every device committed {version}" in out.stdout
    summary = out.stdout.split("==> summary")[1]
    rows = [line.split() for line in summary.splitlines() if line.startswith("    ") and "-000" in line]
    assert len(rows) == 2, summary  # a summary row per device (profiles pixel and rpi4)
    assert all(row[5] == version for row in rows), rows  # every device ends on v2, per the registry
    assert f"fleet manager registered 2 device(s); bundle versions now: {version}\n" in summary
    assert "update shipped: " in summary and "(delta)" in summary
    shipped = re.search(r"update shipped: ([\d,]+) bytes per device \(delta\) vs ([\d,]+) bytes", summary)
    assert shipped, summary
    delta_bytes, full_bytes = (int(g.replace(",", "")) for g in shipped.groups())
    assert 0 < delta_bytes < full_bytes
    # at least one device stepped down because of its battery, with the policy's reason
    assert re.search(r"battery [\d.]+% < \d+% and not charging", summary), summary
    assert f"rollout of {version}: completed" in summary
    assert (tmp_path / "demo" / "bundle" / "manifest.json").is_file()
    assert (tmp_path / "demo" / "plots" / "battery_variant.png").is_file()
    assert (tmp_path / "demo" / "fleet.db").is_file()
    again = run(*args, env={"PYTHONPATH": str(root)}, timeout=600)  # the second run reuses the bundle
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "reusing" in again.stdout
    assert f"rollout of {version}: completed" in again.stdout
