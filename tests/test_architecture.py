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
# The one exception: the opt-in ExecuTorch backend of the agent imports torch and executorch inside its
# constructor (executorch's Python runtime takes only torch tensors). Module level stays free of them.
LAZY_HEAVY_ALLOWED = {Path("agent/runtime.py"): {"torch", "executorch"}}


def imported_roots(path: Path, *, module_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = (
        [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        if module_level_only
        else ast.walk(tree)
    )
    roots = set()
    for node in nodes:
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
        allowed = LAZY_HEAVY_ALLOWED.get(path.relative_to(ROOT), set())
        bad = (imported_roots(path) & HEAVY) - allowed
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
        top = imported_roots(path, module_level_only=True) & HEAVY
        assert not top, f"{path.relative_to(ROOT)} imports {sorted(top)} at module level"


def test_checker_sees_imports(tmp_path: Path) -> None:
    sample = tmp_path / "m.py"
    sample.write_text("import torch.nn as nn\nfrom fleet.broker import x\nfrom . import y\n")
    assert imported_roots(sample) == {"torch", "fleet"}
