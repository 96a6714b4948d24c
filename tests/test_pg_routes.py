"""Route caches across processes on PostgreSQL (issue 15 point 3): a tenant's row changed by another router
drops this router's cached route (a trigger NOTIFYs in the changing transaction), and every reconnect of the
hints drops all of them (NOTIFY is not durable). Waits are on conditions with deadlines."""

from __future__ import annotations

import time
from collections.abc import Callable

import psycopg
from helpers_pg import separate_server

from shardlite import Router


def _until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.005)


def _listening(router: Router) -> None:
    listener = router._store.meta._hints  # type: ignore[attr-defined]
    assert listener is not None and listener.wait_connected(30)


def test_a_change_by_another_router_drops_the_cached_route(pg_dsn: str, root: str) -> None:
    with Router(root, meta=pg_dsn) as a, Router(root, meta=pg_dsn) as b:
        _listening(a)
        with a.transaction("u:1") as tx:
            tx.execute("CREATE TABLE t(x)")
        with a.transaction("u:2") as tx:
            tx.execute("CREATE TABLE t(x)")
        assert {"u:1", "u:2"} <= set(a._store._records)
        b.drop("u:1")  # a tombstone: the row changes in b's transaction
        _until(lambda: "u:1" not in a._store._records, "a forgets the dropped tenant's route")
        assert "u:2" in a._store._records  # only what changed
        assert not a.exists("u:1")


def test_every_reconnect_drops_every_cached_route(root: str) -> None:
    with separate_server() as server, Router(root, meta=server.dsn()) as router:
        _listening(router)
        with router.transaction("u:1") as tx:
            tx.execute("CREATE TABLE t(x)")
        assert "u:1" in router._store._records
        server.kill()
        server.start()
        _until(lambda: "u:1" not in router._store._records, "the reconnect drops the cached routes")
        with router.transaction("u:1") as tx:  # re-read from the catalog, and working
            tx.execute("INSERT INTO t VALUES (1)")


def test_one_listening_connection_carries_every_hint(pg_dsn: str, root: str) -> None:
    """Route, node-list and session hints share one connection per router: a revoke in another router
    is seen, a tenant change is hinted, and the database shows one LISTENing backend per router."""
    with Router(root, meta=pg_dsn) as a, Router(root, meta=pg_dsn) as b:
        _listening(a)
        _listening(b)
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            listening = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                     "AND query ILIKE 'LISTEN%%'").fetchone()
        assert listening == (2,)
        uid = a.accounts.register("one@example.com", password="correct horse battery staple")
        token = a.sessions.create(uid, ttl=3600)
        assert a.sessions.resolve(token) is not None  # now in a's cache, trusted for up to 30 s without a hint
        b.sessions.revoke(token)
        _until(lambda: a.sessions.resolve(token) is None, "the revoke in b seen by a", timeout=5.0)
