"""Held wake-ups (:mod:`shardlite.front.wakes`) and the relay's re-park that needs no metadata write
(:meth:`shardlite.services.relay.Relay._acknowledge`), over both metadata backends.

* with a relay of this process running and holding a parked source's lease, an emit on that source writes
  nothing to the metadata (no flag before its commit, no wake-up after it, no park when the relay drains it
  again): the relay settles the held wake-up, the event is delivered, the flag stays parked with its version;
* a held wake-up is late, never lost: it is written when the relay stops, or after ``HOLD_MAX``;
* a flag woken behind the relay's back (another process's wake-up) is listed as due and parked again by the
  relay's next look, not left due for ever;
* the sweep does not take a held wake-up for a lost one.

No timing assertions: waits poll with a deadline.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from helpers_outbox import SCHEMA, applied, emit, marker, record, spy_pending, wait_for

from shardlite import Router
from shardlite.front import wakes as wakes_module
from shardlite.front.wakes import Wakes

pytestmark = pytest.mark.usefixtures("any_meta")  # both metadata backends


def parked(router: Router, key: str = "src:1") -> bool:
    flag = router._store.meta.pending.row(key)
    return flag is not None and flag.parked is not None


def spy_writes(router: Router) -> list[str]:
    """Record every metadata write of the pending-work index that an emit or a relay pass can make."""
    return spy_pending(router, ("flag_many", "park", "park_many", "wake_many", "set_due", "clear_many"))


def running_relay_with_parked_source(make_router: Callable[..., Router]) -> Router:
    """A router whose relay runs, holds ``src:1``'s lease, and has parked its flag (the file records it)."""
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    router.relay.start()
    emit(router, 0)
    wait_for(lambda: applied(router) == [0] and parked(router), "the first event and the park")
    flag = router._store.meta.pending.row("src:1")
    assert flag is not None
    wait_for(lambda: marker(router, "src:1") == flag.version, "the marker")
    assert "src:1" in router.relay._held
    return router


def held_wake_ups(make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch,
                  hold_max: float | None = None) -> tuple[Router, Wakes, list[str]]:
    """The set-up of the held wake-up tests: ``HOLD_MAX`` set to ``hold_max`` (when given) before the router,
    a router from :func:`running_relay_with_parked_source`, its emitter's held wake-ups, and a spy on its
    metadata writes started after the park."""
    if hold_max is not None:
        monkeypatch.setattr(wakes_module, "HOLD_MAX", hold_max)
    router = running_relay_with_parked_source(make_router)
    wakes = router._store.emitter.wakes
    assert wakes is not None
    return router, wakes, spy_writes(router)


def test_a_relay_holding_the_lease_delivers_a_parked_source_without_metadata_writes(
        make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    router, wakes, writes = held_wake_ups(make_router, monkeypatch)
    try:
        version = marker(router, "src:1")
        for n in (1, 2, 3):
            emit(router, n)
            wait_for(lambda n=n: applied(router)[-1:] == [n], f"event {n}")  # type: ignore[misc]
        wait_for(lambda: not wakes.keys(), "the relay settling the held wake-ups")
        assert writes == [], "nothing written to the pending-work index: the flag was never un-parked"
        flag = router._store.meta.pending.row("src:1")
        assert flag is not None and flag.parked is not None and flag.version == version
        assert marker(router, "src:1") == version
    finally:
        router.relay.stop()
    assert applied(router) == [0, 1, 2, 3]


def test_a_held_wake_up_is_written_when_the_relay_stops(make_router: Callable[..., Router],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    router, wakes, writes = held_wake_ups(make_router, monkeypatch)
    try:
        emit(router, 1, topic="unhandled")  # no handler here: it stays in the outbox, its wake-up unsettled
        assert wakes.queued("src:1"), "held while the relay runs and holds the lease"
    finally:
        router.relay.stop()
    wait_for(lambda: wakes.pending_count() == 0 and "wake_many" in writes,
             "the held wake-up, written once the relay stopped")


def test_a_held_wake_up_is_written_after_hold_max(make_router: Callable[..., Router],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    router, wakes, writes = held_wake_ups(make_router, monkeypatch, hold_max=0.2)
    try:
        emit(router, 1, topic="unhandled")
        wait_for(lambda: wakes.pending_count() == 0 and "wake_many" in writes,
                 "the held wake-up, written after HOLD_MAX with the relay running")
        assert router.relay.running
    finally:
        router.relay.stop()


def test_a_flag_woken_elsewhere_is_parked_again(make_router: Callable[..., Router]) -> None:
    router = running_relay_with_parked_source(make_router)
    other = make_router(schema=SCHEMA)  # another process's view of the root: its wake-up is not this relay's
    try:
        flag = router._store.meta.pending.row("src:1")
        assert flag is not None
        writes = spy_writes(router)
        assert other._store.meta.pending.wake_many([("src:1", flag.version)]) == []
        # the woken flag is due now: this relay parks it again, after this notify or at its own next look at
        # the due flags (which may come first on a loaded machine), with a write of its own either way
        router.relay.notify("src:1")
        wait_for(lambda: bool({"park", "park_many"} & set(writes)) and parked(router),
                 "the relay parking the flag woken behind its back")
        again = router._store.meta.pending.row("src:1")
        assert again is not None and again.version == flag.version and marker(router, "src:1") == flag.version
    finally:
        router.relay.stop()


def test_the_sweep_does_not_wake_a_held_wake_up(make_router: Callable[..., Router]) -> None:
    router = running_relay_with_parked_source(make_router)
    router.relay.stop()  # its passes would deliver the event; here only the sweep runs
    wakes = router._store.emitter.wakes
    assert wakes is not None
    wakes.holder = lambda key: True  # held, as for a running relay holding the lease
    try:
        emit(router, 1, topic="unhandled")
        assert wakes.queued("src:1")
        stats = router.relay.sweeper.sweep(expire=False)
        assert stats.woken == 0 and parked(router), "a queued wake-up is not a lost one"
    finally:
        wakes.release()
    wait_for(lambda: not parked(router), "the wake-up, written once released")


def test_a_held_wake_up_queued_while_the_flusher_is_timed_is_written_after_hold_max(
        make_router: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    """A second held wake-up does not signal the flusher (it is timed for the first one already): it is
    still written within HOLD_MAX of the source's first queuing, with the relay running."""
    router, wakes, writes = held_wake_ups(make_router, monkeypatch, hold_max=0.3)
    try:
        emit(router, 1, topic="unhandled")  # no handler here: it stays in the outbox, its wake-up unsettled
        wait_for(lambda: wakes._until is not None or "wake_many" in writes, "the flusher timing the held wake-up")
        emit(router, 2, topic="unhandled")  # held, and the flusher is timed: queued without a signal
        wait_for(lambda: wakes.pending_count() == 0 and "wake_many" in writes,
                 "the held wake-ups, written after HOLD_MAX with the relay running")
        assert not parked(router), "the wake-up un-parked the flag: the events are due"
        assert router.relay.running
    finally:
        router.relay.stop()


def test_a_background_pass_takes_a_whole_chunk_of_due_sources(make_router: Callable[..., Router]) -> None:
    """A pass of a relay that was not told about the commits (another process emitted them, as under
    ``shardlite relay run``) lists up to ``sources_per_pass`` due sources at once, so their events for one
    destination share its transaction: 100 sources flagged elsewhere are delivered by one pass."""
    emitter = make_router(schema=SCHEMA)
    relay_side = make_router(emitter.root, schema=SCHEMA)
    relay_side.handler("t")(record)
    for n in range(100):
        emit(emitter, n, source=f"src:{n}")
    stats = relay_side.relay.run_once()
    assert stats.sources == 100
    assert sorted(applied(relay_side)) == list(range(100))
