"""The group commit of :class:`~shardlite.AsyncRouter` (see :mod:`shardlite.front.aio`): a mixin that keeps the
batches, opens them, hands the connection from one transaction to the next and commits.

Waits are bounded, and a stuck tenant never holds the others up:

* A batch's ``BEGIN IMMEDIATE`` is tried on the loop without waiting when the tenant's connection is
  warm, else on a worker thread that waits at most :data:`OPEN_WAIT_MS` for another connection's lock and
  never for a moving tenant; while the tenant stays locked (or fenced by a move) the loop sleeps between
  tries, so no worker thread is held for the whole wait. The opener gives up ``busy_timeout_ms`` (for a
  lock; ``move_wait`` for a move) after *it* began to wait.
* A transaction queued behind others (``Batch.waiters``) carries the time it began to wait. When the
  opener gives up, every queued transaction whose own wait has reached the bound fails with the same error
  at once, instead of each one starting a full wait of its own in turn (the tenth of ten queued
  transactions used to get ``Busy`` after ten timeouts). A watchdog fails any transaction queued for longer
  than the bound behind a batch that does not move (a transaction body awaiting something slow). Queued
  transactions that fail never executed anything: retrying them is safe.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from concurrent.futures import Executor
from time import monotonic as _monotonic
from typing import Any

import apsw

from ..errors import Busy, ShardliteError, TenantMoving
from ..files.pool import Handle
from .batch import Batch, Future, Round, Waiter
from .store import Store

__all__ = ["GroupCommit", "OPEN_WAIT_MS", "MIN_QUEUE_WAIT"]

#: How long a worker thread waits for another connection's lock before it hands the wait back to the loop.
OPEN_WAIT_MS = 20
#: Floor of the bound on waiting behind this process's own transactions (with ``busy_timeout_ms=0``
#: a transaction still waits its turn in the batch).
MIN_QUEUE_WAIT = 0.1
_BATCH_OWNER = -1  # no thread has this id: Handle.enter() from any thread waits for the lock


class GroupCommit:
    """Mixin of :class:`~shardlite.AsyncRouter`: the group-commit batches. Expects ``_store``,
    ``_executor``, ``_batches``, ``_max_batch``, ``_commit_offloaded``, ``_busy_s``, ``_move_wait`` and
    ``_loop_limit`` from the router."""

    _store: Store
    _executor: Executor
    _batches: dict[str, Batch]
    _max_batch: int
    _commit_offloaded: bool
    _busy_s: float
    _move_wait: float
    _loop_limit: float

    async def _call(self, fn: Any, *args: Any) -> Any:
        raise NotImplementedError

    async def _join(self, canon: str) -> Batch:
        """Wait for this transaction's turn on ``canon`` and return the open batch it joins."""
        batch = self._batches.get(canon)
        if batch is None:
            batch = self._batches[canon] = Batch(canon, asyncio.get_running_loop(), not self._commit_offloaded)
            if self._store.checkpoints is not None:
                self._store.checkpoints.defer_thread = threading.get_ident()  # the loop never checkpoints
        started = 0.0
        if batch.busy or batch.committing or batch.waiters or batch.count >= self._max_batch:
            fut: asyncio.Future[None] = Future(loop=batch.loop)
            waiter: Waiter = (fut, _monotonic())
            started = waiter[1]
            batch.waiters.append(waiter)
            if batch.watchdog is None:
                self._watch(batch)
            try:
                await fut
            except BaseException:
                if waiter in batch.waiters:
                    batch.waiters.remove(waiter)  # never started: nothing executed
                elif fut.done() and not fut.cancelled() and fut.exception() is None:
                    batch.busy = False  # we were handed the turn but cannot take it: pass it on
                    self._next(batch)
                raise
        batch.busy = True
        if batch.handle is None:
            try:
                await self._open_batch(batch, started or _monotonic())
            except BaseException as exc:
                batch.busy = False
                if isinstance(exc, (Busy, TenantMoving)):
                    self._expire(batch, exc)
                self._next(batch)
                raise
        batch.count += 1
        return batch

    # -- bounded waits ------------------------------------------------------------------------------------

    def _bound(self, error: BaseException | None) -> float:
        """How long a transaction may wait for the reason ``error`` (None: its turn in the batch)."""
        return max(self._move_wait if isinstance(error, TenantMoving) else self._busy_s, MIN_QUEUE_WAIT)

    def _watch(self, batch: Batch) -> None:
        """Make sure the watchdog runs when the oldest queued transaction reaches its bound."""
        if not batch.waiters:
            batch.watchdog = None
            return
        oldest = min(started for _, started in batch.waiters)
        delay = max(0.0, oldest + self._bound(batch.opening_error) - _monotonic())
        batch.watchdog = batch.loop.call_later(delay, self._watchdog, batch)

    def _watchdog(self, batch: Batch) -> None:
        batch.watchdog = None
        error = batch.opening_error
        self._expire(batch, error if error is not None else Busy(
            f"tenant {batch.key!r} stayed busy: this process's transactions on it held it past the busy timeout "
            "(a transaction body awaiting something slow holds the tenant's batch); nothing was executed: "
            "retry"))
        if batch.waiters:
            self._watch(batch)

    def _expire(self, batch: Batch, error: BaseException) -> None:
        """Fail, with ``error``, every queued transaction that has waited its bound for that reason."""
        now = _monotonic()
        bound = self._bound(error)
        kept: deque[Waiter] = deque()
        for fut, started in batch.waiters:
            if fut.done():
                continue
            if now - started >= bound:
                fut.set_exception(type(error)(str(error)))
            else:
                kept.append((fut, started))
        batch.waiters = kept

    # -- opening ------------------------------------------------------------------------------------------

    async def _open_batch(self, batch: Batch, started: float) -> None:
        """BEGIN IMMEDIATE for ``batch``: on the loop when the warm connection is free at once, else on a
        worker that waits briefly; while the tenant stays locked or moving the loop sleeps between tries,
        until the bound counted from ``started`` (see the module doc)."""
        store = self._store
        loop = batch.loop
        delay = 0.001
        while True:
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
                except (Busy, TenantMoving) as exc:
                    batch.opening_error = exc
                    if batch.watchdog is not None:  # queued transactions now wait for this reason
                        batch.watchdog.cancel()
                        self._watch(batch)
                    if _monotonic() - started + delay > self._bound(exc):
                        raise
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.05)
                    continue
                handle.owner = threading.get_ident()
            break
        assert handle is not None
        batch.opening_error = None
        batch.handle = handle
        batch.count = 0
        batch.round = Round()
        handle.savepoints = 0
        handle.limit = self._loop_limit  # statements of the batch run on the loop

    async def _restart_log(self, handle: Handle) -> None:
        """The tenant's log reached INLINE_FRAMES under the loop's commits: copy it on a worker before its
        next batch begins (see :mod:`shardlite.files.checkpoints`), so that batch's first write restarts it.
        Only this tenant's transactions wait; a cancelled wait leaves the worker to finish alone."""
        checkpoints = self._store.checkpoints
        assert checkpoints is not None and handle.wal is not None  # a watch is installed by checkpoints
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, checkpoints.restart, handle,
                                                             handle.wal)
        except RuntimeError:  # the executor is shutting down: the router is closing
            handle.wal.restart_due = False

    def _begin_for_batch(self, key: str) -> Handle:
        """On a worker: BEGIN IMMEDIATE for a batch, waiting at most OPEN_WAIT_MS for a lock and not at all
        for a moving tenant (the loop waits instead). The handle is owned by the batch (the loop), not by
        this worker thread: a later job on this worker (a relay pass) must wait for it, not re-enter it."""
        handle = self._store.begin_write(key, wait_ms=min(OPEN_WAIT_MS, int(self._busy_s * 1000)), move_wait=0.0)
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

    # -- handing on and committing ------------------------------------------------------------------------

    def _next(self, batch: Batch) -> None:
        """Hand the connection to the next waiter, or schedule the batch's commit."""
        if batch.busy or batch.committing:
            return
        if batch.waiters and (batch.handle is None or batch.count < self._max_batch):
            while batch.waiters:
                fut = batch.waiters.popleft()[0]
                if not fut.done():
                    batch.busy = True
                    fut.set_result(None)
                    return
        if batch.watchdog is not None and not batch.waiters:
            batch.watchdog.cancel()
            batch.watchdog = None
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
            handle.limit = self._store._deadline  # the connection's other users run on worker threads
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
