"""Copying a backup's checked global DB copies into a root (for :mod:`shardlite.restore`).

What comes back: shardlite's accounts, credentials and sessions (into ``global.db``), and the app's whole
global schema with its rows (into ``app_global.db``): its tables, then its indexes, views and triggers, then
its version (``PRAGMA user_version``, the number of the app's ``global_schema`` steps applied). The version
comes back only with the objects its steps made, so the app finds the schema its version promises.

The copies are untrusted: each object's definition must be one statement that creates exactly that object
and nothing else, run first on a scratch in-memory database holding the definitions accepted so far
(:func:`_checked`); the caller has already refused copies whose schema touches shardlite's tables.
"""

from __future__ import annotations

from typing import Any, Final

import apsw

from .copying import inert
from .errors import ShardliteError
from .sanitize import shown
from .store import Store

__all__ = ["copy_globals", "RESTORED_INTERNAL"]

#: shardlite's own global tables a backup brings back (the catalog, nodes, relay and rebalance state
#: describe the old root and are not).
RESTORED_INTERNAL: Final = ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions")

_NOT_SQLITE = "name NOT LIKE 'sqlite^_%' ESCAPE '^'"


def copy_globals(store: Store, src: str, sources: dict[str, tuple[apsw.Connection, str]]) -> dict[str, int]:
    """Copy the checked global copies ``sources`` (``{"global": (conn, label)}``, and ``"app_global"`` when
    the backup has one; older backups kept the app's tables in the ``global`` copy) into the root's global
    DBs; the rows copied per table."""
    try:
        source, label = sources["global"]
        with store.globaldb.write() as conn:
            copied = _copy_tables(source, conn, label, internal=True, scratch=None)
        app_source, app_label = sources.get("app_global", sources["global"])
        scratch = inert(apsw.Connection(":memory:"))
        try:
            with store.appdb.write() as conn:
                copied |= _copy_tables(app_source, conn, app_label, internal=False, scratch=scratch)
                _copy_app_objects(app_source, conn, app_label, scratch)
                _restore_app_version(app_source, conn, app_label)
        finally:
            scratch.close()
        return copied
    except apsw.Error as exc:  # a copy SQLite cannot read, a row the live tables refuse
        raise ShardliteError(f"restoring the global DB from {src} failed ({exc}); fix the cause and retry") from exc


def _copy_tables(source: apsw.Connection, conn: apsw.Connection, label: str, *, internal: bool,
                 scratch: apsw.Connection | None) -> dict[str, int]:
    """Copy tables of ``source`` into the DB open on ``conn``, by column name: with ``internal`` the
    accounts, credentials and sessions (into global.db), else the app's own tables (created from the copy's
    checked definitions, also on ``scratch``, when missing). Returns the rows copied per table."""
    copied: dict[str, int] = {}
    rows = source.execute(f"SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND {_NOT_SQLITE}").fetchall()
    for name, sql in rows:
        table = str(name)
        ours = table.lower().startswith("_shardlite")
        if ours != internal or (ours and table not in RESTORED_INTERNAL):
            continue
        exists = conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (table,)).fetchall()
        if ours and not exists:
            raise ShardliteError(f"the global DB has no {table}")
        if scratch is not None:
            definition = _checked(scratch, "table", table, str(sql or ""), label)
            if not exists:
                conn.execute(definition)
        columns = [str(r[1]) for r in source.execute(f"PRAGMA table_info({_quote(table)})").fetchall()]
        if ours:
            mine = [str(r[1]) for r in conn.execute(f"PRAGMA table_info({_quote(table)})").fetchall()]
            if sorted(map(str.lower, mine)) != sorted(map(str.lower, columns)):
                raise ShardliteError(f"{label} is refused: its {table} has the columns {columns}, not {mine}")
        listed = ", ".join(_quote(c) for c in columns)
        marks = ", ".join("?" for _ in columns)
        found = source.execute(f"SELECT {listed} FROM {_quote(table)}").fetchall()
        if found:
            conn.executemany(f"INSERT OR REPLACE INTO {_quote(table)}({listed}) VALUES ({marks})", found)
        copied[table] = len(found)
    return copied


def _copy_app_objects(source: apsw.Connection, conn: apsw.Connection, label: str, scratch: apsw.Connection) -> None:
    """The app's indexes, views and triggers of ``source`` (in the order they were made), each checked on
    ``scratch`` and created on ``conn`` unless an object of that name is there already. An index SQLite made
    itself (a UNIQUE or PRIMARY KEY constraint's) has no definition and comes with its table."""
    rows = source.execute(f"SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE type IN ('index', 'view', "
                          f"'trigger') AND sql IS NOT NULL AND {_NOT_SQLITE} ORDER BY rowid").fetchall()
    for kind, name, table, sql in rows:
        if str(name).lower().startswith("_shardlite") or str(table).lower().startswith("_shardlite"):
            continue  # shardlite's own (an older backup's global copy): the root has its own
        definition = _checked(scratch, str(kind), str(name), str(sql), label)
        if not conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?", (name,)).fetchall():
            conn.execute(definition)


def _restore_app_version(source: apsw.Connection, conn: apsw.Connection, label: str) -> None:
    """The app's global schema came along: so does its version (``PRAGMA user_version`` of app_global.db; an
    older backup's global copy kept it in ``_shardlite_catalog_meta``)."""
    if _has_table(source, "_shardlite_catalog_meta"):
        found: list[Any] = source.execute(
            "SELECT value FROM _shardlite_catalog_meta WHERE name = 'app_global_version'").fetchall()
    else:
        found = source.execute("PRAGMA user_version").fetchall()
    if not found:
        return
    version = found[0][0]
    if not str(version).isdigit() or int(version) > 1 << 31:
        raise ShardliteError(f"{label} is refused: its app global version is {shown(version)}")
    conn.execute(f"PRAGMA user_version = {int(version)}")


def _has_table(conn: apsw.Connection, name: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (name,)).fetchall())


def _checked(scratch: apsw.Connection, kind: str, name: str, sql: str, label: str) -> str:
    """``sql`` when it is one statement that creates the ``kind`` object ``name`` and nothing else, run
    whole without error on ``scratch`` (which keeps it, for the definitions after it); else
    :class:`ShardliteError`."""
    statements: list[str] = []

    def one(_cursor: apsw.Cursor, text: str, _bindings: Any) -> bool:
        statements.append(text)
        return len(statements) == 1

    query = f"SELECT type, name FROM sqlite_schema WHERE sql IS NOT NULL AND {_NOT_SQLITE}"
    before = set(scratch.execute(query).fetchall())
    cursor = scratch.cursor()
    cursor.exec_trace = one
    scratch.execute("SAVEPOINT checked")
    try:
        cursor.execute(sql).fetchall()
        made = set(scratch.execute(query).fetchall()) - before
        failed = len(statements) != 1 or made != {(kind, name)}
    except apsw.Error:  # a second statement (refused by the tracer, or failing to prepare), bad SQL
        failed = True
    if failed:
        scratch.execute("ROLLBACK TO checked")
    scratch.execute("RELEASE checked")
    if failed:
        raise ShardliteError(f"{label} is refused: the definition of its {kind} {shown(name)} is not one CREATE "
                             f"{kind.upper()} statement")
    return sql


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
