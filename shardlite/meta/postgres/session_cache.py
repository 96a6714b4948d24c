"""A cache of live sessions kept right across processes: :class:`CachedSessions` (issue 15 point 3).

``Sessions.resolve`` of a warm token must not pay a round trip to PostgreSQL, and a revoke in any process
must be seen by ``resolve`` in every other within a second. So :meth:`CachedSessions.live` answers from a
dict of digests found live, and every write that ends a session NOTIFYs :data:`.accounts.SESSION_HINTS` in
its own transaction (see :mod:`.sessions`); the store's one :class:`~.listen.Listener` (shared with the
route and node-list hints, :class:`~.meta.PgMeta`) hands each hint to :meth:`CachedSessions.hint`, which
drops the sessions it names. The rules that keep it right:

* **Only while hints flow.** An entry is filled only while the listener is connected, and every (re)connect
  drops the whole cache (NOTIFY is not durable: hints sent while it was down are gone).
* **No fill over a hint.** A read that started before a hint arrived may have seen the row as it was before
  the write; it is returned but not cached (an epoch counter, bumped by every hint, tells).
* **A bounded age.** An entry is trusted for :data:`MAX_AGE` seconds at most, and at most half the
  session's ``idle_ttl``: the stored ``last_seen`` moves when another process touches the session, and the
  copy here must not make the policy judge a session idle-expired that is not (this process's own
  :meth:`touch` refreshes its copy's ``last_seen``, not its age). The age also bounds what a hint lost with
  a silently dead listener connection could cost, until the keepalives notice and the reconnect drops all.
* While the server is down, entries keep answering within their age (issue 15 point 4: sessions in cache
  keep working); nobody can revoke meanwhile, and the reconnect drops them all.

Misses (unknown, revoked) are not cached: they read the store each time.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from ..sessions import SessionStore
from .accounts import ALL_HINT, account_hint, digest_hint
from .listen import Listener
from .sessions import PgSessions

if TYPE_CHECKING:
    from ...front.sessions import Session

__all__ = ["CachedSessions", "MAX_AGE", "MAX_ENTRIES"]

#: Seconds an entry is trusted at most (see the module doc).
MAX_AGE = 30.0
#: Entries at most; the cache is emptied when full (no LRU bookkeeping on the hot path).
MAX_ENTRIES = 100_000


class CachedSessions:
    """``meta.sessions``: :class:`~.sessions.PgSessions` with a cache of live sessions in front of
    :meth:`live` (see the module doc); every other method is the store's. :meth:`attach` names the listener
    whose connection it trusts (the cache stays empty until it is connected), :meth:`close` forgets it."""

    def __init__(self, store: PgSessions, *, max_age: float = MAX_AGE, max_entries: int = MAX_ENTRIES) -> None:
        self.store = store
        self.max_age = max_age
        self.max_entries = max_entries
        #: digest -> (the session, the monotonic time until which the entry is trusted)
        self._cache: dict[bytes, tuple[Session, float]] = {}
        self._epoch = 0
        self._lock = threading.Lock()
        self._listener: Listener | None = None
        # the store's other methods, as they are
        self.insert = store.insert
        self.known = store.known
        self.count_live = store.count_live
        self.purge = store.purge

    def attach(self, listener: Listener) -> None:
        """Take hints from ``listener`` (its owner hands each :data:`SESSION_HINTS` payload to :meth:`hint`
        and each (re)connect to :meth:`reset`); the cache fills only while it is connected."""
        self._listener = listener
        self.reset()

    def close(self) -> None:
        """Stop trusting the cache (the listener's owner closes the listener)."""
        self._listener = None
        self.reset()

    @property
    def listening(self) -> bool:
        return self._listener is not None and self._listener.connected

    def wait_listening(self, timeout: float) -> bool:
        return self._listener is not None and self._listener.wait_connected(timeout)

    # -- writes that end sessions: the store's, then this process's entries go at once (the hint the write
    # sent reaches the other processes, and this one again a moment later)

    def revoke(self, digest: bytes, now: float) -> bool:
        try:
            return self.store.revoke(digest, now)
        finally:
            self.hint(digest_hint(digest))

    def revoke_all(self, account_id: int, now: float) -> int:
        try:
            return self.store.revoke_all(account_id, now)
        finally:
            self.hint(account_hint(account_id))

    def rotate(self, old: bytes, new: bytes, now: float) -> None:
        try:
            self.store.rotate(old, new, now)
        finally:
            self.hint(digest_hint(old))

    # -- the hot path -------------------------------------------------------------------------------------

    def live(self, digest: bytes) -> Session | None:
        entry = self._cache.get(digest)
        if entry is not None and entry[1] > time.monotonic():
            return entry[0]
        epoch = self._epoch
        session = self.store.live(digest)
        if session is not None and self.listening:
            self._fill(digest, session, epoch)
        return session

    def local(self, digest: bytes | None) -> bool:
        if digest is None:
            return False
        entry = self._cache.get(digest)
        return entry is not None and entry[1] > time.monotonic()

    def touch(self, digest: bytes, now: float) -> None:
        epoch = self._epoch
        self.store.touch(digest, now)
        with self._lock:  # this process's copy follows its own touch; the entry keeps its deadline
            entry = self._cache.get(digest)
            if entry is not None and epoch == self._epoch and entry[0].last_seen < now:
                self._cache[digest] = (entry[0]._replace(last_seen=now), entry[1])

    def _fill(self, digest: bytes, session: Session, epoch: int) -> None:
        age = self.max_age if session.idle_ttl is None else min(self.max_age, session.idle_ttl / 2)
        with self._lock:
            if epoch != self._epoch:
                return  # a hint came while we read: what we read may predate the write it announced
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            self._cache[digest] = (session, time.monotonic() + age)

    # -- hints ----------------------------------------------------------------------------------------------

    def reset(self) -> None:
        """Drop every entry (on each listener (re)connect, and on close)."""
        with self._lock:
            self._epoch += 1
            self._cache.clear()

    def hint(self, payload: str) -> None:
        """Drop what ``payload`` names: ``d:<digest hex>`` one session, ``a:<account id>`` an account's,
        anything else (``*``) every one."""
        kind, _, value = payload.partition(":")
        with self._lock:
            self._epoch += 1
            if kind == "d" and payload != ALL_HINT:
                try:
                    self._cache.pop(bytes.fromhex(value), None)
                    return
                except ValueError:
                    pass
            elif kind == "a" and value.isdigit():
                account_id = int(value)
                for digest in [d for d, (s, _) in self._cache.items() if s.account_id == account_id]:
                    del self._cache[digest]
                return
            self._cache.clear()


def _conforms(sessions: CachedSessions) -> SessionStore:
    return sessions  # mypy checks here that CachedSessions satisfies the SessionStore contract
