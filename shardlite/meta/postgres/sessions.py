"""Sessions in PostgreSQL: :class:`PgSessions`, the :class:`~shardlite.meta.sessions.SessionStore` on
``shardlite.sessions``.

Reads (:meth:`PgSessions.live`, :meth:`PgSessions.known`) are one statement on a pooled autocommit
connection: no transaction, no lock. Every write is one statement except :meth:`PgSessions.rotate`, and each
compare-and-set is the row lock of a conditional ``UPDATE``: at READ COMMITTED a second updater of the row
waits for the first, then re-checks its ``WHERE`` on the row as the first left it, so of several revokes (or
rotations) of one session exactly one matches. "The account exists" is the foreign key
``sessions_account_id_fkey`` (:class:`~shardlite.UnknownAccount`). Multi-row writes (``revoke_all``,
``purge``) may deadlock with each other; :func:`.txn.retrying` runs them again.

Every write that ends a session that was live NOTIFYs :data:`.accounts.SESSION_HINTS` in its own
transaction (:mod:`.session_cache`). :meth:`PgSessions.purge` does not: it deletes only sessions already
revoked (hinted then) or expired at the caller's clock, which the policy's own checks refuse from any cached
copy too (the cached ``expires`` never changes, the cached ``last_seen`` is never newer than the stored one).
"""

from __future__ import annotations

import psycopg

from ...errors import AuthenticationFailed, UnknownAccount
from ...front.sessions import Session
from ..sessions import SessionStore
from .accounts import SESSION_HINTS, account_hint, digest_hint, unknown_account
from .connect import Pool
from .txn import retrying

__all__ = ["PgSessions"]

#: Session's fields, in its order, of a session not revoked.
_LIVE = ("SELECT account_id, created, expires, idle_ttl, last_seen FROM shardlite.sessions "
         "WHERE token_hash = %s AND revoked IS NULL")
_KNOWN = "SELECT 1 FROM shardlite.sessions WHERE token_hash = %s"
_INSERT = ("INSERT INTO shardlite.sessions(token_hash, account_id, created, expires, idle_ttl, last_seen) "
           "VALUES (%s, %s, %s, %s, %s, %s)")
#: rotate's compare-and-set: revoke ``old`` only while it is live at ``now``, returning what the new row copies.
_REVOKE_LIVE = ("UPDATE shardlite.sessions SET revoked = %s WHERE token_hash = %s AND revoked IS NULL "
                "AND expires > %s AND (idle_ttl IS NULL OR %s - last_seen < idle_ttl) "
                "RETURNING account_id, expires, idle_ttl")

_session = tuple.__new__  # Session's fields are the row _LIVE returns: build it from the row as it is


class PgSessions:
    """``meta.sessions`` on PostgreSQL (see :class:`~shardlite.meta.sessions.SessionStore` and the module doc)."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool

    def insert(self, digest: bytes, account_id: int, created: float, expires: float,
               idle_ttl: float | None) -> None:
        def unit() -> None:
            with self._pool.connection() as conn:
                conn.execute(_INSERT, (digest, account_id, created, expires, idle_ttl, created))

        try:
            retrying(unit)
        except psycopg.errors.ForeignKeyViolation as exc:
            if unknown_account(exc):
                raise UnknownAccount(f"no account {account_id!r}") from None
            raise

    def live(self, digest: bytes) -> Session | None:
        # the hot path: one statement, autocommit, the row as the Session it already is
        with self._pool.connection() as conn:
            row = conn.execute(_LIVE, (digest,)).fetchone()
        return None if row is None else _session(Session, row)

    def local(self, digest: bytes | None) -> bool:
        return False  # every read is a round trip (the cache in front of this, CachedSessions, says otherwise)

    def known(self, digest: bytes) -> bool:
        with self._pool.connection() as conn:
            return conn.execute(_KNOWN, (digest,)).fetchone() is not None

    def touch(self, digest: bytes, now: float) -> None:
        def unit() -> None:
            with self._pool.connection() as conn:
                conn.execute("UPDATE shardlite.sessions SET last_seen = %s WHERE token_hash = %s AND last_seen < %s",
                             (now, digest, now))

        retrying(unit)

    def revoke(self, digest: bytes, now: float) -> bool:
        def unit() -> bool:
            with self._pool.connection() as conn:  # one statement: the compare-and-set and its hint
                return conn.execute("WITH done AS (UPDATE shardlite.sessions SET revoked = %s WHERE token_hash = %s "
                                    "AND revoked IS NULL RETURNING 1) SELECT pg_notify(%s, %s) FROM done",
                                    (now, digest, SESSION_HINTS, digest_hint(digest))).rowcount > 0

        return retrying(unit)

    def revoke_all(self, account_id: int, now: float) -> int:
        def unit() -> int:
            with self._pool.connection() as conn:
                row = conn.execute(
                    "WITH done AS (UPDATE shardlite.sessions SET revoked = %s WHERE account_id = %s "
                    "AND revoked IS NULL RETURNING 1), n AS (SELECT count(*) AS n FROM done) "
                    "SELECT n, CASE WHEN n > 0 THEN pg_notify(%s, %s) END FROM n",
                    (now, account_id, SESSION_HINTS, account_hint(account_id))).fetchone()
            return int(row[0]) if row else 0

        return retrying(unit)

    def rotate(self, old: bytes, new: bytes, now: float) -> None:
        def unit() -> None:
            with self._pool.connection() as conn, conn.transaction():
                row = conn.execute(_REVOKE_LIVE, (now, old, now, now)).fetchone()
                if row is None:
                    raise AuthenticationFailed("the session is unknown, expired or revoked")
                account_id, expires, idle_ttl = row
                conn.execute(_INSERT, (new, account_id, now, expires, idle_ttl, now))
                conn.execute("SELECT pg_notify(%s, %s)", (SESSION_HINTS, digest_hint(old)))

        retrying(unit)

    def count_live(self, account_id: int) -> int:
        with self._pool.connection() as conn:
            row = conn.execute("SELECT count(*) FROM shardlite.sessions WHERE account_id = %s AND revoked IS NULL",
                               (account_id,)).fetchone()
        return int(row[0]) if row else 0

    def purge(self, now: float) -> int:
        def unit() -> int:
            with self._pool.connection() as conn:
                return conn.execute("DELETE FROM shardlite.sessions WHERE revoked IS NOT NULL OR expires <= %s "
                                    "OR (idle_ttl IS NOT NULL AND last_seen + idle_ttl <= %s)", (now, now)).rowcount

        return retrying(unit)


def _conforms(sessions: PgSessions) -> SessionStore:
    return sessions  # mypy checks here that PgSessions satisfies the SessionStore contract
