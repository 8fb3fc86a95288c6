"""Render the contract's field tables as Markdown for ``docs/protocol.md``.

``python -m agent.contract.docgen docs/protocol.md`` rewrites the part of that file between the
``BEGIN GENERATED`` and ``END GENERATED`` markers; a test fails when the file is out of date.
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined, to_json

from agent.contract.manifest import (
    ArtifactFile,
    BudgetInput,
    BudgetPoint,
    BundleManifest,
    CreationInfo,
    InputSpec,
    Latency,
    Normalization,
    Signature,
    Variant,
)
from agent.contract.messages import (
    Birth,
    BundleRef,
    DesiredState,
    Event,
    Metrics,
    Percentiles,
    Readings,
    Status,
    UpdateInstruction,
    UpdateStatus,
)
from agent.contract.topics import CHANNELS, TOPIC_PREFIX

__all__ = ["BEGIN", "END", "render", "update_file"]

BEGIN = "<!-- BEGIN GENERATED: python -m agent.contract.docgen docs/protocol.md -->"
END = "<!-- END GENERATED -->"

MANIFEST_MODELS: tuple[type[BaseModel], ...] = (
    BundleManifest, InputSpec, Normalization, Variant, ArtifactFile, Latency, BudgetInput, BudgetPoint,
    CreationInfo, Signature,
)  # fmt: skip
MESSAGE_MODELS: tuple[type[BaseModel], ...] = (
    Birth, Status, Metrics, Event, DesiredState, UpdateStatus, BundleRef, Percentiles, Readings,
    UpdateInstruction,
)  # fmt: skip


def _type_name(annotation: object) -> str:
    """A short, readable type: ``str``, ``float | None``, ``tuple[str, ...]``, ``'a' | 'b'``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is tuple:
        inner = (
            f"{_type_name(args[0])}, ..."
            if len(args) == 2 and args[1] is Ellipsis
            else ", ".join(_type_name(a) for a in args)
        )
        return f"tuple[{inner}]"
    if origin is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return repr(annotation)


def _default(field: typing.Any) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(defaults)"
    return f"`{to_json(value).decode()}`".replace("|", "\\|")


def _table(model: type[BaseModel]) -> str:
    doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    rows = [f"### `{model.__name__}`", "", doc, "", "| field | type | default | description |",
            "|---|---|---|---|"]  # fmt: skip
    for name, field in model.model_fields.items():
        kind = _type_name(field.annotation).replace("|", "\\|")
        rows.append(f"| `{name}` | `{kind}` | {_default(field)} | {field.description} |")
    return "\n".join(rows)


def render() -> str:
    """The generated Markdown: the channel table, then one field table per model."""
    parts = [
        "## Channels",
        "",
        f"Topic: `{TOPIC_PREFIX}/<fleet>/<device>/<channel>`.",
        "",
        "| channel | message kind | published by | QoS | retained |",
        "|---|---|---|---|---|",
    ]
    for name, spec in CHANNELS.items():
        retained = "yes" if spec.retained else "no"
        parts.append(f"| `{name}` | `{spec.kind}` | {spec.publisher} | {spec.qos} | {retained} |")
    parts += ["", "## Wire messages", ""]
    parts += [_table(m) + "\n" for m in MESSAGE_MODELS]
    parts += ["## Bundle manifest (`manifest.json`)", ""]
    parts += [_table(m) + "\n" for m in MANIFEST_MODELS]
    return "\n".join(parts).rstrip() + "\n"


def update_file(path: Path) -> bool:
    """Rewrite the generated block of ``path``; return whether anything changed."""
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN!r} ... {END!r} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n\n{render()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


if __name__ == "__main__":
    changed = update_file(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/protocol.md"))
    print("updated" if changed else "up to date")
