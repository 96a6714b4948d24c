"""Sessions in ``<root>/global.db``: the SQLite :class:`~shardlite.meta.sessions.SessionStore`.

Reads run on this thread's ``query_only`` reader of :class:`~shardlite.files.globaldb.GlobalDB` (no lock, WAL
readers never block); writes are one ``BEGIN IMMEDIATE`` transaction each on the global writer, which also
makes :meth:`SqliteSessions.rotate`'s check and writes one unit. The revokes are compare-and-set updates
(``revoked IS NULL``), judged by ``changes()``.
"""

from __future__ import annotations

from typing import Any

import apsw

from ...errors import AuthenticationFailed, UnknownAccount
from ...files.authorizer import INTERNAL_SQL as _I
from ...files.globaldb import GlobalDB
from ...front.sessions import Session
from ..sessions import SessionStore

__all__ = ["SqliteSessions"]

#: Session's fields, in its order, of a session not revoked.
_LIVE = ("SELECT account_id, created, expires, idle_ttl, last_seen FROM _shardlite_sessions "
         "WHERE token_hash = ? AND revoked IS NULL")
_KNOWN = "SELECT 1 FROM _shardlite_sessions WHERE token_hash = ?"
_INSERT = (_I + "INSERT INTO _shardlite_sessions(token_hash, account_id, created, expires, idle_ttl, last_seen) "
           "VALUES (?, ?, ?, ?, ?, ?)")
_FOREIGN_KEY = apsw.mapping_extended_result_codes["SQLITE_CONSTRAINT_FOREIGNKEY"]

_session = tuple.__new__  # Session's fields are the row _LIVE returns: build it from the row as it is


class SqliteSessions:
    """``meta.sessions`` on ``global.db`` (see :class:`~shardlite.meta.sessions.SessionStore`)."""

    def __init__(self, db: GlobalDB) -> None:
        self._db = db

    def insert(self, digest: bytes, account_id: int, created: float, expires: float,
               idle_ttl: float | None) -> None:
        try:
            with self._db.write() as conn:
                conn.execute(_INSERT, (digest, account_id, created, expires, idle_ttl, created))
        except apsw.ConstraintError as exc:
            if getattr(exc, "extendedresult", None) == _FOREIGN_KEY:
                raise UnknownAccount(f"no account {account_id!r}") from None
            raise

    def live(self, digest: bytes) -> Session | None:
        # the hot path: one statement on this thread's reader, the row as the Session it already is
        for row in self._db.reader().execute(_LIVE, (digest,)):
            return _session(Session, row)
        return None

    def local(self, digest: bytes | None) -> bool:
        return True

    def known(self, digest: bytes) -> bool:
        return bool(self._db.reader().execute(_KNOWN, (digest,)).fetchall())

    def touch(self, digest: bytes, now: float) -> None:
        with self._db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_sessions SET last_seen = ? WHERE token_hash = ? "
                         "AND last_seen < ?", (now, digest, now))

    def revoke(self, digest: bytes, now: float) -> bool:
        with self._db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_sessions SET revoked = ? WHERE token_hash = ? AND revoked IS NULL",
                         (now, digest))
            return conn.changes() > 0

    def revoke_all(self, account_id: int, now: float) -> int:
        with self._db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_sessions SET revoked = ? WHERE account_id = ? AND revoked IS NULL",
                         (now, account_id))
            return int(conn.changes())

    def rotate(self, old: bytes, new: bytes, now: float) -> None:
        # F8: the liveness check and the two writes are one unit because BEGIN IMMEDIATE admits one writer;
        # the revoke is written as the compare-and-set a PostgreSQL backend runs (UPDATE ... RETURNING)
        with self._db.write() as conn:
            rows: list[Any] = conn.execute(
                "SELECT account_id, expires, idle_ttl FROM _shardlite_sessions WHERE token_hash = ? "
                "AND revoked IS NULL AND expires > ? AND (idle_ttl IS NULL OR ? - last_seen < idle_ttl)",
                (old, now, now)).fetchall()
            if not rows:
                raise AuthenticationFailed("the session is unknown, expired or revoked")
            account_id, expires, idle_ttl = rows[0]
            conn.execute(_I + "UPDATE _shardlite_sessions SET revoked = ? WHERE token_hash = ? AND revoked IS NULL",
                         (now, old))
            conn.execute(_INSERT, (new, account_id, now, expires, idle_ttl, now))

    def count_live(self, account_id: int) -> int:
        rows = self._db.read("SELECT count(*) FROM _shardlite_sessions WHERE account_id = ? AND revoked IS NULL",
                             (account_id,))
        return int(rows[0][0])

    def purge(self, now: float) -> int:
        with self._db.write() as conn:
            conn.execute(_I + "DELETE FROM _shardlite_sessions WHERE revoked IS NOT NULL OR expires <= ? "
                         "OR (idle_ttl IS NOT NULL AND last_seen + idle_ttl <= ?)", (now, now))
            return int(conn.changes())


def _conforms(sessions: SqliteSessions) -> SessionStore:
    return sessions  # mypy checks here that SqliteSessions satisfies the SessionStore contract
