"""The metadata backends of the conformance suite (``tests/test_meta_*.py``) and how to open each; and
:func:`meta_rows`, which reads a root's metadata tables as SQL whichever backend keeps them (for the
multi-process and crash suites that run over both backends through the ``any_meta`` fixture).

A conformance module names the parts of the store it exercises in a module-level ``META_PART`` (an
attribute name such as ``"journal"``, or a tuple of them); on a backend that does not have them yet its tests
are skipped with a loud reason (:func:`missing_parts`), so no test of a part runs against a backend that
lacks it, and every skip says what is left to build.
"""

from __future__ import annotations

import os
import tempfile
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import apsw

from shardlite import Settings
from shardlite.files.globaldb import GLOBAL_DB_NAME
from shardlite.meta import MetaStore
from shardlite.meta.choose import ENV_VAR, locate_store
from shardlite.meta.record import read_record
from shardlite.meta.sqlite import SqliteMeta

#: The metadata backends every conformance test runs over. For "postgresql", the ``meta_backend`` fixture
#: puts a fresh database's URL in ``SHARDLITE_META`` (inherited by child processes, so they reopen the
#: same store through the root's ``meta.json``).
META_BACKENDS = ["sqlite", "postgresql"]


def open_meta(backend: str, root: str, *, create: bool = True,
              default_nodes: Sequence[tuple[str, str, int]] = (("n1", "n1", 1),)) -> MetaStore:
    """A :class:`~shardlite.meta.store.MetaStore` of ``backend`` on ``root``, opened."""
    if backend == "sqlite":
        store: object = SqliteMeta(root, Settings())
    elif backend == "postgresql":
        store = locate_store(root, Settings(), create=create)
        if getattr(store, "root_id", None) is None:
            raise ValueError(f"{ENV_VAR} names no PostgreSQL database: use the meta_backend fixture")
    else:
        raise ValueError(f"unknown metadata backend {backend!r}")
    opened = cast(MetaStore, store)
    opened.open(create=create, default_nodes=default_nodes)
    return opened


def missing_parts(backend: str, module: types.ModuleType) -> list[str]:
    """The parts ``module`` needs (its ``META_PART``) that ``backend``'s store does not have yet."""
    wanted = getattr(module, "META_PART", ())
    parts = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    if backend != "postgresql" or not parts:
        return []
    from shardlite.meta.location import parse_location
    from shardlite.meta.postgres import PgMeta

    probe = PgMeta("/nonexistent", parse_location("postgresql://probe@127.0.0.1/probe"), "0" * 32, Settings())
    return [part for part in parts if not hasattr(probe, part)]


def meta_rows(root: str | os.PathLike[str], sql: str, params: Sequence[Any] = (), *,
              meta: str | None = None) -> list[tuple[Any, ...]]:
    """Rows of ``sql`` over ``root``'s metadata in ``global.db``'s own schema (``_shardlite_tenants``,
    ``_shardlite_moves``, ``_shardlite_accounts``...), read apart from any router under test: the embedded
    ``global.db`` itself, read-only; for a root on PostgreSQL, a one-snapshot export of its metadata
    (``export_global``, what a backup copies) through a connection of its own. ``meta``: the root's
    PostgreSQL URL when ``SHARDLITE_META`` names another database (a second root of the test)."""
    with _metadata_file(os.fspath(root), meta) as path:
        return _read(path, sql, params)


def exported_rows(store: Any, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """:func:`meta_rows` through an open metadata store (a router's ``_store.meta``) of either backend."""
    with tempfile.TemporaryDirectory(prefix="meta-rows-") as scratch, store.export_global(scratch) as path:
        return _read(path, sql, params)


def _read(path: str, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_NOFOLLOW)
    try:
        conn.setbusytimeout(10_000)
        return conn.execute(sql, tuple(params)).fetchall()
    finally:
        conn.close()


@contextmanager
def _metadata_file(root: str, meta: str | None) -> Iterator[str]:
    if read_record(root) is None:
        yield os.path.join(root, GLOBAL_DB_NAME)
        return
    store: Any = locate_store(root, Settings(), meta, create=False)
    store.pool.open()  # only the pool: opening the whole store would start its listeners for one read
    try:
        with tempfile.TemporaryDirectory(prefix="meta-rows-") as scratch, store.export_global(scratch) as path:
            yield path
    finally:
        store.pool.close()
