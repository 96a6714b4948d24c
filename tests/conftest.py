"""Shared fixtures: a fresh data root and routers that are always closed.

``root``          a path (``str``) under pytest's tmp dir that does not exist yet: the Router creates it.
``make_router``   factory ``make_router(root=None, **kwargs) -> Router``; every router it made is closed at
                  teardown (closing twice is harmless), so tests never trip the ResourceWarning filter.
``router``        a single ``Router(root)`` with default settings.
``meta``          a fresh, opened metadata store of each backend in turn (:data:`META_BACKENDS`): the
                  conformance suite of the metadata contracts (``tests/test_meta_*.py``) runs over every backend.
``pg_server``     (session) a real PostgreSQL server, started on first use; ``pg_dsn``: a fresh database on
                  it per test (``helpers_pg``). Without PostgreSQL their tests skip loudly (fail under CI=true).

The terminal summary lists the tests skipped because a real component is missing (``helpers_real``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers_meta import META_BACKENDS, missing_parts, open_meta
from helpers_pg import pg_dsn as pg_dsn
from helpers_pg import pg_server as pg_server
from helpers_real import pytest_terminal_summary as pytest_terminal_summary

from shardlite import Router
from shardlite.meta import MetaStore
from shardlite.meta.choose import ENV_VAR


@pytest.fixture
def root(tmp_path: pathlib.Path) -> str:
    return os.fspath(tmp_path / "data")


@pytest.fixture
def make_router(root: str) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def make(path: str | os.PathLike[str] | None = None, **kwargs: Any) -> Router:
        router = Router(root if path is None else path, **kwargs)
        made.append(router)
        return router

    yield make
    for router in reversed(made):
        router.close()


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    return make_router()


# -- the metadata conformance suite (tests/test_meta_*.py) ---------------------------------------------------

@pytest.fixture(params=META_BACKENDS)
def meta_backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each metadata backend in turn; for PostgreSQL a fresh database of the harness's server, named by
    ``SHARDLITE_META`` (skipped, loudly, for the parts the backend does not implement yet)."""
    backend = str(request.param)
    missing = missing_parts(backend, request.module)
    if missing:
        pytest.skip(f"the {backend} metadata backend does not implement meta.{', meta.'.join(missing)} yet")
    if backend == "postgresql":
        monkeypatch.setenv(ENV_VAR, request.getfixturevalue("pg_dsn"))
    else:
        monkeypatch.delenv(ENV_VAR, raising=False)
    return backend


@pytest.fixture
def meta(meta_backend: str, root: str) -> Iterator[MetaStore]:
    """A fresh, opened metadata store of each backend in turn (one node, ``n1``), closed afterwards."""
    store = open_meta(meta_backend, root)
    yield store
    store.close()
