"""A PostgreSQL root's metadata exported into a SQLite file of ``global.db``'s own schema (for backups).

A backup holds the metadata as a ``global.db`` copy whichever backend the root uses, so restore, its checks
of untrusted copies, and old backups work the same way. The export reads every table in one
``REPEATABLE READ`` transaction (one snapshot), and writes the rows of this root: its nodes, the tenants on
them, and the database-wide rest (generations, accounts, credentials, sessions, pending work, dead letters,
the journal); the never-reused counters go into ``sqlite_sequence`` as the identity sequences stand.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import sql

from ...files.engine import Settings
from ...files.globaldb import GLOBAL_DB_NAME
from ..sqlite.meta import SqliteMeta
from ..tables import TABLES, Table
from .connect import Pool

__all__ = ["exported_global"]

_TEXT_KEYS = ("name", "key", "source", "incarnation")


@contextmanager
def exported_global(pool: Pool, root_id: str, directory: str) -> Iterator[str]:
    """Yield the path of a fresh SQLite file in a private temporary folder under ``directory`` holding the
    metadata as ``global.db`` would (see the module doc); the folder is removed afterwards."""
    scratch = tempfile.mkdtemp(prefix=".meta-export-", dir=directory)
    try:
        meta = SqliteMeta(scratch, Settings())  # global.db's own schema, by global.db's own steps
        meta.open(create=True, default_nodes=())
        try:
            with pool.connection() as pg, pg.transaction():
                pg.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                with meta.globaldb.write() as conn:
                    for table in TABLES:
                        rows = _rows(pg, table, root_id)
                        marks = ", ".join("?" for _ in table.columns)
                        conn.executemany(f"INSERT INTO {table.sqlite}({', '.join(table.columns)}) "
                                         f"VALUES ({marks})", rows)
                        if table.sequence is not None:
                            _sequence(pg, conn, table)
        finally:
            meta.close()
        yield os.path.join(scratch, GLOBAL_DB_NAME)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rows(pg: psycopg.Connection[Any], table: Table, root_id: str) -> list[tuple[Any, ...]]:
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in table.columns)
    order = sql.SQL(", ").join(sql.SQL('{} COLLATE "C"').format(sql.Identifier(k)) if k in _TEXT_KEYS
                               else sql.Identifier(k) for k in table.key)
    where = sql.SQL("")
    params: tuple[Any, ...] = ()
    if table.pg in ("nodes", "kv", "plans"):  # rows of the root's own (several roots may share the database)
        where, params = sql.SQL(" WHERE root_id = %s"), (root_id,)
    elif table.pg == "moves":
        where = sql.SQL(" WHERE plan_id IN (SELECT id FROM shardlite.plans WHERE root_id = %s)")
        params = (root_id,)
    elif table.pg == "tenants":
        where = sql.SQL(" WHERE node IN (SELECT name FROM shardlite.nodes WHERE root_id = %s)")
        params = (root_id,)
    query = sql.SQL("SELECT {} FROM shardlite.{}{} ORDER BY {}").format(columns, sql.Identifier(table.pg), where,
                                                                        order)
    return [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)
            for row in pg.execute(query, params).fetchall()]


def _sequence(pg: psycopg.Connection[Any], conn: Any, table: Table) -> None:
    row = pg.execute("SELECT pg_sequence_last_value(pg_get_serial_sequence(%s, %s)::regclass)",
                     (f"shardlite.{table.pg}", table.sequence)).fetchone()
    top = int(row[0]) if row and row[0] is not None else 0
    if top > 0:  # sqlite_sequence has no key on name: the inserts above may have made its row already
        conn.execute("DELETE FROM sqlite_sequence WHERE name = ?", (table.sqlite,))
        conn.execute("INSERT INTO sqlite_sequence(name, seq) VALUES (?, ?)", (table.sqlite, top))
