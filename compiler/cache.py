"""A cache of trained dense checkpoints, so later compiles reuse the training.

Keyed by everything that changes the result: model spec, data set, training config, torch version and
the source of the reference model. Entries are plain state_dicts loaded with ``weights_only=True`` (no
pickled code is executed) and written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["cache_dir", "cache_key", "load_cached", "store"]


def cache_dir() -> Path:
    """``$EDGEPRUNE_CACHE`` or ``~/.cache/edgeprune``."""
    env = os.environ.get("EDGEPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "edgeprune"


def cache_key(**parts: object) -> str:
    from compiler import reference

    blob = json.dumps(
        {**parts, "torch": torch.__version__, "reference_src": Path(reference.__file__).read_text()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def load_cached(model: nn.Module, key: str, *, kind: str = "dense") -> bool:
    """Load the ``kind`` entry ``key`` into ``model``; ``False`` if there is none (or it is unreadable)."""
    path = cache_dir() / f"{kind}-{key}.pt"
    if not path.is_file():
        return False
    try:
        model.load_state_dict(torch.load(path, weights_only=True))
    except (RuntimeError, OSError, EOFError):
        return False
    return True


def store(model: nn.Module, key: str, *, kind: str = "dense") -> Path:
    """Write ``model``'s state_dict as the ``kind`` entry ``key`` (atomically)."""
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{kind}-{key}.pt"
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as tmp:
        torch.save(model.state_dict(), tmp)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)
    return path
