"""Running the relay to completion inside a test: :func:`deliver` (sync) and :func:`adeliver` (async).

Both drain the router's relay (every pending event of every source, with the handlers registered on that
router, waiting out retry delays) on demand, then look at what is left: events that became dead letters
during the call, and events still pending (no handler for their topic on this router, a handler still
failing when the drain's time ran out, events held behind those on the same pair). Unless
``check=False``, anything left is an ``AssertionError`` listing each event with its reason.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from ..core.outbox import from_json
from ..errors import UnknownTenant
from ..front.aio import AsyncRouter
from ..front.router import Router
from ..front.store import Store
from ..services.relay import PassStats, Relay
from .events import _shown

__all__ = ["deliver", "adeliver", "Delivery", "Undelivered"]

_PENDING = "SELECT seq, dest, topic, payload, attempts, last_error FROM _shardlite_outbox ORDER BY seq"
#: dead letters read before and after a drain (a test makes far fewer)
_DEAD_LIMIT = 1_000_000


@dataclass(frozen=True)
class Undelivered:
    """An event a :func:`deliver` call left undelivered: ``state`` is ``"dead"`` (a dead letter made during
    the call) or ``"pending"`` (still in its source's outbox); ``reason`` says why."""

    state: str
    source: str
    dest: str
    topic: str
    payload: Any
    seq: int
    reason: str

    def __str__(self) -> str:
        return f"{self.state}: {self.source} -> {self.dest}  topic {self.topic!r}  payload {_shown(self.payload)}\n" \
               f"      {self.reason}"


@dataclass
class Delivery:
    """What one :func:`deliver` call did: the relay's counts (``stats``), and the events it left undelivered
    (``undelivered``: dead letters made during the call first, then those still pending)."""

    stats: PassStats
    undelivered: list[Undelivered] = field(default_factory=list)
    failing: dict[str, str] = field(default_factory=dict)  # sources the relay gave up on: their last error

    @property
    def delivered(self) -> int:
        return self.stats.delivered

    @property
    def ok(self) -> bool:
        return not self.undelivered and not self.failing

    def describe(self) -> str:
        """The failure message: each undelivered event with its reason, and the failing sources."""
        count = len(self.undelivered)
        lines = [f"{count} event{'s' if count != 1 else ''} could not be delivered "
                 f"({self.stats.delivered} delivered):"]
        lines += [f"  {item}" for item in self.undelivered]
        lines += [f"  source {key!r} kept failing: {error}" for key, error in sorted(self.failing.items())]
        return "\n".join(lines)


def _relay(router: Router | AsyncRouter) -> Relay:
    if isinstance(router, AsyncRouter):
        if router.relay.running:
            raise RuntimeError("this AsyncRouter's relay is running in the background (relay.start() or "
                               "relay=True): stop it, deliver() runs the relay on demand")
        return router.relay.sync
    if not isinstance(router, Router):
        raise TypeError(f"deliver() takes a shardlite Router or AsyncRouter, not {type(router).__name__}")
    if router.relay.running:
        raise RuntimeError("this Router's relay is running in the background (relay.start() or relay=True): "
                           "stop it, deliver() runs the relay on demand")
    return router.relay


def deliver(router: Router | AsyncRouter, *, timeout: float = 30.0, check: bool = True) -> Delivery:
    """Deliver every pending event of ``router``'s data root with the handlers registered on ``router``,
    on the calling thread, until nothing more can be delivered (retries waited out) or ``timeout``
    seconds. Raises ``AssertionError`` listing the events left undelivered (dead letters made by this call,
    events still pending, with why) unless ``check`` is false; returns the :class:`Delivery` either way.

    Works for an ``AsyncRouter`` from a sync test (no event loop running in this thread); in an async test
    use :func:`adeliver`. Refuses (``RuntimeError``) a router whose relay runs in the background."""
    __tracebackhide__ = True
    if isinstance(router, AsyncRouter):
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("an event loop is running in this thread (an async test): "
                               "use `await shardlite_adeliver(router)` (shardlite.testing.adeliver)")
    relay = _relay(router)
    before = _dead(relay.store)
    stats = relay.drain(timeout=timeout)
    return _finish(relay, before, stats, check)


async def adeliver(router: Router | AsyncRouter, *, timeout: float = 30.0, check: bool = True) -> Delivery:
    """:func:`deliver` for async tests: the relay runs on the router's worker threads (an ``AsyncRouter``)
    or on a thread of the loop's default executor (a ``Router``), so the event loop keeps running."""
    __tracebackhide__ = True
    relay = _relay(router)
    store = relay.store
    before = await asyncio.to_thread(_dead, store)
    if isinstance(router, AsyncRouter):
        stats = await router.relay.drain(timeout=timeout)
    else:
        stats = await asyncio.to_thread(lambda: relay.drain(timeout=timeout))
    return await asyncio.to_thread(_finish, relay, before, stats, check)


def _dead(store: Store) -> set[tuple[str, str, int]]:
    return {(d.source, d.incarnation, d.seq) for d in store.meta.dead_letters.list(limit=_DEAD_LIMIT)}


def _finish(relay: Relay, before: set[tuple[str, str, int]], stats: PassStats, check: bool) -> Delivery:
    __tracebackhide__ = True
    result = Delivery(stats, _new_dead(relay.store, before) + _pending(relay), _failing(relay, stats))
    if check and not result.ok:
        raise AssertionError(result.describe())
    return result


def _new_dead(store: Store, before: set[tuple[str, str, int]]) -> list[Undelivered]:
    found = []
    for letter in store.meta.dead_letters.list(limit=_DEAD_LIMIT):
        if (letter.source, letter.incarnation, letter.seq) in before:
            continue
        found.append(Undelivered("dead", letter.source, letter.dest, letter.topic, _payload(letter.payload),
                                 letter.seq, f"dead letter after {letter.attempts} attempt"
                                 f"{'s' if letter.attempts != 1 else ''}: {letter.error}"))
    return found


def _pending(relay: Relay) -> list[Undelivered]:
    """Every event still in an outbox of the root, with the reason it was not delivered."""
    store, handlers = relay.store, relay.handlers
    known = ", ".join(sorted(handlers)) or "none"
    found = []
    for source, *_ in store.meta.pending.all():
        try:
            rows = store.read_internal(source, _PENDING)
        except UnknownTenant:
            continue
        blocked: dict[str, int] = {}  # destination -> the seq of the first event held there
        for seq, dest, topic, payload, attempts, last_error in rows:
            if dest in blocked:
                reason = f"held behind event #{blocked[dest]} of the same source and destination (order is kept)"
            elif topic not in handlers:
                reason = f"no handler for topic {topic!r} on this router (handlers: {known})"
            elif attempts:
                reason = f"still failing after {attempts} attempt{'s' if attempts != 1 else ''}: {last_error}"
            else:
                reason = "not delivered before the time ran out (its destination unavailable, or its source failing)"
            blocked.setdefault(str(dest), int(seq))
            found.append(Undelivered("pending", source, str(dest), str(topic), _payload(payload), int(seq), reason))
    return found


def _failing(relay: Relay, stats: PassStats) -> dict[str, str]:
    """The sources the relay could not read or acknowledge (not one event's fault), with their error."""
    troubles = relay.troubles(time.time())["failing"]
    return {key: str(troubles.get(key, {}).get("error", "see the relay's log")) for key in stats.failing
            if key in troubles and troubles[key].get("role") == "source"}


def _payload(text: Any) -> Any:
    try:
        return from_json(str(text))
    except ValueError:
        return text
