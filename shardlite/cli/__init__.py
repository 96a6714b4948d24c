"""The ``shardlite`` command line. One module per group of subcommands.

Options every command shares (:data:`SHARED`: ``--root``, ``--json``) are accepted before the
subcommand, after it and after a nested action, with one meaning: an explicit ``--root`` anywhere wins
over ``$SHARDLITE_ROOT``, two different explicit roots are an error, ``--json`` anywhere turns JSON on.
Every parser of the tree gets its own copy of them (a dest per depth, default left unset), so an inner
parser never overwrites what an outer one read; :func:`_merge_shared` folds them into ``args.root``
and ``args.json``.

Warnings and errors are one line on stderr each. An error reads ``shardlite COMMAND: what went wrong;
what to do`` and exits with status 2 (130 when interrupted); argparse's own usage errors exit 2 as well.
``SHARDLITE_TRACEBACK=1`` re-raises an unexpected exception instead, for a bug report.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NoReturn

import apsw

from ..errors import ShardliteError
from . import accounts, basics, meta, migrate, ops, rebalance, relay, replicate
from .common import CliError, echo, literal

__all__ = ["main", "build_parser", "walk", "SHARED"]

#: The options every command takes, wherever they appear on the command line.
SHARED = ("--root", "--json")
_ROOT, _JSON = "_shared_root_", "_shared_json_"


class _Parser(argparse.ArgumentParser):
    """argparse, with the offending argument in a usage error shown literally (it may hold escapes)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {literal(message)}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shardlite",
        description="One SQLite file per tenant: inspect and operate a shardlite data root.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for module in (basics, migrate, rebalance, relay, replicate, accounts, ops, meta):
        module.register(sub)
    for depth, _path, each in list(walk(parser)):
        _add_shared(each, depth)
    return parser


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[int, tuple[str, ...], argparse.ArgumentParser]]:
    """Every parser of the tree under ``parser`` (itself first) with its depth and its command path
    (``()``, ``("nodes",)``, ``("nodes", "add")``), in the order the commands were registered."""
    yield len(path), path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk(child, (*path, name))


def _add_shared(parser: argparse.ArgumentParser, depth: int) -> None:
    group = parser.add_argument_group("options every command takes (before or after the command)")
    group.add_argument("--root", dest=f"{_ROOT}{depth}", action="append", default=argparse.SUPPRESS,
                       metavar="DIR", help="data root (default: $SHARDLITE_ROOT)")
    group.add_argument("--json", dest=f"{_JSON}{depth}", action="store_true", default=argparse.SUPPRESS,
                       help="machine-readable output (JSON lines), no progress bar")


def _merge_shared(args: argparse.Namespace) -> None:
    """Set ``args.root`` (the explicit root, or None) and ``args.json`` from the per-depth copies."""
    roots: list[str] = []
    json_mode = False
    for name in sorted(vars(args)):
        if name.startswith(_ROOT):
            roots += getattr(args, name)
            delattr(args, name)
        elif name.startswith(_JSON):
            json_mode = json_mode or bool(getattr(args, name))
            delattr(args, name)
    if any(not root for root in roots):
        raise CliError("--root was given an empty value: pass --root DIR")
    distinct = list(dict.fromkeys(os.path.abspath(root) for root in roots))
    if len(distinct) > 1:
        raise CliError(f"two different data roots given (--root {distinct[0]} and --root {distinct[1]}); pass "
                       "--root once")
    args.root = roots[-1] if roots else None
    args.json = json_mode


def _command(args: argparse.Namespace) -> str:
    return " ".join(str(part) for part in (args.command, getattr(args, "action", None)) if part)


_ERRNO_ADVICE = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path (a part of it is not a directory)",
    errno.EISDIR: "pass a file, not a directory",
    errno.EEXIST: "choose another path or move that one away",
    errno.EACCES: "check its permissions (or run as the data root's owner)",
    errno.EPERM: "check its permissions (or run as the data root's owner)",
    errno.EROFS: "the file system is read-only; remount it read-write or choose another place",
    errno.ENOSPC: "free space there and retry",
    errno.EDQUOT: "free space there (or raise the quota) and retry",
}


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    advice = _ERRNO_ADVICE.get(exc.errno or 0, "fix that and retry")
    return f"{exc.strerror or exc}{where}; {advice}"


def _one_line_warning(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for a command: one literal line on stderr (not Python's two, with the
    source line), e.g. a DirectoryModeWarning about a root open to others."""
    def show(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        echo(f"shardlite {command}: warning: {message}", err=True)
    return show


def _fail(command: str, message: object) -> int:
    echo(f"shardlite {command}: {message}", err=True)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``shardlite argv...``; the exit status. Never raises for a user's mistake or a failing root."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0), or a usage error argparse has already printed (2)
        return exc.code if isinstance(exc.code, int) else 2
    command = _command(args)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(command)
            _merge_shared(args)
            return int(args.func(args))
    except KeyboardInterrupt:
        echo(f"shardlite {command}: interrupted; what finished stays done, run the command again for the rest",
             err=True)
        return 130
    except BrokenPipeError:  # `shardlite ... | head`: the reader left; not an error of ours
        sys.stderr.close()
        return 0
    except (CliError, ShardliteError) as exc:
        return _fail(command, exc)
    except OSError as exc:
        return _fail(command, _os_error(exc))
    except apsw.Error as exc:
        return _fail(command, f"SQLite: {type(exc).__name__}: {exc}; check the statement or the file named, "
                              "then retry")
    except ValueError as exc:  # bad input that slipped past argparse (JSON, numbers, text encodings)
        return _fail(command, f"invalid input: {exc}; check the arguments (`shardlite {command} --help`)")
    except Exception as exc:
        if os.environ.get("SHARDLITE_TRACEBACK"):
            raise
        return _fail(command, f"unexpected {type(exc).__name__}: {exc}; this is a bug in shardlite: run again "
                              "with SHARDLITE_TRACEBACK=1 and report the traceback")


if __name__ == "__main__":
    sys.exit(main())
