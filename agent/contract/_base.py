"""Shared base of every contract model: frozen, closed, described, and one error type on bad input."""

from __future__ import annotations

import json
from typing import Annotated, Any, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from agent.errors import ContractError

SCHEMA_VERSION = 1
"""Version of the manifest schema and of the wire protocol. Bumped on any incompatible change."""

INT32_MAX = 2**31 - 1
"""Upper bound of per-window counters: what a 32-bit SQL INTEGER column holds (PostgreSQL's ``integer``)."""
INT64_MAX = 2**63 - 1
"""Upper bound of every other integer on the wire: what a 64-bit SQL column holds (``bigint``)."""

# Identifiers appear in MQTT topics and file names, so they exclude '/', '+', '#' and spaces.
Identifier = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"),
]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
MessageId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{32}$")]


def summarize_validation_error(exc: ValidationError) -> tuple[str, ...]:
    """One line per problem, ``location: reason``, short enough for a log line or a CLI."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(part) for part in err["loc"]) or "<root>"
        lines.append(f"{loc}: {err['msg']}")
    return tuple(lines)


class ContractModel(BaseModel):
    """Base of the manifest and every wire message.

    Frozen (a parsed message cannot be altered by accident), ``extra="forbid"`` (a typo or a field
    from a newer schema is an error, not silently dropped), and every field carries a description,
    which ``docs/protocol.md`` and the JSON schemas show.
    """

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        strict=False,
        validate_default=True,
        use_attribute_docstrings=False,
    )

    @classmethod
    def from_json(cls, data: str | bytes | bytearray) -> Self:
        """Parse and validate JSON text; raise :class:`ContractError` on anything malformed.

        >>> from agent.contract import Normalization
        >>> Normalization.from_json('{"mean": [0.5], "std": [0.25]}').std
        (0.25,)
        """
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            raise contract_error(cls.__name__, exc) from exc

    @classmethod
    def from_obj(cls, data: Any) -> Self:
        """Validate an already-decoded object (a ``dict`` from JSON); raise :class:`ContractError`."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise contract_error(cls.__name__, exc) from exc

    def to_json(self) -> str:
        """Serialise to compact JSON, the form sent on the wire and written to disk."""
        return self.model_dump_json()


def contract_error(what: str, exc: ValidationError) -> ContractError:
    problems = summarize_validation_error(exc)
    shown = "; ".join(problems[:5]) + (f"; ... {len(problems) - 5} more" if len(problems) > 5 else "")
    return ContractError(
        f"invalid {what}: {shown}",
        errors=problems,
        hint="see docs/protocol.md for the schema, or `edgeprune contract schema` for JSON Schema",
    )


def canonical_json(data: Any) -> bytes:
    """Deterministic JSON bytes (sorted keys, no spaces, UTF-8): what signatures are computed over."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def described(description: str, **kwargs: Any) -> Any:
    """``Field(description=...)`` spelled shortly; every contract field is declared through it."""
    return Field(description=description, **kwargs)
