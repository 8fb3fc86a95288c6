"""Progress bars that show on a terminal and stay quiet (one line per 10%) in logs and CI."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

__all__ = ["progress"]


def progress(*, total: int, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr; when stderr is not a terminal, it updates at most every 10% of the work."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
        mininterval=0.2 if interactive else 0.0,
        miniters=None if interactive else max(1, total // 10),
    )
