"""The ``shardlite`` command line. One module per group of subcommands; errors print one line, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from ..errors import ShardliteError
from . import accounts, basics, migrate, ops, rebalance, relay
from .common import CliError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shardlite",
        description="One SQLite file per tenant: inspect and operate a shardlite data root.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--root", help="data root (default: $SHARDLITE_ROOT)")
    common.add_argument("--json", action="store_true", help="machine-readable output (JSON lines), no progress bar")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub_with_common = _WithParents(sub, common)
    for module in (basics, migrate, rebalance, relay, accounts, ops):
        module.register(sub_with_common)
    return parser


class _WithParents:
    """Adds the shared --root/--json options to every subcommand."""

    def __init__(self, sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
        self._sub, self._parent = sub, parent

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parents = list(kwargs.pop("parents", [])) + [self._parent]
        parser: argparse.ArgumentParser = self._sub.add_parser(name, parents=parents, **kwargs)
        parser._shardlite_common = self._parent  # type: ignore[attr-defined]  # for nested subcommands
        return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (CliError, ShardliteError) as exc:
        print(f"shardlite {args.command}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `shardlite ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
