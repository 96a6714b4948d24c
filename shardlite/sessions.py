"""Sessions in the global DB (brief rule 11).

* A token is 32 random bytes (256 bits) from :mod:`secrets`, URL-safe base64 without padding (43
  characters), returned once. The DB stores only its SHA-256, so a copy of the data root (DB, WAL,
  backups) never reveals a usable token.
* Expiry is absolute (``ttl``, from creation) and optionally idle (``idle_ttl``, from the last use).
* ``resolve`` is a read. Recording activity for idle expiry is throttled: ``last_seen`` is written only when
  it is older than ``min(touch_interval, idle_ttl / 4)``, so a busy session costs one write per interval,
  not one per request.
* Tokens never appear in reprs, logs or exceptions: :class:`Session` does not carry one.
* ``resolve`` remembers the SHA-256 of the tokens it found (a bounded in-process map of
  ``digest_cache`` entries, emptied when full): hashing is a sixth of a resolve, and an app resolves the
  same tokens request after request. A digest is a pure function of its token, so the map never changes
  an answer (revocation and expiry are read from the DB every time). It holds raw tokens in this
  process's memory (as its requests do), never on disk; ``revoke``/``rotate`` drop theirs;
  ``router.sessions.digest_cache = 0`` turns it off.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import apsw

from .accounts import valid_id
from .authorizer import INTERNAL_SQL as _I
from .errors import AuthenticationFailed, UnknownAccount
from .globaldb import GlobalDB

__all__ = ["Session", "Sessions", "TOKEN_LENGTH"]

#: Length of a token: base64url of 32 bytes without padding.
TOKEN_LENGTH = 43
#: Default number of token digests ``resolve`` remembers (about 4 MB when full).
DIGEST_CACHE = 16384
_RESOLVE = ("SELECT account_id, created, expires, idle_ttl, last_seen, revoked FROM _shardlite_sessions "
            "WHERE token_hash = ?")
#: Session's fields, in its order, of a session not revoked.
_LIVE = ("SELECT account_id, created, expires, idle_ttl, last_seen FROM _shardlite_sessions "
         "WHERE token_hash = ? AND revoked IS NULL")


class Session(NamedTuple):
    """A snapshot of a live session (no token inside: it cannot leak through a repr or a log line).
    Immutable; a named tuple because it is built on the hot path of every request straight from the
    row SQLite returns (a dataclass costs twice as much to build)."""

    account_id: int
    created: float
    expires: float
    idle_ttl: float | None
    last_seen: float

    @property
    def idle_expires(self) -> float | None:
        return None if self.idle_ttl is None else self.last_seen + self.idle_ttl


_session = tuple.__new__  # Session's fields are the row _LIVE returns: build it from the row as it is


try:  # CPython's own SHA-256 (HACL*): for a 43-byte token it is ~20% faster than OpenSSL's object setup
    from _sha256 import sha256 as _sha256
except ImportError:  # pragma: no cover - other interpreters
    _sha256 = hashlib.sha256


def _digest(token: object) -> bytes | None:
    if type(token) is not str or len(token) != TOKEN_LENGTH or not token.isascii():
        return None
    digest: bytes = _sha256(token.encode()).digest()
    return digest


class Sessions:
    """``router.sessions``: create, resolve, revoke, rotate and purge sessions."""

    def __init__(self, db: GlobalDB, clock: Callable[[], float] = time.time, *,
                 default_ttl: float = 30 * 24 * 3600, touch_interval: float = 60.0,
                 digest_cache: int = DIGEST_CACHE) -> None:
        self._db = db
        self.clock = clock
        self.default_ttl = default_ttl
        self.touch_interval = touch_interval
        # token -> SHA-256 for tokens resolve() found in the DB; only found ones, so garbage tokens
        # cannot churn it. Emptied when full (no LRU bookkeeping on the hot path).
        self._digests: dict[str, bytes] = {}
        self.digest_cache = digest_cache

    @property
    def digest_cache(self) -> int:
        """How many token digests :meth:`resolve` remembers (0: none); setting it empties the map."""
        return self._digest_cache

    @digest_cache.setter
    def digest_cache(self, entries: int) -> None:
        if type(entries) is not int or entries < 0:
            raise ValueError("digest_cache must be an int >= 0")
        self._digest_cache = entries
        self._digests.clear()

    def _forget(self, token: object) -> None:
        if type(token) is str:
            self._digests.pop(token, None)

    def create(self, account_id: int, *, ttl: float | None = None, idle_ttl: float | None = None) -> str:
        """A new session for ``account_id``; returns the raw token (shown once, never stored)."""
        if not valid_id(account_id):
            raise UnknownAccount(f"no account {account_id!r}")
        ttl = self.default_ttl if ttl is None else ttl
        if not ttl > 0 or (idle_ttl is not None and not idle_ttl > 0):
            raise ValueError("ttl and idle_ttl must be positive numbers of seconds")
        token = secrets.token_urlsafe(32)
        digest = _digest(token)
        assert digest is not None
        now = self.clock()
        try:
            with self._db.write() as conn:
                conn.execute(_I + "INSERT INTO _shardlite_sessions(token_hash, account_id, created, expires, "
                             "idle_ttl, last_seen) VALUES (?, ?, ?, ?, ?, ?)",
                             (digest, account_id, now, now + ttl, idle_ttl, now))
        except apsw.ConstraintError:
            raise UnknownAccount(f"no account {account_id!r}") from None
        return token

    def _live(self, row: tuple[Any, ...], now: float) -> bool:
        _, _, expires, idle_ttl, last_seen, revoked = row
        if revoked is not None or now >= expires:
            return False
        return idle_ttl is None or now - last_seen < idle_ttl

    def resolve(self, token: object, *, _touch: Callable[[bytes, Session], Session] | None = None) -> Session | None:
        """The live session for ``token``; None when unknown, malformed, expired, idle-expired or revoked.

        The hot path of every authenticated request: one indexed read on this thread's read connection, its
        checks written out here (each call and tuple saved is a measurable share of the read). When
        a throttled activity write is due it goes through ``_touch`` (default :meth:`touch`; the async twin
        passes its own, which defers the write to a worker thread)."""
        # exactly str: a subclass could compare equal to a remembered token it is not
        digest = self._digests.get(token) if type(token) is str else None
        if digest is None:
            digest = self._remember(token)
            if digest is None:
                return None
        try:
            conn = self._db._local.conn  # this thread's reader without the call (GlobalDB.reader)
        except AttributeError:
            conn = self._db.reader()
        for row in conn.execute(_LIVE, (digest,)):
            now = self.clock()
            if now >= row[2]:
                return None
            idle_ttl = row[3]
            if idle_ttl is not None:
                idle = now - row[4]
                if idle >= idle_ttl:
                    return None
                if idle >= self.touch_interval or idle >= idle_ttl / 4:
                    return (_touch or self.touch)(digest, _session(Session, row))
            return _session(Session, row)
        return None

    def _remember(self, token: object) -> bytes | None:
        """The digest of a well-formed token, remembered if a session row has it (a token seen for the
        first time costs one more indexed read); None for a malformed or unknown token."""
        digest = _digest(token)
        if digest is None or not self._digest_cache:
            return digest
        if not self._db.reader().execute("SELECT 1 FROM _shardlite_sessions WHERE token_hash = ?",
                                         (digest,)).fetchall():
            return None
        if len(self._digests) >= self._digest_cache:
            self._digests.clear()
        self._digests[token] = digest  # type: ignore[index]  # _digest accepted it: a str
        return digest

    def touch(self, digest: bytes, session: Session) -> Session:
        """The write half of :meth:`resolve`: record activity (throttled by :meth:`resolve`)."""
        now = self.clock()
        with self._db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_sessions SET last_seen = ? WHERE token_hash = ? "
                         "AND last_seen < ?", (now, digest, now))
        return session._replace(last_seen=now)

    def revoke(self, token: object) -> bool:
        """Revoke one session; True if a live session was revoked."""
        self._forget(token)
        digest = _digest(token)
        if digest is None:
            return False
        with self._db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_sessions SET revoked = ? WHERE token_hash = ? AND revoked IS NULL",
                         (self.clock(), digest))
            return conn.changes() > 0

    def revoke_all(self, account_id: int) -> int:
        """Revoke every session of ``account_id``; returns how many."""
        if not valid_id(account_id):
            return 0
        with self._db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_sessions SET revoked = ? WHERE account_id = ? AND revoked IS NULL",
                         (self.clock(), account_id))
            return int(conn.changes())

    def rotate(self, token: object) -> str:
        """Replace a live session by a new token with the same absolute expiry and idle policy; the old
        token stops working. :class:`AuthenticationFailed` when ``token`` is not a live session."""
        self._forget(token)
        digest = _digest(token)
        now = self.clock()
        new_token = secrets.token_urlsafe(32)
        new_digest = _digest(new_token)
        with self._db.write() as conn:
            rows: list[Any] = conn.execute(_RESOLVE, (digest,)).fetchall() if digest is not None else []
            if not rows or not self._live(rows[0], now):
                raise AuthenticationFailed("the session is unknown, expired or revoked")
            account_id, created, expires, idle_ttl, _, _ = rows[0]
            conn.execute(_I + "UPDATE _shardlite_sessions SET revoked = ? WHERE token_hash = ?", (now, digest))
            conn.execute(_I + "INSERT INTO _shardlite_sessions(token_hash, account_id, created, expires, idle_ttl, "
                         "last_seen) VALUES (?, ?, ?, ?, ?, ?)", (new_digest, account_id, now, expires, idle_ttl, now))
        return new_token

    def count_live(self, account_id: int) -> int:
        """Sessions of ``account_id`` not revoked (expired ones included until :meth:`purge`)."""
        if not valid_id(account_id):
            return 0
        rows = self._db.read("SELECT count(*) FROM _shardlite_sessions WHERE account_id = ? AND revoked IS NULL",
                             (account_id,))
        return int(rows[0][0])

    def purge(self) -> int:
        """Delete expired, idle-expired and revoked sessions; returns how many rows went."""
        now = self.clock()
        with self._db.write() as conn:
            conn.execute(_I + "DELETE FROM _shardlite_sessions WHERE revoked IS NOT NULL OR expires <= ? "
                         "OR (idle_ttl IS NOT NULL AND last_seen + idle_ttl <= ?)", (now, now))
            return int(conn.changes())
