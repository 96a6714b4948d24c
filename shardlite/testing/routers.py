"""Routers for tests: fast defaults, factories that close what they made, and a private event loop.

* :func:`router_options` merges the fast test defaults with the user's schema and keyword arguments.
* :class:`LoopRunner` runs coroutines from a *sync* test on one event loop of its own (created on first use,
  never installed as the thread's current loop, closed at teardown), so an :class:`~shardlite.AsyncRouter`
  used through it lives on one loop for the whole test.
* :class:`RouterFactory` / :class:`AsyncRouterFactory` build routers on the test's data root and close every
  one they built (an ``AsyncRouter`` with ``aclose()`` on the :class:`LoopRunner`'s loop).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from ..core.outbox import RetryPolicy
from ..files.schema import Step
from ..front.accounts import ScryptParams
from ..front.aio import AsyncRouter
from ..front.router import Router

__all__ = ["FAST_SCRYPT", "FAST_RETRY", "Schema", "router_options", "LoopRunner", "RouterFactory",
           "AsyncRouterFactory"]

T = TypeVar("T")
Schema = Sequence[Step] | Mapping[str, Sequence[Step]] | None

#: Password hashing for tests: microseconds instead of tens of milliseconds per hash. Never use it outside
#: tests (the library's default is n=2**14, r=8, p=1).
FAST_SCRYPT = ScryptParams(n=2**4, r=1, p=1)
#: The relay's retries for tests: the same five attempts, backing off from 1 ms (not 50 ms) to 10 ms, so a
#: failing handler becomes a dead letter within a few milliseconds of :func:`~shardlite.testing.deliver`.
FAST_RETRY = RetryPolicy(max_attempts=5, backoff_base=0.001, backoff_cap=0.01, unavailable_base=0.01,
                         unavailable_cap=0.05)


def router_options(schema: Schema, global_schema: Sequence[Step] | None,
                   overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for ``Router``/``AsyncRouter``: the schemas, ``synchronous="NORMAL"``, the fast
    retry policy, then ``overrides`` (which win)."""
    return {"schema": schema, "global_schema": global_schema, "synchronous": "NORMAL", "retry": FAST_RETRY,
            **overrides}


class LoopRunner:
    """``run(coro)``: run a coroutine to completion from a sync test and return its result.

    Every call uses the same event loop, created on the first call and closed by :meth:`close` (the
    fixture's teardown): tasks a call leaves running (a started relay) go on during the next call.
    It cannot be used while an event loop runs in the calling thread (an async test): ``RuntimeError``
    saying to await the coroutine instead. The loop is never made the thread's current event loop, so
    pytest-asyncio's and anyio's loops are left alone."""

    def __init__(self) -> None:
        self._runner: asyncio.Runner | None = None
        self._closed = False

    def __call__(self, coro: Coroutine[Any, Any, T]) -> T:
        __tracebackhide__ = True
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            coro.close()  # never awaited: no "coroutine was never awaited" warning on top of this error
            raise RuntimeError("shardlite_run runs coroutines from sync tests; an event loop is running in this "
                               "thread (an async test): await the coroutine instead")
        if self._closed:
            coro.close()
            raise RuntimeError("shardlite_run was used after its test's teardown")
        if self._runner is None:
            self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        return self._runner.run(coro)

    @property
    def started(self) -> bool:
        """Whether the loop exists (a coroutine was run)."""
        return self._runner is not None

    def close(self) -> None:
        """Cancel what still runs on the loop and close it (idempotent)."""
        self._closed = True
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()


class RouterFactory:
    """``make(root=None, **overrides) -> Router`` on the test's data root (or ``root``), with ``options``
    (see :func:`router_options`) under ``overrides`` and the accounts' scrypt cost set to ``scrypt`` (unless
    None); ``on_made(router)`` is called for each. :meth:`close_all` closes every router it made."""

    def __init__(self, root: str | os.PathLike[str], options: Mapping[str, Any], scrypt: ScryptParams | None,
                 on_made: Callable[[Router], None] | None = None) -> None:
        self.root = root
        self.options = dict(options)
        self.scrypt = scrypt
        self._on_made = on_made
        self.made: list[Router] = []

    def __call__(self, root: str | os.PathLike[str] | None = None, **overrides: Any) -> Router:
        router = Router(self.root if root is None else root, **(self.options | overrides))
        self.made.append(router)
        if self.scrypt is not None:
            router.accounts.scrypt = self.scrypt
        if self._on_made is not None:
            self._on_made(router)
        return router

    def close_all(self) -> None:
        for router in reversed(self.made):
            router.close()


class AsyncRouterFactory:
    """``make(root=None, **overrides) -> AsyncRouter``, like :class:`RouterFactory`. The router needs no
    event loop to be built; it binds to the loop that uses it (an async test's, or the
    :class:`LoopRunner`'s in a sync test). :meth:`close_all` runs ``aclose()`` for each on the
    :class:`LoopRunner`'s loop, after the test (no loop runs then)."""

    def __init__(self, root: str | os.PathLike[str], options: Mapping[str, Any], scrypt: ScryptParams | None,
                 runner: LoopRunner, on_made: Callable[[AsyncRouter], None] | None = None) -> None:
        self.root = root
        self.options = dict(options)
        self.scrypt = scrypt
        self._runner = runner
        self._on_made = on_made
        self.made: list[AsyncRouter] = []

    def __call__(self, root: str | os.PathLike[str] | None = None, **overrides: Any) -> AsyncRouter:
        router = AsyncRouter(self.root if root is None else root, **(self.options | overrides))
        self.made.append(router)
        if self.scrypt is not None:
            router.accounts.sync.scrypt = self.scrypt
        if self._on_made is not None:
            self._on_made(router)
        return router

    def close_all(self) -> None:
        """Close every router made (``aclose()``); the first failure is raised once all were tried."""
        failure: BaseException | None = None
        for router in reversed(self.made):
            if router.closed:
                continue
            try:
                self._runner(router.aclose())
            except Exception as exc:  # noqa: BLE001 - the others are still closed; raised below
                failure = failure or exc
        if failure is not None:
            raise failure
