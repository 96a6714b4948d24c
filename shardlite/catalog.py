"""The catalog: where every tenant lives, in the global metadata DB (brief §1, §4 Nodes and Identity).

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

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .accounts import upgrade_email_keys
from .app_tables import move_app_tables
from .authorizer import INTERNAL_SQL as _I
from .globaldb import GLOBAL_DB_NAME, GlobalDB
from .schema import Step

__all__ = ["Node", "TenantRecord", "Location", "SqliteCatalog", "GLOBAL_DB_NAME", "GLOBAL_STEPS"]

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

    # -- relay: pending-work flags and dead letters ------------------------------------------------------

    def flag_pending(self, key: str) -> None:
        """Record that ``key`` has pending outbox events (bumps the row's version; see relay.py)."""
        self.flag_pending_many([key])

    def flag_pending_many(self, keys: list[str]) -> None:
        """:meth:`flag_pending` for several keys in one write transaction."""
        now = time.time()
        with self.write() as conn:
            conn.executemany(_I + "INSERT INTO _shardlite_pending(key, version, due, since) VALUES (?, 1, ?, ?) "
                             "ON CONFLICT(key) DO UPDATE SET version = version + 1, due = min(due, excluded.due)",
                             [(key, now, now) for key in keys])

    def pending_due(self, now: float, limit: int) -> list[tuple[str, int, float]]:
        """``(key, version, due)`` of flagged tenants whose work is due, oldest due first."""
        rows = self.read(f"SELECT key, version, due FROM _shardlite_pending WHERE due <= ? ORDER BY due "
                         f"LIMIT {int(limit):d}", (now,))  # a literal LIMIT: see feed.page_query
        return [(str(k), int(v), float(d)) for k, v, d in rows]

    def pending_row(self, key: str) -> tuple[int, float] | None:
        rows = self.read("SELECT version, due FROM _shardlite_pending WHERE key = ?", (key,))
        return (int(rows[0][0]), float(rows[0][1])) if rows else None

    def pending_all(self) -> list[tuple[str, float, float]]:
        """``(key, due, since)`` of every flagged tenant."""
        rows = self.read("SELECT key, due, since FROM _shardlite_pending ORDER BY key")
        return [(str(k), float(d), float(s)) for k, d, s in rows]

    def clear_pending(self, key: str, version: int) -> None:
        """Drop ``key``'s flag unless an emitter re-flagged it since ``version`` was read."""
        self.clear_pending_many([(key, version)])

    def clear_pending_many(self, flags: list[tuple[str, int]]) -> None:
        """:meth:`clear_pending` for several ``(key, version)`` pairs in one write transaction."""
        with self.write() as conn:
            for key, version in flags:
                conn.execute(_I + "DELETE FROM _shardlite_pending WHERE key = ? AND version = ?", (key, version))

    def set_pending_due(self, key: str, due: float) -> None:
        now = time.time()
        with self.write() as conn:
            conn.execute(_I + "INSERT INTO _shardlite_pending(key, version, due, since) VALUES (?, 1, ?, ?) "
                         "ON CONFLICT(key) DO UPDATE SET due = excluded.due", (key, due, now))

    def add_dead_letter(self, source: str, incarnation: str, seq: int, dest: str, topic: str, payload: str,
                        created: float, attempts: int, error: str) -> None:
        with self.write() as conn:
            conn.execute(_I + "INSERT INTO _shardlite_dead_letters(source, incarnation, seq, dest, topic, payload, "
                         "created, attempts, error, died) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                         "ON CONFLICT DO NOTHING",
                         (source, incarnation, seq, dest, topic, payload, created, attempts, error, time.time()))

    def dead_letters(self, *, limit: int = 1000) -> list[dict[str, Any]]:
        rows = self.read("SELECT source, incarnation, seq, dest, topic, payload, created, attempts, error, died "
                         "FROM _shardlite_dead_letters ORDER BY died, source, seq LIMIT ?", (limit,))
        names = ("source", "incarnation", "seq", "dest", "topic", "payload", "created", "attempts", "error", "died")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def delete_dead_letter(self, source: str, incarnation: str, seq: int) -> None:
        with self.write() as conn:
            conn.execute(_I + "DELETE FROM _shardlite_dead_letters WHERE source = ? AND incarnation = ? AND seq = ?",
                         (source, incarnation, seq))
