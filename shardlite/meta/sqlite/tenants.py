""":class:`SqliteTenants`: the :class:`~shardlite.meta.tenants.TenantCatalog` in ``global.db``
(``_shardlite_tenants``, and ``_shardlite_generations`` for the generation counter).

Atomicity comes from :class:`~shardlite.files.globaldb.GlobalDB`: each write is one ``BEGIN IMMEDIATE`` (a
savepoint when the caller already holds the global writer, as the mover's flip inside
``Journal.holding`` does), and reads run on the thread's ``query_only`` reader. Generations are the
``INTEGER PRIMARY KEY AUTOINCREMENT`` of ``_shardlite_generations``: never reused, even after a delete.
Key order is SQLite's BINARY collation on UTF-8, which is code-point order.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence

import apsw

from ...errors import ConfigurationError, MetaConflict
from ...files.authorizer import INTERNAL_SQL as _I
from ...files.catalog import TenantRecord
from ...files.globaldb import GlobalDB
from ..tenants import LIVE, GenerationTaken, TenantCatalog, check_states, record_of

__all__ = ["SqliteTenants"]

_COLUMNS = "key, node, generation, epoch, state, incarnation, schema_version, created"
_LOOKUP = f"SELECT {_COLUMNS} FROM _shardlite_tenants WHERE key = ?"
_LIVE_SQL = "state IN ('active', 'moving')"


def _translated(exc: apsw.ConstraintError, key: str, node: str, generation: int) -> Exception:
    """The contract's error for a constraint ``_shardlite_tenants`` refused (rule: no backend's constraint
    error reaches a caller)."""
    if "FOREIGN KEY" in str(exc):
        return ConfigurationError(f"tenant {key!r} cannot be placed on node {node!r}: no such node")
    return GenerationTaken(f"tenant {key!r}: generation {generation} is already used ({exc}); allocate one")


class SqliteTenants:
    """The tenant catalog of one root in its ``global.db`` (see the module doc)."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db

    def lookup(self, key: str) -> TenantRecord | None:
        rows = self.db.read(_LOOKUP, (key,))
        return record_of(rows[0]) if rows else None

    def allocate_generation(self, key: str, node: str, purpose: str) -> int:
        with self.db.write() as conn:
            conn.execute(_I + "INSERT INTO _shardlite_generations(key, node, purpose, at) VALUES (?, ?, ?, ?)",
                         (key, node, purpose, time.time()))
            return int(conn.last_insert_rowid())

    def lookup_or_allocate(self, key: str, node: str, *, revive: bool = True) -> tuple[TenantRecord | None, int | None]:
        record = self.lookup(key)
        if record is not None and (record.state != "dropped" or not revive):
            return record, None
        return record, self.allocate_generation(key, node, "create")

    def register(self, key: str, node: str, generation: int, incarnation: str,
                 schema_version: int) -> TenantRecord:
        now = time.time()
        with self.db.write() as conn:  # BEGIN IMMEDIATE: the read and the write below are one unit
            rows = conn.execute(_LOOKUP, (key,)).fetchall()
            if rows and rows[0][4] != "dropped":
                return record_of(rows[0])
            try:
                if rows:
                    conn.execute(
                        _I + "UPDATE _shardlite_tenants SET node = ?, generation = ?, epoch = epoch + 1, "
                        "state = 'active', incarnation = ?, schema_version = ?, created = ?, updated = ? WHERE key = ?",
                        (node, generation, incarnation, schema_version, now, now, key))
                else:
                    conn.execute(
                        _I + f"INSERT INTO _shardlite_tenants({_COLUMNS}, updated) "
                        "VALUES (?, ?, ?, 1, 'active', ?, ?, ?, ?)",
                        (key, node, generation, incarnation, schema_version, now, now))
            except apsw.ConstraintError as exc:
                raise _translated(exc, key, node, generation) from None
            return record_of(conn.execute(_LOOKUP, (key,)).fetchall()[0])

    def set_state(self, key: str, state: str, *, expect_generation: int, expect_states: Collection[str]) -> None:
        expected = tuple(expect_states)
        check_states(state, expected)
        marks = ", ".join("?" for _ in expected)
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_tenants SET state = ?, updated = ? WHERE key = ? AND generation = ? "
                         f"AND state IN ({marks})", (state, time.time(), key, expect_generation, *expected))
            if conn.changes() != 1:
                raise self._conflict(conn, key, expect_generation, expected)

    def flip(self, key: str, *, from_generation: int, node: str, generation: int, expect_states: Collection[str],
             incarnation: str | None = None) -> TenantRecord:
        expected = tuple(expect_states)
        check_states(None, expected)
        if "dropped" in expected:
            raise ValueError("a tombstone is never flipped (register re-creates it)")
        marks = ", ".join("?" for _ in expected)
        with self.db.write() as conn:
            try:
                conn.execute(_I + "UPDATE _shardlite_tenants SET node = ?, generation = ?, epoch = epoch + 1, "
                             "state = 'active', updated = ?, incarnation = coalesce(?, incarnation) "
                             f"WHERE key = ? AND generation = ? AND state IN ({marks})",
                             (node, generation, time.time(), incarnation, key, from_generation, *expected))
            except apsw.ConstraintError as exc:
                raise _translated(exc, key, node, generation) from None
            if conn.changes() != 1:
                raise self._conflict(conn, key, from_generation, expected)
            return record_of(conn.execute(_LOOKUP, (key,)).fetchall()[0])

    @staticmethod
    def _conflict(conn: apsw.Connection, key: str, generation: int, expected: Sequence[str]) -> MetaConflict:
        rows = conn.execute(_LOOKUP, (key,)).fetchall()
        found = "no row" if not rows else f"generation {rows[0][2]}, state {rows[0][4]}"
        return MetaConflict(f"tenant {key!r} changed meanwhile: expected generation {generation} in state "
                            f"{' or '.join(expected)}, found {found}; nothing was written")

    def note_schema_version(self, key: str, version: int) -> None:
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_tenants SET schema_version = ? WHERE key = ? AND schema_version < ?",
                         (version, key, version))

    def iter_tenants(self, *, states: Collection[str] = LIVE, batch: int = 1000,
                     after: str = "") -> Iterator[TenantRecord]:
        wanted = tuple(states)
        check_states(None, wanted)
        if batch < 1:
            raise ValueError("batch must be at least 1")
        marks = ", ".join("?" for _ in wanted)
        while True:
            rows = self.db.read(f"SELECT {_COLUMNS} FROM _shardlite_tenants WHERE key > ? AND state IN ({marks}) "
                                "ORDER BY key LIMIT ?", (after, *wanted, batch))
            for row in rows:
                yield record_of(row)
            if len(rows) < batch:
                return
            after = str(rows[-1][0])

    def count_by_node(self) -> dict[str, int]:
        rows = self.db.read(f"SELECT node, count(*) FROM _shardlite_tenants WHERE {_LIVE_SQL} GROUP BY node")
        return {str(node): int(count) for node, count in rows}

    def schema_versions(self) -> dict[int, int]:
        rows = self.db.read(f"SELECT schema_version, count(*) FROM _shardlite_tenants WHERE {_LIVE_SQL} "
                            "GROUP BY schema_version ORDER BY schema_version")
        return {int(v): int(c) for v, c in rows}

    def max_schema_version(self, prefix: str) -> int | None:
        upper = prefix + ";"  # ':' + 1: every key of the form 'prefix:...' sorts in [prefix:, prefix;)
        rows = self.db.read(f"SELECT max(schema_version) FROM _shardlite_tenants WHERE key >= ? AND key < ? "
                            f"AND {_LIVE_SQL}", (prefix + ":", upper))
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def has_rows(self) -> bool:
        return bool(self.db.read("SELECT 1 FROM _shardlite_tenants LIMIT 1"))


def _conforms(tenants: SqliteTenants) -> TenantCatalog:
    return tenants  # mypy checks here that SqliteTenants satisfies the TenantCatalog contract
