"""Group-commit state shared by :class:`~shardlite.AsyncRouter`'s transactions (see :mod:`shardlite.front.aio`).

A :class:`Batch` is one tenant's group commit: the connection it holds, whose transaction has it, who
waits; a :class:`Round` is one ``BEGIN ... COMMIT`` of it, whose outcome every member awaits. Also the
member savepoints' statements and the few asyncio shortcuts the hot path uses.
"""

from __future__ import annotations

import asyncio
import types
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from ..files.authorizer import SAVEPOINT_PREFIX
from ..files.pool import Handle

__all__ = ["Batch", "Waiter", "Round", "MEMBER_SAVEPOINT", "MEMBER_ROLLBACK", "MEMBER_RELEASE", "nested_savepoint",
           "current_task", "Future", "yield_once"]


Waiter = tuple["asyncio.Future[None]", float]


class Batch:
    """Group-commit state of one tenant."""

    __slots__ = ("key", "loop", "handle", "waiters", "busy", "holder", "count", "round", "committing",
                 "commit_scheduled", "commit_on_loop", "watchdog", "opening_error")

    def __init__(self, key: str, loop: asyncio.AbstractEventLoop, commit_on_loop: bool) -> None:
        self.key = key
        self.loop = loop
        #: the COMMIT runs on the loop thread (``synchronous=NORMAL``), not on a worker
        self.commit_on_loop = commit_on_loop
        self.handle: Handle | None = None
        #: transactions waiting for their turn, with the time each began to wait
        self.waiters: deque[Waiter] = deque()
        self.busy = False  # a transaction holds the connection (its savepoint is open)
        self.holder: asyncio.Task[Any] | None = None  # the task whose transaction holds it
        self.count = 0
        #: the open batch's outcome (None while no batch is open)
        self.round: Round | None = None
        self.committing = False
        self.commit_scheduled = False
        #: fails transactions queued past their bound (see shardlite.front.aio_commit); None when not scheduled
        self.watchdog: asyncio.TimerHandle | None = None
        #: why the batch's BEGIN has not succeeded yet (Busy, TenantMoving), while it is being retried
        self.opening_error: BaseException | None = None


# Each member of a batch runs inside its own savepoint, released on success (an unreleased stack costs
# more per write than the RELEASE saves, measured) and rolled back alone on failure. The names carry the
# authorizer's secret prefix, so these cached statements run without toggling trusted mode.
_NESTED_SP: dict[int, tuple[str, str, str]] = {}


def savepoint_names(name: str) -> tuple[str, str, str]:
    name = SAVEPOINT_PREFIX + name
    return f"SAVEPOINT {name}", f"ROLLBACK TO {name}", f"RELEASE {name}"


MEMBER_SAVEPOINT, MEMBER_ROLLBACK, MEMBER_RELEASE = savepoint_names("m")


def nested_savepoint(depth: int) -> tuple[str, str, str]:
    found = _NESTED_SP.get(depth)
    if found is None:
        found = _NESTED_SP[depth] = savepoint_names(f"n{depth}")
    return found


def _task_lookup() -> Callable[[asyncio.AbstractEventLoop], asyncio.Task[Any] | None]:
    """The current task of a running loop, fast: Python 3.11's ``asyncio.current_task`` is a Python
    function around a dict lookup (0.3 µs on the hot path of every transaction); later versions have
    it in C."""
    table = getattr(asyncio.tasks, "_current_tasks", None)
    if isinstance(asyncio.current_task, types.BuiltinFunctionType) or not isinstance(table, dict):
        return asyncio.current_task
    return table.get


current_task = _task_lookup()

#: asyncio's C future, made directly: ``loop.create_future()`` is a Python method around the same call
#: (0.2 µs on every transaction's path); the group commit only needs a plain future.
Future = asyncio.Future



@types.coroutine
def yield_once() -> Generator[None, None, None]:
    """Give the loop one turn (a bare ``yield``: the task is rescheduled at the back of the ready queue,
    no future involved)."""
    yield


def _retrieved(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class Round:
    """The outcome of one group-commit batch (one ``BEGIN ... COMMIT``), shared by its members.

    ``finished`` turns true once, after the batch's ``COMMIT`` (``error`` None) or its failure (``error``
    set). Members that block for it each get their own future (:meth:`wait`), so a member's cancellation
    cancels only its own wait."""

    __slots__ = ("finished", "error", "_waiters", "confirm")

    def __init__(self) -> None:
        self.finished = False
        self.error: BaseException | None = None
        self._waiters: list[asyncio.Future[None]] | None = None
        #: with durability="replicated": the batch's one wait for the replica, shared by its members
        self.confirm: asyncio.Future[None] | None = None

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future resolved (or failed with ``error``) when the batch finishes."""
        fut: asyncio.Future[None] = Future(loop=loop)
        if self.finished:
            _settle(fut, self.error)
        elif self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)
        return fut

    def finish(self, error: BaseException | None) -> None:
        self.finished, self.error = True, error
        waiters, self._waiters = self._waiters, None
        for fut in waiters or ():
            _settle(fut, error)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if fut.done():
        return  # its member was cancelled meanwhile
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)
        fut.add_done_callback(_retrieved)  # a member cancelled later never reads it
