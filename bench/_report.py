"""The common end of the pass/fail benches: record how they ran, write the JSON, print the verdict."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any


def finish(
    result: dict[str, Any], args: argparse.Namespace, argv: list[str] | None, problems: list[str], *, ok: str
) -> int:
    """Write ``result`` (plus the command, arguments and machine) to ``args.json_out``, print each
    problem and the verdict; 0 when there is no problem, else 1."""
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    result["command"] = " ".join(["python", *sys.argv]) if argv is None else " ".join(argv)
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "db"}
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    args.json_out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json_out}")
    for problem in problems:
        print(f"FAIL {problem}")
    print(ok if not problems else "FAILED")
    return 0 if not problems else 1
