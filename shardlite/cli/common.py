"""Shared CLI plumbing: the data root, loading ``--app module:attr``, output, progress.

Output contract: everything a command prints goes through :func:`literal` (by way of :func:`echo`,
:func:`print_table`, :func:`emit_json` or :func:`console_line`), so text a tenant, a user or a backup
controls (keys, rows, column names, topics, e-mail addresses, error messages quoting them) is shown as it
is: never read as rich markup or emoji codes, and with every character Python does not call printable
(C0 and C1 controls, DEL, bidi and other format characters such as U+202E, line and paragraph separators,
surrogates, unassigned code points) written as an escape (``\\x1b``, ``\\u202e``). JSON output keeps such
characters as JSON escapes (``\\u001b``, ``\\u2028``): the same strings once decoded.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from ..errors import ConfigurationError
from ..front.router import Router
from ..meta.record import RECORD_NAME

__all__ = ["CliError", "root_of", "open_router", "load_app", "literal", "echo", "emit_json", "json_line",
           "print_table", "console_line", "progress", "positive_int", "advice"]

_SHORT = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2. The message says what to do next."""


def literal(value: object) -> str:
    """``value`` as text that shows exactly what it holds and cannot act on a terminal: every character
    that is not printable (``str.isprintable``; the plain space is) becomes an escape (``\\t``, ``\\n``,
    ``\\x1b``, ``\\u202e``, ``\\U000e0001``). Printable text, rich markup such as ``[bold]`` included, is
    returned unchanged: print it with :func:`echo` or :func:`print_table`, which never interpret markup."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    short = _SHORT.get(ch)
    if short is not None:
        return short
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def echo(text: object = "", *, err: bool = False) -> None:
    """Print one line of plain text (no markup), :func:`literal` applied to the whole line."""
    stream = sys.stderr if err else sys.stdout
    stream.write(literal(text) + "\n")
    stream.flush()


def json_line(obj: Any) -> str:
    """``obj`` as one line of JSON: non-ASCII printable text as it is, every character that is not
    printable (C1 controls, DEL, U+2028/U+2029, bidi and format characters, lone surrogates) as a
    ``\\uXXXX`` escape (a surrogate pair beyond the BMP), so the line is safe to show and decodes to the
    same values. Strict JSON has no infinities: a non-finite number (SQLite stores ``1e999`` as one) is
    written as the string ``"Infinity"``, ``"-Infinity"`` or ``"NaN"``."""
    try:
        text = json.dumps(obj, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:
        text = json.dumps(_finite(obj), ensure_ascii=False, default=str, allow_nan=False)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _json_escape(ch) for ch in text)


def _finite(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by its name (see :func:`json_line`)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "NaN" if math.isnan(obj) else ("Infinity" if obj > 0 else "-Infinity")
    if isinstance(obj, dict):
        return {key: _finite(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(value) for value in obj]
    return obj


def _json_escape(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def emit_json(obj: Any) -> None:
    """Print ``obj`` as one JSON line (:func:`json_line`)."""
    sys.stdout.write(json_line(obj) + "\n")
    sys.stdout.flush()


def _text(value: object) -> Text:
    """A rich renderable that shows ``value`` literally: a Text object is never parsed for markup or emoji."""
    return Text("" if value is None else literal(value))


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A rich table on stdout; title, headers and cells are shown literally (:func:`literal`), long
    values fold onto more lines instead of being cut."""
    table = Table(title=_text(title))
    for column in columns:
        table.add_column(_text(column), overflow="fold")
    for row in rows:
        table.add_row(*(_text(v) for v in row))
    Console(emoji=False, markup=False, highlight=False).print(table)


def console_line(console: Console, text: object) -> None:
    """One line of plain text on a rich ``console`` (say, the one under a progress bar), shown literally."""
    console.print(_text(text))


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (a usage error otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


@contextmanager
def advice(text: str, *kinds: type[BaseException]) -> Iterator[None]:
    """Errors of ``kinds`` raised in the block become a :class:`CliError` whose message ends with ``text``
    (what to do next, where the command knows better than the library)."""
    try:
        yield
    except kinds as exc:
        raise CliError(f"{exc}; {text}") from exc


def root_of(args: argparse.Namespace) -> str:
    """The data root: ``--root`` wherever it was given, else ``$SHARDLITE_ROOT``; absolute. Refuses (one
    line) an empty value and a path that exists but is not a directory."""
    root = args.root if getattr(args, "root", None) is not None else os.environ.get("SHARDLITE_ROOT")
    if not root:
        raise CliError("no data root: pass --root DIR or set SHARDLITE_ROOT")
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise CliError(f"the data root {root} is not a directory: pass --root DIR naming a directory")
    return root


def require_root(root: str) -> None:
    """Refuse (one line saying what to do) a directory that is not a data root: one with neither an embedded
    ``global.db`` nor a ``meta.json`` naming its PostgreSQL metadata."""
    if not (os.path.isfile(os.path.join(root, "global.db")) or os.path.isfile(os.path.join(root, RECORD_NAME))):
        raise CliError(f"no shardlite data root at {root}: run `shardlite init --root {shlex.quote(root)}` first, "
                       "or pass the right --root")


def open_router(args: argparse.Namespace) -> Router:
    """A Router on the existing root (never creates one; `shardlite init` does)."""
    root = root_of(args)
    require_root(root)
    try:
        return Router(root, create=False)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc


def load_app(spec: str, root: str | None) -> Router:
    """Import ``module:attr``: a Router, or a zero-argument callable returning one. ``root``, when given,
    must be the app's root.

    Importing the module must not start anything by itself (the relay's lifetime is never implicit)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--app expects module:attr, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}; check the module name and the current "
                       "directory (or PYTHONPATH)") from exc
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise CliError(f"{module_name!r} has no attribute {attr!r}; check --app module:attr") from exc
    router = obj if isinstance(obj, Router) else obj() if callable(obj) else None
    if not isinstance(router, Router):
        raise CliError(f"{spec} is neither a shardlite Router nor a callable returning one; point --app at one")
    if root is not None and os.path.abspath(root) != router.root:
        router.close()
        raise CliError(f"--root {os.path.abspath(root)} does not match the app's root {router.root}; drop --root "
                       "or make them agree")
    return router


@contextmanager
def progress(description: str, total: int | None, *, quiet: bool) -> Iterator[Any]:
    """A rich progress bar on a terminal; a no-op advance function otherwise (or when ``quiet``)."""
    if quiet or not sys.stderr.isatty():
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)


class _LiteralFormatter(logging.Formatter):
    """Log lines shown literally (:func:`~shardlite.cli.common.literal`): an error quoting a tenant's data
    or topic cannot act on the terminal, and a multi-line message stays one line."""

    def format(self, record: logging.LogRecord) -> str:
        return literal(super().format(record))


def log_to_stderr() -> None:
    """Warnings of a long-running command (relay, replicator; one line each) go to stderr with a time stamp,
    written literally, unless the app configured logging itself."""
    if not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_LiteralFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logging.basicConfig(level=logging.WARNING, handlers=[handler])
