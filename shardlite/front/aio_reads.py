"""Reads of :class:`~shardlite.AsyncRouter` (see :mod:`shardlite.front.aio`): a mixin.

A read runs inline on the event loop when the tenant's read connection is warm and free, under a budget
of *time* (``inline_read_ms``) and steps (``inline_read_steps``), with values up to
:data:`~shardlite.files.limits.FAST_VALUE` bytes: the progress handler looks at the clock every few hundred
virtual-machine steps, and no single step can build a large value, so a read cannot stall the loop for
long (one ``randomblob(3e8)`` did for 1-2.4 s when the budget counted steps only). A read past the budget
is redone on a worker thread of the router's read pool, as is a cold one, under ``statement_timeout``.

On a worker, a read is a :class:`~shardlite.files.limits.Ticket`: a caller that is cancelled interrupts its
statement (abandoned reads used to pin every worker); one tenant never holds more than all but one of the
read workers, so its slow reads cannot starve the others' cold reads; and a tenant being moved is waited
for on the loop (``move_wait``), not on a worker thread.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from time import monotonic as _monotonic
from typing import Any

import apsw

from ..errors import TenantMoving
from ..files.limits import Ticket
from .store import Store
from .transaction import Params

__all__ = ["Reads", "TenantGate"]


class TenantGate:
    """At most ``limit`` of one tenant's reads on worker threads at once; the next waits its turn (in
    order) on the loop."""

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._busy: dict[str, list[Any]] = {}  # key -> [reads running, deque of futures waiting]

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        entry = self._busy.get(key)
        if entry is None:
            entry = self._busy[key] = [0, deque()]
        if entry[0] < self.limit and not entry[1]:
            entry[0] += 1
        else:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry[1].append(fut)
            try:
                await fut
            except BaseException:
                if fut in entry[1]:
                    entry[1].remove(fut)
                    self._drop_if_idle(key, entry)
                elif fut.done() and not fut.cancelled():
                    self._release(key, entry)  # handed a slot it cannot use: pass it on
                raise
        try:
            yield
        finally:
            self._release(key, entry)

    def _release(self, key: str, entry: list[Any]) -> None:
        waiting: deque[asyncio.Future[None]] = entry[1]
        while waiting:
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes to it
                return
        entry[0] -= 1
        self._drop_if_idle(key, entry)

    def _drop_if_idle(self, key: str, entry: list[Any]) -> None:
        if entry[0] == 0 and not entry[1]:
            self._busy.pop(key, None)


class Reads:
    """Mixin of :class:`~shardlite.AsyncRouter`. Expects ``_store``, ``_readers`` (an executor),
    ``_gate`` (a :class:`TenantGate`), ``_budget`` and ``_move_wait`` from the router."""

    _store: Store
    _readers: Executor
    _gate: TenantGate
    _budget: tuple[float, int]
    _move_wait: float

    def _canonical(self, key: object) -> str:
        raise NotImplementedError

    def _inline(self, key: object, sql: str, params: Params, internal: bool) -> list[tuple[Any, ...]] | None:
        """The read run on the loop, or None when it must run on a worker (cold, busy, over budget, a
        large value); ``internal``: one of shardlite's own reads, its text prefixed with INTERNAL_SQL. A plain
        method, not a coroutine: the caller awaits only when the read goes to a worker."""
        store = self._store
        try:
            handle = store._fast.get(key)
        except TypeError:
            return None
        # Inline on a warm read connection. If a worker is reading on it right now (microseconds), waiting
        # briefly is far cheaper than a thread hop; past a few milliseconds the read goes to a worker.
        if handle is None or not handle.lock.acquire(True, 0.005):
            return None
        try:
            if not handle.closed:
                return store._query(handle, sql, params, internal, None, self._budget)
        except (apsw.InterruptError, apsw.TooBigError):
            pass  # over budget, or a value too large to build on the loop: a worker reads it
        finally:
            handle.lock.release()
        return None

    async def _offloaded(self, key: object, sql: str, params: Params, internal: bool) -> list[tuple[Any, ...]]:
        """The read on a worker thread of the read pool (see the module doc)."""
        canon = self._canonical(key)
        loop = asyncio.get_running_loop()
        deadline = _monotonic() + self._move_wait
        delay = 0.001
        async with self._gate.slot(canon):
            while True:
                ticket = Ticket()
                running = loop.run_in_executor(self._readers, self._store.read, canon, sql, params, internal, ticket,
                                               0.0)
                try:
                    return await running
                except asyncio.CancelledError:
                    ticket.cancel()  # the statement stops (or never starts); its result is nobody's
                    raise
                except TenantMoving:
                    if _monotonic() + delay > deadline:
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.05)
