"""Roots made before global schema version 5 kept the app's global tables in global.db: opening such a root
moves them (with their rows, counters, indexes, triggers and views) into app_global.db, once, even when an
earlier attempt was interrupted."""

from __future__ import annotations

import os
from collections.abc import Callable

import apsw
import pytest
from helpers_routers import global_rows

from shardlite import Router
from shardlite.files.app_tables import app_objects
from shardlite.files.catalog import GLOBAL_STEPS

GLOBAL_SCHEMA = [
    "CREATE TABLE rooms(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE)",
    "CREATE TABLE members(room INTEGER NOT NULL REFERENCES rooms(id), user INTEGER NOT NULL)",
    "CREATE INDEX members_by_user ON members(user)",
    "CREATE TABLE audit(what TEXT)",
    "CREATE TRIGGER rooms_audit AFTER INSERT ON rooms BEGIN INSERT INTO audit VALUES ('room ' || NEW.name); END",
    "CREATE VIEW room_sizes AS SELECT room, count(*) AS n FROM members GROUP BY room",
]


def _v4_root(make_router: Callable[..., Router], root: str) -> None:
    """A root laid out as version 4 left it: the app's objects and rows inside global.db, their schema
    version in _shardlite_catalog_meta, no app_global.db."""
    router = make_router(global_schema=GLOBAL_SCHEMA)
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO rooms(name) VALUES ('lobby'), ('gone'), ('kept')")
        tx.execute("DELETE FROM rooms WHERE name = 'gone'")  # AUTOINCREMENT must not hand out 2 again
        tx.execute("INSERT INTO members VALUES (1, 10), (1, 11), (3, 10)")
    router.accounts.register("someone@example.com")
    router.close()
    app = os.path.join(root, "app_global.db")
    meta = apsw.Connection(os.path.join(root, "global.db"))
    try:
        meta.execute("ATTACH DATABASE ? AS app", (app,))
        meta.execute("BEGIN")
        for kind, name, _table, sql in app_objects_in(meta, "app"):
            meta.execute(sql)
            if kind == "table":
                meta.execute(f'INSERT INTO main."{name}" SELECT * FROM app."{name}"')
        meta.execute("INSERT INTO sqlite_sequence SELECT * FROM app.sqlite_sequence")
        meta.execute("INSERT INTO _shardlite_catalog_meta(name, value) VALUES ('app_global_version', ?)",
                     (str(len(GLOBAL_SCHEMA)),))
        meta.execute("PRAGMA user_version = 4")
        meta.execute("COMMIT")
        meta.execute("DETACH DATABASE app")
    finally:
        meta.close()
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(app + suffix):
            os.unlink(app + suffix)


def app_objects_in(conn: apsw.Connection, schema: str) -> list[tuple[str, str, str, str]]:
    rows = conn.execute(f"SELECT type, name, tbl_name, sql FROM {schema}.sqlite_schema WHERE sql IS NOT NULL "
                        "AND name NOT LIKE 'sqlite%' ORDER BY rowid").fetchall()
    tables = [r for r in rows if r[0] == "table"]
    return [*tables, *[r for r in rows if r[0] != "table"]]


def _check_moved(router: Router, root: str) -> None:
    assert router.globals.query("SELECT id, name FROM rooms ORDER BY id") == [(1, "lobby"), (3, "kept")]
    assert router.globals.query("SELECT * FROM room_sizes ORDER BY room") == [(1, 2), (3, 1)]
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO rooms(name) VALUES ('new')")
    assert router.globals.query("SELECT id FROM rooms WHERE name = 'new'") == [(4,)]  # the counter came along
    assert router.globals.query("SELECT what FROM audit ORDER BY rowid")[-1] == ("room new",)  # the trigger too
    indexes = router.globals.query("SELECT name FROM sqlite_schema WHERE type = 'index' AND name = 'members_by_user'")
    assert indexes == [("members_by_user",)]
    assert int(router._store.meta.appdb.read("PRAGMA user_version")[0][0]) == len(GLOBAL_SCHEMA)
    # nothing of the app is left in global.db, and shardlite's own tables are intact
    left = [n for _, n, _, _ in app_objects(router._store.meta.globaldb.writer)]
    assert left == []
    assert global_rows(router, "SELECT value FROM _shardlite_catalog_meta WHERE name = 'app_global_version'") == []
    assert global_rows(router, "PRAGMA user_version") == [(len(GLOBAL_STEPS),)]
    assert router.accounts.by_email("someone@example.com") is not None


def test_opening_a_version_4_root_moves_the_app_tables(make_router: Callable[..., Router], root: str) -> None:
    _v4_root(make_router, root)
    router = make_router(global_schema=GLOBAL_SCHEMA)
    _check_moved(router, root)


def test_the_move_runs_once(make_router: Callable[..., Router], root: str) -> None:
    _v4_root(make_router, root)
    make_router(global_schema=GLOBAL_SCHEMA).close()
    router = make_router()  # no global_schema given: the app's tables stay as they are
    assert router.globals.query("SELECT count(*) FROM rooms") == [(2,)]


@pytest.mark.parametrize("leftover", ["partial copy", "stray file"])
def test_an_interrupted_move_is_redone_from_global_db(make_router: Callable[..., Router], root: str,
                                                      leftover: str) -> None:
    """A crash after the copy into app_global.db but before global.db recorded version 5 leaves global.db
    authoritative: the next opener copies again over whatever the interrupted copy left."""
    _v4_root(make_router, root)
    stale = apsw.Connection(os.path.join(root, "app_global.db"))
    try:
        if leftover == "partial copy":
            stale.execute("CREATE TABLE rooms(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE)")
            stale.execute("INSERT INTO rooms(name) VALUES ('half')")
            stale.execute("CREATE TABLE audit(what TEXT)")
        else:
            stale.execute("PRAGMA user_version = 99")
    finally:
        stale.close()
    router = make_router(global_schema=GLOBAL_SCHEMA)
    _check_moved(router, root)
