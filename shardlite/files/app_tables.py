"""Moving the app's global tables out of ``global.db`` into ``app_global.db`` (global schema version 5).

Roots made before version 5 kept the app's own global tables (``Router(global_schema=...)``) in
``global.db``, next to credentials, session digests and the catalog, and user SQL run through
``router.globals`` shared that file's connection. From version 5 the app's tables live in a file of their
own that holds no shardlite table (app SQL never reads or writes shardlite's internal tables); this module
moves them there once, when a process opens the root with this version.

The move runs inside the global DB's upgrade transaction (``BEGIN IMMEDIATE`` on ``global.db``), so any
other process opening the root waits for it and then finds version 5. It copies every app object (tables
with their rows and ``AUTOINCREMENT`` counters, then indexes, triggers and views, in their original order)
into ``app_global.db`` in one transaction of that file, carries the app schema version over, and only
then drops the objects from ``global.db`` in the same global transaction that records version 5. A crash
at any point leaves ``global.db`` at version 4 with the app's tables in it (authoritative); the next
opener copies again over whatever an interrupted copy left in ``app_global.db`` (the same names are dropped
there first), so the tables are never in both places as far as any router is concerned, and never in
neither.
"""

from __future__ import annotations

import os
from typing import Any

import apsw

from .engine import create_private_file
from .globaldb import APP_DB_NAME

__all__ = ["move_app_tables", "app_objects"]

_RESERVED = "_shardlite"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def app_objects(conn: apsw.Connection) -> list[tuple[str, str, str, str]]:
    """``(type, name, table, sql)`` of the app's schema objects in ``conn``'s main DB, in creation order:
    every object with SQL text whose name is neither SQLite's nor shardlite's, and that is not the
    shadow table of a virtual table (copying the virtual table recreates those)."""
    shadows = {str(row[1]) for row in conn.execute("PRAGMA main.table_list") if row[2] == "shadow"}
    rows = conn.execute("SELECT type, name, tbl_name, sql FROM main.sqlite_schema WHERE sql IS NOT NULL "
                        "ORDER BY rowid").fetchall()
    return [(str(t), str(n), str(tbl), str(sql)) for t, n, tbl, sql in rows
            if not str(n).lower().startswith(("sqlite_", _RESERVED)) and str(n) not in shadows
            and not str(tbl).lower().startswith(_RESERVED)]


def move_app_tables(cursor: apsw.Cursor) -> None:
    """The version-5 upgrade step of ``global.db``: run with ``cursor`` on its writer, inside the upgrade
    transaction (see the module doc)."""
    source = cursor.connection
    objects = app_objects(source)
    rows: Any = source.execute("SELECT value FROM _shardlite_catalog_meta WHERE name = 'app_global_version'"
                               ).fetchall()
    version = int(rows[0][0]) if rows else 0
    if objects or version:
        _copy(source, os.path.join(os.path.dirname(source.filename), APP_DB_NAME), objects, version)
    source.execute("PRAGMA defer_foreign_keys = ON")  # app tables referencing each other go in any order
    for kind, name, _table, _sql in reversed(objects):
        if kind in ("table", "view", "trigger"):  # an index goes with its table
            source.execute(f"DROP {kind.upper()} IF EXISTS {_quote(name)}")
    source.execute("DELETE FROM _shardlite_catalog_meta WHERE name = 'app_global_version'")


def _copy(source: apsw.Connection, path: str, objects: list[tuple[str, str, str, str]], version: int) -> None:
    """Copy ``objects`` (with the rows of tables) into the DB at ``path`` in one transaction; the same
    names left there by an interrupted copy are replaced."""
    create_private_file(path)
    dest = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
    try:
        dest.setbusytimeout(5000)
        dest.execute("PRAGMA journal_mode=WAL").fetchall()
        dest.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)  # copied rows must not fire copied triggers
        dest.execute("BEGIN IMMEDIATE")
        try:
            dest.execute("PRAGMA defer_foreign_keys = ON")
            for kind, name, _table, _sql in reversed(app_objects(dest)):
                if kind in ("table", "view", "trigger"):
                    dest.execute(f"DROP {kind.upper()} IF EXISTS {_quote(name)}")
            tables = [(name, sql) for kind, name, _t, sql in objects if kind == "table"]
            for name, sql in tables:
                dest.execute(sql)
                columns = len(source.execute(f"PRAGMA table_info({_quote(name)})").fetchall())  # as SELECT * has
                marks = ", ".join("?" for _ in range(columns))
                dest.executemany(f"INSERT INTO {_quote(name)} VALUES ({marks})",
                                 source.execute(f"SELECT * FROM {_quote(name)}"))
            if tables and source.execute("SELECT 1 FROM sqlite_schema WHERE name = 'sqlite_sequence'").fetchall():
                names = {name for name, _ in tables}
                counters = [(n, s) for n, s in source.execute("SELECT name, seq FROM sqlite_sequence") if n in names]
                if counters:
                    dest.executemany("DELETE FROM sqlite_sequence WHERE name = ?", [(n,) for n, _ in counters])
                    dest.executemany("INSERT INTO sqlite_sequence(name, seq) VALUES (?, ?)", counters)
            for kind, _name, _table, sql in objects:
                if kind != "table":
                    dest.execute(sql)
            dest.execute(f"PRAGMA user_version = {int(version)}")
            dest.execute("COMMIT")
        except BaseException:
            if not dest.get_autocommit():
                dest.execute("ROLLBACK")
            raise
    finally:
        dest.close()
