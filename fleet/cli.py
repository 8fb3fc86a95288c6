"""`edgeprune fleet ...`: run the fleet manager."""

from __future__ import annotations

import argparse
from typing import Any

from agent.errors import UserError

__all__ = ["add_fleet_parser"]


class NotBuiltError(UserError):
    """A part of the product that does not exist yet."""


def _not_built(args: argparse.Namespace) -> int:
    raise NotBuiltError(
        "'edgeprune fleet' is not built yet: the fleet manager is tracked in issue #7",
        hint="`edgeprune demo` runs what works today; see README.md for the status of each part",
    )


def add_fleet_parser(sub: Any) -> None:
    """Register `edgeprune fleet` on the top-level subparsers."""
    p = sub.add_parser("fleet", help="run the fleet manager (not built yet, issue #7)")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=_not_built)
