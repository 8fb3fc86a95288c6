"""The edgeprune device agent and the contract every other part imports.

This package is the leaf of the dependency graph: it imports nothing else of the repository and never
imports torch, so a device installs only ``pip install edgeprune`` (pydantic, paho-mqtt, psutil,
onnxruntime). The shared contract lives in :mod:`agent.contract`, the errors in :mod:`agent.errors`,
the reference data loaders in :mod:`agent.data`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("edgeprune")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
