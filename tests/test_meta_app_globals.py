"""Conformance: :class:`~shardlite.meta.app_globals.AppGlobals` over every metadata backend (the ``meta``
fixture), through the contract only."""

from __future__ import annotations

import apsw
import pytest
from helpers_meta import open_meta
from helpers_threads import race

from shardlite import ShardliteError, StatementNotAllowed
from shardlite.meta import MetaStore

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = "app_globals"


STEPS = ["CREATE TABLE members(conv TEXT, user TEXT, PRIMARY KEY(conv, user))",
         "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]


def test_migrate_and_version(meta: MetaStore) -> None:
    assert meta.app_globals.version() == 0
    meta.app_globals.migrate(STEPS[:1])
    assert meta.app_globals.version() == 1
    meta.app_globals.migrate(STEPS)  # only the missing step runs (a rerun of the first would fail)
    assert meta.app_globals.version() == 2
    meta.app_globals.migrate(STEPS[:1])  # fewer steps than the version: nothing happens
    assert meta.app_globals.version() == 2


def test_concurrent_migrators_apply_each_step_once(meta_backend: str, root: str, meta: MetaStore) -> None:
    stores = [open_meta(meta_backend, root, create=False) for _ in range(4)]
    try:
        results = race(4, lambda i: stores[i].app_globals.migrate(STEPS))
    finally:
        for store in stores:
            store.close()
    assert results == [None] * 4 and meta.app_globals.version() == 2


def test_transaction_commits_or_rolls_back_whole(meta: MetaStore) -> None:
    meta.app_globals.migrate(STEPS)
    with meta.app_globals.transaction() as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('a')")
        assert tx.lastrowid == 1 and tx.changes == 1
        tx.execute("INSERT INTO members VALUES ('c', 'u')")
    with pytest.raises(RuntimeError), meta.app_globals.transaction() as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('b')")
        raise RuntimeError
    assert meta.app_globals.query("SELECT body FROM notes ORDER BY id") == [("a",)]


def test_a_nested_transaction_is_a_savepoint(meta: MetaStore) -> None:
    meta.app_globals.migrate(STEPS)
    with meta.app_globals.transaction() as outer:
        outer.execute("INSERT INTO notes(body) VALUES ('outer')")
        with pytest.raises(RuntimeError), meta.app_globals.transaction() as inner:
            inner.execute("INSERT INTO notes(body) VALUES ('inner')")
            raise RuntimeError
        with meta.app_globals.transaction() as inner:
            inner.execute("INSERT INTO notes(body) VALUES ('kept')")
    assert meta.app_globals.query("SELECT body FROM notes ORDER BY id") == [("outer",), ("kept",)]


def test_writers_are_serialised(meta: MetaStore) -> None:
    meta.app_globals.migrate(STEPS)

    def bump(_: int) -> None:
        for _ in range(25):
            with meta.app_globals.transaction() as tx:
                (n,) = tx.execute("SELECT count(*) FROM notes").fetchone()
                tx.execute("INSERT INTO notes(id, body) VALUES (?, 'x')", (n + 1,))

    assert race(4, bump) == [None] * 4
    assert meta.app_globals.query("SELECT count(*), max(id) FROM notes") == [(100, 100)]


@pytest.mark.parametrize("sql", ["BEGIN", "ATTACH 'x.db' AS x", "PRAGMA journal_mode = DELETE",
                                 "CREATE TABLE _shardlite_x(a)"])
def test_the_authorizer_guards_the_app_sql(meta: MetaStore, sql: str) -> None:
    with pytest.raises(StatementNotAllowed), meta.app_globals.transaction() as tx:
        tx.execute(sql)


def test_query_reads_committed_data_and_never_writes(meta: MetaStore) -> None:
    meta.app_globals.migrate(STEPS)
    with meta.app_globals.transaction() as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('a')")
        assert meta.app_globals.query("SELECT count(*) FROM notes") == [(0,)]  # not committed yet
    with pytest.raises((StatementNotAllowed, apsw.ReadOnlyError)):
        meta.app_globals.query("DELETE FROM notes")
    assert meta.app_globals.query("SELECT count(*) FROM notes") == [(1,)]


def test_table_with_rows_and_clear(meta: MetaStore) -> None:
    assert meta.app_globals.table_with_rows() is None
    meta.app_globals.migrate(STEPS)
    assert meta.app_globals.table_with_rows() is None
    with meta.app_globals.transaction() as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('a')")
    assert meta.app_globals.table_with_rows() == "notes"
    meta.app_globals.clear(1)
    assert meta.app_globals.table_with_rows() is None and meta.app_globals.version() == 1
    assert meta.app_globals.query("SELECT count(*) FROM notes") == [(0,)]  # the tables stay


def test_import_sqlite(meta: MetaStore) -> None:
    source = apsw.Connection(":memory:")
    for step in STEPS:
        source.execute(step)
    source.execute("CREATE INDEX notes_by_body ON notes(body)")
    source.execute("INSERT INTO notes(body) VALUES ('from the backup')")
    source.execute("PRAGMA user_version = 2")
    try:
        copied = meta.app_globals.import_sqlite(source, "the copy")
    finally:
        source.close()
    assert copied == {"members": 0, "notes": 1}
    assert meta.app_globals.version() == 2
    assert meta.app_globals.query("SELECT body FROM notes INDEXED BY notes_by_body") == [("from the backup",)]


def test_import_sqlite_refuses_a_definition_doing_more_than_creating_its_object(meta: MetaStore) -> None:
    source = apsw.Connection(":memory:")
    source.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)")
    source.execute("CREATE VIEW v AS SELECT 1")
    source.execute("PRAGMA writable_schema = ON")
    source.execute("UPDATE sqlite_schema SET sql = 'CREATE VIEW w AS SELECT 1' WHERE name = 'v'")
    source.execute("PRAGMA writable_schema = OFF")
    try:
        with pytest.raises(ShardliteError, match="the copy is refused"):
            meta.app_globals.import_sqlite(source, "the copy")
    finally:
        source.close()
    assert meta.app_globals.query("SELECT name FROM sqlite_schema WHERE name IN ('notes', 'v', 'w')") == []
