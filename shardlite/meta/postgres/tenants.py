""":class:`PgTenants`: the :class:`~shardlite.meta.tenants.TenantCatalog` in PostgreSQL (``shardlite.tenants``,
and ``shardlite.generations`` for the generation counter).

The key space is the database's, shared by every root using it: the methods that take a key act by key. The
enumerations cover the tenants on this root's nodes (a join on ``shardlite.nodes.root_id``).

How each write is atomic at READ COMMITTED (no global writer lock as SQLite's ``BEGIN IMMEDIATE``):

* :meth:`~PgTenants.allocate_generation`: the identity of ``shardlite.generations`` (a sequence: never
  hands a value out twice, even after a rollback), read back with ``RETURNING``, one statement. For a
  ``create`` it commits without waiting for its WAL flush (:data:`_RELAXED`); see the method.
  :meth:`~PgTenants.lookup_or_allocate` is the lookup and that allocation in one statement;
* :meth:`~PgTenants.register`: one statement (no ``BEGIN``/``COMMIT`` round trips):
  ``INSERT ... ON CONFLICT (key) DO UPDATE ... WHERE state = 'dropped'``, which inserts, re-creates a
  tombstone, or (a live row) writes nothing; the same statement reads the live row it met. A row that was
  committed by a racing registrant after the statement's snapshot is locked by ``ON CONFLICT`` but is not
  in that snapshot: then (a race, rare) one more statement reads it, and returns it as it stands then;
* :meth:`~PgTenants.set_state`, :meth:`~PgTenants.flip`: one conditional ``UPDATE ... RETURNING`` (a writer
  that waited for a row lock re-checks the ``WHERE`` on the row as committed: a correct compare-and-set);
* a tenant's ``node`` references ``shardlite.nodes``: its foreign-key check takes ``FOR KEY SHARE`` on the
  node row, which conflicts with the ``FOR UPDATE`` of :meth:`PgNodes.remove
  <shardlite.meta.postgres.nodes.PgNodes.remove>`, so a registration never lands on a node being removed.

Keys are ``COLLATE "C"`` in the schema (code-point order, as SQLite's BINARY). PostgreSQL's text cannot hold
U+0000 and no canonical key does: a key with it has no row (reads find nothing) and writes refuse it with
:class:`ValueError` before it reaches the server.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from psycopg import Connection, errors

from ...errors import ConfigurationError, MetaConflict
from ...files.catalog import TenantRecord
from ..tenants import LIVE, GenerationTaken, TenantCatalog, check_states, record_of
from .connect import Pool
from .txn import constraint_of, has_nul, statement

__all__ = ["PgTenants"]

_COLUMNS = "key, node, generation, epoch, state, incarnation, schema_version, created"
_T_COLUMNS = ", ".join(f"t.{column}" for column in _COLUMNS.split(", "))
_LOOKUP = f"SELECT {_COLUMNS} FROM shardlite.tenants WHERE key = %s"
#: The tenants on this root's nodes (the enumerations' scope); its one parameter is the root id.
_MINE = "shardlite.tenants t JOIN shardlite.nodes n ON n.name = t.node WHERE n.root_id = %s"
_LIVE_SQL = "t.state IN ('active', 'moving')"

_ALLOCATE = "INSERT INTO shardlite.generations(key, node, purpose, at) VALUES (%s, %s, %s, %s) RETURNING generation"
#: The same, committed without waiting for its WAL flush: ``set_config(..., true)`` sets
#: ``synchronous_commit`` for the statement's own (implicit) transaction only, in the same round trip.
_RELAXED = ("WITH relaxed AS (SELECT set_config('synchronous_commit', 'off', true)) "
            "INSERT INTO shardlite.generations(key, node, purpose, at) SELECT %s, %s, %s, %s FROM relaxed "
            "RETURNING generation")
#: The key's row (or a row of NULLs) and, when it has none, or a tombstone and ``revive``, a creation's
#: generation (``_RELAXED``'s insert, run only then: its ``WHERE`` is false otherwise), in one statement.
_LOOKUP_OR_ALLOCATE = (
    f"WITH found AS (SELECT {_COLUMNS} FROM shardlite.tenants WHERE key = %(key)s), "
    "relaxed AS (SELECT set_config('synchronous_commit', 'off', true)), "
    "alloc AS (INSERT INTO shardlite.generations(key, node, purpose, at) "
    "SELECT %(key)s, %(node)s, 'create', %(at)s FROM relaxed "
    "WHERE NOT EXISTS (SELECT 1 FROM found WHERE state <> 'dropped' OR NOT %(revive)s) RETURNING generation) "
    f"SELECT (SELECT generation FROM alloc), {_COLUMNS} FROM (SELECT 1) one LEFT JOIN found ON true")
#: Insert, re-create a tombstone, or meet a live row (written nothing) and read it, in one statement.
_REGISTER = (
    f"WITH ins AS (INSERT INTO shardlite.tenants AS t({_COLUMNS}, updated) "
    "VALUES (%(key)s, %(node)s, %(generation)s, 1, 'active', %(incarnation)s, %(version)s, %(now)s, %(now)s) "
    "ON CONFLICT (key) DO UPDATE SET node = excluded.node, generation = excluded.generation, "
    "epoch = t.epoch + 1, state = 'active', incarnation = excluded.incarnation, "
    "schema_version = excluded.schema_version, created = excluded.created, updated = excluded.updated "
    f"WHERE t.state = 'dropped' RETURNING {_T_COLUMNS}) "
    f"SELECT {_COLUMNS} FROM ins UNION ALL "
    f"SELECT {_COLUMNS} FROM shardlite.tenants WHERE key = %(key)s AND NOT EXISTS (SELECT 1 FROM ins)")


def _translated(exc: errors.IntegrityError, key: str, node: str, generation: int) -> Exception:
    """The contract's error for a constraint ``shardlite.tenants`` refused, by constraint name."""
    name = constraint_of(exc)
    if name == "tenants_node_fkey":
        return ConfigurationError(f"tenant {key!r} cannot be placed on node {node!r}: no such node")
    if name == "tenants_generation_key":
        return GenerationTaken(f"tenant {key!r}: generation {generation} is already used; allocate one")
    return exc


def _refuse_nul(what: str, *texts: str) -> None:
    if has_nul(*texts):
        raise ValueError(f"{what} holds U+0000 (NUL), which no tenant key or incarnation may hold")


def _known_node(key: str, node: str) -> None:
    """A node name with NUL names no node (PostgreSQL's text cannot hold it): the unknown node's error."""
    if has_nul(node):
        raise ConfigurationError(f"tenant {key!r} cannot be placed on node {node!r}: no such node")


class PgTenants:
    """The tenant catalog in the database of ``pool`` as root ``root_id`` sees it (see the module doc)."""

    def __init__(self, pool: Pool, root_id: str) -> None:
        self.pool = pool
        self.root_id = root_id

    def lookup(self, key: str) -> TenantRecord | None:
        if has_nul(key):
            return None
        with self.pool.connection() as conn:  # the hot path: one statement, no transaction of its own
            row = conn.execute(_LOOKUP, (key,)).fetchone()
        return record_of(row) if row else None

    def allocate_generation(self, key: str, node: str, purpose: str) -> int:
        """A new generation (see the contract). For ``purpose="create"`` the allocation commits without
        waiting for its WAL flush, which halves the durable commits of a tenant creation. Why that keeps
        every rule:

        * PostgreSQL writes one WAL stream and flushes it in order: a commit that waits for its flush makes
          every record before it durable. The creation's registration is such a commit and comes after the
          allocation, so a generation a tenant row holds is durably allocated, and the sequence never hands
          it out again, even after a crash of the server.
        * Only a crash of the server (or of its machine) within the flush delay (``wal_writer_delay``) of
          an allocation that no durable commit followed can lose it; the sequence then hands that
          generation out again. Nothing registered holds it; at most a file at ``(key, generation)`` does,
          written by a creator that never registered (it died, or its registration failed): an orphan,
          never routed to. The creator handles both meetings (:mod:`shardlite.front.tenant_create`): a file
          already at its path makes it allocate again and leave that file alone; a registration refused
          with :class:`~shardlite.meta.tenants.GenerationTaken` (two creators of different keys given one
          generation) removes its own file and allocates again.

        Moves, restores and imports keep the durable commit: they link their file without that handling."""
        _refuse_nul("the key, node or purpose", key, node, purpose)
        sql = _RELAXED if purpose == "create" else _ALLOCATE

        def body(conn: Connection[Any]) -> int:
            row = conn.execute(sql, (key, node, purpose, time.time())).fetchone()
            assert row is not None
            return int(row[0])

        return statement(self.pool, body)

    def lookup_or_allocate(self, key: str, node: str, *, revive: bool = True) -> tuple[TenantRecord | None, int | None]:
        """One statement (see :data:`_LOOKUP_OR_ALLOCATE`); the allocation commits as a ``create``'s does
        (see :meth:`allocate_generation`)."""
        if has_nul(key):
            return None, None  # no row holds NUL, and none may: register refuses it before the server
        _known_node(key, node)

        def body(conn: Connection[Any]) -> tuple[TenantRecord | None, int | None]:
            row = conn.execute(_LOOKUP_OR_ALLOCATE,
                               {"key": key, "node": node, "at": time.time(), "revive": revive}).fetchone()
            assert row is not None
            record = record_of(row[1:]) if row[1] is not None else None
            return record, None if row[0] is None else int(row[0])

        return statement(self.pool, body)

    def register(self, key: str, node: str, generation: int, incarnation: str,
                 schema_version: int) -> TenantRecord:
        _refuse_nul("the key or incarnation", key, incarnation)
        _known_node(key, node)

        def body(conn: Connection[Any]) -> TenantRecord:
            params = {"key": key, "node": node, "generation": generation, "incarnation": incarnation,
                      "version": schema_version, "now": time.time()}
            try:
                row = conn.execute(_REGISTER, params).fetchone()
            except errors.IntegrityError as exc:
                raise _translated(exc, key, node, generation) from None
            if row is None:  # a live row committed after the statement's snapshot (a racing registrant)
                row = conn.execute(_LOOKUP, (key,)).fetchone()
            assert row is not None
            return record_of(row)

        return statement(self.pool, body)

    def set_state(self, key: str, state: str, *, expect_generation: int, expect_states: Collection[str]) -> None:
        expected = list(expect_states)
        check_states(state, expected)

        def body(conn: Connection[Any]) -> bool:
            return conn.execute(
                "UPDATE shardlite.tenants SET state = %s, updated = %s "
                "WHERE key = %s AND generation = %s AND state = ANY(%s) RETURNING 1",
                (state, time.time(), key, expect_generation, expected)).fetchone() is not None

        if has_nul(key) or not statement(self.pool, body):
            raise self._conflict(key, expect_generation, expected)

    def flip(self, key: str, *, from_generation: int, node: str, generation: int, expect_states: Collection[str],
             incarnation: str | None = None) -> TenantRecord:
        expected = list(expect_states)
        check_states(None, expected)
        if "dropped" in expected:
            raise ValueError("a tombstone is never flipped (register re-creates it)")
        _refuse_nul("the incarnation", incarnation or "")
        _known_node(key, node)

        def body(conn: Connection[Any]) -> Sequence[Any] | None:
            try:
                return conn.execute(
                    "UPDATE shardlite.tenants SET node = %s, generation = %s, epoch = epoch + 1, state = 'active', "
                    "updated = %s, incarnation = coalesce(%s::text, incarnation) "
                    f"WHERE key = %s AND generation = %s AND state = ANY(%s) RETURNING {_COLUMNS}",
                    (node, generation, time.time(), incarnation, key, from_generation, expected)).fetchone()
            except errors.IntegrityError as exc:
                raise _translated(exc, key, node, generation) from None

        row = None if has_nul(key) else statement(self.pool, body)
        if row is None:
            raise self._conflict(key, from_generation, expected)
        return record_of(row)

    def _conflict(self, key: str, generation: int, expected: Sequence[str]) -> MetaConflict:
        """The conflict's error, naming the row as it is now (read after the failed compare-and-set: for the
        message only)."""
        found = self.lookup(key)
        what = "no row" if found is None else f"generation {found.generation}, state {found.state}"
        return MetaConflict(f"tenant {key!r} changed meanwhile: expected generation {generation} in state "
                            f"{' or '.join(expected)}, found {what}; nothing was written")

    def note_schema_version(self, key: str, version: int) -> None:
        if has_nul(key):
            return
        statement(self.pool, lambda conn: conn.execute(
            "UPDATE shardlite.tenants SET schema_version = %s WHERE key = %s AND schema_version < %s",
            (version, key, version)))

    def iter_tenants(self, *, states: Collection[str] = LIVE, batch: int = 1000,
                     after: str = "") -> Iterator[TenantRecord]:
        wanted = list(states)
        check_states(None, wanted)
        if batch < 1:
            raise ValueError("batch must be at least 1")
        # no key holds NUL, so the keys after 'a\0b' are the keys after 'a' (except 'a' itself, which sorts
        # before 'a\0b'), i.e. exactly those greater than 'a' and not equal to it: '>' on the text before NUL
        after = after.split("\0", 1)[0]
        while True:
            with self.pool.connection() as conn:
                rows = conn.execute(f"SELECT {_T_COLUMNS} FROM {_MINE} AND t.key > %s AND t.state = ANY(%s) "
                                    "ORDER BY t.key LIMIT %s", (self.root_id, after, wanted, batch)).fetchall()
            for row in rows:
                yield record_of(row)
            if len(rows) < batch:
                return
            after = str(rows[-1][0])

    def count_by_node(self) -> dict[str, int]:
        with self.pool.connection() as conn:
            rows = conn.execute(f"SELECT t.node, count(*) FROM {_MINE} AND {_LIVE_SQL} GROUP BY t.node",
                                (self.root_id,)).fetchall()
        return {str(node): int(count) for node, count in rows}

    def schema_versions(self) -> dict[int, int]:
        with self.pool.connection() as conn:
            rows = conn.execute(f"SELECT t.schema_version, count(*) FROM {_MINE} AND {_LIVE_SQL} "
                                "GROUP BY t.schema_version ORDER BY t.schema_version", (self.root_id,)).fetchall()
        return {int(v): int(c) for v, c in rows}

    def max_schema_version(self, prefix: str) -> int | None:
        if has_nul(prefix):
            return None  # no key holds NUL
        # ':' + 1 is ';': every key of the form 'prefix:...' sorts in [prefix:, prefix;) by code point
        with self.pool.connection() as conn:
            row = conn.execute(f"SELECT max(t.schema_version) FROM {_MINE} AND t.key >= %s AND t.key < %s "
                               f"AND {_LIVE_SQL}", (self.root_id, prefix + ":", prefix + ";")).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def has_rows(self) -> bool:
        with self.pool.connection() as conn:
            row = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {_MINE})", (self.root_id,)).fetchone()
        return bool(row and row[0])


def _conforms(tenants: PgTenants) -> TenantCatalog:
    return tenants  # mypy checks here that PgTenants satisfies the TenantCatalog contract
