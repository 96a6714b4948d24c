"""The contract of session rows: :class:`SessionStore`.

The backend stores rows keyed by the SHA-256 digest of a token (the token itself never reaches it:
session tokens never rest in plain text); the policy stays in :mod:`shardlite.front.sessions` (token minting,
TTLs, expiry checks of ``resolve``, the digest cache, the throttling of ``touch``). Common rules of every method:

* Each method is one atomic unit; reads see committed data only.
* A session belongs to an account; deleting the account deletes its sessions
  (:meth:`~shardlite.meta.accounts.AccountStore.delete`).
* Times are the caller's clock (the router's ``clock``), never the backend's: tests inject one.
* A session is *live at* ``now`` when it is not revoked, ``now < expires``, and ``idle_ttl`` is None or
  ``now - last_seen < idle_ttl``.
* Digests are bytes (32 of them from :mod:`shardlite.front.sessions`); a backend must not assume more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..front.sessions import Session

__all__ = ["SessionStore"]


class SessionStore(Protocol):
    """Session rows (``meta.sessions``). See the module doc for the rules every method keeps."""

    def insert(self, digest: bytes, account_id: int, created: float, expires: float,
               idle_ttl: float | None) -> None:
        """Insert a session (``last_seen = created``, not revoked). :class:`~shardlite.UnknownAccount` when
        the account does not exist (by the foreign key: nothing written). A digest already stored is a
        programming error (the backend's own integrity error; 256 random bits never collide)."""
        ...

    def live(self, digest: bytes) -> Session | None:
        """The session with this digest as a :class:`~shardlite.front.sessions.Session`, or None when there is
        none or it is revoked. Expiry is *not* checked here (the caller's clock decides).

        **The hot path of every authenticated request**: one indexed read, no transaction, no lock, no
        write, nothing but the statement (SQLite: this thread's reader connection; PostgreSQL: a pooled
        connection in autocommit, or a cache kept right by notifications, issue 15 point 3)."""
        ...

    def local(self, digest: bytes | None) -> bool:
        """True when :meth:`live` (and :meth:`known`) for ``digest`` (None: any digest) answer without a
        network round trip, so the async front end may resolve on its event loop instead of a worker
        thread. SQLite: always (a local read of microseconds). PostgreSQL: when a trusted cache entry holds it."""
        ...

    def known(self, digest: bytes) -> bool:
        """Whether any session row (revoked or not) has this digest. On the path of a token's first
        sighting: one indexed read, no transaction."""
        ...

    def touch(self, digest: bytes, now: float) -> None:
        """Record activity: ``last_seen = now`` only when the stored ``last_seen < now`` (monotonic: an older
        clock reading never moves it back). No error for an unknown digest."""
        ...

    def revoke(self, digest: bytes, now: float) -> bool:
        """Compare-and-set ``revoked = now`` on the session when it is not revoked yet; True when this call
        revoked it, False when there is no such session or it was revoked already (by anyone: of several
        concurrent callers exactly one gets True)."""
        ...

    def revoke_all(self, account_id: int, now: float) -> int:
        """Revoke every session of the account not revoked yet; returns how many this call revoked."""
        ...

    def rotate(self, old: bytes, new: bytes, now: float) -> None:
        """Atomically revoke the session ``old`` (``revoked = now``), which must be live at ``now``, and
        insert ``new`` for the same account with the same ``expires`` and ``idle_ttl``, ``created =
        last_seen = now``. The revoke is a compare-and-set on the session being live: of several concurrent
        rotations of one session exactly one succeeds; every other caller, and any call when ``old`` is
        unknown, revoked or expired, gets :class:`~shardlite.AuthenticationFailed` with nothing written
        (PostgreSQL: a conditional ``UPDATE ... RETURNING`` then the insert, in one transaction)."""
        ...

    def count_live(self, account_id: int) -> int:
        """How many sessions of the account are not revoked (expired ones included until :meth:`purge`)."""
        ...

    def purge(self, now: float) -> int:
        """Delete every session revoked, expired (``expires <= now``) or idle-expired (``last_seen +
        idle_ttl <= now``); returns how many rows went."""
        ...
