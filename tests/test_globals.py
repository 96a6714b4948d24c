"""The app's own global tables (``Router(global_schema=[...])``, ``router.globals``): creation and migration,
commit and rollback, read-only queries, and the authorizer that keeps user SQL away from ``_shardlite_*``."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import apsw
import pytest
from helpers_routers import global_rows

from shardlite import AsyncRouter, Router, StatementNotAllowed, TransactionClosed
from shardlite.front.accounts import ScryptParams

FAST = ScryptParams(n=2**8)
SCHEMA = [
    "CREATE TABLE members(account_id INTEGER NOT NULL, room TEXT NOT NULL, PRIMARY KEY (account_id, room))",
    "CREATE INDEX members_by_room ON members(room, account_id)",
]
INTERNAL = ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions", "_shardlite_catalog_meta",
            "_shardlite_nodes", "_shardlite_tenants", "_shardlite_generations")


def app_tables(router: Router) -> list[str]:
    return [row[0] for row in router.globals.query(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_shardlite%' ESCAPE '\\' "
        "AND name NOT LIKE 'sqlite%' ORDER BY name")]


def snapshot(router: Router) -> dict[str, Any]:
    """shardlite's tables in global.db (which app SQL cannot reach) and the app's file as it stands."""
    state: dict[str, Any] = {t: global_rows(router, f"SELECT * FROM {t} ORDER BY 1") for t in INTERNAL}
    state["members"] = router.globals.query("SELECT * FROM members ORDER BY 1, 2")
    state["schema"] = router.globals.query("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name")
    state["temp"] = router.globals.query("SELECT name FROM temp.sqlite_master ORDER BY name")
    state["user_version"] = router.globals.query("PRAGMA user_version")
    state["global_schema"] = global_rows(router, "SELECT name, sql FROM sqlite_master ORDER BY name")
    return state


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    r = make_router(global_schema=SCHEMA)
    r.accounts.scrypt = FAST
    return r


def app_version(router: Router) -> int:
    """The app's global schema version: the number of global_schema steps applied."""
    return int(router._store.meta.appdb.read("PRAGMA user_version")[0][0])


def test_global_schema_creates_the_app_tables(router: Router) -> None:
    assert app_tables(router) == ["members"]
    indexes = router.globals.query("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'members' "
                                   "AND name NOT LIKE 'sqlite_autoindex%'")
    assert indexes == [("members_by_room",)]
    assert app_version(router) == 2


def test_transaction_commits(router: Router) -> None:
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (?, ?)", (1, "lobby"))
        assert tx.lastrowid > 0 and tx.changes == 1
        tx.execute("INSERT INTO members VALUES (:a, :r)", {"a": 2, "r": "lobby"})
        assert tx.execute("SELECT count(*) FROM members").fetchall() == [(2,)]  # own writes visible
        assert router.globals.query("SELECT count(*) FROM members") == [(0,)]  # query: committed data only
    assert router.globals.query("SELECT account_id FROM members WHERE room = ? ORDER BY 1", ("lobby",)) \
        == [(1,), (2,)]
    with pytest.raises(TransactionClosed):
        tx.execute("INSERT INTO members VALUES (3, 'x')")  # the object is dead after its block
    assert router.globals.query("SELECT count(*) FROM members") == [(2,)]


def test_transaction_rolls_back_on_error(router: Router) -> None:
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (1, 'kept')")

    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        with router.globals.transaction() as tx:
            tx.execute("INSERT INTO members VALUES (2, 'gone')")
            tx.execute("DELETE FROM members WHERE room = 'kept'")
            raise Boom
    assert router.globals.query("SELECT * FROM members") == [(1, "kept")]
    with pytest.raises(apsw.ConstraintError):  # the caller's own SQL errors pass through as APSW's
        with router.globals.transaction() as tx:
            tx.execute("INSERT INTO members VALUES (3, 'gone')")
            tx.execute("INSERT INTO members VALUES (1, 'kept')")
    assert router.globals.query("SELECT * FROM members") == [(1, "kept")]
    with router.globals.transaction() as tx:  # the writer is usable again
        tx.execute("INSERT INTO members VALUES (4, 'after')")
    assert router.globals.query("SELECT count(*) FROM members") == [(2,)]


def test_nested_transactions_are_savepoints(router: Router) -> None:
    with router.globals.transaction() as outer:
        outer.execute("INSERT INTO members VALUES (1, 'outer')")
        with pytest.raises(RuntimeError):
            with router.globals.transaction() as inner:
                inner.execute("INSERT INTO members VALUES (2, 'inner')")
                raise RuntimeError
        with router.globals.transaction() as inner:
            inner.execute("INSERT INTO members VALUES (3, 'inner-kept')")
        uid = router.accounts.register("nested@example.com")
        outer.execute("INSERT INTO members VALUES (?, 'acct')", (uid,))
    assert sorted(router.globals.query("SELECT account_id, room FROM members")) == \
        sorted([(1, "outer"), (3, "inner-kept"), (uid, "acct")])
    # accounts live in shardlite's own global.db, apart from the app's tables: registering one inside an app
    # transaction commits on its own (no deadlock; the app's rollback does not undo it)
    with pytest.raises(KeyError):
        with router.globals.transaction() as outer:
            outer.execute("INSERT INTO members VALUES (7, 'rolled back')")
            kept = router.accounts.register("kept@example.com")
            raise KeyError
    assert router.accounts.get(kept) is not None
    assert router.globals.query("SELECT count(*) FROM members WHERE account_id = 7") == [(0,)]


WRITES = [
    "INSERT INTO members VALUES (9, 'x')",
    "UPDATE members SET room = 'y'",
    "DELETE FROM members",
    "REPLACE INTO members VALUES (1, 'lobby')",
    "INSERT INTO members SELECT 10, 'z' RETURNING *",
    "CREATE TABLE sneaky(x)",
    "DROP TABLE members",
    "DROP INDEX members_by_room",
    "CREATE INDEX i2 ON members(room)",
    "ALTER TABLE members ADD COLUMN extra TEXT",
    "CREATE VIEW v AS SELECT 1",
    "CREATE TEMP TABLE t(x)",
    "CREATE TRIGGER tr AFTER INSERT ON members BEGIN SELECT 1; END",
    "DELETE FROM _shardlite_sessions",
    "UPDATE _shardlite_accounts SET email = 'x'",
    "SELECT 1; DELETE FROM members",
    "WITH d AS (SELECT 1) DELETE FROM members",
    "PRAGMA query_only = 0",
    "PRAGMA user_version = 99",
    "PRAGMA journal_mode = DELETE",
    "VACUUM",
    "ANALYZE",
    "REINDEX",
    "BEGIN",
    "SAVEPOINT s",
    "ATTACH DATABASE ':memory:' AS other",
]


@pytest.mark.parametrize("sql", WRITES)
def test_query_is_read_only(router: Router, sql: str) -> None:
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (1, 'lobby')")
    router.accounts.register("someone@example.com", password="some-password")
    before = snapshot(router)
    with pytest.raises((StatementNotAllowed, apsw.SQLError)):  # SQLError: no shardlite table in the app's file
        router.globals.query(sql)
    assert snapshot(router) == before
    assert router.globals.query("SELECT * FROM members") == [(1, "lobby")]  # the reader still works


def test_query_reads_are_allowed(router: Router) -> None:
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (1, 'lobby'), (2, 'lobby'), (2, 'garden')")
    assert router.globals.query("SELECT room, count(*) FROM members GROUP BY room ORDER BY room") == \
        [("garden", 1), ("lobby", 2)]
    assert router.globals.query("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3) "
                                "SELECT i FROM n") == [(1,), (2,), (3,)]
    assert [row[1] for row in router.globals.query("PRAGMA table_info(members)")] == ["account_id", "room"]
    assert router.globals.query("PRAGMA user_version")[0][0] >= 1


PROTECTED_WRITES = [
    "INSERT INTO _shardlite_accounts(email, email_key, created, updated) VALUES ('e@x.org', 'e@x.org', 0, 0)",
    "UPDATE _shardlite_accounts SET email_key = 'hijacked@x.org'",
    "DELETE FROM _shardlite_accounts",
    "UPDATE _shardlite_credentials SET hash = x'00'",
    "DELETE FROM _shardlite_credentials",
    "UPDATE _shardlite_sessions SET revoked = NULL, expires = 1e12",
    "INSERT INTO _shardlite_sessions(token_hash, account_id, created, expires, last_seen) "
    "VALUES (x'01', 1, 0, 1e12, 0)",
    "DELETE FROM _shardlite_sessions",
    "INSERT OR REPLACE INTO _shardlite_catalog_meta(name, value) VALUES ('app_global_version', '0')",
    "UPDATE _shardlite_tenants SET node = 'elsewhere'",
    "DELETE FROM _SHARDLITE_ACCOUNTS",
    "DELETE FROM main._shardlite_sessions",
    "INSERT INTO members SELECT id, 'x' FROM _shardlite_accounts; DELETE FROM _shardlite_sessions",
    "DROP TABLE _shardlite_sessions",
    "DROP INDEX _shardlite_sessions_by_account",
    "ALTER TABLE _shardlite_accounts ADD COLUMN evil TEXT",
    "ALTER TABLE _shardlite_accounts RENAME TO stolen",
    "CREATE INDEX evil ON _shardlite_accounts(email)",
    "CREATE TABLE _shardlite_mine(x)",
    "CREATE TRIGGER evil AFTER INSERT ON _shardlite_sessions BEGIN SELECT 1; END",
    "CREATE TEMP TRIGGER evil AFTER INSERT ON main._shardlite_sessions BEGIN SELECT 1; END",
    "CREATE TEMP VIEW _shardlite_sessions AS SELECT * FROM main._shardlite_sessions",  # shadowing
    "CREATE TEMP TABLE _shardlite_accounts(x)",  # shadowing
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SAVEPOINT mine",
    "RELEASE mine",
    "ATTACH DATABASE ':memory:' AS other",
    "PRAGMA writable_schema = ON",
    "PRAGMA foreign_keys = OFF",
    "PRAGMA journal_mode = DELETE",
    "PRAGMA synchronous = OFF",
    "PRAGMA user_version = 0",
    "SELECT load_extension('x')",
]


@pytest.mark.parametrize("sql", PROTECTED_WRITES)
def test_user_sql_cannot_touch_shardlite_tables_through_globals(router: Router, sql: str) -> None:
    uid = router.accounts.register("victim@example.com", password="victim-password")
    token = router.sessions.create(uid)
    router.sessions.revoke(router.sessions.create(uid))
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (?, 'lobby')", (uid,))
    before = snapshot(router)
    # refused by the authorizer, or (shardlite's tables are not in the app's file) by SQLite itself
    with pytest.raises((StatementNotAllowed, apsw.SQLError)):
        with router.globals.transaction() as tx:
            tx.execute("INSERT INTO members VALUES (99, 'rolled back')")
            tx.execute(sql)
    assert snapshot(router) == before
    assert router.sessions.resolve(token) is not None
    assert router.accounts.authenticate("victim@example.com", "victim-password") == uid
    with router.globals.transaction() as tx:  # the writer is healthy and untrusted state was restored
        tx.execute("INSERT INTO members VALUES (7, 'after')")
        with pytest.raises((StatementNotAllowed, apsw.SQLError)):
            tx.execute("DELETE FROM _shardlite_sessions")


def test_trigger_on_app_table_cannot_write_shardlite_tables(router: Router) -> None:
    """A trigger is user SQL too: firing it from a user write is refused when its body touches _shardlite_*."""
    uid = router.accounts.register("victim@example.com")
    token = router.sessions.create(uid)
    before = snapshot(router)
    with pytest.raises(StatementNotAllowed, match="may not reference shardlite's own tables"):
        with router.globals.transaction() as tx:
            tx.execute("CREATE TRIGGER members_evil AFTER INSERT ON members "
                       "BEGIN DELETE FROM _shardlite_sessions; END")
    assert snapshot(router) == before
    with router.globals.transaction() as tx:  # the trigger is not there to fire
        tx.execute("INSERT INTO members VALUES (1, 'lobby')")
    assert router.sessions.resolve(token) is not None


def test_app_objects_cannot_reach_shardlite_tables(router: Router) -> None:
    """Regression: an app table in the global DB could reference _shardlite_accounts with a cascading
    foreign key and hang a trigger on it that ran during accounts.delete. The app's tables now live in a
    file of their own: no app object can reference, constrain or be fired by a shardlite table."""
    victim = router.accounts.register("victim@example.com", password="victim-password")
    attacker = router.accounts.register("attacker@example.com")
    token = router.sessions.create(victim)
    with pytest.raises(StatementNotAllowed, match="may not reference shardlite's own tables"):
        with router.globals.transaction() as tx:
            tx.execute("CREATE TABLE links(account_id INTEGER REFERENCES _shardlite_accounts(id) ON DELETE CASCADE)")
            tx.execute("CREATE TRIGGER links_gone AFTER DELETE ON links BEGIN "
                       "UPDATE _shardlite_accounts SET email = 'attacker+x@example.com', "
                       "email_key = 'hijacked@example.com' WHERE id != OLD.account_id; END")
    assert "links" not in app_tables(router)
    before = global_rows(router, "SELECT * FROM _shardlite_accounts WHERE id = ?", (victim,))
    router.accounts.delete(attacker)
    assert router.accounts.get(attacker) is None
    assert global_rows(router, "SELECT * FROM _shardlite_accounts WHERE id = ?", (victim,)) == before
    assert router.sessions.resolve(token) is not None
    assert router.accounts.authenticate("victim@example.com", "victim-password") == victim


@pytest.mark.parametrize("sql", [
    "ALTER TABLE members RENAME TO _shardlite_evil",
    "ALTER TABLE members RENAME TO _SHARDLITE_accounts2",
])
def test_user_sql_cannot_rename_into_the_reserved_namespace(router: Router, sql: str) -> None:
    before = snapshot(router)
    with pytest.raises(StatementNotAllowed):
        with router.globals.transaction() as tx:
            tx.execute(sql)
    assert snapshot(router) == before
    assert app_tables(router) == ["members"]


def test_later_router_migrates_added_steps(make_router: Callable[..., Router], root: str) -> None:
    first = make_router(global_schema=SCHEMA)
    with first.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (1, 'lobby')")
    first.close()

    calls: list[int] = []

    def add_rooms(cursor: apsw.Cursor) -> None:  # a callable step
        calls.append(1)
        cursor.execute("CREATE TABLE rooms(name TEXT PRIMARY KEY, topic TEXT)")
        cursor.execute("INSERT INTO rooms SELECT DISTINCT room, NULL FROM members")

    steps = [*SCHEMA, "ALTER TABLE members ADD COLUMN role TEXT NOT NULL DEFAULT 'member'", add_rooms]
    second = make_router(global_schema=steps)
    assert calls == [1]
    assert second.globals.query("SELECT account_id, room, role FROM members") == [(1, "lobby", "member")]
    assert second.globals.query("SELECT * FROM rooms") == [("lobby", None)]
    assert app_version(second) == 4
    second.close()

    third = make_router(global_schema=steps)  # nothing left to run (ALTER would fail if re-run)
    assert calls == [1]
    assert app_tables(third) == ["members", "rooms"]
    third.close()

    fourth = make_router()  # no global_schema: the app's tables stay as they are
    assert app_tables(fourth) == ["members", "rooms"]


def test_failing_global_step_rolls_back_the_whole_migration(make_router: Callable[..., Router],
                                                            root: str) -> None:
    make_router(global_schema=SCHEMA).close()
    with pytest.raises(apsw.SQLError):
        make_router(global_schema=[*SCHEMA, "CREATE TABLE extra(x)", "CREATE TABLE broken("])
    again = make_router(global_schema=SCHEMA)
    assert app_tables(again) == ["members"]  # 'extra' was rolled back with the failing step
    assert app_version(again) == 2


def test_app_tables_live_in_their_own_file_apart_from_shardlites(router: Router, root: str) -> None:
    """App SQL never shares a file (nor a connection) with credentials, sessions or the catalog."""
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO members VALUES (5, 'file')")
    app = apsw.Connection(os.path.join(root, "app_global.db"), flags=apsw.SQLITE_OPEN_READONLY)
    meta = apsw.Connection(os.path.join(root, "global.db"), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert app.execute("SELECT * FROM members").fetchall() == [(5, "file")]
        names = "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
        assert not [n for (n,) in app.execute(names) if n.startswith("_shardlite")]
        assert all(n.startswith("_shardlite") for (n,) in meta.execute(names))
    finally:
        app.close()
        meta.close()


def test_async_globals(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, global_schema=SCHEMA) as ar:
            ar.accounts.sync.scrypt = FAST
            uid = await ar.accounts.register("g@example.com")
            async with ar.globals.transaction() as tx:
                await tx.execute("INSERT INTO members VALUES (?, 'lobby')", (uid,))
                assert tx.changes == 1
                assert await ar.globals.query("SELECT count(*) FROM members") == [(0,)]
            assert await ar.globals.query("SELECT * FROM members") == [(uid, "lobby")]
            with pytest.raises(ValueError):
                async with ar.globals.transaction() as tx:
                    await tx.execute("INSERT INTO members VALUES (2, 'gone')")
                    raise ValueError
            assert await ar.globals.query("SELECT count(*) FROM members") == [(1,)]
            with pytest.raises((StatementNotAllowed, apsw.SQLError)):
                async with ar.globals.transaction() as tx:
                    await tx.execute("DELETE FROM _shardlite_accounts")
            with pytest.raises(StatementNotAllowed):
                await ar.globals.query("DELETE FROM members")
            assert (await ar.accounts.get(uid)) is not None

            async def add(n: int) -> None:
                async with ar.globals.transaction() as tx:
                    await tx.execute("INSERT INTO members VALUES (?, 'crowd')", (n,))
                    await asyncio.sleep(0)  # yield inside the body: other tasks must wait their turn
                    await tx.execute("UPDATE members SET room = 'crowd' WHERE account_id = ?", (n,))

            await asyncio.gather(*(add(100 + n) for n in range(20)))
            assert await ar.globals.query("SELECT count(*) FROM members WHERE room = 'crowd'") == [(20,)]

    asyncio.run(main())
