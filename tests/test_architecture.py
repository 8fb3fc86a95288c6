"""Import directions between the parts (docs/architecture.md), checked on the source with ast."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("agent", "compiler", "fleet", "devices", "edgeprune")
# part -> the other parts it may import
ALLOWED = {
    "agent": set(),
    "compiler": {"agent"},
    "fleet": {"agent"},
    "devices": {"agent"},
    "edgeprune": {"agent", "compiler", "fleet", "devices"},
}
HEAVY = {"torch", "torchvision", "executorch", "onnx", "onnxscript", "torch_pruning"}
TORCH_FREE = ("agent", "fleet", "devices")


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def sources(part: str) -> list[Path]:
    return sorted((ROOT / part).rglob("*.py"))


@pytest.mark.parametrize("part", PARTS)
def test_import_directions(part: str) -> None:
    assert sources(part), f"{part}/ has no modules"
    forbidden = set(PARTS) - ALLOWED[part] - {part}
    for path in sources(part):
        bad = imported_roots(path) & forbidden
        assert not bad, (
            f"{path.relative_to(ROOT)} imports {sorted(bad)}; {part} may import only {ALLOWED[part]}"
        )


@pytest.mark.parametrize("part", TORCH_FREE)
def test_device_and_server_parts_import_no_ml_framework(part: str) -> None:
    for path in sources(part):
        bad = imported_roots(path) & HEAVY
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import torch.nn as nn\nfrom fleet.broker import x\nfrom . import y\n")
    assert imported_roots(sample) == {"torch", "fleet"}
