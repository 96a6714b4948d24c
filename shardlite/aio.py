"""The async front end: :class:`AsyncRouter`, over the same :class:`~shardlite.store.Store` core.

Not a thread per connection. Two mechanisms make it fast (brief §6, §7):

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
import os
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import apsw

from . import feed, lifecycle
from .accounts import Accounts
from .aio_globals import AsyncAccounts, AsyncGlobalTables, AsyncSessions
from .aio_relay import AsyncRelay
from .batch import (
    MEMBER_RELEASE,
    MEMBER_ROLLBACK,
    MEMBER_SAVEPOINT,
    Batch,
    Future,
    Round,
    current_task,
    nested_savepoint,
    yield_once,
)
from .catalog import Location
from .engine import Settings
from .errors import Busy, ShardliteError, StatementNotAllowed, TenantMoving
from .globals import GlobalTables
from .keys import canonical
from .outbox import DEFAULT_MAX_PAYLOAD, RetryPolicy
from .pool import Handle
from .relay import Handler, HandlerRegistry, Relay
from .schema import Step
from .sessions import Sessions
from .store import Store
from .transaction import AsyncTransaction, Params, TransactionClosed

__all__ = ["AsyncRouter", "AsyncTransaction"]

T = TypeVar("T")
Schema = Sequence[Step] | Mapping[str, Sequence[Step]] | None


_ROLLED_BACK = "SQLite rolled it back for another transaction of the batch: OR ROLLBACK, RAISE(ROLLBACK), I/O"
_BATCH_OWNER = -1  # no thread has this id: Handle.enter() from any thread waits for the lock


class _AsyncScope(AsyncTransaction):
    """What ``AsyncRouter.transaction(key)`` returns: the ``async with`` scope and, once entered, the
    transaction itself (one object per transaction instead of two: this is every async write's path).
    It can be entered once; before that and after its block it refuses statements."""

    __slots__ = ("_router", "_batch", "_depth", "_round", "_entered")

    _round: Round

    def __init__(self, router: AsyncRouter, key: object) -> None:
        self._router = router
        self.key = key  # type: ignore[assignment]  # the caller's key until entered, then the canonical one
        self._open = self._entered = False
        self._given = None

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
        self._flagged = False
        self.key = canon
        self._open = True
        return self

    def _enter_nested(self, batch: Batch, canon: str) -> AsyncTransaction:
        """A transaction inside the running one, in the same task: a savepoint of its own."""
        handle = batch.handle
        assert handle is not None
        depth = handle.savepoints = handle.savepoints + 1
        try:
            handle.cur.execute(nested_savepoint(depth)[0])
        except BaseException:
            handle.savepoints -= 1
            raise
        self._batch, self._depth = batch, depth
        self.key, self._conn, self._guard, self._handle = canon, handle.conn, handle.guard, handle
        self._emitter, self._flagged, self._open = self._router._emitter, False, True
        return self

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._open = False
        depth = self._depth
        self._seal(not depth)  # a nested block's spare cursor is its enclosing transaction's too
        if depth:
            self._exit_nested(self._handle, depth, exc_type is not None)
            return
        batch = self._batch
        cur = self._handle.cur
        refused: StatementNotAllowed | None = None
        try:
            if self._conn.get_autocommit():
                # SQLite rolled the whole batch back (an OR ROLLBACK conflict, RAISE(ROLLBACK), an I/O error):
                # every transaction in it is lost, this one included.
                self._router._abort_batch(batch, _ROLLED_BACK)
                if exc_type is None:
                    raise TransactionClosed(f"the transaction on {self.key!r} was rolled back by SQLite "
                                            "(an OR ROLLBACK conflict, RAISE(ROLLBACK) or an I/O error); "
                                            "nothing of it was committed")
                return
            if exc_type is None and self._guard.ddl:  # type: ignore[union-attr]  # set for tenant scopes
                try:
                    self._router._store.check_schema(self._handle)
                except StatementNotAllowed as exc:
                    refused = exc
            if exc_type is not None or refused is not None:
                cur.execute(MEMBER_ROLLBACK)
            cur.execute(MEMBER_RELEASE)
        except apsw.Error:
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
        if refused is not None:
            raise refused
        if exc_type is not None:
            return
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

    def _exit_nested(self, handle: Handle, depth: int, failed: bool) -> None:
        _, rollback, release = nested_savepoint(depth)
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


class AsyncRouter(HandlerRegistry):
    """``AsyncRouter`` has the names of :class:`~shardlite.Router`, awaitable (brief §4)."""

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
        inline_read_steps: int = 5000,
        global_schema: Sequence[Step] | None = None,
        clock: Callable[[], float] = time.time,
        relay: bool = False,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        retry: RetryPolicy | None = None,
    ) -> None:
        settings = Settings(synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, max_open=max_open,
                            cache_kib=cache_kib)
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardlite")
        try:
            self._store = Store(os.fspath(root), nodes=nodes, schema=schema,  # type: ignore[arg-type]
                                global_schema=global_schema, settings=settings, move_wait=move_wait,
                                max_payload=max_payload, checkpoint_submit=self._executor.submit)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self._batches: dict[str, Batch] = {}
        self._max_batch = max_batch
        self._inline_steps = inline_read_steps
        self._loop_thread = 0
        self._inline_ticks = 0  # progress-handler calls during the current inline read
        self._commit_offloaded = settings.synchronous != "NORMAL"
        self._canon: dict[object, str] = {}
        self._emitter = self._store.emitter
        db = self._store.globaldb
        #: Accounts (async twin of :class:`~shardlite.accounts.Accounts`).
        self.accounts = AsyncAccounts(Accounts(db, clock), self._call)
        #: Sessions (async twin of :class:`~shardlite.sessions.Sessions`).
        self.sessions = AsyncSessions(Sessions(db, clock), self._call)
        #: The app's global tables (async twin of :class:`~shardlite.globals.GlobalTables`).
        self.globals = AsyncGlobalTables(GlobalTables(self._store.appdb))
        self._handlers: dict[str, Handler] = {}
        #: The outbox relay as an asyncio task (:class:`~shardlite.aio_relay.AsyncRelay`). Never started
        #: implicitly; ``relay=True`` starts it when the router is entered (``async with``).
        self.relay = AsyncRelay(Relay(self._store, self._handlers, policy=retry), self._call)
        self._relay_for_life = relay

    def _canonical(self, key: object) -> str:
        canon = self._canon.get(key)
        if canon is None:
            canon = canonical(key)
            if len(self._canon) > 65536:
                self._canon.clear()
            self._canon[key] = canon
        return canon

    # -- plumbing -------------------------------------------------------------------------------------

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    def _interrupt_inline(self) -> bool:
        """Progress handler: abort a read running inline on the loop thread past its budget.

        SQLite calls it every ``inline_read_steps`` steps *counted across the runs of a cached statement*,
        so its first call during a read can come after a single step of that read; the second call proves
        the read itself ran past the budget. (Aborting on the first call sent one cheap point read in ~150
        to a worker thread.) ``query`` zeroes the count before each inline read."""
        if threading.get_ident() != self._loop_thread:
            return False
        self._inline_ticks += 1
        return self._inline_ticks > 1

    # -- group commit -----------------------------------------------------------------------------------

    async def _join(self, canon: str) -> Batch:
        """Wait for this transaction's turn on ``canon`` and return the open batch it joins."""
        batch = self._batches.get(canon)
        if batch is None:
            batch = self._batches[canon] = Batch(canon, asyncio.get_running_loop(), not self._commit_offloaded)
            if self._store.checkpoints is not None:
                self._store.checkpoints.defer_thread = threading.get_ident()  # the loop never checkpoints
        if batch.busy or batch.committing or batch.waiters or batch.count >= self._max_batch:
            fut: asyncio.Future[None] = Future(loop=batch.loop)
            batch.waiters.append(fut)
            try:
                await fut
            except BaseException:
                if fut in batch.waiters:
                    batch.waiters.remove(fut)  # never started: nothing executed
                elif fut.done() and not fut.cancelled() and fut.exception() is None:
                    batch.busy = False  # we were handed the turn but cannot take it: pass it on
                    self._next(batch)
                raise
        batch.busy = True
        if batch.handle is None:
            try:
                await self._open_batch(batch)
            except BaseException:
                batch.busy = False
                self._next(batch)
                raise
        batch.count += 1
        return batch

    async def _open_batch(self, batch: Batch) -> None:
        store = self._store
        loop = batch.loop
        handle = store.pool.get(batch.key, "w")
        if handle is not None and handle.wal is not None and handle.wal.restart_due:
            await self._restart_log(handle)
        opened = False
        if handle is not None and not handle.closed and handle.lock.acquire(blocking=False):
            handle.owner, handle.depth = threading.get_ident(), 1
            try:
                opened = store.begin(handle, wait_ms=0)
            except Busy:
                opened = False
            if not opened:
                store.release(handle)
        if not opened:
            pending = loop.run_in_executor(self._executor, self._begin_for_batch, batch.key)
            try:
                handle = await asyncio.shield(pending)
            except asyncio.CancelledError:
                pending.add_done_callback(self._abandon_begin)  # the worker's BEGIN may still succeed
                raise
            handle.owner = threading.get_ident()
        assert handle is not None
        batch.handle = handle
        batch.count = 0
        batch.round = Round()
        handle.savepoints = 0

    async def _restart_log(self, handle: Handle) -> None:
        """The tenant's log reached INLINE_FRAMES under the loop's commits: copy it on a worker before its
        next batch begins (see :mod:`shardlite.checkpoints`), so that batch's first write restarts it.
        Only this tenant's transactions wait; a cancelled wait leaves the worker to finish alone."""
        checkpoints = self._store.checkpoints
        assert checkpoints is not None and handle.wal is not None  # a watch is installed by checkpoints
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, checkpoints.restart, handle,
                                                             handle.wal)
        except RuntimeError:  # the executor is shutting down: the router is closing
            handle.wal.restart_due = False

    def _begin_for_batch(self, key: str) -> Handle:
        """On a worker: BEGIN IMMEDIATE for a batch. The handle is owned by the batch (the loop), not by
        this worker thread: a later job on this worker (a relay pass) must wait for it, not re-enter it."""
        handle = self._store.begin_write(key)
        handle.owner = _BATCH_OWNER
        return handle

    def _abandon_begin(self, begun: asyncio.Future[Handle]) -> None:
        """A batch was cancelled while its BEGIN ran on a worker: roll back and release what it got."""
        if begun.cancelled() or begun.exception() is not None:
            return
        handle = begun.result()
        try:
            self._store.rollback(handle)
        finally:
            handle.owner = threading.get_ident()
            self._store.release(handle)

    def _next(self, batch: Batch) -> None:
        """Hand the connection to the next waiter, or schedule the batch's commit."""
        if batch.busy or batch.committing:
            return
        if batch.waiters and (batch.handle is None or batch.count < self._max_batch):
            while batch.waiters:
                fut = batch.waiters.popleft()
                if not fut.done():
                    batch.busy = True
                    fut.set_result(None)
                    return
        if batch.handle is not None and not batch.commit_scheduled:
            batch.commit_scheduled = True
            batch.loop.call_soon(self._maybe_commit, batch)
        elif batch.handle is None and not batch.waiters:
            self._batches.pop(batch.key, None)

    def _leave(self, batch: Batch) -> None:
        batch.busy = False
        self._next(batch)

    def _maybe_commit(self, batch: Batch) -> None:
        batch.commit_scheduled = False
        if batch.busy or batch.committing or batch.handle is None:
            return
        if batch.waiters and batch.count < self._max_batch:
            self._next(batch)  # someone arrived meanwhile: let them join first
            return
        batch.committing = True
        if self._commit_offloaded:
            batch.loop.create_task(self._commit_offloaded_batch(batch))
        else:
            error: BaseException | None = None
            try:
                self._store.commit(batch.handle)
            except BaseException as exc:  # noqa: BLE001 - delivered to every member of the batch
                error = exc
            self._finish(batch, error)

    async def _commit_offloaded_batch(self, batch: Batch) -> None:
        error: BaseException | None = None
        try:
            assert batch.handle is not None
            await asyncio.shield(self._call(self._store.commit, batch.handle))
        except BaseException as exc:  # noqa: BLE001
            error = exc
        self._finish(batch, error)

    def _finish(self, batch: Batch, error: BaseException | None) -> None:
        handle, outcome = batch.handle, batch.round
        batch.handle, batch.round, batch.count = None, None, 0
        batch.committing = False
        if handle is not None:
            handle.owner = threading.get_ident()
            self._store.release(handle)
        if outcome is not None:
            outcome.finish(error)
        self._next(batch)

    def _abort_batch(self, batch: Batch, why: str = "a savepoint failed") -> None:
        """A savepoint could not be released, or SQLite rolled the transaction back: roll the whole batch
        back; every transaction waiting for its commit gets the error."""
        if batch.handle is not None:
            try:
                self._store.rollback(batch.handle)
            except apsw.Error:
                pass
            self._finish(batch, ShardliteError(f"the group-commit batch was rolled back ({why}); nothing of this "
                                               "transaction was committed: retry it"))

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
        ``Busy``/``TenantMoving`` for up to ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        delay = 0.002
        while True:
            try:
                async with self.transaction(key) as tx:
                    result = fn(tx)
                    if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                        result = await result
                    return result  # type: ignore[return-value]
            except (Busy, TenantMoving):
                if loop.time() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def query(self, key: object, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Read-only statement on ``key``'s tenant, like :meth:`Router.query`."""
        return await self._read(key, sql, params, False)

    async def _read(self, key: object, sql: str, params: Params, internal: bool) -> list[tuple[Any, ...]]:
        """A read, inline on the loop when it can be (see the module doc); ``internal``: one of
        shardlite's own reads, its text prefixed with INTERNAL_SQL."""
        store = self._store
        try:
            handle = store._fast.get(key)
        except TypeError:
            handle = None
        # Inline on a warm read connection. If a worker is reading on it right now (microseconds), waiting
        # briefly is far cheaper than a thread hop; past a few milliseconds the read goes to a worker.
        if handle is not None and handle.lock.acquire(True, 0.005):
            try:
                if not handle.closed:
                    if not handle.budgeted:  # a flag on the handle: a WeakSet lookup cost 0.3 µs a read
                        if self._loop_thread == 0:
                            self._loop_thread = threading.get_ident()
                        handle.conn.setprogresshandler(self._interrupt_inline, self._inline_steps)
                        handle.budgeted = True
                    self._inline_ticks = 0
                    rows = store._query(handle, sql, params, internal)
                    if rows is not None:
                        return rows
            except apsw.InterruptError:
                pass  # over budget: redo it on a worker thread
            finally:
                handle.lock.release()
        return await self._call(store.read, key, sql, params, internal)

    async def locate(self, key: object) -> Location:
        return self._store.locate(key)  # catalog reads: this thread's read connection, microseconds

    async def exists(self, key: object) -> bool:
        return self._store.exists(key)

    async def tenants(self) -> AsyncIterator[str]:
        """Every live tenant key, in key order."""
        iterator = self._store.tenants()
        sentinel = object()
        while True:
            key = await self._call(next, iterator, sentinel)
            if key is sentinel:
                return
            yield key

    async def drop(self, key: object) -> None:
        await self._call(lifecycle.drop, self._store, key)

    async def migrate_all(self, *, parallel: int = 4) -> dict[str, str]:
        return await self._call(lambda: lifecycle.migrate_all(self._store, parallel=parallel))

    # -- outbox ---------------------------------------------------------------------------------------

    async def feed(self, key: object, *, limit: int = 50, before: int | None = None) -> list[feed.FeedItem]:
        """``key``'s activity feed, newest first (see :meth:`Router.feed`)."""
        cursor = (1 << 62) if before is None else int(before)
        return feed.items(await self._read(key, feed.page_query(limit), (cursor,), True))

    # -- lifecycle --------------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Stop the relay, wait for open batches to commit, then close every connection. Idempotent."""
        await self.relay.stop()
        for batch in list(self._batches.values()):
            if batch.round is not None:
                try:
                    await batch.round.wait(batch.loop)
                except Exception:  # noqa: BLE001 - their owners saw it
                    pass
        self._executor.shutdown(wait=True)
        self._store.close()

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
            self._executor.shutdown(wait=False)
            store.close()

