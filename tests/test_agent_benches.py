"""The agent's benches run as the scripts a user runs, with small numbers, and report what they claim to
(no timing is asserted: the numbers are the bench's job, docs/agent.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agent.signing import KeyPair

if TYPE_CHECKING:
    from compiler.pipeline import CompileResult

ROOT = Path(__file__).resolve().parents[1]


def _bench(script: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_policy_decision_bench_times_every_config(tmp_path: Path) -> None:
    out = _bench("policy_decision.py", "--n", "2000", "--json", str(tmp_path / "p.json"))
    rows = json.loads((tmp_path / "p.json").read_text())["rows"]
    assert [r["config"] for r in rows] == ["defaults", "latency goal 1.5 ms", "pinned gated"]
    assert all(r["decisions"] == 2000 and 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"] for r in rows)
    assert "goal: p99 <= 50 us" in out


@pytest.mark.export
def test_footprint_bench_serves_and_compares_the_trim(
    compiled: CompileResult, signing_keys: KeyPair, tmp_path: Path
) -> None:
    # The agent serves frames from the bench through stdin, with and without the working-set trim.
    _bench(
        "agent_footprint.py",
        "--bundle",
        str(compiled.out),
        "--public-key",
        str(signing_keys.public),
        "--backends",
        "onnx",
        "--serve",
        "6",
        "--serve-rate",
        "20",
        "--idle",
        "1",
        "--json",
        str(tmp_path / "f.json"),
    )
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    assert [(r["backend"], r["trim"]) for r in rows] == [("onnx", True), ("onnx", False)]
    for r in rows:
        assert r["inferences"] >= 60 and not r["torch_loaded"]
        assert 0 < r["anonymous_mb"] < r["rss_mb"] and r["rss_serving_mb"] <= r["rss_serving_peak_mb"]
