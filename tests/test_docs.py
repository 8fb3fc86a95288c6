"""Docs that are generated from code stay in step with it."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.contract.docgen import render, update_file

ROOT = Path(__file__).resolve().parents[1]


def test_protocol_tables_are_up_to_date() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    assert render() in text, "run: python -m agent.contract.docgen docs/protocol.md"


def test_update_file_rewrites_a_stale_block(tmp_path: Path) -> None:
    copy = tmp_path / "protocol.md"
    shutil.copy(ROOT / "docs" / "protocol.md", copy)
    copy.write_text(copy.read_text().replace("| `seq` | `int` |", "| `seq` | `string` |"))
    assert update_file(copy) is True
    assert render() in copy.read_text()
    assert update_file(copy) is False
