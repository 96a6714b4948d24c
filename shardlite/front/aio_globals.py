"""Async twins of ``router.accounts``, ``router.sessions`` and ``router.globals`` for AsyncRouter.

Password hashing (scrypt) runs on the router's password threads, every other write on its worker threads,
so the event loop never waits for a KDF or for the global write lock, and logins never occupy the
threads BEGINs, commits and session writes need. ``sessions.resolve`` reads inline on the loop when that
needs no round trip (a warm token, or the embedded metadata: a microsecond-scale indexed read on this
thread's own read connection) and offloads only the throttled activity write. The account reads run
inline with the embedded metadata only; with a remote store (PostgreSQL) they go to a worker thread, so a
slow or unreachable server never stalls the loop (issue 15 point 4).

``globals.transaction()`` runs its body on the loop while holding ``app_global.db``'s writer; transactions
of different tasks are serialised by an ``asyncio.Lock``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .accounts import Account, Accounts
from .globals import GlobalTables
from .sessions import Session, Sessions
from .transaction import Params, Transaction

__all__ = ["AsyncAccounts", "AsyncSessions", "AsyncGlobalTables"]

T = TypeVar("T")
Offload = Callable[..., Awaitable[Any]]


class AsyncAccounts:
    """``await ar.accounts.register(...)`` and friends; see :class:`~shardlite.front.accounts.Accounts`."""

    def __init__(self, sync: Accounts, call: Offload, call_kdf: Offload | None = None, *,
                 inline_reads: bool = True) -> None:
        self.sync = sync
        self._call = call
        #: reads run on the loop (embedded metadata) rather than on a worker (a remote store)
        self._inline = inline_reads
        #: runs what hashes a password (scrypt): a thread pool of its own, so a flood of logins never
        #: occupies the threads every other offloaded operation needs
        self._kdf = call_kdf or call

    def key(self, email: object) -> str:
        """The canonical uniqueness key of ``email`` (pure, no I/O: not awaitable)."""
        return self.sync.key(email)

    async def register(self, email: str, *, password: str | None = None, **profile: Any) -> int:
        return int(await self._kdf(lambda: self.sync.register(email, password=password, **profile)))

    async def get(self, account_id: int) -> Account | None:
        if self._inline:
            return self.sync.get(account_id)
        found: Account | None = await self._call(self.sync.get, account_id)
        return found

    async def by_email(self, email: str) -> Account | None:
        if self._inline:
            return self.sync.by_email(email)
        found: Account | None = await self._call(self.sync.by_email, email)
        return found

    async def search(self, text: str, *, limit: int = 20) -> list[Account]:
        if self._inline:
            return self.sync.search(text, limit=limit)
        found: list[Account] = await self._call(lambda: self.sync.search(text, limit=limit))
        return found

    async def update_profile(self, account_id: int, **changes: Any) -> Account:
        result: Account = await self._call(lambda: self.sync.update_profile(account_id, **changes))
        return result

    async def change_email(self, account_id: int, new_email: str) -> None:
        await self._call(self.sync.change_email, account_id, new_email)

    async def delete(self, account_id: int) -> None:
        await self._call(self.sync.delete, account_id)

    async def set_password(self, account_id: int, password: str) -> None:
        await self._kdf(self.sync.set_password, account_id, password)

    async def has_password(self, account_id: int) -> bool:
        if self._inline:
            return self.sync.has_password(account_id)
        return bool(await self._call(self.sync.has_password, account_id))

    async def authenticate(self, email: str, password: str) -> int:
        return int(await self._kdf(self.sync.authenticate, email, password))


class AsyncSessions:
    """``await ar.sessions.resolve(token)`` and friends; see :class:`~shardlite.front.sessions.Sessions`."""

    def __init__(self, sync: Sessions, call: Offload) -> None:
        self.sync = sync
        self._call = call

    @property
    def digest_cache(self) -> int:
        """See :attr:`Sessions.digest_cache <shardlite.front.sessions.Sessions.digest_cache>`."""
        return self.sync.digest_cache

    @digest_cache.setter
    def digest_cache(self, entries: int) -> None:
        self.sync.digest_cache = entries

    async def create(self, account_id: int, *, ttl: float | None = None, idle_ttl: float | None = None) -> str:
        return str(await self._call(lambda: self.sync.create(account_id, ttl=ttl, idle_ttl=idle_ttl)))

    async def resolve(self, token: object) -> Session | None:
        due: list[bytes] = []

        def defer(digest: bytes, session: Session) -> Session:
            due.append(digest)
            return session

        if self.sync._local(token):  # warm: memory or a local file, microseconds
            session = self.sync.resolve(token, _touch=defer)
        else:  # a round trip to PostgreSQL: never on the event loop
            session = await self._call(lambda: self.sync.resolve(token, _touch=defer))
        if session is None or not due:
            return session
        result: Session = await self._call(self.sync.touch, due[0], session)
        return result

    async def revoke(self, token: object) -> bool:
        return bool(await self._call(self.sync.revoke, token))

    async def revoke_all(self, account_id: int) -> int:
        return int(await self._call(self.sync.revoke_all, account_id))

    async def rotate(self, token: object) -> str:
        return str(await self._call(self.sync.rotate, token))

    async def count_live(self, account_id: int) -> int:
        if self.sync._local(None):
            return self.sync.count_live(account_id)
        return int(await self._call(self.sync.count_live, account_id))

    async def purge(self) -> int:
        return int(await self._call(self.sync.purge))


class _AsyncGlobalScope:
    def __init__(self, owner: AsyncGlobalTables) -> None:
        self._owner = owner
        self._scope: Any = None

    async def __aenter__(self) -> AsyncGlobalTransaction:
        await self._owner._lock.acquire()
        try:
            self._scope = self._owner.sync.transaction()
            return AsyncGlobalTransaction(self._scope.__enter__())
        except BaseException:
            self._owner._lock.release()
            raise

    async def __aexit__(self, et: Any, ev: Any, tb: Any) -> None:
        try:
            self._scope.__exit__(et, ev, tb)
        finally:
            self._owner._lock.release()


class AsyncGlobalTransaction:
    """``await tx.execute(sql, params)`` inside ``ar.globals.transaction()``."""

    __slots__ = ("_tx",)

    def __init__(self, tx: Transaction) -> None:
        self._tx = tx

    async def execute(self, sql: str, params: Params = ()) -> Any:
        return self._tx.execute(sql, params)

    @property
    def lastrowid(self) -> int:
        return self._tx.lastrowid

    @property
    def changes(self) -> int:
        return self._tx.changes


class AsyncGlobalTables:
    """``async with ar.globals.transaction() as tx`` and ``await ar.globals.query(sql, params)``."""

    def __init__(self, sync: GlobalTables) -> None:
        self.sync = sync
        self._lock = asyncio.Lock()

    def transaction(self) -> _AsyncGlobalScope:
        return _AsyncGlobalScope(self)

    async def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        return self.sync.query(sql, params)
