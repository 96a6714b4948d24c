"""App SQL is untrusted: it never reaches shardlite's internal tables, and no statement runs after its block.

Regressions of an adversarial review (issue 13, items 1, 2 and 4): a cursor returned from
``router.globals.transaction()`` ran its second statement after the block, trusted, in autocommit, and
overwrote a password hash; app SQL read every credential and could rewind ``sqlite_sequence``; tenant
cursors stepped after their block wrote without the lock or the fence, and an unconsumed one broke the next
caller's transaction; an error text leaked the group commit's savepoint secret, with which a query froze the
shared read connection's snapshot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import apsw
import pytest
from helpers_routers import global_rows

from shardlite import AsyncRouter, Router, ShardliteError, StatementNotAllowed
from shardlite.files.authorizer import INTERNAL_SQL, SAVEPOINT_PREFIX
from shardlite.front.accounts import ScryptParams

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT UNIQUE)"]
GLOBAL_SCHEMA = ["CREATE TABLE members(account_id INTEGER NOT NULL, room TEXT NOT NULL)"]
FAST = ScryptParams(n=2**4, r=1, p=1)
KEY = "org:1"


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    r = make_router(schema=SCHEMA, global_schema=GLOBAL_SCHEMA)
    r.accounts.scrypt = FAST
    return r


def _texts(exc: BaseException | None) -> str:
    """Every message of an exception's chain a traceback shows (a context raised ``from None`` is not)."""
    seen = []
    while exc is not None:
        seen.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__
    return "\n".join(seen)


# -- item 1: router.globals never runs with shardlite's trust -------------------------------------------------


def test_a_global_cursor_stepped_after_its_block_cannot_take_over_an_account(router: Router) -> None:
    victim = router.accounts.register("victim@example.com", password="victim-password")

    def leak() -> apsw.Cursor:
        with router.globals.transaction() as tx:
            return tx.execute("SELECT 1; UPDATE _shardlite_credentials SET hash = x'00', salt = x'00'")

    cursor = leak()
    with pytest.raises(apsw.Error):
        list(cursor)  # the block has ended: its cursor is closed, the UPDATE never runs
    assert router.accounts.authenticate("victim@example.com", "victim-password") == victim


def test_a_global_cursor_stepped_after_its_block_writes_nothing(router: Router) -> None:
    def leak() -> apsw.Cursor:
        with router.globals.transaction() as tx:
            cur = tx.execute("SELECT 1; INSERT INTO members VALUES (66, 'late')")
            assert next(cur) == (1,)
            return cur

    cursor = leak()
    with pytest.raises(apsw.CursorClosedError):
        list(cursor)
    assert router.globals.query("SELECT count(*) FROM members") == [(0,)]
    with router.globals.transaction() as tx:  # the writer is healthy
        tx.execute("INSERT INTO members VALUES (1, 'after')")
    assert router.globals.query("SELECT * FROM members") == [(1, "after")]


def test_async_global_cursor_stepped_after_its_block_writes_nothing(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, global_schema=GLOBAL_SCHEMA) as ar:
            ar.accounts.sync.scrypt = FAST
            victim = await ar.accounts.register("victim@example.com", password="victim-password")
            async with ar.globals.transaction() as tx:
                cur = await tx.execute("SELECT 1; UPDATE _shardlite_credentials SET hash = x'00'")
            with pytest.raises(apsw.Error):
                list(cur)
            async with ar.globals.transaction() as tx:
                late = await tx.execute("SELECT 1; INSERT INTO members VALUES (66, 'late')")
            with pytest.raises(apsw.CursorClosedError):
                list(late)
            assert await ar.globals.query("SELECT count(*) FROM members") == [(0,)]
            assert await ar.accounts.authenticate("victim@example.com", "victim-password") == victim

    asyncio.run(main())


@pytest.mark.parametrize("sql", [
    "SELECT hash, salt FROM _shardlite_credentials",
    "SELECT token_hash FROM _shardlite_sessions",
    "SELECT email FROM _shardlite_accounts",
    "SELECT key, node FROM _shardlite_tenants",
    "SELECT * FROM main._shardlite_credentials",
])
def test_app_sql_cannot_read_credentials_sessions_or_the_catalog(router: Router, sql: str) -> None:
    uid = router.accounts.register("someone@example.com", password="some-password")
    router.sessions.create(uid)
    with router.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('a')")
    with pytest.raises((StatementNotAllowed, apsw.SQLError)):  # SQLError: no such table in the app's file
        router.globals.query(sql)
    with pytest.raises((StatementNotAllowed, apsw.SQLError)):
        with router.globals.transaction() as tx:
            tx.execute(sql).fetchall()
    names = [n for (n,) in router.globals.query("SELECT name FROM sqlite_schema")]
    assert not [n for n in names if n.lower().startswith("_shardlite")]


def test_app_sql_cannot_rewind_account_ids(router: Router) -> None:
    """sqlite_sequence of shardlite's accounts is out of app SQL's reach: a new account never receives a
    deleted account's id (and with it that id's user:<id> tenant)."""
    router.accounts.register("first@example.com")
    gone = router.accounts.register("gone@example.com")
    router.accounts.delete(gone)
    for sql in ("UPDATE sqlite_sequence SET seq = 0",
                "INSERT INTO sqlite_sequence(name, seq) VALUES ('_shardlite_accounts', 0)",
                "DELETE FROM sqlite_sequence"):
        try:
            with router.globals.transaction() as tx:
                tx.execute(sql)
        except (StatementNotAllowed, apsw.SQLError):
            pass  # refused is fine too: what matters is the next id
    assert router.accounts.register("new@example.com") > gone


# -- item 2: no statement runs after its block -----------------------------------------------------------------


def test_a_tenant_cursor_stepped_after_its_block_writes_nothing(router: Router) -> None:
    def leak() -> apsw.Cursor:
        with router.transaction(KEY) as tx:
            cur = tx.execute("SELECT 1; INSERT INTO t(x) VALUES ('late')")
            assert next(cur) == (1,)
            return cur

    cursor = leak()
    with pytest.raises(apsw.CursorClosedError):
        list(cursor)
    with pytest.raises(apsw.CursorClosedError):
        cursor.execute("INSERT INTO t(x) VALUES ('through the old cursor')")
    assert router.query(KEY, "SELECT count(*) FROM t") == [(0,)]


def test_an_unconsumed_cursor_does_not_break_the_next_transaction(router: Router) -> None:
    with router.transaction(KEY) as tx:
        tx.execute("SELECT 1; INSERT INTO t(x) VALUES ('never stepped')")  # dropped unconsumed
    with router.transaction(KEY) as tx:  # was: IncompleteExecutionError
        tx.execute("INSERT INTO t(x) VALUES ('next')")
    with router.transaction(KEY) as tx:  # the same inside one transaction
        tx.execute("SELECT 1; INSERT INTO t(x) VALUES ('dropped too')")
        tx.execute("INSERT INTO t(x) VALUES ('same block')")
    assert router.query(KEY, "SELECT x FROM t ORDER BY id") == [("next",), ("same block",)]


def test_cursors_held_across_statements_keep_their_rows_inside_the_block(router: Router) -> None:
    with router.transaction(KEY) as tx:
        tx.executemany("INSERT INTO t(x) VALUES (?)", [("a",), ("b",), ("c",)])
        held = tx.execute("SELECT x FROM t ORDER BY id")
        assert next(held) == ("a",)
        assert tx.execute("SELECT count(*) FROM t").fetchall() == [(3,)]  # another cursor: `held` keeps its place
        assert [r[0] for r in held] == ["b", "c"]
        tx.execute("INSERT INTO t(x) VALUES ('d')")
        many = tx.executemany("INSERT INTO t(x) VALUES (?)", [("e",)])
    with pytest.raises(apsw.CursorClosedError):
        many.execute("INSERT INTO t(x) VALUES ('via executemany cursor')")
    assert [r[0] for r in router.query(KEY, "SELECT x FROM t ORDER BY id")] == ["a", "b", "c", "d", "e"]


def test_async_cursors_never_run_in_another_transaction_of_the_batch(root: str) -> None:
    """A member's cursor stepped after its block would run inside the next member's savepoint."""
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            leaked: list[apsw.Cursor] = []

            async def first() -> None:
                async with ar.transaction(KEY) as tx:
                    cur = await tx.execute("SELECT 1; INSERT INTO t(x) VALUES ('late')")
                    assert next(cur) == (1,)
                    leaked.append(cur)

            async def second() -> None:
                async with ar.transaction(KEY) as tx:
                    await tx.execute("INSERT INTO t(x) VALUES ('second')")
                    with pytest.raises(apsw.CursorClosedError):
                        list(leaked[0])

            await asyncio.gather(first(), second())
            async with ar.transaction(KEY) as tx:
                await tx.execute("SELECT 1; SELECT 2")  # dropped unconsumed
            async with ar.transaction(KEY) as tx:
                await tx.execute("INSERT INTO t(x) VALUES ('after')")
            assert await ar.query(KEY, "SELECT x FROM t ORDER BY id") == [("second",), ("after",)]

    asyncio.run(main())


def test_a_select_left_unfinished_keeps_no_snapshot_of_the_connection(make_router: Callable[..., Router],
                                                                       root: str) -> None:
    """``tx.execute("SELECT ...").fetchone()`` leaves SQLite's statement active after the COMMIT: it kept an
    old snapshot of the pooled write connection, so once another connection wrote, the tenant's next
    BEGIN IMMEDIATE failed (Busy) and its checkpoints could not finish."""
    mine = make_router(schema=SCHEMA)
    other = make_router(schema=SCHEMA)  # its own connections, as another process would have
    with mine.transaction(KEY) as tx:
        tx.executemany("INSERT INTO t(x) VALUES (?)", [("a",), ("b",)])
    with mine.transaction(KEY) as tx:
        assert tx.execute("SELECT x FROM t ORDER BY id").fetchone() == ("a",)
    with other.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('other')")
    with mine.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('mine again')")
        assert tx.execute("SELECT count(*) FROM t").fetchall() == [(4,)]


# -- item 4: internal names never reach callers; no user SQL leaves a connection in a transaction -------------


def test_rolled_back_batches_do_not_leak_the_savepoint_secret(root: str) -> None:
    async def main() -> list[str]:
        texts = []
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            async with ar.transaction(KEY) as tx:
                await tx.execute("INSERT INTO t(x) VALUES ('taken')")
            for nested in (False, True):
                try:
                    async with ar.transaction(KEY) as tx:
                        if nested:
                            async with ar.transaction(KEY) as inner:
                                with pytest.raises(apsw.ConstraintError):
                                    await inner.execute("INSERT OR ROLLBACK INTO t(x) VALUES ('taken')")
                        else:
                            with pytest.raises(apsw.ConstraintError):
                                await tx.execute("INSERT OR ROLLBACK INTO t(x) VALUES ('taken')")
                except ShardliteError as exc:
                    texts.append(_texts(exc))
                else:
                    raise AssertionError("a transaction SQLite rolled back reported success")
            async with ar.transaction(KEY) as tx:  # the tenant is usable afterwards
                await tx.execute("INSERT INTO t(x) VALUES ('after')")
            assert await ar.query(KEY, "SELECT x FROM t ORDER BY id") == [("taken",), ("after",)]
        return texts

    texts = asyncio.run(main())
    assert len(texts) == 2
    for text in texts:
        assert "rolled back" in text
        assert SAVEPOINT_PREFIX not in text and INTERNAL_SQL.strip() not in text


def test_sync_rollback_by_sqlite_is_reported_without_internal_names(router: Router) -> None:
    with router.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('taken')")
    with pytest.raises(ShardliteError, match="rolled back by SQLite") as caught:
        with router.transaction(KEY) as tx:
            with pytest.raises(apsw.ConstraintError):
                tx.execute("INSERT OR ROLLBACK INTO t(x) VALUES ('taken')")
    assert SAVEPOINT_PREFIX not in _texts(caught.value)


@pytest.mark.parametrize("sql", [
    f"SAVEPOINT {SAVEPOINT_PREFIX}x",
    f"SAVEPOINT {SAVEPOINT_PREFIX}m; SELECT 1",
    "SAVEPOINT x",
    "BEGIN",
], ids=["secret-savepoint", "secret-savepoint-then-select", "savepoint", "begin"])  # the secret differs per process
def test_reads_cannot_open_a_transaction_even_with_the_secret(make_router: Callable[..., Router], sql: str) -> None:
    """With the secret, a query used to leave the shared read connection inside a transaction: every reader
    then saw a frozen snapshot and the WAL grew without bound."""
    router = make_router(schema=SCHEMA, global_schema=GLOBAL_SCHEMA)
    with router.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('a')")
    assert router.query(KEY, "SELECT count(*) FROM t") == [(1,)]
    with pytest.raises(StatementNotAllowed):
        router.query(KEY, sql)
    with pytest.raises(StatementNotAllowed):
        router.globals.query(sql)
    for i in range(5):
        with router.transaction(KEY) as tx:
            tx.execute("INSERT INTO t(x) VALUES (?)", (f"later {i}",))
    assert router.query(KEY, "SELECT count(*) FROM t") == [(6,)]  # not a frozen snapshot


def test_global_metadata_keeps_its_own_reads(router: Router) -> None:
    """shardlite's own global reads still work (they run on connections app SQL never reaches)."""
    uid = router.accounts.register("reader@example.com", password="reader-password")
    router.sessions.create(uid)
    assert router.sessions.count_live(uid) == 1
    assert router.accounts.has_password(uid)
    assert global_rows(router, "SELECT count(*) FROM _shardlite_accounts") == [(1,)]


