"""The error hierarchy every part of edgeprune raises.

One root, :class:`EdgepruneError`, split in two the way ExecuTorch splits ``ExportError`` from
``InternalError``:

* :class:`UserError` -- the input is wrong (a malformed manifest, a missing data set, a bad flag).
  The message says what is wrong and ``hint`` says what to do about it.
* :class:`InternalError` -- edgeprune itself is wrong. Please report it.

Third-party exceptions are mapped at the boundary with ``raise ... from exc`` so the cause stays
visible. The CLI prints ``TypeName: message`` plus the hint and exits 1 for any of these.
"""

from __future__ import annotations

__all__ = [
    "ContractError",
    "DataError",
    "EdgepruneError",
    "InternalError",
    "UserError",
]


class EdgepruneError(Exception):
    """Root of every error edgeprune raises on purpose."""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UserError(EdgepruneError):
    """The input is wrong: fix the input, not edgeprune."""


class InternalError(EdgepruneError):
    """edgeprune is wrong: an invariant of ours broke. Please report it with the traceback."""


class ContractError(UserError):
    """A manifest, wire message or topic does not match the contract.

    Raised by every ``parse_*``/``from_json`` entry point of :mod:`agent.contract` for malformed JSON,
    a field of the wrong type, an unknown field, a failed cross-field check or a topic that does not
    belong to the protocol. ``errors`` holds one short line per problem (location: reason).
    """

    def __init__(self, message: str, *, errors: tuple[str, ...] = (), hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.errors = errors


class DataError(UserError):
    """A data set is missing, unreadable or corrupt."""
