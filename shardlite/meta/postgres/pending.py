"""The pending-work index and the dead letters in PostgreSQL (``shardlite.pending``,
``shardlite.dead_letters``): the PostgreSQL side of :mod:`shardlite.meta.pending`.

How each rule holds without SQLite's one-writer lock (autocommit connections, READ COMMITTED):

* :meth:`PgPending.flag_many` is one ``INSERT ... ON CONFLICT (key) DO UPDATE`` over the (deduplicated,
  code-point sorted) keys: the upsert takes each row's lock and re-reads its committed version before it adds
  1, so concurrent flaggers never lose a bump, and sorted keys mean two flaggers lock rows in one order. One
  statement, one round trip, its own transaction: the hot path of the emit.
* A new row's version starts at the client's clock in microseconds, as on SQLite (not a sequence: a flag
  deleted and written again must not land on a version an older row of that key reached, and the same
  rule on both backends keeps ``meta copy``'s versions meaningful).
* :meth:`PgPending.clear_many` deletes ``WHERE key = %s AND version = %s``: a conditional delete that
  re-checks the version of the row it locked, so a flag bumped meanwhile is left alone. Several pairs are one
  transaction, deleted in key order (the flaggers' lock order), pipelined into one round trip.
* :meth:`PgDeadLetters.add` is ``INSERT ... ON CONFLICT (source, incarnation, seq) DO NOTHING RETURNING 1``:
  concurrent adders of one identity wait on the first and see its row, and exactly one gets True.

* :meth:`PgPending.park` and :meth:`PgPending.wake_many` may be lost in a server crash (the contract allows
  it), so they commit with ``synchronous_commit`` off for their own transaction: ``set_config(...,
  true)`` in the statement itself, evaluated before any row is written, so the commit that follows does
  not wait for the WAL flush and the statement stays one round trip. ``wake_many`` un-parks and reports
  the pairs without a flag in one statement (a CTE; its outer query sees the rows as they were, and an
  update never removes a row).

Deadlocks and serialization failures are retried inside each method (:mod:`.txn`). Reads are single
statements (committed data). Text with NUL is refused before it reaches the server (:class:`ValueError`);
a key with NUL cannot be stored, so reads and deletes of one find nothing without asking.
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from typing import Any

from psycopg import Connection

from ..pending import DeadLetter, DeadLetters, PendingRow, PendingWork
from ..sqlite.failures import refuse_nul
from .connect import Pool
from .txn import has_nul, in_transaction, statement

__all__ = ["PgPending", "PgDeadLetters"]

_FLAG = ("INSERT INTO shardlite.pending AS p(key, version, due, since) "
         "SELECT k, %s, %s, %s FROM unnest(%s::text[]) AS k "
         "ON CONFLICT (key) DO UPDATE SET version = p.version + 1, "
         "due = CASE WHEN p.parked IS NULL THEN LEAST(p.due, excluded.due) ELSE excluded.due END, parked = NULL")
_SET_DUE = ("INSERT INTO shardlite.pending AS p(key, version, due, since) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (key) DO UPDATE SET due = excluded.due, parked = NULL")
_CLEAR = "DELETE FROM shardlite.pending WHERE key = %s AND version = %s"
#: this statement's transaction commits without waiting for the WAL flush (see the module doc)
_NOT_DURABLE = "(SELECT set_config('synchronous_commit', 'off', true)) AS nd"
_PARK = (f"UPDATE shardlite.pending AS p SET parked = %s FROM {_NOT_DURABLE} "
         "WHERE p.key = %s AND p.version = %s AND nd.set_config IS NOT NULL RETURNING 1")
_PARK_MANY = ("WITH w(k, v) AS (SELECT * FROM unnest(%s::text[], %s::bigint[])) "
              f"UPDATE shardlite.pending AS p SET parked = %s FROM w, {_NOT_DURABLE} "
              "WHERE p.key = w.k AND p.version = w.v AND nd.set_config IS NOT NULL RETURNING p.key")
_WAKE = ("WITH w(k, v) AS (SELECT * FROM unnest(%s::text[], %s::bigint[])), "
         f"woken AS (UPDATE shardlite.pending AS p SET parked = NULL, due = %s FROM w, {_NOT_DURABLE} "
         "WHERE p.key = w.k AND p.version = w.v AND p.parked IS NOT NULL AND nd.set_config IS NOT NULL "
         "RETURNING p.key) "
         "SELECT w.k, w.v FROM w WHERE NOT EXISTS "
         "(SELECT 1 FROM shardlite.pending AS q WHERE q.key = w.k AND q.version = w.v)")
_ROW = "SELECT key, version, due, since, parked FROM shardlite.pending"
_LETTER = "source, incarnation, seq, dest, topic, payload, created, attempts, error, died"


def _fresh_version() -> int:
    return time.time_ns() // 1000


def _limit(limit: int) -> int:
    count = int(limit)
    if count < 0:
        raise ValueError(f"limit must be >= 0, not {limit!r}")
    return count


def _row(found: Sequence[Any]) -> PendingRow:
    key, version, due, since, parked = found
    return PendingRow(str(key), int(version), float(due), float(since), None if parked is None else float(parked))


class PgPending:
    """:class:`~shardlite.meta.pending.PendingWork` in ``shardlite.pending``."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def _rows(self, sql: str, params: Sequence[object] = ()) -> list[PendingRow]:
        return statement(self.pool, lambda conn: [_row(r) for r in conn.execute(sql, params).fetchall()])

    def flag_many(self, keys: Sequence[str]) -> None:
        wanted = sorted(set(keys))  # one row once per statement; code-point order = the "C" index order
        if not wanted:
            return
        refuse_nul(*wanted)
        now = time.time()
        params = (_fresh_version(), now, now, wanted)
        statement(self.pool, lambda conn: conn.execute(_FLAG, params))

    def due(self, now: float, limit: int) -> builtins.list[PendingRow]:
        count = _limit(limit)  # a literal LIMIT, as on SQLite (see feed.page_query)
        return self._rows(f"{_ROW} WHERE parked IS NULL AND due <= %s ORDER BY due, key LIMIT {count:d}",
                          (float(now),))

    def all(self) -> builtins.list[PendingRow]:
        return self._rows(f"{_ROW} ORDER BY key")

    def row(self, key: str) -> PendingRow | None:
        if has_nul(key):
            return None
        rows = self._rows(f"{_ROW} WHERE key = %s", (key,))
        return rows[0] if rows else None

    def clear_many(self, pairs: Sequence[tuple[str, int]]) -> None:
        wanted = sorted({(key, int(version)) for key, version in pairs if not has_nul(key)})
        if not wanted:
            return

        def clear(conn: Connection[Any]) -> None:
            with conn.cursor() as cur:
                cur.executemany(_CLEAR, wanted)

        if len(wanted) == 1:
            statement(self.pool, lambda conn: conn.execute(_CLEAR, wanted[0]))
        else:
            in_transaction(self.pool, clear)

    def set_due(self, key: str, due: float) -> None:
        refuse_nul(key)
        params = (key, _fresh_version(), float(due), time.time())
        statement(self.pool, lambda conn: conn.execute(_SET_DUE, params))

    def park(self, key: str, version: int) -> bool:
        if has_nul(key):
            return False
        params = (time.time(), key, int(version))
        return statement(self.pool, lambda conn: conn.execute(_PARK, params).fetchone() is not None)

    def park_many(self, pairs: Sequence[tuple[str, int]]) -> builtins.list[str]:
        given = [(key, int(version)) for key, version in pairs]
        wanted = sorted({pair for pair in given if not has_nul(pair[0])})  # the flaggers' lock order
        if not wanted:
            return []
        params = ([k for k, _ in wanted], [v for _, v in wanted], time.time())
        found = statement(self.pool, lambda conn: conn.execute(_PARK_MANY, params).fetchall())
        parked = {str(k) for (k,) in found}
        return [key for key, _ in given if key in parked]

    def wake_many(self, pairs: Sequence[tuple[str, int]]) -> builtins.list[tuple[str, int]]:
        given = [(key, int(version)) for key, version in pairs]
        wanted = sorted({pair for pair in given if not has_nul(pair[0])})  # the flaggers' lock order
        if not wanted:
            return given
        params = ([k for k, _ in wanted], [v for _, v in wanted], time.time())
        found = statement(self.pool, lambda conn: conn.execute(_WAKE, params).fetchall())
        missing = {(str(k), int(v)) for k, v in found}
        return [pair for pair in given if pair in missing or has_nul(pair[0])]

    def parked(self, limit: int, idle_before: float, after: str = "") -> builtins.list[PendingRow]:
        count = _limit(limit)
        return self._rows(f"{_ROW} WHERE parked IS NOT NULL AND parked <= %s AND key > %s ORDER BY key "
                          f"LIMIT {count:d}", (float(idle_before), after))


def _letter(found: Sequence[Any]) -> DeadLetter:
    source, incarnation, seq, dest, topic, payload, created, attempts, error, died = found
    return DeadLetter(str(source), str(incarnation), int(seq), str(dest), str(topic), str(payload), float(created),
                      int(attempts), str(error), float(died))


class PgDeadLetters:
    """:class:`~shardlite.meta.pending.DeadLetters` in ``shardlite.dead_letters``."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool

    def add(self, letter: DeadLetter) -> bool:
        refuse_nul(letter.source, letter.incarnation, letter.dest, letter.topic, letter.payload, letter.error)
        params = (letter.source, letter.incarnation, int(letter.seq), letter.dest, letter.topic, letter.payload,
                  float(letter.created), int(letter.attempts), letter.error, float(letter.died))
        sql = (f"INSERT INTO shardlite.dead_letters({_LETTER}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
               "ON CONFLICT (source, incarnation, seq) DO NOTHING RETURNING 1")
        return statement(self.pool, lambda conn: conn.execute(sql, params).fetchone() is not None)

    def list(self, limit: int = 1000) -> builtins.list[DeadLetter]:
        sql = (f"SELECT {_LETTER} FROM shardlite.dead_letters "
               f'ORDER BY died, source, seq, incarnation COLLATE "C" LIMIT {_limit(limit):d}')
        return statement(self.pool, lambda conn: [_letter(r) for r in conn.execute(sql).fetchall()])

    def count(self) -> int:
        found = statement(self.pool, lambda conn: conn.execute("SELECT count(*) FROM shardlite.dead_letters")
                          .fetchone())
        return int(found[0]) if found else 0

    def delete(self, source: str, incarnation: str, seq: int) -> bool:
        if has_nul(source, incarnation):
            return False
        params = (source, incarnation, int(seq))
        sql = "DELETE FROM shardlite.dead_letters WHERE source = %s AND incarnation = %s AND seq = %s RETURNING 1"
        return statement(self.pool, lambda conn: conn.execute(sql, params).fetchone() is not None)


def _conforms(pending: PgPending, letters: PgDeadLetters) -> tuple[PendingWork, DeadLetters]:
    return pending, letters  # mypy checks here that both satisfy their contracts
