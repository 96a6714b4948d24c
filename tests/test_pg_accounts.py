"""Accounts, credentials and sessions on PostgreSQL (``shardlite.meta.postgres.accounts``, ``.sessions``):
what the conformance suite (``test_meta_accounts.py``, ``test_meta_sessions.py``) cannot say about this
backend: a real deadlock is retried, never surfaced; the identity sequence and explicit ids; and
:class:`~shardlite.MetaUnavailable` while the server is down, gone by itself after."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers_pg import separate_server

from shardlite import EmailTaken, MetaUnavailable, Settings
from shardlite.meta.accounts import AccountRows
from shardlite.meta.location import parse_location
from shardlite.meta.postgres import PgMeta
from shardlite.meta.postgres.txn import retrying
from shardlite.meta.record import new_root_id

T0 = 1_700_000_000.0


def _meta(dsn: str, root: str, **kw: float) -> PgMeta:
    meta = PgMeta(root, parse_location(dsn), new_root_id(), Settings(), **kw)  # type: ignore[arg-type]
    meta.open(create=True, default_nodes=[("n1", "n1", 1)])
    return meta


@pytest.fixture
def pg(pg_dsn: str, tmp_path: Path) -> Iterator[PgMeta]:
    meta = _meta(pg_dsn, os.fspath(tmp_path))
    yield meta
    meta.close()


def test_a_deadlock_is_run_again_not_surfaced(pg: PgMeta, pg_dsn: str) -> None:
    """Two transactions lock two accounts in opposite orders; the server aborts the unit run by
    ``retrying`` (its deadlock_timeout is the shorter), which runs it again once the other committed."""
    a = pg.accounts.create("a@x.io", "a@x.io", "", "{}", T0)
    b = pg.accounts.create("b@x.io", "b@x.io", "", "{}", T0)
    runs: list[int] = []
    other_holds_b, first_holds_a = threading.Event(), threading.Event()

    def unit() -> str:
        runs.append(1)
        with pg.pool.connection() as conn, conn.transaction():
            conn.execute("SET LOCAL deadlock_timeout = '50ms'")
            conn.execute("SELECT 1 FROM shardlite.accounts WHERE id = %s FOR UPDATE", (a,))
            first_holds_a.set()
            assert other_holds_b.wait(30)
            conn.execute("SELECT 1 FROM shardlite.accounts WHERE id = %s FOR UPDATE", (b,))
        return "done"

    def other() -> None:
        with psycopg.connect(pg_dsn, autocommit=True) as conn, conn.transaction():
            conn.execute("SET LOCAL deadlock_timeout = '60s'")
            conn.execute("SELECT 1 FROM shardlite.accounts WHERE id = %s FOR UPDATE", (b,))
            assert first_holds_a.wait(30)
            other_holds_b.set()
            conn.execute("SELECT 1 FROM shardlite.accounts WHERE id = %s FOR UPDATE", (a,))  # waits for unit

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert retrying(unit) == "done"
    finally:
        other_holds_b.set()
        thread.join()
    assert len(runs) >= 2  # aborted once at least, then run again (under load a retry may meet the other's tail)


def test_imported_ids_move_the_sequence_past_them_and_never_back(pg: PgMeta) -> None:
    pg.accounts.import_rows(AccountRows([(1, "i@x.io", "i@x.io", "", "{}", T0, T0)], [], []))  # a fresh sequence
    first = pg.accounts.create("a@x.io", "a@x.io", "", "{}", T0)
    assert first > 1
    pg.accounts.import_rows(AccountRows([(first + 50, "j@x.io", "j@x.io", "", "{}", T0, T0)], [], []))
    high = pg.accounts.create("b@x.io", "b@x.io", "", "{}", T0)
    assert high > first + 50
    pg.accounts.import_rows(AccountRows([(2, "k@x.io", "k@x.io", "", "{}", T0, T0)], [], []))  # a low id
    assert pg.accounts.create("c@x.io", "c@x.io", "", "{}", T0) > high


def test_create_takes_the_next_id_when_an_import_took_the_one_it_drew(pg: PgMeta, pg_dsn: str) -> None:
    """An explicit id written before the sequence moved past it (an import whose setval comes after the
    create drew its value) costs the create one more value, not an error."""
    first = pg.accounts.create("a@x.io", "a@x.io", "", "{}", T0)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO shardlite.accounts(id, email, email_key, created, updated) "
                     "VALUES (%s, 'i@x.io', 'i@x.io', 0, 0)", (first + 1,))
    second = pg.accounts.create("b@x.io", "b@x.io", "", "{}", T0)
    assert second == first + 2
    with pytest.raises(EmailTaken):
        pg.accounts.create("I@x.io", "i@x.io", "", "{}", T0)


def test_accounts_and_sessions_are_unavailable_while_the_server_is_down(tmp_path: Path) -> None:
    with separate_server() as server:
        meta = _meta(server.dsn(), os.fspath(tmp_path), connect_timeout=1.0)
        uid = meta.accounts.create("a@x.io", "a@x.io", "", "{}", T0)
        meta.sessions.insert(b"d" * 32, uid, T0, T0 + 100, None)
        server.kill()
        for call in (lambda: meta.sessions.live(b"d" * 32), lambda: meta.sessions.revoke(b"d" * 32, T0 + 1),
                     lambda: meta.accounts.create("b@x.io", "b@x.io", "", "{}", T0),
                     lambda: meta.credentials.for_login("a@x.io")):
            with pytest.raises(MetaUnavailable, match="cannot be reached"):
                call()
        server.start()
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects in the background: the first calls may still see the old failure
            try:
                assert meta.sessions.live(b"d" * 32) is not None
                break
            except MetaUnavailable:
                assert time.monotonic() < deadline, "the store did not come back after the server did"
        assert meta.sessions.revoke(b"d" * 32, T0 + 1) is True  # nothing of the failed calls was written
        assert meta.accounts.by_email_key("b@x.io") is None
        assert meta.accounts.create("b@x.io", "b@x.io", "", "{}", T0) > uid
        meta.close()
