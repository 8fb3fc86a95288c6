"""One loaded bundle, many simulated devices: a per-device view of a shared :class:`ModelServer`.

An onnxruntime session is safe to call from several threads, so a thousand simulated agents in one
process need the bundle loaded once. Each agent still chooses its own variant: :class:`ServerView` keeps
the *active* variant per device and runs every inference on the shared server with that variant named
explicitly (``ModelServer.infer(x, variant=...)``), so one device's switch never changes another's.

>>> shared = ModelServer(bundle, manifest, OnnxBackend())  # doctest: +SKIP
>>> a, b = ServerView(shared), ServerView(shared)  # doctest: +SKIP
>>> a.switch("static-50"); (a.active, b.active)  # doctest: +SKIP
('static-50', 'dense')
"""

from __future__ import annotations

import numpy as np

from agent.runtime import BackendError, Inference, ModelServer

__all__ = ["ServerView"]


class ServerView(ModelServer):
    """A :class:`ModelServer` for one device that shares the loaded models of ``shared``.

    Only the active variant is its own; loading, memory and the models belong to ``shared``. It is a
    subclass so :class:`agent.core.Agent` accepts it as its ``server``; it does not run the base
    constructor (that would load the bundle again).
    """

    def __init__(self, shared: ModelServer, *, active: str | None = None) -> None:
        # deliberately no super().__init__(): nothing is loaded here, every call goes to ``shared``
        self._shared = shared
        self._active = active if active is not None else shared.active
        if self._active not in shared.available:
            raise BackendError(f"no variant {self._active!r}; available: {list(shared.available)}")

    @property
    def shared(self) -> ModelServer:
        """The server that holds the models."""
        return self._shared

    @property
    def available(self) -> tuple[str, ...]:
        return self._shared.available

    @property
    def loaded(self) -> tuple[str, ...]:
        return self._shared.loaded

    @property
    def active(self) -> str:
        return self._active

    def switch(self, name: str) -> None:
        if name not in self._shared.available:
            raise BackendError(f"no variant {name!r}; available: {list(self._shared.available)}")
        self._active = name  # one reference assignment: atomic for inferences running in other threads

    def infer(self, x: np.ndarray, *, variant: str | None = None, budget: float | None = None) -> Inference:
        return self._shared.infer(x, variant=variant if variant is not None else self._active, budget=budget)

    def __repr__(self) -> str:
        return f"ServerView(active={self._active!r}, shared={self._shared!r})"
