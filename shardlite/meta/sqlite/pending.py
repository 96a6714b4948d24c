"""The pending-work index and the dead letters in the global DB (``_shardlite_pending``,
``_shardlite_dead_letters``): the SQLite side of :mod:`shardlite.meta.pending`.

Every write is one ``BEGIN IMMEDIATE`` transaction on the global DB's writer; reads use the calling
thread's ``query_only`` reader (committed data). Keys and text compare as SQLite's BINARY collation does,
which for UTF-8 text is code-point order (the contract's order).

Versions. A new flag's version starts at the wall clock in microseconds and every flag adds 1, so a flag
deleted and written again does not get a version a relay may still hold (that would need more flags of one
key than microseconds passed between the two rows: flags are written on transitions only, far below that
rate). The upsert is the one statement the emit path pays for, as before.

Parked flags (``parked`` not NULL) stay out of the due index (a partial index ``WHERE parked IS NULL``), so an
idle relay's poll never walks them. ``park`` and ``wake_many`` are ordinary global-DB commits here
(``synchronous=NORMAL`` already skips the fsync the PostgreSQL side turns off); ``park`` of a flag that is
parked with that version already is a read, not a write (its parked time stays: it was idle since).
"""

from __future__ import annotations

import builtins
import time
from collections.abc import Sequence
from typing import Any

from ...files.authorizer import INTERNAL_SQL as _I
from ...files.globaldb import GlobalDB
from ..pending import DeadLetter, DeadLetters, PendingRow, PendingWork
from .failures import UNAVAILABLE, refuse_nul, unavailable

__all__ = ["SqlitePending", "SqliteDeadLetters"]

_FLAG = (_I + "INSERT INTO _shardlite_pending(key, version, due, since) VALUES (?, ?, ?, ?) "
         "ON CONFLICT(key) DO UPDATE SET version = version + 1, "
         "due = CASE WHEN parked IS NULL THEN min(due, excluded.due) ELSE excluded.due END, parked = NULL")
_SET_DUE = (_I + "INSERT INTO _shardlite_pending(key, version, due, since) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(key) DO UPDATE SET due = excluded.due, parked = NULL")
_CLEAR = _I + "DELETE FROM _shardlite_pending WHERE key = ? AND version = ?"
_PARK = _I + "UPDATE _shardlite_pending SET parked = ? WHERE key = ? AND version = ?"
_WAKE = _I + "UPDATE _shardlite_pending SET parked = NULL, due = ? WHERE key = ? AND version = ? AND parked IS NOT NULL"
_IS_PARKED = "SELECT 1 FROM _shardlite_pending WHERE key = ? AND version = ? AND parked IS NOT NULL"
_HAS = _I + "SELECT 1 FROM _shardlite_pending WHERE key = ? AND version = ?"
_ROW = "SELECT key, version, due, since, parked FROM _shardlite_pending"
_LETTER = "source, incarnation, seq, dest, topic, payload, created, attempts, error, died"


def _fresh_version() -> int:
    return time.time_ns() // 1000


def _row(found: Sequence[Any]) -> PendingRow:
    key, version, due, since, parked = found
    return PendingRow(str(key), int(version), float(due), float(since), None if parked is None else float(parked))


class SqlitePending:
    """:class:`~shardlite.meta.pending.PendingWork` in the global DB."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db

    def _read(self, sql: str, params: Sequence[object], doing: str) -> list[tuple[Any, ...]]:
        try:
            return self.db.read(sql, params)
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, doing) from exc

    def flag_many(self, keys: Sequence[str]) -> None:
        now = time.time()
        version = _fresh_version()
        try:
            with self.db.write() as conn:
                conn.executemany(_FLAG, [(key, version, now, now) for key in keys])
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "flagging pending outbox events") from exc

    def due(self, now: float, limit: int) -> builtins.list[PendingRow]:
        rows = self._read(f"{_ROW} WHERE parked IS NULL AND due <= ? ORDER BY due, key LIMIT {int(limit):d}", (now,),
                          "looking for pending work")  # a literal LIMIT: see feed.page_query
        return [_row(r) for r in rows]

    def all(self) -> builtins.list[PendingRow]:
        return [_row(r) for r in self._read(f"{_ROW} ORDER BY key", (), "listing pending work")]

    def row(self, key: str) -> PendingRow | None:
        rows = self._read(f"{_ROW} WHERE key = ?", (key,), "reading a pending-work flag")
        return _row(rows[0]) if rows else None

    def clear_many(self, pairs: Sequence[tuple[str, int]]) -> None:
        try:
            with self.db.write() as conn:
                conn.executemany(_CLEAR, [(key, int(version)) for key, version in pairs])
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "clearing pending-work flags") from exc

    def set_due(self, key: str, due: float) -> None:
        try:
            with self.db.write() as conn:
                conn.execute(_SET_DUE, (key, _fresh_version(), due, time.time()))
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "moving a pending-work flag") from exc

    def park(self, key: str, version: int) -> bool:
        found = self._read(_IS_PARKED, (key, int(version)), "reading a pending-work flag")
        if found:  # parked with that version already (nobody woke it): a read instead of a write
            return True
        try:
            with self.db.write() as conn:
                conn.execute(_PARK, (time.time(), key, int(version)))
                return bool(conn.changes())
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "parking a pending-work flag") from exc

    def park_many(self, pairs: Sequence[tuple[str, int]]) -> builtins.list[str]:
        wanted = [(key, int(version)) for key, version in pairs]
        if not wanted:
            return []
        now = time.time()
        parked: set[str] = set()
        try:
            with self.db.write() as conn:
                for key, version in wanted:
                    conn.execute(_PARK, (now, key, version))
                    if conn.changes():
                        parked.add(key)
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "parking pending-work flags") from exc
        return [key for key, _ in wanted if key in parked]

    def wake_many(self, pairs: Sequence[tuple[str, int]]) -> builtins.list[tuple[str, int]]:
        wanted = [(key, int(version)) for key, version in pairs]
        if not wanted:
            return []
        now = time.time()
        missing: list[tuple[str, int]] = []
        try:
            with self.db.write() as conn:
                for key, version in wanted:
                    conn.execute(_WAKE, (now, key, version))
                    if not conn.changes() and not conn.execute(_HAS, (key, version)).fetchall():
                        missing.append((key, version))
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "waking pending-work flags") from exc
        return missing

    def parked(self, limit: int, idle_before: float, after: str = "") -> builtins.list[PendingRow]:
        rows = self._read(f"{_ROW} WHERE parked IS NOT NULL AND parked <= ? AND key > ? ORDER BY key "
                          f"LIMIT {int(limit):d}", (float(idle_before), after), "listing parked pending work")
        return [_row(r) for r in rows]


def _letter(found: Sequence[Any]) -> DeadLetter:
    source, incarnation, seq, dest, topic, payload, created, attempts, error, died = found
    return DeadLetter(str(source), str(incarnation), int(seq), str(dest), str(topic), str(payload), float(created),
                      int(attempts), str(error), float(died))


class SqliteDeadLetters:
    """:class:`~shardlite.meta.pending.DeadLetters` in the global DB."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db

    def add(self, letter: DeadLetter) -> bool:
        refuse_nul(letter.source, letter.incarnation, letter.dest, letter.topic, letter.payload, letter.error)
        try:
            with self.db.write() as conn:
                conn.execute(_I + f"INSERT INTO _shardlite_dead_letters({_LETTER}) "
                             "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                             (letter.source, letter.incarnation, int(letter.seq), letter.dest, letter.topic,
                              letter.payload, float(letter.created), int(letter.attempts), letter.error,
                              float(letter.died)))
                return bool(conn.changes())
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "adding a dead letter") from exc

    def list(self, limit: int = 1000) -> builtins.list[DeadLetter]:
        try:
            rows = self.db.read(f"SELECT {_LETTER} FROM _shardlite_dead_letters "
                                f"ORDER BY died, source, seq, incarnation LIMIT {int(limit):d}")
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "listing dead letters") from exc
        return [_letter(r) for r in rows]

    def count(self) -> int:
        try:
            rows = self.db.read("SELECT count(*) FROM _shardlite_dead_letters")
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "counting dead letters") from exc
        return int(rows[0][0])

    def delete(self, source: str, incarnation: str, seq: int) -> bool:
        try:
            with self.db.write() as conn:
                conn.execute(_I + "DELETE FROM _shardlite_dead_letters WHERE source = ? AND incarnation = ? "
                             "AND seq = ?", (source, incarnation, int(seq)))
                return bool(conn.changes())
        except UNAVAILABLE as exc:
            raise unavailable(exc, self.db.path, "deleting a dead letter") from exc


def _conforms(pending: SqlitePending, letters: SqliteDeadLetters) -> tuple[PendingWork, DeadLetters]:
    return pending, letters  # mypy checks here that both satisfy their contracts
