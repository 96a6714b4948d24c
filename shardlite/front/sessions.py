"""Sessions in the global DB (rules: session tokens never rest in plain text).

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
from typing import TYPE_CHECKING, NamedTuple

from ..errors import AuthenticationFailed, MetaUnavailable, UnknownAccount
from .accounts import valid_id

if TYPE_CHECKING:
    from ..meta.sessions import SessionStore

__all__ = ["Session", "Sessions", "TOKEN_LENGTH"]

#: Length of a token: base64url of 32 bytes without padding.
TOKEN_LENGTH = 43
#: Default number of token digests ``resolve`` remembers (about 4 MB when full).
DIGEST_CACHE = 16384


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
    """``router.sessions``: create, resolve, revoke, rotate and purge sessions.

    The policy lives here (tokens, TTLs, expiry, the digest cache, throttled activity writes); the rows
    live behind the contract ``store`` (:mod:`shardlite.meta.sessions`), keyed by the token's SHA-256."""

    def __init__(self, store: SessionStore, clock: Callable[[], float] = time.time, *,
                 default_ttl: float = 30 * 24 * 3600, touch_interval: float = 60.0,
                 digest_cache: int = DIGEST_CACHE) -> None:
        self._store = store
        self._live = store.live  # bound once: resolve is the hot path
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
        self._store.insert(digest, account_id, now, now + ttl, idle_ttl)
        return token

    def resolve(self, token: object, *, _touch: Callable[[bytes, Session], Session] | None = None) -> Session | None:
        """The live session for ``token``; None when unknown, malformed, expired, idle-expired or revoked.

        The hot path of every authenticated request: one indexed read (:meth:`SessionStore.live
        <shardlite.meta.sessions.SessionStore.live>`), its checks written out here (each call and tuple
        saved is a measurable share of the read). When a throttled activity write is due it goes through
        ``_touch`` (default :meth:`touch`; the async twin passes its own, which defers the write to a
        worker thread)."""
        # exactly str: a subclass could compare equal to a remembered token it is not
        digest = self._digests.get(token) if type(token) is str else None
        if digest is None:
            digest = self._remember(token)
            if digest is None:
                return None
        session = self._live(digest)
        if session is None:
            return None
        now = self.clock()
        if now >= session[2]:  # expires
            return None
        idle_ttl = session[3]
        if idle_ttl is not None:
            idle = now - session[4]  # last_seen
            if idle >= idle_ttl:
                return None
            if idle >= self.touch_interval or idle >= idle_ttl / 4:
                return (_touch or self.touch)(digest, session)
        return session

    def _local(self, token: object) -> bool:
        """True when :meth:`resolve` of ``token`` needs no network round trip (see
        :meth:`SessionStore.local <shardlite.meta.sessions.SessionStore.local>`): the async twin then resolves
        on its event loop."""
        return self._store.local(self._digests.get(token) if type(token) is str else None)

    def _remember(self, token: object) -> bytes | None:
        """The digest of a well-formed token, remembered if a session row has it (a token seen for the
        first time costs one more indexed read); None for a malformed or unknown token."""
        digest = _digest(token)
        if digest is None or not self._digest_cache:
            return digest
        if not self._store.known(digest):
            return None
        if len(self._digests) >= self._digest_cache:
            self._digests.clear()
        self._digests[token] = digest  # type: ignore[index]  # _digest accepted it: a str
        return digest

    def touch(self, digest: bytes, session: Session) -> Session:
        """The write half of :meth:`resolve`: record activity (throttled by :meth:`resolve`). When the
        metadata store cannot be reached, ``session`` is returned as it was: a session answered from a cache
        keeps working (issue 15 point 4), and an unmoved stamp can only make it idle out sooner, never
        later; the next resolve due a touch tries again."""
        now = self.clock()
        try:
            self._store.touch(digest, now)
        except MetaUnavailable:
            return session
        return session._replace(last_seen=now)

    def revoke(self, token: object) -> bool:
        """Revoke one session; True if a live session was revoked."""
        self._forget(token)
        digest = _digest(token)
        if digest is None:
            return False
        return self._store.revoke(digest, self.clock())

    def revoke_all(self, account_id: int) -> int:
        """Revoke every session of ``account_id``; returns how many."""
        if not valid_id(account_id):
            return 0
        return self._store.revoke_all(account_id, self.clock())

    def rotate(self, token: object) -> str:
        """Replace a live session by a new token with the same absolute expiry and idle policy; the old
        token stops working. :class:`AuthenticationFailed` when ``token`` is not a live session."""
        self._forget(token)
        digest = _digest(token)
        if digest is None:
            raise AuthenticationFailed("the session is unknown, expired or revoked")
        new_token = secrets.token_urlsafe(32)
        new_digest = _digest(new_token)
        assert new_digest is not None
        self._store.rotate(digest, new_digest, self.clock())
        return new_token

    def count_live(self, account_id: int) -> int:
        """Sessions of ``account_id`` not revoked (expired ones included until :meth:`purge`)."""
        if not valid_id(account_id):
            return 0
        return self._store.count_live(account_id)

    def purge(self) -> int:
        """Delete expired, idle-expired and revoked sessions; returns how many rows went."""
        return self._store.purge(self.clock())
