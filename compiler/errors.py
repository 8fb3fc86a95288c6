"""Errors of the compiler, under the common root in :mod:`agent.errors`."""

from __future__ import annotations

from agent.errors import InternalError, UserError

__all__ = ["CompileError", "ExportError", "InternalError", "PruneError", "VerificationError"]


class CompileError(UserError):
    """The compile request is wrong: a bad argument, a model that cannot be loaded, missing data."""


class PruneError(CompileError):
    """The pruner cannot handle the model: names the layer and why."""


class ExportError(CompileError):
    """torch.export, ExecuTorch lowering or ONNX export failed for the model."""


class VerificationError(CompileError):
    """An exported file does not reproduce the eager model's outputs; the bundle is not written."""
