"""`edgeprune devices ...`: device profiles and the simulator."""

from __future__ import annotations

import argparse
from typing import Any

from agent.errors import UserError

__all__ = ["add_devices_parser"]


class NotBuiltError(UserError):
    """A part of the product that does not exist yet."""


def _not_built(args: argparse.Namespace) -> int:
    raise NotBuiltError(
        "'edgeprune devices' is not built yet: the fleet simulator is tracked in issue #8",
        hint="`edgeprune demo` runs what works today; see README.md for the status of each part",
    )


def add_devices_parser(sub: Any) -> None:
    """Register `edgeprune devices` on the top-level subparsers."""
    p = sub.add_parser("devices", help="device profiles and the simulator (not built yet, issue #8)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_not_built)
