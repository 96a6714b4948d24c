"""Every statement has a deadline; reads have row and byte caps (issue 13, item 7).

Before: a read had no deadline (an endless recursive CTE ran for ever), and results had no cap (3 M rows
cost 482 MiB before anything could refuse them).
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Callable

import apsw
import pytest

from shardlite import (
    AsyncRouter,
    ConfigurationError,
    PayloadTooLarge,
    QueryTimeout,
    ResultTooLarge,
    Router,
    TransactionClosed,
)
from shardlite.files.limits import FAST_VALUE

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"]
KEY = "org:1"
ENDLESS = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c"
MANY = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < ?) SELECT n FROM c"


@pytest.fixture
def make(make_router: Callable[..., Router]) -> Callable[..., Router]:
    def factory(**kwargs: object) -> Router:
        router = make_router(schema=SCHEMA, **kwargs)
        with router.transaction(KEY) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('seed')")
        return router
    return factory


# -- deadlines ---------------------------------------------------------------------------------------------------


def test_an_endless_read_is_interrupted_at_the_deadline(make: Callable[..., Router]) -> None:
    router = make(statement_timeout=0.2)
    with pytest.raises(QueryTimeout, match="statement_timeout"):
        router.query(KEY, ENDLESS)
    assert router.query(KEY, "SELECT count(*) FROM t") == [(1,)]  # the connection is usable again


def test_an_endless_write_statement_is_interrupted_and_nothing_commits(make: Callable[..., Router]) -> None:
    router = make(statement_timeout=0.2)
    with pytest.raises((QueryTimeout, TransactionClosed)):
        with router.transaction(KEY) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('rolled back')")
            tx.execute(f"INSERT INTO t(v) SELECT n FROM ({ENDLESS.replace('SELECT count(*)', 'SELECT n')})")
    assert router.query(KEY, "SELECT count(*) FROM t") == [(1,)]
    with router.transaction(KEY) as tx:  # the tenant is usable again
        tx.execute("INSERT INTO t(v) VALUES ('after')")
    assert router.query(KEY, "SELECT count(*) FROM t") == [(2,)]


def test_many_short_statements_never_add_up_to_a_timeout(make: Callable[..., Router]) -> None:
    """The clock is per statement: thousands of cheap reads past the deadline in all are fine."""
    router = make(statement_timeout=0.05)
    for _ in range(3):
        for _ in range(2000):
            assert router.query(KEY, "SELECT count(*) FROM t") == [(1,)]
    with router.transaction(KEY) as tx:
        for _ in range(2000):
            tx.execute("SELECT count(*) FROM t").fetchall()


def test_no_deadline_when_statement_timeout_is_none(make: Callable[..., Router]) -> None:
    router = make(statement_timeout=None)
    assert router.query(KEY, "SELECT count(*) FROM (" + MANY + ")", (300_000,)) == [(300_000,)]


def test_map_interrupts_one_tenant_and_goes_on(make: Callable[..., Router]) -> None:
    router = make(statement_timeout=0.2)
    with router.transaction("org:2") as tx:
        tx.execute("INSERT INTO t(v) VALUES ('other')")
    result = router.map("SELECT CASE WHEN (SELECT v FROM t) = 'seed' THEN (" + ENDLESS + ") ELSE 1 END")
    rows = dict(result)
    assert rows == {"org:2": [(1,)]}
    assert "QueryTimeout" in result.errors[KEY]


# -- caps ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 63, 64, 65, 999, 1000])
def test_results_up_to_max_rows_are_whole(make: Callable[..., Router], n: int) -> None:
    router = make(max_rows=1000)
    sql = MANY if n else "SELECT 1 WHERE ? = 0 AND 0"
    assert router.query(KEY, sql, (n,)) == [(i,) for i in range(1, n + 1)]


def test_more_rows_than_max_rows_are_refused_without_holding_them(make: Callable[..., Router]) -> None:
    router = make(max_rows=1000)
    with pytest.raises(ResultTooLarge, match="max_rows=1000"):
        router.query(KEY, MANY, (1001,))
    router = make(max_rows=100_000)
    tracemalloc.start()
    try:
        with pytest.raises(ResultTooLarge, match="max_rows"):
            router.query(KEY, MANY, (3_000_000,))  # 3 M rows cost 482 MiB before the cap existed
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held before the refusal"
    assert router.query(KEY, "SELECT count(*) FROM t") == [(2,)]  # usable again (each make() added a row)


def test_results_past_max_result_bytes_are_refused(make: Callable[..., Router]) -> None:
    router = make(max_result_bytes=1024 * 1024)
    # many small values (measured in chunks) and large values (the measured path) alike
    with pytest.raises(ResultTooLarge, match="max_result_bytes"):
        router.query(KEY, "SELECT zeroblob(1000) FROM (" + MANY + ")", (2000,))
    with pytest.raises(ResultTooLarge, match="max_result_bytes"):
        router.query(KEY, "SELECT zeroblob(100000) FROM (" + MANY + ")", (20,))
    with pytest.raises(ResultTooLarge, match="max_result_bytes"):
        router.query(KEY, "SELECT length(zeroblob(2000000))")  # a value past the cap cannot even be built
    assert len(router.query(KEY, "SELECT zeroblob(1000) FROM (" + MANY + ")", (500,))) == 500


def test_values_larger_than_the_fast_limit_are_read_whole(make: Callable[..., Router]) -> None:
    router = make()
    big = b"\x01" * (FAST_VALUE * 3)
    with router.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(v) VALUES (?)", (big,))
    assert router.query(KEY, "SELECT v FROM t WHERE length(v) > 100") == [(big,)]
    assert router.query(KEY, "SELECT length(v) FROM t WHERE length(v) > 100") == [(len(big),)]


def test_map_caps_each_tenant(make: Callable[..., Router]) -> None:
    router = make(max_rows=10)
    result = router.map(MANY, (11,))
    assert dict(result) == {}
    assert "ResultTooLarge" in result.errors[KEY]


# -- the same under AsyncRouter ----------------------------------------------------------------------------------


def test_async_reads_have_the_deadline_and_the_caps(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, statement_timeout=0.2, max_rows=1000,
                               max_result_bytes=1024 * 1024) as ar:
            async with ar.transaction(KEY) as tx:
                await tx.execute("INSERT INTO t(v) VALUES ('seed')")
            with pytest.raises(QueryTimeout):
                await ar.query(KEY, ENDLESS)
            with pytest.raises(ResultTooLarge):
                await ar.query(KEY, MANY, (1001,))
            with pytest.raises(ResultTooLarge):
                await ar.query(KEY, "SELECT zeroblob(100000) FROM (" + MANY + ")", (20,))
            assert len(await ar.query(KEY, MANY, (1000,))) == 1000
            big = b"\x02" * (FAST_VALUE * 2)
            async with ar.transaction(KEY) as tx:
                await tx.execute("INSERT INTO t(v) VALUES (?)", (big,))
            assert await ar.query(KEY, "SELECT v FROM t WHERE length(v) > 100") == [(big,)]
            assert await ar.query(KEY, "SELECT count(*) FROM t") == [(2,)]

    asyncio.run(main())


def test_a_statement_of_an_async_transaction_is_bounded_on_the_loop(root: str) -> None:
    """Statements of a transaction run on the event loop, stalling every task: loop_statement_timeout."""
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, loop_statement_timeout=0.2) as ar:
            async with ar.transaction(KEY) as tx:
                await tx.execute("INSERT INTO t(v) VALUES ('seed')")
            with pytest.raises((QueryTimeout, apsw.InterruptError, TransactionClosed)):
                async with ar.transaction(KEY) as tx:
                    (await tx.execute(ENDLESS)).fetchall()
            async with ar.transaction(KEY) as tx:
                await tx.execute("INSERT INTO t(v) VALUES ('after')")
            assert await ar.query(KEY, "SELECT count(*) FROM t") == [(2,)]

    asyncio.run(main())


# -- a transaction's outbox ----------------------------------------------------------------------------------------


def test_a_transactions_outbox_is_capped(make_router: Callable[..., Router]) -> None:
    """emit_many had no cap: one transaction wrote 1.2 GB of outbox."""
    router = make_router(schema=SCHEMA, max_outbox_bytes=1024 * 1024)
    dests = [f"user:{i}" for i in range(20_000)]
    with pytest.raises(PayloadTooLarge, match="max_outbox_bytes"):
        with router.transaction(KEY) as tx:
            tx.emit_many(dests, "note", {"text": "x" * 100})
    with pytest.raises(PayloadTooLarge, match="max_outbox_bytes"):
        with router.transaction(KEY) as tx:
            for i in range(2000):  # one by one adds up the same
                tx.emit(f"user:{i}", "note", {"text": "é" * 300})
    assert router.relay.status()["pending"] == 0  # nothing of either transaction was committed
    with router.transaction(KEY) as tx:  # under the cap: fine
        tx.emit_many(dests[:1000], "note", {"text": "x" * 100})
    assert router.relay.status()["pending"] == 1000


def test_max_outbox_bytes_is_checked(make_router: Callable[..., Router]) -> None:
    with pytest.raises(ConfigurationError):
        make_router(schema=SCHEMA, max_payload=4096, max_outbox_bytes=1024)


def test_shardlites_own_statements_never_inherit_an_old_clock(make_router: Callable[..., Router]) -> None:
    """Regression: only user statements restarted the statement clock, so once a connection had lived
    past statement_timeout, shardlite's own statements on it (BEGIN, COMMIT, the relay's deliveries and
    acknowledgements, feed inserts) were interrupted: "InterruptError: interrupted" from the relay."""
    router = make_router(schema=SCHEMA, statement_timeout=0.1, relay=False)
    router.use_feed("note")
    deadline = time.monotonic() + 1.0
    sent = 0
    while time.monotonic() < deadline:  # longer than ten timeouts, on the same connections
        with router.transaction("src:1") as tx:
            for _ in range(20):
                tx.emit("user:dst", "note", {"n": sent})
                sent += 1
        stats = router.relay.run_once()
        assert stats.failed == 0 and stats.dead == 0, router.relay.status()
    router.relay.drain(timeout=30)
    assert len(router.feed("user:dst", limit=1000)) == min(sent, 1000)
    assert router.relay.status()["pending"] == 0
