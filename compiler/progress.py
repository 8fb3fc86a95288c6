"""Progress bars that show on a terminal and stay quiet (a line every 30 s at most) in logs and CI."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["progress"]


def progress(*, total: int, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr; when stderr is not a terminal, it prints a line every 30 s at most."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
        # In a log, one line every 30 s at most: enough to see it move, few enough to read.
        mininterval=0.2 if interactive else 30.0,
    )
