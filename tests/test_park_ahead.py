"""Parking ahead (:func:`shardlite.services.relay_sweep.park_ahead`; the rules: :mod:`shardlite.meta.pending`),
over both metadata backends: a pass parks the flags of the sources it is about to leave empty in one
metadata call before their acknowledgements, and makes a flag due again when its acknowledgement found
events left or could not be written, so no event is ever left under a parked flag by a relay that lives on.
No timing assertions."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from helpers_outbox import SCHEMA, applied, emit, marker, record, spy_pending, wait_for

from shardlite import Router

pytestmark = pytest.mark.usefixtures("any_meta")  # both metadata backends


def spy(router: Router) -> list[str]:
    """Record the pending-work index calls a relay pass makes."""
    return spy_pending(router, ("park", "park_many", "wake_many", "set_due", "row"))


def pair(make_router: Callable[..., Router]) -> tuple[Router, Router]:
    """An emitting router and a relaying one on the same root (as an app process and ``relay run``)."""
    emitter = make_router(schema=SCHEMA)
    relay_side = make_router(emitter.root, schema=SCHEMA)
    relay_side.handler("t")(record)
    return emitter, relay_side


def parked_version(router: Router, key: str) -> int | None:
    flag = router._store.meta.pending.row(key)
    assert flag is not None
    return flag.version if flag.parked is not None else None


def test_a_pass_parks_the_flags_it_empties_in_one_call(make_router: Callable[..., Router]) -> None:
    emitter, relay_side = pair(make_router)
    sources = [f"src:{n}" for n in range(20)]
    for n, source in enumerate(sources):
        emit(emitter, n, source=source)
    relay_side.relay.run_once()  # the first look parks each flag in its acknowledgement: no marker yet
    for source in sources:
        assert marker(relay_side, source) is not None
    for n, source in enumerate(sources):  # the marker is set: the emitter wakes the parked flags
        emit(emitter, 100 + n, source=source)
    emitter._store.emitter.wakes.flush()
    wait_for(lambda: all(parked_version(relay_side, s) is None for s in sources), "the 20 wake-ups")
    calls = spy(relay_side)
    stats = relay_side.relay.run_once()
    assert stats.delivered == 20
    assert calls.count("park_many") == 1 and "park" not in calls and "row" not in calls
    for source in sources:
        version = parked_version(relay_side, source)
        assert version is not None and version == marker(relay_side, source)
    assert sorted(applied(relay_side)) == sorted([*range(20), *range(100, 120)])


def test_events_committed_after_the_read_make_a_flag_parked_ahead_due_again(
        make_router: Callable[..., Router]) -> None:
    """An emitter that commits between the relay's read of the outbox and its acknowledgement finds the
    outbox non-empty (the delivered events are still there): it neither flags nor wakes. The flag parked
    ahead must then be made due by the relay, or that event would wait for a sweep."""
    emitter, relay_side = pair(make_router)
    emit(emitter, 0)
    relay_side.relay.run_once()
    assert marker(relay_side, "src:1") is not None
    emit(emitter, 1)
    emitter._store.emitter.wakes.flush()
    sneaked: list[int] = []

    def sneak(step: str) -> None:
        if step == "delivered" and not sneaked:
            sneaked.append(2)
            emit(emitter, 2)

    relay_side.relay.fault = sneak
    calls = spy(relay_side)
    relay_side.relay.run_once()
    relay_side.relay.fault = None
    assert sneaked and "park_many" in calls
    assert parked_version(relay_side, "src:1") is None  # due again, not parked over event 2
    assert [r.key for r in relay_side._store.meta.pending.due(float("inf"), 10)] == ["src:1"]
    relay_side.relay.run_once()
    assert applied(relay_side) == [0, 1, 2]


def test_an_acknowledgement_that_cannot_be_written_un_parks_the_flag_parked_ahead(
        make_router: Callable[..., Router]) -> None:
    emitter, relay_side = pair(make_router)
    emit(emitter, 0)
    relay_side.relay.run_once()  # the lease, and the marker
    assert marker(relay_side, "src:1") is not None
    emit(emitter, 1)
    emitter._store.emitter.wakes.flush()
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:  # the relaying process's own write connection of src:1, in use from then on
        with relay_side.transaction("src:1") as tx:
            tx.execute("SELECT 1")
            inside.set()
            release.wait(30)

    holder = threading.Thread(target=hold)

    def take_the_source(step: str) -> None:  # after the deliveries and the park, before the acknowledgement
        if step == "parked-ahead" and not holder.is_alive():
            holder.start()
            assert inside.wait(30)

    relay_side.relay.fault = take_the_source
    try:
        calls = spy(relay_side)
        relay_side.relay.run_once()
        assert holder.is_alive() and "park_many" in calls and "wake_many" in calls
        assert applied(relay_side) == [0, 1]  # delivered, not acknowledged
        assert parked_version(relay_side, "src:1") is None  # due: the next pass acknowledges it
    finally:
        relay_side.relay.fault = None
        release.set()
        if holder.is_alive():
            holder.join(30)
    relay_side.relay.drain(timeout=30)
    assert applied(relay_side) == [0, 1]
    assert parked_version(relay_side, "src:1") is not None
