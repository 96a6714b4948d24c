"""Pending work, dead letters and kv on PostgreSQL (``shardlite.meta.postgres.pending``, ``.kv``): what the
conformance suite (``test_meta_pending.py``, ``test_meta_kv.py``) cannot say.

* A deadlock between a contract call and another transaction is retried inside the call, never surfaced:
  another session holds one of the rows ``flag_many`` / ``clear_many`` needs and then asks for one the call
  holds; the server aborts the call's transaction, which runs again and succeeds once the other commits.
* Code-point order holds in a database whose default collation is a locale's (ICU ``en-US``, where ``a``
  sorts before ``A``), also for the dead letters' ``incarnation``, which is not a ``COLLATE "C"`` column.
* The server killed and restarted: the emit path's flag write (the router's
  :class:`~shardlite.front.transaction.Emitter`
  over ``pending.flag_many``) raises :class:`~shardlite.MetaUnavailable`, keeps its keys queued and writes
  nothing; every other call fails the same way; all work again by themselves once the server is back.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from helpers_meta import open_meta
from helpers_pg import separate_server, wait_for_lock_waiter
from psycopg import sql

from shardlite import MetaUnavailable, Settings
from shardlite.front.transaction import Emitter
from shardlite.meta import MetaStore
from shardlite.meta.choose import ENV_VAR
from shardlite.meta.location import parse_location
from shardlite.meta.pending import DeadLetter
from shardlite.meta.postgres import PgMeta
from shardlite.meta.record import new_root_id
from shardlite.testing.postgres import PgServer

#: The store's sessions detect a deadlock after this (the other session waits far longer, so the server
#: always aborts the store's transaction: the one the test wants retried).
STORE_DEADLOCK_TIMEOUT = "3s"


def _database_name(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


@pytest.fixture
def pg_meta(pg_dsn: str, root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MetaStore]:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # before the pool connects: its sessions get it
        conn.execute(sql.SQL("ALTER DATABASE {} SET deadlock_timeout = {}").format(
            sql.Identifier(_database_name(pg_dsn)), sql.Literal(STORE_DEADLOCK_TIMEOUT)))
    monkeypatch.setenv(ENV_VAR, pg_dsn)
    store = open_meta("postgresql", root)
    yield store
    store.close()



def _deadlock(dsn: str, call: Callable[[], object]) -> list[object]:
    """Run ``call`` on a thread while another session holds ``user:b``'s row; once ``call`` waits for it,
    that session asks for ``user:a``'s row (which ``call`` holds by then): a deadlock. Returns ``call``'s
    outcome (its result, or the exception it raised)."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)

    touch = "UPDATE shardlite.pending SET due = due WHERE key = %s"
    with psycopg.connect(dsn) as other:
        other.execute("SET deadlock_timeout = '10min'")
        other.execute(touch, ("user:b",))
        thread = threading.Thread(target=run)
        thread.start()
        try:
            wait_for_lock_waiter(dsn, "the store's call (on the other session's lock)")
            other.execute(touch, ("user:a",))  # waits until the server aborts the store's transaction
            other.commit()
        finally:
            thread.join(timeout=120)
    assert not thread.is_alive()
    return outcome


def test_a_deadlocked_flag_many_is_retried_not_surfaced(pg_meta: MetaStore, pg_dsn: str) -> None:
    pending = pg_meta.pending
    pending.flag_many(["user:a", "user:b"])
    before = {row.key: row.version for row in pending.all()}
    assert _deadlock(pg_dsn, lambda: pending.flag_many(["user:b", "user:a"])) == [None]
    assert {row.key: row.version for row in pending.all()} == {k: v + 1 for k, v in before.items()}


def test_a_deadlocked_clear_many_is_retried_not_surfaced(pg_meta: MetaStore, pg_dsn: str) -> None:
    pending = pg_meta.pending
    pending.flag_many(["user:a", "user:b", "user:c"])
    pairs = [(row.key, row.version) for row in pending.all() if row.key != "user:c"]
    assert _deadlock(pg_dsn, lambda: pending.clear_many(list(reversed(pairs)))) == [None]
    assert [row.key for row in pending.all()] == ["user:c"]


@pytest.fixture
def icu_meta(pg_server: PgServer, tmp_path: Path) -> Iterator[MetaStore]:
    """A store in a database whose default collation is ICU's ``en-US`` (not code-point order)."""
    name = f"icu_{new_root_id()[:16]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LOCALE_PROVIDER icu "
                             "ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'").format(sql.Identifier(name)))
    meta = PgMeta(os.fspath(tmp_path / "data"), parse_location(pg_server.dsn(name)), new_root_id(), Settings())
    try:
        meta.open(create=True, default_nodes=(("n1", "n1", 1),))
        yield meta
    finally:
        meta.close()
        pg_server.drop_database(name)


def test_code_point_order_in_a_database_with_a_locale_collation(icu_meta: MetaStore) -> None:
    keys = ["user:b", "user:B", "user:a", "user:A", "user:é", "user:e", "user:\U0001f600", "user:10", "user:9"]
    icu_meta.pending.flag_many(keys)
    assert [row.key for row in icu_meta.pending.all()] == sorted(keys)
    for key in keys:
        icu_meta.pending.set_due(key, 1.0)
    assert [row.key for row in icu_meta.pending.due(2.0, 100)] == sorted(keys)  # ties in key order

    incarnations = ["b" * 32, "B" * 32, "a" * 32, "A" * 32]
    for incarnation in incarnations:
        icu_meta.dead_letters.add(DeadLetter("user:a", incarnation, 1, "user:b", "t", "{}", 1.0, 1, "e", 2.0))
    assert [d.incarnation for d in icu_meta.dead_letters.list()] == sorted(incarnations)


def _eventually(call: Callable[[], object]) -> object:
    """``call()``, repeated while it raises MetaUnavailable: the pool reconnects in the background, so the
    first calls after a restart may still see the outage (bounded: fails after 60 s)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return call()
        except MetaUnavailable:
            assert time.monotonic() < deadline, "the store did not come back after the server did"


def test_the_emit_flag_is_metaunavailable_while_the_server_is_down_and_comes_back(tmp_path: Path) -> None:
    with separate_server() as server:
        meta = PgMeta(os.fspath(tmp_path), parse_location(server.dsn()), new_root_id(), Settings(),
                      connect_timeout=1.0)
        meta.open(create=True, default_nodes=(("n1", "n1", 1),))
        try:
            emitter = Emitter(meta.pending.flag_many)
            emitter.flag("user:a")
            emitter.flush("user:a")
            first = meta.pending.row("user:a")
            assert first is not None
            meta.dead_letters.add(DeadLetter("user:a", "0" * 32, 1, "user:b", "t", "{}", 1.0, 1, "e", 2.0))
            meta.kv.put("k", "v1")

            server.kill()
            emitter.flag("user:b")
            with pytest.raises(MetaUnavailable, match="cannot be reached"):
                emitter.flush("user:b")  # the router rolls the tenant transaction back: nothing acknowledged
            calls: list[Callable[[], object]] = [
                lambda: meta.pending.flag_many(["user:a"]), lambda: meta.pending.due(time.time(), 10),
                meta.pending.all, lambda: meta.pending.row("user:a"),
                lambda: meta.pending.clear_many([("user:a", first.version)]),
                lambda: meta.pending.set_due("user:a", 1.0),
                lambda: meta.dead_letters.add(DeadLetter("user:c", "0" * 32, 1, "user:b", "t", "{}", 1.0, 1, "e",
                                                         2.0)),
                meta.dead_letters.list, meta.dead_letters.count,
                lambda: meta.dead_letters.delete("user:a", "0" * 32, 1),
                lambda: meta.kv.get("k"), lambda: meta.kv.put("k", "v2")]
            for call in calls:
                with pytest.raises(MetaUnavailable):
                    call()

            server.start()
            _eventually(lambda: emitter.flush("user:b"))  # the queued flag is written by the next flush
            assert [row.key for row in meta.pending.all()] == ["user:a", "user:b"]
            assert meta.pending.row("user:a") == first  # nothing of the failed calls was written
            assert meta.dead_letters.count() == 1 and meta.kv.get("k") == "v1"
            meta.pending.clear_many([("user:a", first.version)])
            assert [row.key for row in meta.pending.all()] == ["user:b"]
        finally:
            meta.close()
