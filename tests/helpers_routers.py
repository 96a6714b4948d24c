"""Helpers shared by test files: run the CLI in-process, and a factory of Routers closed at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_meta import exported_rows

import shardlite.cli
from shardlite import Router


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``shardlite argv...`` in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = shardlite.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def router_factory(base: Path, schema: Any) -> Iterator[Callable[..., Router]]:
    """For a fixture: ``make(name="data", **kwargs)`` opens a Router on ``base/name`` (``schema`` unless
    given); every Router made is closed at teardown (closing twice is harmless)."""
    made: list[Router] = []

    def factory(name: str = "data", **kwargs: Any) -> Router:
        kwargs.setdefault("schema", schema)
        router = Router(base / name, **kwargs)
        made.append(router)
        return router

    yield factory
    for router in reversed(made):
        router.close()


def internal_rows(router: Any, key: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Rows of shardlite's own ``_shardlite_*`` tables in ``key``'s tenant, read the way shardlite reads
    them (user SQL, ``router.query`` included, may not read them). ``router``: a Router or AsyncRouter."""
    return router._store.read_internal(key, sql, params)


def global_rows(router: Any, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Rows of shardlite's own tables in ``global.db``'s schema (accounts, credentials, sessions, catalog),
    which app SQL (``router.globals``) cannot reach; on PostgreSQL, from an export of the router's metadata
    (:func:`helpers_meta.exported_rows`)."""
    meta = router._store.meta
    if hasattr(meta, "globaldb"):  # the embedded store: global.db itself, through its own connections
        return meta.globaldb.read(sql, params)  # type: ignore[no-any-return]
    return exported_rows(meta, sql, params)
