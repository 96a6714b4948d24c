"""Change hints across processes (``shardlite.meta.postgres.listen.Listener``) on a real server: every
NOTIFY arrives, a reset follows every reconnect (hints sent meanwhile are lost, so caches must re-read), and
close is prompt."""

from __future__ import annotations

import queue
import time

import psycopg
from helpers_pg import separate_server

from shardlite.meta.postgres.listen import POLL, Listener


def _listener(dsn: str, got: queue.Queue[tuple[str, str]]) -> Listener:
    return Listener(dsn, "test", ["hints_a", "hints_b"], lambda ch, payload: got.put((ch, payload)),
                    lambda: got.put(("reset", "")))


def test_hints_arrive_and_a_reset_comes_first(pg_dsn: str) -> None:
    got: queue.Queue[tuple[str, str]] = queue.Queue()
    listener = _listener(pg_dsn, got)
    listener.start()
    try:
        assert got.get(timeout=10) == ("reset", "") and listener.connected
        with psycopg.connect(pg_dsn, autocommit=True) as conn:
            with conn.transaction():
                conn.execute("SELECT pg_notify('hints_a', 'k:1')")
                conn.execute("SELECT pg_notify('hints_b', 'k:ü')")
            with conn.transaction():  # a rolled-back change sends nothing
                conn.execute("SELECT pg_notify('hints_a', 'never')")
                raise psycopg.Rollback
            conn.execute("SELECT pg_notify('hints_a', 'k:2')")
        assert [got.get(timeout=10) for _ in range(3)] == [("hints_a", "k:1"), ("hints_b", "k:ü"),
                                                            ("hints_a", "k:2")]
    finally:
        started = time.monotonic()
        listener.close()
        assert time.monotonic() - started < POLL + 5
    assert not listener.connected


def test_a_reconnect_after_the_server_died_resets(tmp_path: object) -> None:
    with separate_server() as server:
        got: queue.Queue[tuple[str, str]] = queue.Queue()
        listener = _listener(server.dsn(), got)
        listener.start()
        try:
            assert got.get(timeout=10) == ("reset", "")
            server.kill()
            server.start()
            assert got.get(timeout=30) == ("reset", "")  # reconnected: whatever was missed must be re-read
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                conn.execute("SELECT pg_notify('hints_a', 'after')")
            assert got.get(timeout=10) == ("hints_a", "after")
        finally:
            listener.close()
