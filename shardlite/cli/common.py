"""Shared CLI plumbing: the data root, loading ``--app module:attr``, JSON and table output, progress."""

from __future__ import annotations

import argparse
import importlib
import json
import os
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

from ..errors import ConfigurationError
from ..router import Router

__all__ = ["CliError", "root_of", "open_router", "load_app", "emit_json", "print_table", "progress"]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def root_of(args: argparse.Namespace) -> str:
    root = getattr(args, "root", None) or os.environ.get("SHARDLITE_ROOT")
    if not root:
        raise CliError("no data root: pass --root DIR or set SHARDLITE_ROOT")
    return os.path.abspath(root)


def open_router(args: argparse.Namespace) -> Router:
    """A Router on the existing root (never creates one; `shardlite init` does)."""
    try:
        return Router(root_of(args), create=False)
    except ConfigurationError as exc:
        raise CliError(str(exc)) from exc


def load_app(spec: str, root: str | None) -> Router:
    """Import ``module:attr``: a Router, or a zero-argument callable returning one.

    Importing the module must not start anything by itself (brief §4, Relay lifetime).
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--app expects module:attr, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        obj: Any = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError as exc:
        raise CliError(f"{module_name!r} has no attribute {attr!r}") from exc
    router = obj if isinstance(obj, Router) else obj() if callable(obj) else None
    if not isinstance(router, Router):
        raise CliError(f"{spec} is neither a shardlite Router nor a callable returning one")
    if root is not None and os.path.abspath(root) != router.root:
        router.close()
        raise CliError(f"--root {os.path.abspath(root)} does not match the app's root {router.root}")
    return router


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, default=str) + "\n")


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


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
