"""Resolve ``--model``: ``reference`` or ``package.module:factory`` (a callable returning an nn.Module)."""

from __future__ import annotations

import importlib

from torch import nn

from compiler.errors import CompileError
from compiler.reference import reference

__all__ = ["load_model"]


def load_model(spec: str, *, classes: int, in_channels: int) -> nn.Module:
    """Build a fresh, untrained model from ``spec``."""
    if spec == "reference":
        return reference(classes=classes, in_channels=in_channels)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CompileError(f"--model {spec!r} is neither 'reference' nor 'package.module:factory'")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CompileError(
            f"--model {spec!r}: cannot import {attr!r} from {module_name!r}: {exc}",
            hint="the module must be importable (on PYTHONPATH) and define the factory",
        ) from exc
    model = factory()
    if not isinstance(model, nn.Module):
        raise CompileError(f"--model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
