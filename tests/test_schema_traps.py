"""No user schema object can reference, shadow or constrain shardlite's tables (issue 13, item 3).

A user table with a foreign key into ``_shardlite_relay(claimed_by)`` made every one of shardlite's own
UPDATEs of that table fail with "foreign key mismatch": the relay stopped for every tenant, and a tenant made
itself undroppable (stuck in ``dropping``). The authorizer is not told what a REFERENCES clause names, so a
transaction in which user SQL changed the schema is checked before it commits; a tenant file that already
holds such an object (made before this check, or by hand) can still be dropped, because the fence runs on
shardlite's own inert connection.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import apsw
import pytest
from helpers_routers import global_rows

from shardlite import AsyncRouter, ConfigurationError, Router, StatementNotAllowed, UnknownTenant

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, x TEXT)"]
KEY = "org:1"

TRAPS = [
    "CREATE TABLE trap(x REFERENCES _shardlite_relay(claimed_by))",
    "CREATE TABLE trap(x INTEGER REFERENCES _shardlite_outbox(seq) ON DELETE RESTRICT)",
    "CREATE TABLE trap(x, FOREIGN KEY (x) REFERENCES _SHARDLITE_META(key))",
    'CREATE TABLE trap(x REFERENCES "_shardlite_inbox"(source))',
    "CREATE TEMP TABLE trap(x REFERENCES _shardlite_relay(claimed_by))",
    "CREATE VIEW trap AS SELECT * FROM t WHERE x IN (SELECT dest FROM _shardlite_outbox)",
    "CREATE TRIGGER trap AFTER INSERT ON t BEGIN SELECT count(*) FROM _shardlite_feed; END",
]


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    return make_router(schema=SCHEMA)


def _objects(router: Router, key: str) -> list[str]:
    return [n for (n,) in router.query(key, "SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite%' "
                                            "AND name NOT LIKE '\\_shardlite%' ESCAPE '\\'")]


@pytest.mark.parametrize("sql", TRAPS)
def test_a_transaction_that_creates_a_trap_is_refused_whole(router: Router, sql: str) -> None:
    with router.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('before')")
    with pytest.raises(StatementNotAllowed, match="may not reference shardlite's own tables"):
        with router.transaction(KEY) as tx:
            tx.execute("INSERT INTO t(x) VALUES ('rolled back')")
            tx.execute(sql)
    assert _objects(router, KEY) == ["t"]
    assert router.query(KEY, "SELECT x FROM t") == [("before",)]
    # shardlite's own writes to the tenant still work: emitting, relaying, acknowledging, dropping
    router.use_feed("note")
    with router.transaction(KEY) as tx:
        tx.emit("user:1", "note", {"n": 1})
    assert router.relay.drain(timeout=30).delivered == 1
    assert [item.payload for item in router.feed("user:1")] == [{"n": 1}]
    router.drop(KEY)
    assert not router.exists(KEY)


def test_the_check_also_guards_nested_blocks_and_run(router: Router) -> None:
    with pytest.raises(StatementNotAllowed):
        with router.transaction(KEY) as outer:
            outer.execute("INSERT INTO t(x) VALUES ('outer')")
            with router.transaction(KEY) as inner:
                inner.execute(TRAPS[0])
    with pytest.raises(StatementNotAllowed):
        router.run(KEY, lambda tx: tx.execute(TRAPS[1]))
    assert _objects(router, KEY) == ["t"]


def test_plain_user_ddl_still_works(router: Router) -> None:
    with router.transaction(KEY) as tx:
        tx.execute("CREATE TABLE parent(id INTEGER PRIMARY KEY)")
        tx.execute("CREATE TABLE child(p INTEGER REFERENCES parent(id))")
        tx.execute("CREATE INDEX child_p ON child(p)")
        tx.execute("CREATE VIEW v AS SELECT * FROM child")
        tx.execute("CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO parent(id) VALUES (NEW.id); END")
        tx.execute("INSERT INTO t(x) VALUES ('fires')")
    assert sorted(_objects(router, KEY)) == ["child", "child_p", "parent", "t", "tr", "v"]


@pytest.mark.parametrize("sql", TRAPS[:3])
def test_async_member_creating_a_trap_fails_alone(root: str, sql: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            async def trap() -> None:
                async with ar.transaction(KEY) as tx:
                    await tx.execute("INSERT INTO t(x) VALUES ('trap member')")
                    await tx.execute(sql)

            async def innocent(n: int) -> None:
                async with ar.transaction(KEY) as tx:
                    await tx.execute("INSERT INTO t(x) VALUES (?)", (f"innocent {n}",))

            results = await asyncio.gather(innocent(1), trap(), innocent(2), return_exceptions=True)
            assert results[0] is None and results[2] is None
            assert isinstance(results[1], StatementNotAllowed)
            rows = await ar.query(KEY, "SELECT x FROM t ORDER BY id")
            assert rows == [("innocent 1",), ("innocent 2",)]
            names = await ar.query(KEY, "SELECT name FROM sqlite_schema WHERE name = 'trap'")
            assert names == []

    asyncio.run(main())


def test_a_file_that_already_holds_a_trap_can_be_dropped(router: Router) -> None:
    """A trap made before the check existed (or by hand): the fence runs on an inert connection."""
    with router.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('a')")
    path = router.locate(KEY).path
    assert path is not None
    raw = apsw.Connection(path)  # no authorizer: what an old version or a hand let through
    try:
        raw.execute("PRAGMA foreign_keys = ON")
        raw.execute("CREATE TABLE trap(x REFERENCES _shardlite_meta(retired))")
        raw.execute("CREATE TRIGGER block BEFORE UPDATE ON _shardlite_meta BEGIN SELECT RAISE(ABORT, 'no'); END")
    finally:
        raw.close()
    router.drop(KEY)  # was: stuck in 'dropping', TenantMoving for ever
    assert not router.exists(KEY)
    assert not os.path.exists(path)
    with pytest.raises(UnknownTenant):
        router.query(KEY, "SELECT 1")


def test_a_user_table_named_like_a_function_does_not_break_the_relay(router: Router) -> None:
    router.use_feed("note")
    with router.transaction("src:1") as tx:
        tx.execute("CREATE TABLE json_each(value)")
        tx.execute("CREATE TABLE json_tree(value)")
        tx.emit("user:2", "note", {"n": 1})
        tx.emit("user:3", "note", {"n": 2})
    stats = router.relay.drain(timeout=30)
    assert stats.delivered == 2 and stats.failed == 0
    assert router.relay.status()["pending"] == 0


def test_schema_steps_cannot_reference_shardlite_tables(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=["CREATE TABLE t(x REFERENCES _shardlite_relay(claimed_by))"])
    with pytest.raises(ConfigurationError, match="reference shardlite's own tables"):
        with router.transaction(KEY):
            pass
    assert not router.exists(KEY)


def test_app_global_tables_cannot_reference_shardlite_tables(make_router: Callable[..., Router]) -> None:
    router = make_router(global_schema=["CREATE TABLE members(account_id INTEGER)"])
    with pytest.raises(StatementNotAllowed, match="may not reference shardlite's own tables"):
        with router.globals.transaction() as tx:
            tx.execute("CREATE TABLE links(account_id INTEGER REFERENCES _shardlite_accounts(id))")
    names = [n for (n,) in router.globals.query("SELECT name FROM sqlite_schema")]
    assert "links" not in names
    uid = router.accounts.register("ok@example.com")
    router.accounts.delete(uid)
    assert global_rows(router, "SELECT count(*) FROM _shardlite_accounts") == [(0,)]
