"""The app's global tables in ``<root>/app_global.db``: :class:`SqliteAppGlobals`, the
:class:`~shardlite.meta.app_globals.AppGlobals` of every backend for now (see that module).

Writes take the one writer of ``app_global.db`` (:class:`~shardlite.files.globaldb.GlobalDB` with ``user_sql``:
BEGIN IMMEDIATE, a savepoint when nested, the body under the authorizer); reads run on this thread's
``query_only`` reader. The version is the file's ``PRAGMA user_version``.

:meth:`SqliteAppGlobals.import_sqlite` copies a backup's app schema and rows. The copy is untrusted: each
object's definition must be one statement that creates exactly that object and nothing else, run first on a
scratch in-memory database holding the definitions accepted so far (:func:`_checked`); the caller has
already refused copies whose schema touches shardlite's tables. The version comes back only with the
objects its steps made, so the app finds the schema its version promises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw

from ...errors import ShardliteError
from ...files.authorizer import INTERNAL_SQL as _I
from ...files.copying import inert
from ...files.globaldb import GlobalDB
from ...files.sanitize import shown
from ...files.schema import Step, run_step
from ...front.transaction import Params, Transaction
from ..app_globals import AppGlobals

__all__ = ["SqliteAppGlobals", "quote_name", "NOT_SQLITE"]

#: Excludes SQLite's own objects from a ``sqlite_schema`` query.
NOT_SQLITE = "name NOT LIKE 'sqlite^_%' ESCAPE '^'"
_TABLES = f"SELECT name FROM sqlite_schema WHERE type = 'table' AND {NOT_SQLITE}"


def quote_name(name: str) -> str:
    """``name`` as an SQL identifier."""
    return '"' + name.replace('"', '""') + '"'


class _Scope:
    """``with app_globals.transaction() as tx``: the writer's transaction around a :class:`Transaction`."""

    __slots__ = ("_write", "_tx")

    def __init__(self, db: GlobalDB) -> None:
        self._write = db.write(trusted=False)
        self._tx: Transaction | None = None

    def __enter__(self) -> Transaction:
        conn = self._write.__enter__()
        self._tx = Transaction("<global>", conn)
        return self._tx

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        assert self._tx is not None
        self._tx._close()
        self._write.__exit__(et, ev, tb)


class SqliteAppGlobals:
    """``meta.app_globals`` on ``app_global.db`` (``db``: its :class:`GlobalDB`, opened with ``user_sql``)."""

    def __init__(self, db: GlobalDB) -> None:
        self._db = db

    def transaction(self) -> _Scope:
        return _Scope(self._db)

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self._db.read(sql, params)

    def migrate(self, steps: Sequence[Step]) -> None:
        # trusted: the app's own code; the steps' number is the file's PRAGMA user_version
        with self._db.write() as conn:
            found: Any = conn.execute(_I + "PRAGMA user_version").fetchall()[0][0]
            version = int(found)
            for step in steps[version:]:
                run_step(conn, step)
            if version < len(steps):
                conn.execute(f"{_I}PRAGMA user_version = {int(len(steps))}")

    def version(self) -> int:
        return int(self._db.read("PRAGMA user_version")[0][0])

    def table_with_rows(self) -> str | None:
        tables: Any = self._db.read(_TABLES)
        for (table,) in tables:
            if self._db.read(f"SELECT 1 FROM {quote_name(str(table))} LIMIT 1"):
                return str(table)
        return None

    def clear(self, version: int) -> None:
        with self._db.write() as conn:
            tables: Any = conn.execute(_TABLES).fetchall()
            for (table,) in tables:
                conn.execute(f"DELETE FROM {quote_name(str(table))}")
            conn.execute(f"PRAGMA user_version = {int(version)}")

    def import_sqlite(self, source: apsw.Connection, label: str) -> dict[str, int]:
        scratch = inert(apsw.Connection(":memory:"))
        try:
            with self._db.write() as conn:
                copied = _copy_tables(source, conn, label, scratch)
                _copy_objects(source, conn, label, scratch)
                _copy_version(source, conn, label)
        finally:
            scratch.close()
        return copied


def _copy_tables(source: apsw.Connection, conn: apsw.Connection, label: str,
                 scratch: apsw.Connection) -> dict[str, int]:
    """The app's tables of ``source`` (created from its checked definitions, also on ``scratch``, when
    missing) and their rows, by column name; the rows copied per table. shardlite's own tables (an older
    backup's global copy holds them) are not the app's and are skipped."""
    copied: dict[str, int] = {}
    rows = source.execute(f"SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND {NOT_SQLITE}").fetchall()
    for name, sql in rows:
        table = str(name)
        if table.lower().startswith("_shardlite"):
            continue
        exists = conn.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = ?", (table,)).fetchall()
        definition = _checked(scratch, "table", table, str(sql or ""), label)
        if not exists:
            conn.execute(definition)
        columns = [str(r[1]) for r in source.execute(f"PRAGMA table_info({quote_name(table)})").fetchall()]
        listed = ", ".join(quote_name(c) for c in columns)
        marks = ", ".join("?" for _ in columns)
        found = source.execute(f"SELECT {listed} FROM {quote_name(table)}").fetchall()
        if found:
            conn.executemany(f"INSERT OR REPLACE INTO {quote_name(table)}({listed}) VALUES ({marks})", found)
        copied[table] = len(found)
    return copied


def _copy_objects(source: apsw.Connection, conn: apsw.Connection, label: str, scratch: apsw.Connection) -> None:
    """The app's indexes, views and triggers of ``source`` (in the order they were made), each checked on
    ``scratch`` and created on ``conn`` unless an object of that name is there already. An index SQLite made
    itself (a UNIQUE or PRIMARY KEY constraint's) has no definition and comes with its table."""
    rows = source.execute(f"SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE type IN ('index', 'view', "
                          f"'trigger') AND sql IS NOT NULL AND {NOT_SQLITE} ORDER BY rowid").fetchall()
    for kind, name, table, sql in rows:
        if str(name).lower().startswith("_shardlite") or str(table).lower().startswith("_shardlite"):
            continue  # shardlite's own (an older backup's global copy): the root has its own
        definition = _checked(scratch, str(kind), str(name), str(sql), label)
        if not conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?", (name,)).fetchall():
            conn.execute(definition)


def _copy_version(source: apsw.Connection, conn: apsw.Connection, label: str) -> None:
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

    query = f"SELECT type, name FROM sqlite_schema WHERE sql IS NOT NULL AND {NOT_SQLITE}"
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


def _conforms(app_globals: SqliteAppGlobals) -> AppGlobals:
    return app_globals  # mypy checks here that SqliteAppGlobals satisfies the AppGlobals contract
