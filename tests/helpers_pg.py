"""A real PostgreSQL server for our tests (``tests/conftest.py`` registers these fixtures).

``pg_server``  (session) one throwaway server (:mod:`shardlite.testing.postgres`: Debian's ``postgresql``
               package or ``$PG_BIN``, a temporary directory, 127.0.0.1 on a free port), started the first
               time a test asks for it, so a run without such a test starts none; stopped and removed at the
               end of the session, however it ends. It never runs apt-get: ``make postgres`` (a dependency
               of ``make test``) installs the package. When PostgreSQL cannot be had, every test that needs
               it is skipped with a loud reason, or fails under ``CI=true`` (:mod:`helpers_real`); the
               first attempt's outcome holds for the whole session.
``separate_server()``  a context manager starting a server of its own for one test (for tests that stop
               or kill it), under the same skip-or-fail policy.
``pg_dsn``     (function) a fresh, empty database on that server for the test: yields its DSN (a
               ``postgresql://`` URL with the superuser's password); dropped afterwards, with whatever
               connections the test left open to it.

The test servers run with ``fsync=off`` (:data:`TEST_SETTINGS`). The tests kill processes (the postmaster,
its backends, our writers), never the machine: PostgreSQL still writes its WAL to the OS before a commit
returns, so a process killed -9 loses nothing with it off, exactly as with it on; what it saves is the
fsync of every commit and the checkpoint of every ``CREATE DATABASE`` (one per test: about 0.7 s each with
it on, 0.06 s off, on this loaded 2-core machine). The benchmarks' servers keep ``fsync=on``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest
from helpers_real import missing_component

from shardlite.testing.postgres import PgServer, PgUnavailable, postgres

WHAT = "POSTGRESQL TESTS"
#: ``postgres -c`` settings of the test servers (module doc: why fsync is off).
TEST_SETTINGS = {"fsync": "off"}


@contextmanager
def separate_server() -> Iterator[PgServer]:
    """A throwaway server for the block (no database but ``postgres``), stopped and removed afterwards;
    when none can be started, the test skips loudly (fails under ``CI=true``)."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(postgres((), settings=TEST_SETTINGS, install=False))
        except PgUnavailable as exc:
            missing_component(WHAT, f"no PostgreSQL server could be started: {exc}")
        yield server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    with separate_server() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_server: PgServer) -> Iterator[str]:
    with pg_server.database("test") as dsn:
        yield dsn


def wait_for_lock_waiter(dsn: str, what: str, timeout: float = 60.0) -> None:
    """Return once some backend of ``dsn``'s database waits on a lock; fail (naming ``what`` was expected to
    wait) after ``timeout`` seconds."""
    import time

    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                               "AND wait_event_type = 'Lock'").fetchone()
            if row and row[0] >= 1:
                return
            assert time.monotonic() < deadline, f"{what} never waited on a lock"
            time.sleep(0.005)
