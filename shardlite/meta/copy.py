"""``shardlite meta copy``: move a root's metadata from its embedded SQLite DB to PostgreSQL.

Which store is authoritative is decided by two marks, in this order, so that a crash at any point leaves
exactly one authoritative store (never both) and a re-run finishes the job:

1. **copy** (global.db write-locked for the whole run, so its content cannot change under us): every
   shardlite table of ``global.db`` goes into the PostgreSQL database in one PostgreSQL transaction (a crash
   leaves all of it or none), the never-reused counters (generations, account ids, plan ids) carried over
   from ``sqlite_sequence``; then both sides are compared row by row;
2. **fence** ``global.db`` (triggers that refuse every write to shardlite's tables, and a ``moved_to`` mark),
   committed: from here no process can change the old store; a router still running on it gets an error
   telling it to restart;
3. **record** the location in ``<root>/meta.json``: from here the root's metadata is in PostgreSQL.

A crash before 2 leaves the SQLite store authoritative (the copy in PostgreSQL, if committed, is replaced by
the re-run); between 2 and 3 the SQLite store is still the authority but frozen: routers refuse to open the
root until ``meta copy`` is run again, which re-verifies and writes the record; after 3 PostgreSQL is.

The target database must hold no other root's data: generations and tenant keys are one space per database,
and a root's files carry their generation, so two roots' histories cannot be merged. The app's own global
tables (``app_global.db``) stay in the root: they are SQLite-dialect user SQL (see ``meta.app_globals``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import apsw
import psycopg
from psycopg import sql

from ..core.movejournal import FINISHED
from ..errors import ConfigurationError
from ..files.engine import Settings
from .location import MetaLocation, parse_location
from .postgres.connect import unavailable
from .postgres.schema import upgrade
from .record import RootRecord, new_root_id, read_record, write_record
from .sqlite import SqliteMeta
from .tables import TABLES, Table

__all__ = ["TABLES", "POINTS", "CopyReport", "copy_to_postgres", "moved_mark"]


#: The ``_shardlite_catalog_meta`` names ``meta copy`` keeps for itself (not copied).
_ROOT_ID_MARK = "meta_copy_root_id"
_MOVED_MARK = "moved_to"
_FENCE_MESSAGE = ("shardlite: this root's metadata moved to PostgreSQL (shardlite meta copy); restart this "
                  "process so it opens the root again")


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What a finished ``meta copy`` did: rows per table (as verified on both sides) and where to."""

    location: str
    root_id: str
    rows: dict[str, int]
    resumed: bool


def moved_mark(conn: apsw.Connection) -> str | None:
    """The printable location global.db was moved to, or None when it was not (a fenced global.db)."""
    row = conn.execute("SELECT value FROM _shardlite_catalog_meta WHERE name = ?", (_MOVED_MARK,)).fetchone()
    return str(row[0]) if row else None


#: The points a copy passes, in order (``fault`` is called with each: crash tests kill the process there).
POINTS = ("marked", "copied", "verified", "fenced")


def copy_to_postgres(root: str, url: str, *, settings: Settings | None = None,
                     fault: Callable[[str], None] | None = None) -> CopyReport:
    """Move ``root``'s metadata to the PostgreSQL database at ``url`` (see the module doc); safe to re-run
    after a crash at any point. Refuses (:class:`~shardlite.ConfigurationError`, nothing changed) a root that
    is not embedded, a rebalance in flight, a target holding another root's data, and rows PostgreSQL
    cannot store (text with NUL characters). ``fault`` (tests) is called at each of :data:`POINTS`."""
    point = fault or (lambda name: None)
    target = parse_location(url)
    if target.embedded:
        raise ConfigurationError("meta copy --to takes a postgresql:// URL")
    record = read_record(root)
    if record is not None:
        if not record.location.same_store(target):
            raise ConfigurationError(f"{root}'s metadata is at {record.location.printable} already, not "
                                     f"{target.printable}")
        return CopyReport(record.location.printable, record.root_id, {}, resumed=True)
    meta = SqliteMeta(root, settings or Settings())
    if not meta.exists:
        raise ConfigurationError(f"{root} is not a shardlite root (no global.db)")
    meta.open(create=False)
    try:
        with meta.globaldb.write() as conn:  # committed at once: a re-run after any failure reuses the id
            root_id = _root_id(conn)
        point("marked")
        with meta.globaldb.write() as conn:  # held to the end: global.db cannot change while we copy
            fenced = moved_mark(conn) is not None
            if not fenced:
                _refuse_rebalance_in_flight(conn)
            with _pg(target) as pg:
                upgrade(pg)
                counts = _copy(conn, pg, root_id, root, check_only=fenced, point=point)
            point("verified")
            if not fenced:
                _fence(conn, target)
        point("fenced")
    finally:
        meta.close()
    final = write_record_for(root, target, root_id)
    return CopyReport(final.location.printable, final.root_id, counts, resumed=fenced)


def write_record_for(root: str, target: MetaLocation, root_id: str) -> RootRecord:
    """Record ``target`` with the root id the copy used (a re-run reuses it)."""
    found = write_record(root, target, root_id=root_id)
    if found.root_id != root_id or not found.location.same_store(target):
        raise ConfigurationError(f"{root} got another metadata record meanwhile ({found.location.printable})")
    return found


def _root_id(conn: apsw.Connection) -> str:
    """The root id this copy uses, chosen once and kept in global.db so that a re-run reuses it (a fenced
    global.db has it already: the fence refuses the insert)."""
    row = conn.execute("SELECT value FROM _shardlite_catalog_meta WHERE name = ?", (_ROOT_ID_MARK,)).fetchone()
    if row:
        return str(row[0])
    root_id = new_root_id()
    conn.execute("INSERT INTO _shardlite_catalog_meta(name, value) VALUES (?, ?)", (_ROOT_ID_MARK, root_id))
    return root_id


def _refuse_rebalance_in_flight(conn: apsw.Connection) -> None:
    marks = ", ".join("?" for _ in FINISHED)
    busy = conn.execute("SELECT id, state FROM _shardlite_rebalance WHERE state IN ('applying', 'cancelled') "
                        f"AND id IN (SELECT plan_id FROM _shardlite_moves WHERE step NOT IN ({marks})) LIMIT 1",
                        FINISHED).fetchone()
    if busy:
        raise ConfigurationError(
            f"rebalance plan {busy[0]} is {busy[1]} and has unfinished moves: finish it (shardlite rebalance "
            "resume) or cancel it (shardlite rebalance cancel), then run meta copy again")


class _pg:
    """A connection to the target for the copy (autocommit; the copy opens its own transaction)."""

    def __init__(self, target: MetaLocation) -> None:
        self.target = target
        self.conn: psycopg.Connection[Any] | None = None

    def __enter__(self) -> psycopg.Connection[Any]:
        try:
            self.conn = psycopg.connect(self.target.dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            raise unavailable(self.target.printable, exc) from None
        return self.conn

    def __exit__(self, *exc: object) -> None:
        if self.conn is not None:
            self.conn.close()


def _copy(conn: apsw.Connection, pg: psycopg.Connection[Any], root_id: str, root: str, *,
          check_only: bool, point: Callable[[str], None]) -> dict[str, int]:
    """Copy every table (unless ``check_only``: a fenced re-run only verifies) in one PostgreSQL
    transaction, then compare both sides; returns the rows per table."""
    try:
        if not check_only:
            with pg.transaction():
                _refuse_foreign_data(pg, root_id)
                _clear(pg, root_id)
                pg.execute("INSERT INTO shardlite.roots(id, label, created) VALUES (%s, %s, %s)",
                           (root_id, root[:1000], time.time()))
                for table in TABLES:
                    _copy_table(conn, pg, table, root_id)
                _carry_sequences(conn, pg)
        point("copied")
        return {table.pg: _verify(conn, pg, table, root_id) for table in TABLES}
    except psycopg.OperationalError as exc:
        raise unavailable(parse_pg_where(pg), exc) from None


def parse_pg_where(pg: psycopg.Connection[Any]) -> str:
    info = pg.info
    return f"postgresql://{info.user}@{info.host}:{info.port}/{info.dbname}"


def _refuse_foreign_data(pg: psycopg.Connection[Any], root_id: str) -> None:
    other = pg.execute("SELECT id, label FROM shardlite.roots WHERE id <> %s LIMIT 1", (root_id,)).fetchone()
    if other:
        raise ConfigurationError(
            f"the target database holds another root's metadata ({other[1]!r}); meta copy needs a database "
            "of its own for this root (tenant keys and generations are one space per database)")


def _clear(pg: psycopg.Connection[Any], root_id: str) -> None:
    """Remove an earlier, unfinished copy of this root (the target holds nothing else: checked before)."""
    for table in reversed(TABLES):
        pg.execute(sql.SQL("DELETE FROM shardlite.{}").format(sql.Identifier(table.pg)))
    pg.execute("DELETE FROM shardlite.roots WHERE id = %s", (root_id,))


def _rows(conn: apsw.Connection, table: Table) -> Iterator[tuple[Any, ...]]:
    cols = ", ".join(table.columns)
    where = f" WHERE name NOT IN ('{_ROOT_ID_MARK}', '{_MOVED_MARK}')" if table.pg == "kv" else ""
    yield from conn.execute(f"SELECT {cols} FROM {table.sqlite}{where} ORDER BY {', '.join(table.key)}")


#: The PostgreSQL tables whose rows carry their root's id (a column global.db does not have).
_ROOT_OWNED = ("nodes", "kv", "plans")


def _copy_table(conn: apsw.Connection, pg: psycopg.Connection[Any], table: Table, root_id: str) -> None:
    owned = table.pg in _ROOT_OWNED
    columns = table.columns + (("root_id",) if owned else ())
    statement = sql.SQL("COPY shardlite.{} ({}) FROM STDIN").format(
        sql.Identifier(table.pg), sql.SQL(", ").join(sql.Identifier(c) for c in columns))
    with pg.cursor() as cur, cur.copy(statement) as copy:
        for row in _rows(conn, table):
            _refuse_nul(table, row)
            copy.write_row(row + ((root_id,) if owned else ()))


def _refuse_nul(table: Table, row: Sequence[Any]) -> None:
    for column, value in zip(table.columns, row, strict=True):
        if isinstance(value, str) and "\x00" in value:
            key = dict(zip(table.columns, row, strict=True))
            where = ", ".join(f"{k}={key[k]!r}" for k in table.key)
            raise ConfigurationError(
                f"{table.sqlite} row {where} has a NUL character in {column}, which PostgreSQL cannot store: "
                "change that value (it came in before shardlite refused NUL), then run meta copy again")


def _carry_sequences(conn: apsw.Connection, pg: psycopg.Connection[Any]) -> None:
    """Identity sequences continue after the highest value ever handed out (``sqlite_sequence``, not the
    highest row left: a deleted account's id or a burnt generation is never reused)."""
    seqs: dict[Any, Any] = {name: seq for name, seq in conn.execute("SELECT name, seq FROM sqlite_sequence")}
    for table in TABLES:
        if table.sequence is None:
            continue
        highest = conn.execute(f"SELECT coalesce(max({table.sequence}), 0) FROM {table.sqlite}").get
        top = max(int(seqs.get(table.sqlite, 0) or 0), int(highest or 0))
        if top > 0:
            pg.execute("SELECT setval(pg_get_serial_sequence(%s, %s), %s)",
                       (f"shardlite.{table.pg}", table.sequence, top))


def _verify(conn: apsw.Connection, pg: psycopg.Connection[Any], table: Table, root_id: str) -> int:
    """Compare the table on both sides row by row in primary-key order (code-point order on both); returns
    the row count, or raises :class:`~shardlite.ConfigurationError` at the first difference."""
    order = sql.SQL(", ").join(sql.SQL('{} COLLATE "C"').format(sql.Identifier(k))
                               if k in ("name", "key", "source", "incarnation") else sql.Identifier(k)
                               for k in table.key)
    query = sql.SQL("SELECT {} FROM shardlite.{} ORDER BY {}").format(
        sql.SQL(", ").join(sql.Identifier(c) for c in table.columns), sql.Identifier(table.pg), order)
    count = 0
    with pg.cursor(name=f"verify_{table.pg}") as cur, pg.transaction():
        cur.execute(query)
        theirs = iter(cur)
        for ours in _rows(conn, table):
            got = next(theirs, None)
            if got is None or tuple(_plain(v) for v in got) != tuple(_plain(v) for v in ours):
                raise ConfigurationError(
                    f"meta copy: {table.pg} differs in PostgreSQL after the copy (row {count + 1}); nothing was "
                    "switched: run meta copy again")
            count += 1
        if next(theirs, None) is not None:
            raise ConfigurationError(f"meta copy: {table.pg} has more rows in PostgreSQL than in global.db; "
                                     "nothing was switched: run meta copy again")
    if table.pg in _ROOT_OWNED:
        owned = pg.execute(sql.SQL("SELECT count(*) FROM shardlite.{} WHERE root_id = %s").format(
            sql.Identifier(table.pg)), (root_id,)).fetchone()
        if not owned or owned[0] != count:
            raise ConfigurationError(f"meta copy: the {table.pg} rows in PostgreSQL belong to another root")
    return count


def _plain(value: Any) -> Any:
    return bytes(value) if isinstance(value, (memoryview, bytearray)) else value


def _fence(conn: apsw.Connection, target: MetaLocation) -> None:
    """Make global.db refuse every write to shardlite's tables from now on, and mark where it moved."""
    conn.execute("INSERT OR REPLACE INTO _shardlite_catalog_meta(name, value) VALUES (?, ?)",
                 (_MOVED_MARK, target.printable))
    message = _FENCE_MESSAGE.replace("'", "''")
    for table in TABLES:
        for action in ("INSERT", "UPDATE", "DELETE"):
            conn.execute(f"CREATE TRIGGER IF NOT EXISTS _shardlite_moved_{table.pg}_{action.lower()} "
                         f"BEFORE {action} ON {table.sqlite} BEGIN SELECT RAISE(ABORT, '{message}'); END")

