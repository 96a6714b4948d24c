"""The catalog: where every tenant lives, in the global metadata DB (README: How it works; Nodes and rebalancing).

The ring *proposes* a node for a new tenant; the catalog *decides*: the first process to register a key
wins and every other process adopts its record. The catalog also issues generations (every create, move,
restore and import gets a new one, never reused, so no tenant path is ever reused) and keeps a row for a
dropped tenant (its tombstone) so its history is not forgotten.

The tenant rows and the node list are reached through their contracts, ``store.meta.tenants``
(:mod:`shardlite.meta.tenants`) and ``store.meta.nodes`` (:mod:`shardlite.meta.nodes`); this module keeps
their row types, the global DB's schema (:data:`GLOBAL_STEPS`) and :class:`SqliteCatalog`, the parts of
``global.db`` not behind a contract yet (pending-work flags, dead letters).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import apsw

from ..front.accounts import upgrade_email_keys
from .app_tables import move_app_tables
from .globaldb import GLOBAL_DB_NAME, GlobalDB
from .schema import Step

__all__ = ["Node", "TenantRecord", "Location", "SqliteCatalog", "GLOBAL_DB_NAME", "GLOBAL_STEPS"]


def park_pending(cursor: apsw.Cursor) -> None:
    """Global version 8: ``_shardlite_pending.parked`` and the due index without parked flags. Safe to run
    again on a file that has them (a version number set back by hand)."""
    conn = cursor.connection
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(_shardlite_pending)").fetchall()}
    if "parked" not in columns:
        conn.execute("ALTER TABLE _shardlite_pending ADD COLUMN parked REAL")
    conn.execute("DROP INDEX IF EXISTS _shardlite_pending_by_due")
    conn.execute("CREATE INDEX _shardlite_pending_by_due ON _shardlite_pending(due) WHERE parked IS NULL")


#: shardlite's tables in the global DB, by version (PRAGMA user_version). Version 1: the catalog;
#: version 2: accounts, password credentials and sessions; version 3: the relay's pending-work flags and
#: dead letters; version 4: the rebalance journal (plans and per-tenant move steps); version 5: the app's
#: own global tables move out to ``app_global.db`` (:mod:`shardlite.files.app_tables`); version 6: stored e-mail
#: keys take the domain's ASCII form (:func:`shardlite.front.accounts.upgrade_email_keys`); version 7: moves found by
#: key (a rebalancer settling one tenant's lapsed move); version 8: parked pending-work flags (``parked``: when
#: the flag was parked, NULL while it is not; the due index leaves parked flags out).
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
    (park_pending,),
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


class SqliteCatalog:
    """The catalog in the global DB (``<root>/global.db``). Thread-safe."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db
        self.root = db.root

    def open(self, *, create: bool) -> None:
        """Open (creating when ``create``) and upgrade the global DB's tables (the default nodes are
        seeded by :meth:`shardlite.meta.sqlite.nodes.SqliteNodes.seed`)."""
        self.db.open(create=create, internal_steps=GLOBAL_STEPS)

    @property
    def exists(self) -> bool:
        return self.db.exists

    def close(self) -> None:
        self.db.close()

    def write(self) -> Any:
        return self.db.write()

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.db.read(sql, params)

