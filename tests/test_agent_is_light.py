"""The agent never imports torch: checked in a fresh interpreter, module by module."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import importlib, json, pkgutil, sys
import agent
names = sorted(m.name for m in pkgutil.walk_packages(agent.__path__, "agent."))
for name in names:
    importlib.import_module(name)
heavy = sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "executorch", "torchvision", "onnx"))
print(json.dumps({"modules": names, "heavy": heavy}))
"""


def test_importing_every_agent_module_never_imports_torch() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "agent.contract.manifest" in result["modules"]  # the walk really found the package
    assert len(result["modules"]) >= 6
    assert result["heavy"] == [], f"the agent pulled in {result['heavy']}"


def test_probe_detects_torch() -> None:
    # The probe above must be able to fail: importing torch in the same way is seen.
    code = PROBE.replace("import agent\n", "import agent, torch\n")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "torch" in json.loads(out.stdout.strip().splitlines()[-1])["heavy"]
