"""Shared fixtures: a fresh data root and routers that are always closed.

``root``          a path (``str``) under pytest's tmp dir that does not exist yet: the Router creates it.
``make_router``   factory ``make_router(root=None, **kwargs) -> Router``; every router it made is closed at
                  teardown (closing twice is harmless), so tests never trip the ResourceWarning filter.
``router``        a single ``Router(root)`` with default settings.
``meta``          a fresh, opened metadata store of each backend in turn (:data:`META_BACKENDS`): the
                  conformance suite of the metadata contracts (``tests/test_meta_*.py``) runs over every backend.
``any_meta``      the metadata backend of the test, each in turn (:data:`META_BACKENDS`): for "postgresql",
                  ``SHARDLITE_META`` names a fresh database for the test, so every new root the test makes (in
                  this process or in a child process: they inherit the environment) keeps its metadata there;
                  for "sqlite" it is unset. Opt a module in with ``pytestmark = pytest.mark.usefixtures(
                  "any_meta")`` (usefixtures run before the test's other fixtures, so its routers see it).
``second_meta``   for a second root with the same keys (a restore into a new root): a database of its own on
                  PostgreSQL (one database is one tenant key space), None on SQLite; pass it as ``meta=``.
``pg_server``     (session) a real PostgreSQL server, started on first use; ``pg_dsn``: a fresh database on
                  it per test (``helpers_pg``). Without PostgreSQL their tests skip loudly (fail under CI=true).
``s3_server``     (session) a real S3 server (SeaweedFS), started on first use; ``s3_env``: its credentials in
                  the AWS environment for the test; ``make_replica_target``/``replica_target``: replica targets
                  of each backend in turn, for the replica conformance suite (``helpers_s3``). Without
                  SeaweedFS their tests skip loudly (fail under CI=true).

The terminal summary lists the tests skipped because a real component is missing (``helpers_real``).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
from helpers_meta import META_BACKENDS, missing_parts, open_meta
from helpers_pg import pg_dsn as pg_dsn
from helpers_pg import pg_server as pg_server
from helpers_real import pytest_terminal_summary as pytest_terminal_summary
from helpers_s3 import make_replica_target as make_replica_target
from helpers_s3 import replica_backend as replica_backend
from helpers_s3 import replica_target as replica_target
from helpers_s3 import s3_env as s3_env
from helpers_s3 import s3_server as s3_server

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


# -- the multi-process and crash suites over both backends (issue 15) ------------------------------------------

_SECOND_DATABASES = pytest.StashKey[ExitStack]()


@pytest.fixture(params=META_BACKENDS)
def any_meta(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The test's metadata backend, each in turn; see the module doc."""
    backend = str(request.param)
    if backend != "postgresql":
        monkeypatch.delenv(ENV_VAR, raising=False)
        yield backend
        return
    dsn = request.getfixturevalue("pg_dsn")
    monkeypatch.setenv(ENV_VAR, dsn)
    with ExitStack() as later:  # second_meta's databases: dropped after every other fixture of the test
        request.node.stash[_SECOND_DATABASES] = later
        yield backend
    if getattr(request.node, "rep_call_passed", False):  # passed on "postgresql": it must have used the database
        import psycopg

        with psycopg.connect(dsn, autocommit=True, connect_timeout=30) as conn:
            row = conn.execute("SELECT to_regclass('shardlite.roots') IS NOT NULL").fetchone()
            used = bool(row and row[0]) and conn.execute("SELECT count(*) FROM shardlite.roots").fetchone()
        assert used and used[0] > 0, f"{request.node.nodeid} never put a root's metadata in PostgreSQL"


@pytest.fixture
def second_meta(any_meta: str, request: pytest.FixtureRequest) -> str | None:
    """A second root's own metadata: a fresh database on PostgreSQL (dropped afterwards), None on SQLite."""
    if any_meta != "postgresql":
        return None
    server = request.getfixturevalue("pg_server")
    # any_meta was set up before the test's routers, so it is torn down after them: the database goes then
    return str(request.node.stash[_SECOND_DATABASES].enter_context(server.database("second")))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Records on the item whether its call phase passed (``any_meta`` checks its database only then)."""
    report = yield
    if report.when == "call":
        item.rep_call_passed = report.passed  # type: ignore[attr-defined]
    return report
