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
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .accounts import upgrade_email_keys
from .app_tables import move_app_tables
from .authorizer import INTERNAL_SQL as _I
from .errors import ConfigurationError
from .globaldb import GLOBAL_DB_NAME, GlobalDB
from .schema import Step

__all__ = ["Node", "TenantRecord", "Location", "Catalog", "SqliteCatalog", "GLOBAL_DB_NAME", "GLOBAL_STEPS"]

#: shardlite's tables in the global DB, by version (PRAGMA user_version). Version 1: the catalog;
#: version 2: accounts, password credentials and sessions; version 3: the relay's pending-work flags and
#: dead letters; version 4: the rebalance journal (plans and per-tenant move steps); version 5: the app's
#: own global tables move out to ``app_global.db`` (:mod:`shardlite.app_tables`); version 6: stored e-mail
#: keys take the domain's ASCII form (:func:`shardlite.accounts.upgrade_email_keys`); version 7: moves found by
#: key (a rebalancer settling one tenant's lapsed move).
GLOBAL_STEPS: tuple[tuple[Step, ...], ...] = (
    (
        """CREATE TABLE _shardlite_catalog_meta(name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID""",
        """CREATE TABLE _shardlite_nodes(
               name TEXT PRIMARY KEY,
               path TEXT NOT NULL UNIQUE,
               weight INTEGER NOT NULL CHECK (weight >= 1),
               state TEXT NOT NULL CHECK (state IN ('active', 'draining')),
               added REAL NOT NULL
           ) WITHOUT ROWID""",
        """CREATE TABLE _shardlite_tenants(
               key TEXT PRIMARY KEY,
               node TEXT NOT NULL REFERENCES _shardlite_nodes(name),
               generation INTEGER NOT NULL UNIQUE,
               epoch INTEGER NOT NULL,
               state TEXT NOT NULL CHECK (state IN ('active', 'moving', 'dropping', 'dropped')),
               incarnation TEXT NOT NULL,
               schema_version INTEGER NOT NULL DEFAULT 0,
               created REAL NOT NULL,
               updated REAL NOT NULL
           ) WITHOUT ROWID""",
        "CREATE INDEX _shardlite_tenants_by_node ON _shardlite_tenants(node, state)",
        """CREATE TABLE _shardlite_generations(
               generation INTEGER PRIMARY KEY AUTOINCREMENT,
               key TEXT NOT NULL,
               node TEXT NOT NULL,
               purpose TEXT NOT NULL,
               at REAL NOT NULL
           )""",
    ),
    (
        """CREATE TABLE _shardlite_accounts(
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               email TEXT NOT NULL,
               email_key TEXT NOT NULL UNIQUE,
               name_key TEXT NOT NULL DEFAULT '',
               profile TEXT NOT NULL DEFAULT '{}',
               created REAL NOT NULL,
               updated REAL NOT NULL
           )""",
        "CREATE INDEX _shardlite_accounts_by_name ON _shardlite_accounts(name_key)",
        """CREATE TABLE _shardlite_credentials(
               account_id INTEGER PRIMARY KEY REFERENCES _shardlite_accounts(id) ON DELETE CASCADE,
               scheme TEXT NOT NULL,
               salt BLOB NOT NULL,
               hash BLOB NOT NULL,
               updated REAL NOT NULL
           )""",
        """CREATE TABLE _shardlite_sessions(
               token_hash BLOB PRIMARY KEY,
               account_id INTEGER NOT NULL REFERENCES _shardlite_accounts(id) ON DELETE CASCADE,
               created REAL NOT NULL,
               expires REAL NOT NULL,
               idle_ttl REAL,
               last_seen REAL NOT NULL,
               revoked REAL
           ) WITHOUT ROWID""",
        "CREATE INDEX _shardlite_sessions_by_account ON _shardlite_sessions(account_id)",
        "CREATE INDEX _shardlite_sessions_by_expiry ON _shardlite_sessions(expires)",
    ),
    (
        """CREATE TABLE _shardlite_pending(
               key TEXT PRIMARY KEY,
               version INTEGER NOT NULL,
               due REAL NOT NULL,
               since REAL NOT NULL
           ) WITHOUT ROWID""",
        "CREATE INDEX _shardlite_pending_by_due ON _shardlite_pending(due)",
        """CREATE TABLE _shardlite_dead_letters(
               source TEXT NOT NULL,
               incarnation TEXT NOT NULL,
               seq INTEGER NOT NULL,
               dest TEXT NOT NULL,
               topic TEXT NOT NULL,
               payload TEXT NOT NULL,
               created REAL NOT NULL,
               attempts INTEGER NOT NULL,
               error TEXT NOT NULL,
               died REAL NOT NULL,
               PRIMARY KEY (source, incarnation, seq)
           ) WITHOUT ROWID""",
    ),
    (
        """CREATE TABLE _shardlite_rebalance(
               id INTEGER PRIMARY KEY AUTOINCREMENT,
               created REAL NOT NULL,
               state TEXT NOT NULL CHECK (state IN ('planned', 'applying', 'done', 'cancelled', 'completed',
                                                     'superseded')),
               fingerprint TEXT NOT NULL,
               summary TEXT NOT NULL
           )""",
        """CREATE TABLE _shardlite_moves(
               plan_id INTEGER NOT NULL REFERENCES _shardlite_rebalance(id),
               key TEXT NOT NULL,
               source TEXT NOT NULL,
               target TEXT NOT NULL,
               source_generation INTEGER NOT NULL,
               target_generation INTEGER,
               size INTEGER NOT NULL,
               step TEXT NOT NULL,
               owner TEXT,
               lease REAL NOT NULL DEFAULT 0,
               error TEXT,
               pause_ms REAL,
               updated REAL NOT NULL,
               PRIMARY KEY (plan_id, key)
           ) WITHOUT ROWID""",
    ),
    (move_app_tables,),
    (upgrade_email_keys,),
    ("CREATE INDEX IF NOT EXISTS _shardlite_moves_by_key ON _shardlite_moves(key)",),
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
    def max_schema_version(self, prefix: str) -> int | None: ...
    def schema_versions(self) -> dict[int, int]: ...
    def close(self) -> None: ...


def _row_to_record(row: Sequence[Any]) -> TenantRecord:
    key, node, generation, epoch, state, incarnation, schema_version, created = row
    return TenantRecord(str(key), str(node), int(generation), int(epoch), str(state),
                        str(incarnation), int(schema_version), float(created))


_RECORD_COLUMNS = "key, node, generation, epoch, state, incarnation, schema_version, created"


class SqliteCatalog:
    """The catalog in the global DB (``<root>/global.db``). Thread-safe."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db
        self.root = db.root

    def open(self, *, create: bool, default_nodes: Sequence[tuple[str, str, int]] | None = None) -> None:
        """Open (creating when ``create``) and upgrade the global DB's tables.

        ``default_nodes``: ``(name, path, weight)`` registered when the catalog is first created.
        """
        self.db.open(create=create, internal_steps=GLOBAL_STEPS)
        with self.write() as conn:
            has_nodes = conn.execute("SELECT 1 FROM _shardlite_nodes LIMIT 1").fetchall()
            if not has_nodes and default_nodes:
                now = time.time()
                for name, path, weight in default_nodes:
                    conn.execute(_I + "INSERT INTO _shardlite_nodes(name, path, weight, state, added) "
                                 "VALUES (?, ?, ?, 'active', ?)", (name, path, weight, now))

    @property
    def exists(self) -> bool:
        return self.db.exists

    def close(self) -> None:
        self.db.close()

    def write(self) -> Any:
        return self.db.write()

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.db.read(sql, params)

    # -- nodes -----------------------------------------------------------------------------------------

    def nodes(self) -> list[Node]:
        rows = self.read("SELECT name, path, weight, state FROM _shardlite_nodes ORDER BY name")
        return [Node(str(n), self._abs(str(p)), int(w), str(s)) for n, p, w, s in rows]

    def _abs(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.root, path)

    # -- tenants ---------------------------------------------------------------------------------------

    def lookup(self, key: str) -> TenantRecord | None:
        rows = self.read(f"SELECT {_RECORD_COLUMNS} FROM _shardlite_tenants WHERE key = ?", (key,))
        return _row_to_record(rows[0]) if rows else None

    def allocate_generation(self, key: str, node: str, purpose: str) -> int:
        with self.write() as conn:
            conn.execute(_I + "INSERT INTO _shardlite_generations(key, node, purpose, at) VALUES (?, ?, ?, ?)",
                         (key, node, purpose, time.time()))
            return int(conn.last_insert_rowid())

    def register(self, key: str, node: str, generation: int, incarnation: str, schema_version: int) -> TenantRecord:
        """Record a freshly created tenant unless another process won; return the winning record.

        A dropped key is re-created over its tombstone (new generation, new incarnation).
        """
        now = time.time()
        with self.write() as conn:
            rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM _shardlite_tenants WHERE key = ?", (key,)).fetchall()
            if rows and rows[0][4] != "dropped":
                return _row_to_record(rows[0])
            if rows:
                conn.execute(
                    _I + """UPDATE _shardlite_tenants SET node = ?, generation = ?, epoch = epoch + 1, state = 'active',
                       incarnation = ?, schema_version = ?, created = ?, updated = ? WHERE key = ?""",
                    (node, generation, incarnation, schema_version, now, now, key))
            else:
                conn.execute(
                    _I + f"INSERT INTO _shardlite_tenants({_RECORD_COLUMNS}, updated) "
                    "VALUES (?, ?, ?, 1, 'active', ?, ?, ?, ?)",
                    (key, node, generation, incarnation, schema_version, now, now))
            rows = conn.execute(f"SELECT {_RECORD_COLUMNS} FROM _shardlite_tenants WHERE key = ?", (key,)).fetchall()
            return _row_to_record(rows[0])

    def set_state(self, key: str, state: str, *, expect_generation: int) -> None:
        with self.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_tenants SET state = ?, updated = ? WHERE key = ? AND generation = ?",
                         (state, time.time(), key, expect_generation))
            if conn.changes() != 1:
                raise ConfigurationError(f"tenant {key!r} changed under us (generation {expect_generation} is gone)")

    def set_schema_version(self, key: str, version: int) -> None:
        with self.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_tenants SET schema_version = ? WHERE key = ? AND schema_version < ?",
                         (version, key, version))

    def iter_tenants(
        self, *, states: Sequence[str] = ("active", "moving"), batch: int = 1000
    ) -> Iterator[TenantRecord]:
        """Every tenant in the given states, in key order, read in batches (never all in memory)."""
        marks = ", ".join("?" for _ in states)
        after = ""
        while True:
            rows = self.read(
                f"SELECT {_RECORD_COLUMNS} FROM _shardlite_tenants WHERE key > ? AND state IN ({marks}) "
                "ORDER BY key LIMIT ?",
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
                "SELECT node, count(*) FROM _shardlite_tenants WHERE state IN ('active', 'moving') GROUP BY node"):
            counts[str(node)] = int(count)
        return counts

    def max_schema_version(self, prefix: str) -> int | None:
        """The newest app schema version recorded for live tenants whose key starts with ``prefix:``."""
        upper = prefix + ";"  # ':' + 1: every key of the form 'prefix:...' sorts in [prefix:, prefix;)
        rows = self.read("SELECT max(schema_version) FROM _shardlite_tenants WHERE key >= ? AND key < ? "
                         "AND state IN ('active', 'moving')", (prefix + ":", upper))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def schema_versions(self) -> dict[int, int]:
        """Live tenants per recorded app schema version."""
        rows = self.read("SELECT schema_version, count(*) FROM _shardlite_tenants WHERE state IN ('active', 'moving') "
                         "GROUP BY schema_version ORDER BY schema_version")
        return {int(v): int(c) for v, c in rows}

    # -- nodes and moves (rebalancing) -----------------------------------------------------------------

    def add_node(self, name: str, path: str, weight: int) -> None:
        with self.write() as conn:
            if conn.execute("SELECT 1 FROM _shardlite_nodes WHERE name = ?", (name,)).fetchall():
                raise ConfigurationError(f"node {name!r} already exists")
            conn.execute(_I + "INSERT INTO _shardlite_nodes(name, path, weight, state, added) "
                         "VALUES (?, ?, ?, 'active', ?)", (name, path, weight, time.time()))

    def set_node_state(self, name: str, state: str) -> None:
        with self.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_nodes SET state = ? WHERE name = ?", (state, name))
            if conn.changes() == 0:
                raise ConfigurationError(f"unknown node {name!r}")

    def delete_node(self, name: str) -> None:
        with self.write() as conn:
            if conn.execute("SELECT 1 FROM _shardlite_tenants WHERE node = ? AND state != 'dropped' LIMIT 1",
                            (name,)).fetchall():
                raise ConfigurationError(f"node {name!r} still holds tenants; drain it first")
            conn.execute(_I + "DELETE FROM _shardlite_nodes WHERE name = ?", (name,))

    def flip(self, key: str, *, from_generation: int, node: str, generation: int,
             incarnation: str | None = None) -> None:
        """The commit point of a move (or a restore, which also brings a new ``incarnation``): point
        ``key`` at its new file, compare-and-set on the old generation."""
        with self.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_tenants SET node = ?, generation = ?, epoch = epoch + 1, "
                         "state = 'active', updated = ?, incarnation = coalesce(?, incarnation) "
                         "WHERE key = ? AND generation = ?",
                         (node, generation, time.time(), incarnation, key, from_generation))
            if conn.changes() != 1:
                raise ConfigurationError(f"tenant {key!r} is no longer at generation {from_generation}")
