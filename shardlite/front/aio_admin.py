"""Operations under :class:`~shardlite.AsyncRouter`: the async twins of ``router.nodes``, ``router.rebalance``,
``map``, ``backup``, ``restore``, ``export``, ``import_``, ``drop``, ``status`` and ``stats``.

Each runs the sync implementation on the router's *admin* threads (``asyncio`` must not wait for a copy,
a move or a directory walk), never on the worker threads that BEGINs and commits need, so a backup or a
rebalance running in the application's process does not slow its writes down.

:meth:`AsyncRouter.aclose` closes the map results still open (their reads are interrupted) and waits for
the admin threads up to ``close_timeout``: a backup stops before its next tenant (the previous backup in
that directory stays whole); a rebalance or migration still running fails at its next step on the closed
router, as after a crash (``rebalance resume`` finishes what its journal holds).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar, overload

from ..core.movejournal import MoveRow
from ..core.planning import Plan
from ..errors import ShardliteError
from ..files.catalog import Location, Node
from ..files.engine import Settings
from ..services import backup as backup_mod
from ..services import erase as erase_mod
from ..services import lifecycle, metrics
from ..services.fanout import MapResult, Row, run_map
from ..services.nodes import Nodes
from ..services.rebalance import NoticeFn, Rebalancer
from .aio_relay import AsyncRelay
from .store import Store
from .transaction import Params

__all__ = ["Admin", "AsyncNodes", "AsyncRebalancer", "AsyncMapResult", "ADMIN_WORKERS"]

T = TypeVar("T")

#: Threads for these operations (started when first needed); each parallel copy or move has its own.
ADMIN_WORKERS = 4


async def _on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    try:
        future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    except RuntimeError:  # "cannot schedule new futures after shutdown"
        raise ShardliteError("the router is closed") from None
    return await future


class AsyncNodes:
    """``ar.nodes``: ``await list()``, ``counts()``, ``add()``, ``drain()``, ``remove()``; see
    :class:`~shardlite.services.nodes.Nodes`. ``sync`` is the sync object."""

    def __init__(self, sync: Nodes, executor: ThreadPoolExecutor) -> None:
        self.sync = sync
        self._executor = executor

    async def list(self) -> list[Node]:
        return await _on(self._executor, self.sync.list)

    async def counts(self) -> builtins.list[dict[str, Any]]:
        return await _on(self._executor, self.sync.counts)

    async def add(self, name: str, *, path: str | None = None, weight: int = 1) -> Node:
        return await _on(self._executor, lambda: self.sync.add(name, path=path, weight=weight))

    async def drain(self, name: str) -> Node:
        return await _on(self._executor, self.sync.drain, name)

    async def remove(self, name: str) -> None:
        await _on(self._executor, self.sync.remove, name)


class AsyncRebalancer:
    """``ar.rebalance``: every operation of :class:`~shardlite.services.rebalance.Rebalancer`, awaitable. ``progress``
    and ``notice`` callbacks are called on the rebalancer's threads, not on the event loop. ``sync`` is the
    sync object (its ``lease``, ``reserve`` and ``fault`` settings)."""

    def __init__(self, sync: Rebalancer, executor: ThreadPoolExecutor) -> None:
        self.sync = sync
        self._executor = executor

    async def plans(self) -> list[dict[str, Any]]:
        return await _on(self._executor, self.sync.plans)

    async def compute(self) -> Plan:
        return await _on(self._executor, self.sync.compute)

    async def plan(self) -> tuple[int, Plan]:
        return await _on(self._executor, self.sync.plan)

    async def apply(self, plan_id: int | None = None, *, parallel: int = 1, pause_ms: float = 0.0,
                    progress: Callable[[MoveRow], None] | None = None,
                    notice: NoticeFn | None = None) -> dict[str, Any]:
        return await _on(self._executor, lambda: self.sync.apply(plan_id, parallel=parallel, pause_ms=pause_ms,
                                                                 progress=progress, notice=notice))

    async def resume(self, plan_id: int | None = None, *, parallel: int = 1, pause_ms: float = 0.0,
                     progress: Callable[[MoveRow], None] | None = None,
                     notice: NoticeFn | None = None) -> dict[str, Any]:
        return await _on(self._executor, lambda: self.sync.resume(plan_id, parallel=parallel, pause_ms=pause_ms,
                                                                  progress=progress, notice=notice))

    async def rescue(self, key: str) -> bool:
        return await _on(self._executor, self.sync.rescue, key)

    async def cancel(self, plan_id: int | None = None, *, wait: float | None = None,
                     notice: NoticeFn | None = None) -> dict[str, Any]:
        return await _on(self._executor, lambda: self.sync.cancel(plan_id, wait=wait, notice=notice))

    async def complete(self, plan_id: int | None = None) -> dict[str, Any]:
        return await _on(self._executor, self.sync.complete, plan_id)

    async def status(self, plan_id: int | None = None) -> dict[str, Any]:
        return await _on(self._executor, self.sync.status, plan_id)


class AsyncMapResult:
    """What ``await ar.map(...)`` returns: ``async for key, rows in result``; each tenant is read on the
    admin threads. ``columns``, ``outdated``, ``errors`` and ``count`` as on
    :class:`~shardlite.services.fanout.MapResult`
    (complete once the iteration ended). To stop early, leave an ``async with result:`` block or ``await
    result.aclose()``: the reads in flight are interrupted (``break`` alone leaves them running until the
    result is garbage-collected); :meth:`AsyncRouter.aclose` closes the results still open."""

    def __init__(self, sync: MapResult, executor: ThreadPoolExecutor) -> None:
        self.sync = sync
        self._executor = executor
        self._closed = False
        self._pending: asyncio.Future[Any] | None = None

    async def aclose(self) -> None:
        """Stop: reads in flight are interrupted, queued ones never start, the reading threads are gone
        when this returns (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.sync.stop()  # on the loop: only a flag (closing may wait for reading threads)
        pending = self._pending
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)  # that next() sees the flag and ends the iteration
        await asyncio.to_thread(self.sync.close)  # the generator is idle now: its threads are joined

    async def __aenter__(self) -> AsyncMapResult:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def columns(self) -> list[str] | None:
        return self.sync.columns

    @property
    def outdated(self) -> dict[str, int]:
        return self.sync.outdated

    @property
    def errors(self) -> dict[str, str]:
        return self.sync.errors

    @property
    def count(self) -> int:
        return self.sync.count

    def __aiter__(self) -> AsyncIterator[tuple[str, list[Row]]]:
        return self._items()

    async def _items(self) -> AsyncIterator[tuple[str, list[Row]]]:
        done = object()
        while not self._closed:
            self._pending = asyncio.ensure_future(_on(self._executor, next, self.sync, done))
            try:
                item = await self._pending
            finally:
                self._pending = None
            if item is done:
                return
            yield item


class Admin:
    """The operations of :class:`~shardlite.AsyncRouter` that run on its admin threads (a mixin: the router
    sets ``_store``, ``_admin`` and ``relay`` and calls :meth:`_init_admin`)."""

    _store: Store
    _admin: ThreadPoolExecutor
    relay: AsyncRelay

    def _init_admin(self) -> None:
        self._maps: weakref.WeakSet[AsyncMapResult] = weakref.WeakSet()
        #: Storage nodes (async twin of :class:`~shardlite.services.nodes.Nodes`).
        self.nodes = AsyncNodes(Nodes(self._store), self._admin)
        #: Online tenant moves (async twin of :class:`~shardlite.services.rebalance.Rebalancer`).
        self.rebalance = AsyncRebalancer(Rebalancer(self._store), self._admin)

    @property
    def settings(self) -> Settings:
        return self._store.settings

    @overload
    async def drop(self, key: object, *, erase: Literal[False] = False) -> None: ...

    @overload
    async def drop(self, key: object, *, erase: Literal[True]) -> dict[str, Any]: ...

    async def drop(self, key: object, *, erase: bool = False) -> dict[str, Any] | None:
        """See :meth:`Router.drop` (``erase=True``: the replica's history too, with a receipt). On an admin
        thread: an erase rewrites replica objects for seconds, which must not hold a thread BEGINs need."""
        if erase:
            receipt: dict[str, Any] = await _on(self._admin, erase_mod.erase, self._store, key)
            return receipt
        await _on(self._admin, lifecycle.drop, self._store, key)
        return None

    async def status(self) -> dict[str, Any]:
        """Tenants per node and per schema version, and this process's open connections (like
        :meth:`Router.status`)."""
        return await _on(self._admin, metrics.status, self._store)

    async def stats(self) -> dict[str, Any]:
        """Like :meth:`Router.stats`: :meth:`status` with bytes per node, relay lag and rebalance state."""
        return await _on(self._admin, metrics.stats, self._store, self.relay.sync, self.rebalance.sync)

    async def migrate_all(self, *, parallel: int = 4,
                          progress: Callable[[str, BaseException | None], None] | None = None) -> dict[str, str]:
        """Like :meth:`Router.migrate_all`; ``progress`` is called on the migration threads."""
        return await _on(self._admin, lambda: lifecycle.migrate_all(self._store, parallel=parallel,
                                                                    progress=progress))

    async def map(self, sql: str, params: Params = (), *, keys: Iterable[object] | None = None,
                  parallel: int = 4) -> AsyncMapResult:
        """Like :meth:`Router.map`: ``async for key, rows in await ar.map(sql)``."""
        result = AsyncMapResult(await _on(self._admin, lambda: run_map(self._store, sql, params, keys=keys,
                                                                       parallel=parallel)), self._admin)
        self._maps.add(result)
        return result

    async def _close_admin(self) -> None:
        """Stop what runs on the admin threads (for :meth:`AsyncRouter.aclose`): open map results."""
        for result in list(self._maps):
            await result.aclose()

    async def backup(self, dest: str | os.PathLike[str], *, keys: Iterable[object] | None = None,
                     parallel: int = backup_mod.PARALLEL) -> dict[str, Any]:
        """Like :meth:`Router.backup`."""
        return await _on(self._admin, lambda: backup_mod.backup(self._store, os.fspath(dest), keys=keys,
                                                                parallel=parallel))

    async def restore(self, src: str | os.PathLike[str], *, keys: Iterable[object] | None = None,
                      as_key: object | None = None, force: bool = False) -> list[str]:
        """Like :meth:`Router.restore`."""
        return await _on(self._admin, lambda: backup_mod.restore(self._store, os.fspath(src), keys=keys,
                                                                 as_key=as_key, force=force))

    async def export(self, key: object, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Like :meth:`Router.export`."""
        return await _on(self._admin, backup_mod.export_tenant, self._store, key, os.fspath(path))

    async def import_(self, path: str | os.PathLike[str], key: object, *, force: bool = False,
                      keep_events: bool = False) -> Location:
        """Like :meth:`Router.import_`."""
        await _on(self._admin, lambda: backup_mod.import_tenant(self._store, os.fspath(path), key, force=force,
                                                                keep_events=keep_events))
        return self._store.locate(key)  # a catalog read on this thread's read connection, like ar.locate
