"""What the pass/fail fleet benches share: a fresh database per run, and the end (record how they ran,
write the JSON, print the verdict)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fleet_ingest import PgDatabases


@contextmanager
def fresh_database(url: str, *, prefix: str) -> Iterator[str]:
    """A database for one run: a new one next to ``url`` when it is PostgreSQL, else a temporary SQLite
    file; removed afterwards."""
    pg = PgDatabases(url) if url.startswith("postgresql") else None
    try:
        with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
            yield pg.new() if pg is not None else f"sqlite:///{Path(tmp) / 'fleet.db'}"
    finally:
        if pg is not None:
            pg.close()


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
