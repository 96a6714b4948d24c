"""The async front end: :class:`AsyncRouter`, over the same :class:`~shardlite.front.store.Store` core.

Not a thread per connection. Two mechanisms make it fast (README: Performance):

**Reads** run inline on the event loop when the tenant's read connection is already open and free, under
a budget: a progress handler aborts a statement that runs past ``inline_read_steps`` (up to twice that)
virtual-machine steps, and that read is redone on a worker thread. Cold tenants (the file must be opened)
go to a worker thread directly. Reads use the ``query_only`` read connection, so they never see an
uncommitted write, including one inside an open group-commit batch.

**Writes** are group-committed per tenant. The first transaction of a batch runs ``BEGIN IMMEDIATE`` (on
the loop when the lock is free at once, else on a worker thread with the full busy timeout); every
transaction then runs inside its own ``SAVEPOINT``, released on success or rolled back alone on error;
the batch commits once no transaction is waiting (or at ``max_batch``), and each ``async with`` block
returns only *after* the ``COMMIT`` that holds it. At ``synchronous=FULL`` the ``COMMIT`` (an fsync) runs
on a worker thread so the loop keeps serving reads. Transactions of one tenant run one after another:
keep their bodies short, since a body that awaits something slow holds the tenant's batch open.

Cancellation: a transaction cancelled while it waits for its turn never executes. One cancelled inside
its body rolls back its savepoint: nothing of it commits. One cancelled after its body finished, while
waiting for the batch's ``COMMIT``, still commits with the batch: ``CancelledError`` propagates as asyncio
requires and the outcome is *unknown to the caller*. Write such transactions idempotently (for example
insert with a client-chosen unique id and ``INSERT ... ON CONFLICT DO NOTHING``) and re-run them when the
outcome matters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from sys import getrefcount as _refs
from typing import Any, Final, TypeVar

import apsw

from ..core.keys import canonical
from ..core.outbox import DEFAULT_MAX_PAYLOAD, RetryPolicy
from ..core.retrying import RETRYABLE, Backoff
from ..errors import (
    ConfigurationError,
    MetaUnavailable,
    ReplicationUnavailable,
    ShardliteError,
    StatementNotAllowed,
    TenantErased,
)
from ..files.catalog import Location
from ..files.engine import Settings
from ..files.pool import Handle
from ..files.schema import Step
from ..services.relay import Handler, HandlerRegistry, Relay
from ..services.replicator_child import ReplicatorChild, start_replicator
from . import feed
from .accounts import Accounts
from .aio_admin import ADMIN_WORKERS, Admin
from .aio_commit import GroupCommit
from .aio_globals import AsyncAccounts, AsyncGlobalTables, AsyncSessions
from .aio_reads import Reads, TenantGate
from .aio_relay import AsyncRelay
from .batch import (
    MEMBER_RELEASE,
    MEMBER_ROLLBACK,
    MEMBER_SAVEPOINT,
    Batch,
    Round,
    current_task,
    nested_savepoint,
    yield_once,
)
from .durability import DEFAULT_TIMEOUT, Durability
from .globals import GlobalTables
from .sessions import Sessions
from .store import Store
from .transaction import IDLE_ATTR_REFS, AsyncTransaction, Params, TransactionClosed, seal_handle

__all__ = ["AsyncRouter", "AsyncTransaction"]

T = TypeVar("T")
Schema = Sequence[Step] | Mapping[str, Sequence[Step]] | None


def _retrieved_confirm(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()  # read: its members each raise their own copy


_ROLLED_BACK = "SQLite rolled it back for another transaction of the batch: OR ROLLBACK, RAISE(ROLLBACK), I/O"
#: VM steps between two looks at the clock on read connections (the inline budget). A look costs a Python
#: call, so a page of fifty rows should not make several; no step on a read connection builds a value over
#: 64 KiB (about 0.2 ms at worst, randomblob), so even a pathological read is looked at within ~0.2 s, and
#: a budget of inline_read_ms ends it at the next look.
INLINE_CHECK_STEPS = 1000
log = logging.getLogger("shardlite.aio")


#: The public names of :class:`~shardlite.Router` (``"name"``) and of its parts (``"part.name"``) whose
#: AsyncRouter counterpart is not a coroutine function or does not exist, with the reason. Every other
#: method is awaitable on AsyncRouter under the same name and parameters (tests/test_public_api.py
#: derives the names from Router and checks both ways), and a part's settings are on its ``sync`` object.
NOT_AWAITABLE: Final[Mapping[str, str]] = {
    "close": "closing waits for worker threads: `await ar.aclose()` or `async with AsyncRouter(...)`",
    "transaction": "an async context manager: `async with ar.transaction(key) as tx`",
    "handler": "registers a function (a decorator), no I/O",
    "use_feed": "registers topics, no I/O",
    "globals.transaction": "an async context manager: `async with ar.globals.transaction() as tx`",
    "accounts.key": "computes an address's key, no I/O",
    "sessions.touch": "`await ar.sessions.resolve()` writes the activity stamp itself",
    "relay.start": "schedules the relay task on the running loop, no I/O",
    "rebalance.move": "one claimed move, what the rebalancer's own threads call inside apply()/resume()",
    **{f"relay.{name}": "the relay task's own plumbing (reachable as `ar.relay.sync`)"
       for name in ("notify", "pass_failed", "pass_over", "report", "release_claims")},
    **{f"relay.{name}": "part of `await ar.relay.status()`" for name in ("recorded_error", "troubles")},
}

class _AsyncScope(AsyncTransaction):
    """What ``AsyncRouter.transaction(key)`` returns: the ``async with`` scope and, once entered, the
    transaction itself (one object per transaction instead of two: this is every async write's path).
    It can be entered once; before that and after its block it refuses statements."""

    __slots__ = ("_router", "_batch", "_depth", "_round", "_entered", "_flagged")

    _round: Round

    def __init__(self, router: AsyncRouter, key: object) -> None:
        self._router = router
        self.key = key  # type: ignore[assignment]  # the caller's key until entered, then the canonical one
        self._open = self._entered = False

    async def __aenter__(self) -> AsyncTransaction:
        router = self._router
        if self._entered:
            raise ShardliteError("a transaction scope can be entered only once: call transaction(key) again")
        self._entered = True
        try:
            canon = router._canon[self.key]
        except (KeyError, TypeError):
            canon = router._canonical(self.key)
        batch = router._batches.get(canon)
        if batch is None:
            task = current_task(asyncio.get_running_loop())
            batch = await router._join(canon)
        else:
            task = current_task(batch.loop)
            if batch.busy:
                if batch.holder is task and task is not None:
                    return self._enter_nested(batch, canon)
                batch = await router._join(canon)
            elif batch.handle is None or batch.committing or batch.waiters or batch.count >= router._max_batch:
                batch = await router._join(canon)
            else:
                batch.busy = True  # fast path: join the open batch without waiting
                batch.count += 1
        handle: Handle = batch.handle  # type: ignore[assignment]  # set while a batch is open
        handle.calls = 0  # every statement starts its own clock (see Handle.progress)
        try:
            handle.cur.execute(MEMBER_SAVEPOINT)
        except BaseException:
            batch.count -= 1
            router._leave(batch)
            raise
        batch.holder = task
        self._batch = batch
        self._round = batch.round  # type: ignore[assignment]  # set while a batch is open
        self._depth = 0
        self._handle = handle
        self._conn = handle.conn
        self._guard = handle.guard
        self._emitter = router._emitter
        self._outbox = 0
        self._flagged = handle.needs_flag  # whether the batch needed a pending-work flag before this member
        self.key = canon
        self._open = True
        return self

    def _enter_nested(self, batch: Batch, canon: str) -> AsyncTransaction:
        """A transaction inside the running one, in the same task: a savepoint of its own."""
        handle = batch.handle
        assert handle is not None
        depth = handle.savepoints = handle.savepoints + 1
        handle.calls = 0
        try:
            handle.cur.execute(nested_savepoint(depth)[0])
        except BaseException:
            handle.savepoints -= 1
            raise
        self._batch, self._depth = batch, depth
        self.key, self._conn, self._guard, self._handle = canon, handle.conn, handle.guard, handle
        self._emitter, self._outbox, self._open = self._router._emitter, 0, True
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._open = False
        depth = self._depth
        handle = self._handle
        if depth:  # a nested block's cursors are its enclosing transaction's too: closed with it
            self._exit_nested(handle, depth, exc_type is not None)
            return
        if handle.given or _refs(handle.spare) != IDLE_ATTR_REFS:  # the caller holds cursors: close them
            seal_handle(handle)
        batch = self._batch
        cur = handle.cur
        refused: ShardliteError | None = None
        handle.calls = 0
        try:
            if exc_type is not None:
                cur.execute(MEMBER_ROLLBACK)
            else:
                if handle.guard.ddl:
                    refused = self._router._schema_refusal(handle)
                if (refused is None and handle.needs_flag and not self._flagged and self._router._remote_flags
                        and self._router._emitter.unavailable):
                    refused = self._router._flag_refusal(handle, self.key)
                if refused is not None:
                    cur.execute(MEMBER_ROLLBACK)
            cur.execute(MEMBER_RELEASE)
        except apsw.Error:
            if self._conn.get_autocommit():
                # SQLite rolled the whole batch back (an OR ROLLBACK conflict, RAISE(ROLLBACK), an I/O error):
                # every transaction in it is lost, this one included.
                self._router._abort_batch(batch, _ROLLED_BACK)
                if exc_type is not None:
                    return
                raise TransactionClosed(f"the transaction on {self.key!r} was rolled back by SQLite (an OR "
                                        "ROLLBACK conflict, RAISE(ROLLBACK) or an I/O error); nothing of it was "
                                        "committed") from None
            self._router._abort_batch(batch)
            # SQLite's text would name the batch's internal savepoint: the caller gets shardlite's own
            raise ShardliteError(f"the transaction on {self.key!r} could not be completed: its group-commit "
                                 "batch was rolled back; nothing of it was committed") from None
        except BaseException:
            self._router._abort_batch(batch)
            raise
        finally:
            batch.holder = None
            batch.busy = False
            if batch.waiters or not batch.commit_scheduled:
                self._router._next(batch)  # otherwise the scheduled commit finds the batch free: nothing to do
        if exc_type is not None:
            return
        if refused is not None:
            raise refused
        outcome = self._round
        if batch.commit_on_loop:
            # The batch's commit runs on the loop, scheduled (call_soon) no later than this point: after one
            # turn it has usually run, and no future is needed. A cancellation here raises CancelledError
            # with the outcome unknown, as while waiting on the future (see module doc).
            await yield_once()
        if not outcome.finished or outcome.error is not None:
            # Our own future (which raises the batch's error): cancelling this task cancels only it, never
            # the batch (see module doc).
            await outcome.wait(batch.loop)
        if self._router._durability.replicated:
            await self._router._confirm(outcome, self.key, handle)

    def _exit_nested(self, handle: Handle, depth: int, failed: bool) -> None:
        _, rollback, release = nested_savepoint(depth)
        handle.calls = 0
        try:
            if handle.conn.get_autocommit():  # SQLite rolled everything back: the enclosing block fails too
                if not failed:
                    raise TransactionClosed(f"the transaction on {self.key!r} was rolled back by SQLite; "
                                            "nothing of it was committed")
                return
            if failed:
                handle.cur.execute(rollback)
            handle.cur.execute(release)
        except apsw.Error:
            # SQLite's text would name the internal savepoint: the caller gets shardlite's own
            raise ShardliteError(f"the nested transaction on {self.key!r} could not be completed") from None
        finally:
            handle.savepoints -= 1


class AsyncRouter(HandlerRegistry, GroupCommit, Reads, Admin):
    """``AsyncRouter`` has the names of :class:`~shardlite.Router`, awaitable where they do I/O; the
    exceptions are listed in :data:`NOT_AWAITABLE` with the reason. ``nodes``, ``rebalance``, ``map``,
    ``backup``, ``restore``, ``export``, ``import_``, ``migrate_all``, ``status`` and ``stats`` run on
    admin threads of their own (:mod:`shardlite.front.aio_admin`).

    Beyond :class:`~shardlite.Router`'s arguments: ``max_batch`` bounds a group-commit batch; ``workers``
    threads run BEGINs that must wait, commits at ``synchronous="FULL"``, checkpoints, the relay and
    metadata writes; ``read_workers`` threads run the reads that do not run inline (one tenant never takes
    more than all but one of them); ``kdf_workers`` threads hash passwords (a flood of logins never
    occupies the others). ``inline_read_ms`` / ``inline_read_steps``: the budget of a read on the event
    loop, past which it is redone on a read worker. ``loop_statement_timeout``: seconds a statement of a
    transaction (which runs on the event loop, stalling every task meanwhile) may run before it is
    interrupted (:class:`~shardlite.QueryTimeout`); ``statement_timeout`` bounds the others.
    ``close_timeout``: how long :meth:`aclose` waits for worker threads (their statements are interrupted
    first). ``durability="replicated"``: as on :class:`~shardlite.Router`; the wait never blocks the loop, and
    a group-commit batch asks the replicator once for all its members.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        nodes: Sequence[str] | None = None,
        schema: Schema = None,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        max_open: int = 256,
        cache_kib: int = 512,
        move_wait: float = 10.0,
        max_batch: int = 64,
        workers: int = 4,
        read_workers: int = 4,
        kdf_workers: int = 2,
        inline_read_steps: int = 5000,
        inline_read_ms: float = 20.0,
        statement_timeout: float | None = 30.0,
        loop_statement_timeout: float = 1.0,
        max_rows: int = 100_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        close_timeout: float = 10.0,
        global_schema: Sequence[Step] | None = None,
        clock: Callable[[], float] = time.time,
        relay: bool = False,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_outbox_bytes: int = 64 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        meta: str | None = None,
        replicate: str | None = None,
        replicator: bool = False,
        durability: str = "local",
        durability_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        settings = Settings(synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, max_open=max_open,
                            cache_kib=cache_kib, statement_timeout=statement_timeout, max_rows=max_rows,
                            max_result_bytes=max_result_bytes)
        for name, count in (("workers", workers), ("read_workers", read_workers), ("kdf_workers", kdf_workers)):
            if type(count) is not int or count < 1:
                raise ConfigurationError(f"{name} must be an int >= 1")
        if not inline_read_ms > 0 or not loop_statement_timeout > 0 or not close_timeout > 0:
            raise ConfigurationError("inline_read_ms, loop_statement_timeout and close_timeout must be > 0")
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardlite")
        self._readers = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="shardlite-read")
        self._kdf = ThreadPoolExecutor(max_workers=kdf_workers, thread_name_prefix="shardlite-kdf")
        self._admin = ThreadPoolExecutor(max_workers=ADMIN_WORKERS, thread_name_prefix="shardlite-admin")
        self._replicator: ReplicatorChild | None = None
        try:
            self._store = Store(os.fspath(root), nodes=nodes, schema=schema,  # type: ignore[arg-type]
                                global_schema=global_schema, settings=settings, move_wait=move_wait,
                                meta=meta, max_payload=max_payload, max_outbox=max_outbox_bytes,
                                checkpoint_submit=self._executor.submit,
                                read_check_steps=INLINE_CHECK_STEPS, replicate=replicate)
            self._durability = Durability(self._store, durability, durability_timeout)
            if replicator:
                self._replicator = start_replicator(self._store)
        except BaseException:
            for executor in self._executors():
                executor.shutdown(wait=False)
            store = getattr(self, "_store", None)
            if store is not None:
                store.close()
            raise
        self._batches: dict[str, Batch] = {}
        self._max_batch = max_batch
        self._budget = (inline_read_ms / 1000, max(2, -(-inline_read_steps // INLINE_CHECK_STEPS) + 1))
        self._gate = TenantGate(read_workers - 1)
        self._busy_s = busy_timeout_ms / 1000
        self._move_wait = move_wait
        self._loop_limit = float(loop_statement_timeout)
        self._close_timeout = close_timeout
        self._commit_offloaded = settings.synchronous != "NORMAL"
        self._canon: dict[object, str] = {}
        self._emitter = self._store.emitter
        store_meta = self._store.meta
        #: pending-work flags go over the network: once a write of one found the store unreachable, a batch
        #: member that needs one is refused alone (see _flag_refusal); the embedded store's flag writes are
        #: local, and are tried at each commit as before
        self._remote_flags = not store_meta.local
        # The embedded metadata's reads are local microsecond reads, made inline on the loop; a remote
        # store's wait for the network, and up to its pool timeout while it is down: they go to workers, so
        # the loop keeps serving what needs no metadata (issue 15 point 4).
        #: Accounts (async twin of :class:`~shardlite.front.accounts.Accounts`).
        self.accounts = AsyncAccounts(Accounts(store_meta.accounts, store_meta.credentials, clock), self._call,
                                      self._call_kdf, inline_reads=store_meta.local)
        #: Sessions (async twin of :class:`~shardlite.front.sessions.Sessions`).
        self.sessions = AsyncSessions(Sessions(store_meta.sessions, clock), self._call)
        #: The app's global tables (async twin of :class:`~shardlite.front.globals.GlobalTables`).
        self.globals = AsyncGlobalTables(GlobalTables(store_meta.app_globals))
        self._handlers: dict[str, Handler] = {}
        #: The outbox relay as an asyncio task (:class:`~shardlite.front.aio_relay.AsyncRelay`). Never started
        #: implicitly; ``relay=True`` starts it when the router is entered (``async with``).
        self.relay = AsyncRelay(Relay(self._store, self._handlers, policy=retry), self._call)
        self._relay_for_life = relay
        self._init_admin()

    def _executors(self) -> tuple[Executor, ...]:
        return (self._executor, self._readers, self._kdf, self._admin)

    def _schema_refusal(self, handle: Handle) -> StatementNotAllowed | None:
        """A transaction's user SQL changed the schema: the refusal when a user object now touches
        shardlite's tables (see Store.check_schema), else None."""
        try:
            self._store.check_schema(handle)
        except StatementNotAllowed as exc:
            return exc
        return None

    def _canonical(self, key: object) -> str:
        canon = self._canon.get(key)
        if canon is None:
            canon = canonical(key)
            if len(self._canon) > 65536:
                self._canon.clear()
            self._canon[key] = canon
        return canon

    # -- plumbing -------------------------------------------------------------------------------------

    async def _confirm(self, outcome: Round, canon: str, handle: Handle) -> None:
        """durability="replicated": wait until the committed batch ``outcome`` is in the replica. The batch
        asks once for all its members (front.durability); a member's cancellation cancels only its own wait."""
        task = outcome.confirm
        if task is None:
            task = outcome.confirm = asyncio.ensure_future(self._durability.wait_async(canon, handle=handle))
            task.add_done_callback(_retrieved_confirm)
        try:
            await asyncio.shield(task)
        except ReplicationUnavailable as exc:  # each member its own exception object (their tracebacks differ)
            raise ReplicationUnavailable(str(exc)) from None
        except TenantErased as exc:
            raise TenantErased(str(exc)) from None

    def _flag_refusal(self, handle: Handle, key: str) -> MetaUnavailable:
        """The error for a batch member that needs its tenant's pending-work flag written (it emitted the
        first event of an empty outbox) while the last write of a flag found the remote metadata store
        unreachable (issue 15 point 4: what needs no metadata keeps working). Its savepoint is rolled back by the
        caller, so the batch's commit needs no flag for it and the batch's other members commit; the store
        is probed on a worker thread, and once a flag is written again such members go through as before.
        Only the batch whose commit first finds the store gone fails whole (nothing of it committed)."""
        handle.needs_flag = 0  # this member set it and is rolled back: the batch needs no flag now
        emitter = self._emitter
        try:
            self._executor.submit(emitter.probe, key)
        except RuntimeError:  # the executor is shutting down: the router is closing
            pass
        return MetaUnavailable(f"tenant {key!r}: this transaction emitted the first event of its outbox, whose "
                               "pending-work flag must be written to the metadata first, and "
                               f"{emitter.unavailable}; nothing of this transaction was committed")

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def _call_kdf(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn`` on a password-hashing thread (registration, login, password changes)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._kdf, fn, *args)

    # -- the contract -----------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._store.root

    def transaction(self, key: object) -> _AsyncScope:
        """``async with ar.transaction(key) as tx:`` a group-committed write transaction (see module doc)."""
        return _AsyncScope(self, key)

    async def run(self, key: object, fn: Callable[[AsyncTransaction], Awaitable[T] | T], *,
                  timeout: float = 30.0) -> T:
        """Call ``fn(tx)`` (sync or async) in a write transaction, retrying whole transactions on
        ``Busy``/``TenantMoving`` for up to ``timeout`` seconds, with :meth:`Router.run`'s policy
        (:mod:`shardlite.core.retrying`)."""
        backoff = Backoff(time.monotonic() + timeout)
        while True:
            try:
                async with self.transaction(key) as tx:
                    result = fn(tx)
                    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                        result = await result
                    return result  # type: ignore[return-value]
            except RETRYABLE:
                pause = backoff.pause(time.monotonic())
                if pause is None:
                    raise
                await asyncio.sleep(pause)

    async def wait_replicated(self, key: object, *, timeout: float | None = None) -> None:
        """Like :meth:`Router.wait_replicated`; the event loop serves other tasks meanwhile."""
        if self._store.replicate is None:
            raise ConfigurationError(f"{self.root} does not replicate: there is no replica to wait for")
        await self._durability.wait_async(self._canonical(key), timeout)

    async def query(self, key: object, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Read-only statement on ``key``'s tenant, like :meth:`Router.query`."""
        rows = self._inline(key, sql, params, False)
        if rows is None:
            return await self._offloaded(key, sql, params, False)
        return rows

    async def locate(self, key: object) -> Location:
        if self._store.meta.local:
            return self._store.locate(key)  # catalog reads: this thread's read connection, microseconds
        return await self._call(self._store.locate, key)  # a round trip to PostgreSQL: off the loop

    async def exists(self, key: object) -> bool:
        if self._store.meta.local:
            return self._store.exists(key)
        return bool(await self._call(self._store.exists, key))

    async def tenants(self) -> AsyncIterator[str]:
        """Every live tenant key, in key order."""
        iterator = self._store.tenants()
        sentinel = object()
        while True:
            key = await self._call(next, iterator, sentinel)
            if key is sentinel:
                return
            yield key

    # -- outbox ---------------------------------------------------------------------------------------

    async def feed(self, key: object, *, limit: int = 50, before: int | None = None) -> list[feed.FeedItem]:
        """``key``'s activity feed, newest first (see :meth:`Router.feed`)."""
        cursor = (1 << 62) if before is None else int(before)
        sql = feed.page_query(limit)
        rows = self._inline(key, sql, (cursor,), True)
        if rows is None:
            rows = await self._offloaded(key, sql, (cursor,), True)
        return feed.items(rows)

    # -- lifecycle --------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the relay, wait for open batches to commit, interrupt the statements still running on
        worker threads, wait for those threads (at most ``close_timeout`` seconds, without blocking the
        loop), then close every connection. Idempotent."""
        if self._store.closed:
            return
        await self.relay.stop()
        await self._close_admin()
        deadline = asyncio.get_running_loop().time() + self._close_timeout
        for batch in list(self._batches.values()):
            if batch.round is not None:
                try:
                    await asyncio.wait_for(batch.round.wait(batch.loop),
                                           max(0.0, deadline - asyncio.get_running_loop().time()))
                except Exception:  # noqa: BLE001 - their owners saw it (or the batch is stuck: closed below)
                    pass
        executors = self._executors()
        for executor in executors:
            executor.shutdown(wait=False, cancel_futures=True)  # queued work never starts
        for handle in self._store.pool.handles():
            if handle.owner is not None:
                handle.conn.interrupt()  # a statement running on a worker stops at its next step

        def join() -> None:
            for executor in executors:
                executor.shutdown(wait=True)

        try:
            await asyncio.wait_for(asyncio.to_thread(join),
                                   max(0.05, deadline - asyncio.get_running_loop().time()))
        except TimeoutError:
            log.warning("AsyncRouter for %s closed with worker threads still busy after %.1f s",
                        self._store.root, self._close_timeout)
        self._store.close()
        if self._replicator is not None:  # its last round ships what was committed; off the loop
            await asyncio.to_thread(self._replicator.stop)

    @property
    def closed(self) -> bool:
        return self._store.closed

    async def __aenter__(self) -> AsyncRouter:
        if self._relay_for_life:
            self.relay.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None and not store.closed:
            warnings.warn(f"shardlite AsyncRouter for {store.root} was never closed", ResourceWarning,
                          stacklevel=2)
            for executor in self._executors():
                executor.shutdown(wait=False)
            store.close()
        child = getattr(self, "_replicator", None)
        if child is not None:
            child.stop()

    def __repr__(self) -> str:
        return f"<AsyncRouter {self.root!r}{' closed' if self.closed else ''}>"

