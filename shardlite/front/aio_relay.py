"""The relay under :class:`~shardlite.AsyncRouter`: an asyncio task over the same
:class:`~shardlite.services.relay.Relay`.

The task sleeps on an ``asyncio.Event`` (woken at once by commits that emitted in this process, otherwise
every ``poll_interval``) and runs each pass on the router's worker threads, so handlers (plain functions
``(tx, event)``, as under :class:`~shardlite.Router`) never block the event loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from ..services.relay import PassStats, Relay

__all__ = ["AsyncRelay"]


class AsyncRelay:
    """``ar.relay``: ``start()`` (needs a running loop), ``await stop()``, ``await run_once()``,
    ``await drain()``, ``await status()``, ``await retry_dead()``."""

    def __init__(self, relay: Relay, call: Callable[..., Awaitable[Any]]) -> None:
        self.sync = relay
        self._call = call
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0  # the ident of the thread running the loop

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the relay task on the running loop (idempotent)."""
        if self.running:
            return
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._event = asyncio.Event()
        self._stopping = False
        self.sync.store.emitter.listen(self._notify)
        self.sync._hold_wakes(True)
        self._task = self._loop.create_task(self._run(), name="shardlite-relay")

    async def stop(self) -> None:
        """Stop the task after its current pass and give up the leases it holds (idempotent)."""
        task, self._task = self._task, None
        self.sync.store.emitter.unlisten(self._notify)
        if task is not None:
            # The flag, not only the cancellation: asyncio.wait_for can swallow a cancel that lands in
            # the same loop iteration as a wake-up (CPython 3.11), and the task would run on.
            self._stopping = True
            if self._event is not None:
                self._event.set()
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            self.sync._hold_wakes(False)
        if self.sync._held and not self.sync.store.closed:
            await self._call(self.sync.release_claims)
        self.sync.errors.flush()

    def _notify(self, source: str) -> None:
        """A commit emitted from ``source`` (in the committing thread): pass over it at once. The group commit
        runs on the loop's thread: there the event is set directly, and an event already set is left alone
        (the task clears it before the pass that takes ``_hot``); only another thread needs the loop's
        thread-safe call, a write to its self-pipe (a commit's largest cost after SQLite's, measured)."""
        self.sync._hot.add(source)
        loop, event = self._loop, self._event
        if loop is None or event is None or event.is_set():
            return
        if threading.get_ident() == self._loop_thread:
            event.set()
        elif not loop.is_closed():
            loop.call_soon_threadsafe(event.set)

    async def _run(self) -> None:
        assert self._event is not None
        while not self._stopping:
            try:
                stats: PassStats = await self._call(self.sync.run_once)
                busy = stats.progressed
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the relay task must survive a failing pass
                self.sync.pass_failed(exc)  # reported without flooding the log (Relay.errors)
                busy = False
            if not busy:
                try:
                    await asyncio.wait_for(self._event.wait(), self.sync.poll_interval)
                except TimeoutError:
                    pass
                self._event.clear()

    async def run_once(self, *, limit: int = 256, every: bool = False) -> PassStats:
        """One pass on a worker thread (see :meth:`Relay.run_once <shardlite.services.relay.Relay.run_once>`)."""
        result: PassStats = await self._call(lambda: self.sync.run_once(limit=limit, every=every))
        return result

    async def drain(self, *, timeout: float = 60.0) -> PassStats:
        result: PassStats = await self._call(lambda: self.sync.drain(timeout=timeout))
        return result

    async def status(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call(self.sync.status)
        result["running"] = self.running
        return result

    async def retry_dead(self, *, source: str | None = None, seq: int | None = None) -> int:
        return int(await self._call(lambda: self.sync.retry_dead(source=source, seq=seq)))
