"""The catalog: where every tenant lives, in the global metadata DB (brief §1, §4 Nodes and Identity).

The ring *proposes* a node for a new tenant; the catalog *decides*: the first process to register a key
wins and every other process adopts its record. The catalog also issues generations (every create, move,
restore and import gets a new one, never reused, so no tenant path is ever reused) and keeps a row for a
dropped tenant (its tombstone) so its history is not forgotten.

:class:`Catalog` is the interface the router and relay use; :class:`SqliteCatalog` is today's
implementation, in the global DB next to accounts and sessions. Keep SQLite specifics behind it (the
multi-host mode will put the catalog on PostgreSQL).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import apsw

from .engine import Settings, create_private_file, ensure_private_dir, open_connection
from .errors import Busy, ConfigurationError
from .schema import run_step

__all__ = ["Node", "TenantRecord", "Location", "Catalog", "SqliteCatalog", "GLOBAL_DB_NAME"]

GLOBAL_DB_NAME = "global.db"

#: Catalog tables, by version. The global DB's version lives in PRAGMA user_version.
CATALOG_STEPS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE _catalog_meta(name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE nodes(
               name TEXT PRIMARY KEY,
               path TEXT NOT NULL UNIQUE,
               weight INTEGER NOT NULL CHECK (weight >= 1),
               state TEXT NOT NULL CHECK (state IN ('active', 'draining')),
               added REAL NOT NULL
           ) WITHOUT ROWID""",
        """CREATE TABLE tenants(
               key TEXT PRIMARY KEY,
               node TEXT NOT NULL REFERENCES nodes(name),
               generation INTEGER NOT NULL UNIQUE,
               epoch INTEGER NOT NULL,
               state TEXT NOT NULL CHECK (state IN ('active', 'moving', 'dropping', 'dropped')),
               incarnation TEXT NOT NULL,
               schema_version INTEGER NOT NULL DEFAULT 0,
               created REAL NOT NULL,
               updated REAL NOT NULL
           ) WITHOUT ROWID""",
        "CREATE INDEX tenants_by_node ON tenants(node, state)",
        """CREATE TABLE generations(
               generation INTEGER PRIMARY KEY AUTOINCREMENT,
               key TEXT NOT NULL,
               node TEXT NOT NULL,
               purpose TEXT NOT NULL,
               at REAL NOT NULL
           )""",
    ),
)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    path: str  # absolute directory
    weight: int
    state: str  # active | draining


@dataclass(frozen=True, slots=True)
class Location:
    """Where a tenant lives. ``state`` is ``active``, ``moving`` or ``absent`` (``path`` None when absent)."""

    key: str
    node: str
    path: str | None
    epoch: int
    state: str
    generation: int = 0


@dataclass(frozen=True, slots=True)
class TenantRecord:
    key: str
    node: str
    generation: int
    epoch: int
    state: str
    incarnation: str
    schema_version: int
    created: float


class Catalog(Protocol):
    """What the router needs from a catalog (the SQLite implementation is :class:`SqliteCatalog`)."""

    def nodes(self) -> list[Node]: ...
    def lookup(self, key: str) -> TenantRecord | None: ...
    def allocate_generation(self, key: str, node: str, purpose: str) -> int: ...
    def register(self, key: str, node: str, generation: int, incarnation: str, schema_version: int) -> TenantRecord: ...
    def set_state(self, key: str, state: str, *, expect_generation: int) -> None: ...
    def set_schema_version(self, key: str, version: int) -> None: ...
    def iter_tenants(
        self, *, states: Sequence[str] = ("active", "moving"), batch: int = 1000
    ) -> Iterator[TenantRecord]: ...
    def count_tenants(self) -> dict[str, int]: ...
    def schema_versions(self) -> dict[int, int]: ...
    def close(self) -> None: ...


def _row_to_record(row: Sequence[Any]) -> TenantRecord:
    key, node, generation, epoch, state, incarnation, schema_version, created = row
    return TenantRecord(str(key), str(node), int(generation), int(epoch), str(state),
                        str(incarnation), int(schema_version), float(created))


_RECORD_COLUMNS = "key, node, generation, epoch, state, incarnation, schema_version, created"


class SqliteCatalog:
    """The catalog in ``<root>/global.db``. Thread-safe: one connection behind a lock."""

    def __init__(self, root: str, settings: Settings) -> None:
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, GLOBAL_DB_NAME)
        self.settings = settings
        self._lock = threading.RLock()
        self._conn: apsw.Connection | None = None
        self._closed = True

    # -- lifecycle -------------------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def open(self, *, create: bool, default_nodes: Sequence[tuple[str, str, int]] | None = None) -> None:
        """Open (creating when ``create``) and upgrade the catalog tables.

        ``default_nodes``: ``(name, path, weight)`` registered when the catalog is first created.
        """
        if not create and not self.exists:
            raise ConfigurationError(f"no shardlite data root at {self.root} (run `shardlite init` first)")
        ensure_private_dir(self.root)
        create_private_file(self.path)
        self._closed = False
        with self.write() as conn:
            found: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
            version = int(found)
            for steps in CATALOG_STEPS[version:]:
                for sql in steps:
                    run_step(conn, sql)
            if version < len(CATALOG_STEPS):
                conn.execute(f"PRAGMA user_version = {len(CATALOG_STEPS)}")
            has_nodes = conn.execute("SELECT 1 FROM nodes LIMIT 1").fetchall()
            if not has_nodes and default_nodes:
                now = time.time()
                for name, path, weight in default_nodes:
                    conn.execute("INSERT INTO nodes(name, path, weight, state, added) VALUES (?, ?, ?, 'active', ?)",
                                 (name, path, weight, now))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def abandon(self) -> None:
        """After fork in a child: forget the inherited connection without closing it (reopened lazily)."""
        self._lock = threading.RLock()
        self._conn = None

    @property
    def conn(self) -> apsw.Connection:
        if self._conn is None:
            if self._closed:
                raise ConfigurationError("the catalog is closed")
            self._conn = open_connection(self.path, self.settings, create=False, cache_kib=4096)
        return self._conn

    # -- transactions ----------------------------------------------------------------------------------

    class _Write:
        def __init__(self, catalog: SqliteCatalog) -> None:
            self.catalog = catalog

        def __enter__(self) -> apsw.Connection:
            self.catalog._lock.acquire()
            conn = self.catalog.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
            except apsw.BusyError as exc:
                self.catalog._lock.release()
                raise Busy(f"the global DB stayed locked past the busy timeout: {exc}") from exc
            except BaseException:
                self.catalog._lock.release()
                raise
            return conn

        def __exit__(self, et: object, ev: object, tb: object) -> None:
            conn = self.catalog.conn
            try:
                if et is None:
                    try:
                        conn.execute("COMMIT")
                    except apsw.BusyError as exc:
                        conn.execute("ROLLBACK")
                        raise Busy(f"the global DB commit was blocked: {exc}") from exc
                else:
                    conn.execute("ROLLBACK")
            finally:
                self.catalog._lock.release()

    def write(self) -> SqliteCatalog._Write:
        """``with catalog.write() as conn:`` a BEGIN IMMEDIATE transaction on the global DB."""
        return SqliteCatalog._Write(self)

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self.conn.execute(sql, params).fetchall()

    # -- nodes -----------------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        rows = self.read("SELECT name, path, weight, state FROM nodes ORDER BY name")
        return [Node(str(n), self._abs(str(p)), int(w), str(s)) for n, p, w, s in rows]

    def _abs(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    # -- tenants ---------------------------------------------------------------------------------------

    def lookup(self, key: str) -> TenantRecord | None:
        rows = self.read(f"SELECT {_RECORD_COLUMNS} FROM tenants WHERE key = ?", (key,))
        return _row_to_record(rows[0]) if rows else None

    def allocate_generation(self, key: str, node: str, purpose: str) -> int:
        with self.write() as conn:
            conn.execute("INSERT INTO generations(key, node, purpose, at) VALUES (?, ?, ?, ?)",
                         (key, node, purpose, time.time()))
            return int(conn.last_insert_rowid())

    def register(self, key: str, node: str, generation: int, incarnation: str, schema_version: int) -> TenantRecord:
        """Record a freshly created tenant unless another process won; return the winning record.

        A dropped key is re-created over its tombstone (new generation, new incarnation).
        """
        now = time.time()
        with self.write() as conn:
            rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM tenants WHERE key = ?", (key,)).fetchall()
            if rows and rows[0][4] != "dropped":
                return _row_to_record(rows[0])
            if rows:
                conn.execute(
                    """UPDATE tenants SET node = ?, generation = ?, epoch = epoch + 1, state = 'active',
                       incarnation = ?, schema_version = ?, created = ?, updated = ? WHERE key = ?""",
                    (node, generation, incarnation, schema_version, now, now, key))
            else:
                conn.execute(
                    f"INSERT INTO tenants({_RECORD_COLUMNS}, updated) VALUES (?, ?, ?, 1, 'active', ?, ?, ?, ?)",
                    (key, node, generation, incarnation, schema_version, now, now))
            rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM tenants WHERE key = ?", (key,)).fetchall()
            return _row_to_record(rows[0])

    def set_state(self, key: str, state: str, *, expect_generation: int) -> None:
        with self.write() as conn:
            conn.execute("UPDATE tenants SET state = ?, updated = ? WHERE key = ? AND generation = ?",
                         (state, time.time(), key, expect_generation))
            if conn.changes() != 1:
                raise ConfigurationError(f"tenant {key!r} changed under us (generation {expect_generation} is gone)")

    def set_schema_version(self, key: str, version: int) -> None:
        with self.write() as conn:
            conn.execute("UPDATE tenants SET schema_version = ? WHERE key = ? AND schema_version < ?",
                         (version, key, version))

    def iter_tenants(
        self, *, states: Sequence[str] = ("active", "moving"), batch: int = 1000
    ) -> Iterator[TenantRecord]:
        """Every tenant in the given states, in key order, read in batches (never all in memory)."""
        marks = ", ".join("?" for _ in states)
        after = ""
        while True:
            rows = self.read(
                f"SELECT {_RECORD_COLUMNS} FROM tenants WHERE key > ? AND state IN ({marks}) ORDER BY key LIMIT ?",
                (after, *states, batch))
            for row in rows:
                yield _row_to_record(row)
            if len(rows) < batch:
                return
            after = str(rows[-1][0])

    def count_tenants(self) -> dict[str, int]:
        """Live tenants per node (every node listed, zero included)."""
        counts = {n.name: 0 for n in self.nodes()}
        for node, count in self.read(
                "SELECT node, count(*) FROM tenants WHERE state IN ('active', 'moving') GROUP BY node"):
            counts[str(node)] = int(count)
        return counts

    def schema_versions(self) -> dict[int, int]:
        """Live tenants per recorded app schema version."""
        rows = self.read("SELECT schema_version, count(*) FROM tenants WHERE state IN ('active', 'moving') "
                         "GROUP BY schema_version ORDER BY schema_version")
        return {int(v): int(c) for v, c in rows}
