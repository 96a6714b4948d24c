"""Parked pending-work flags (:mod:`shardlite.services.relay_sweep`, :mod:`shardlite.front.wakes`), over both
metadata backends.

* a drained source's flag is parked, not deleted, and the file records its version; the next emit that finds
  the outbox empty writes no flag before its commit, only a wake-up after it, and its event is delivered;
* a wake-up that is lost (suppressed, or the writer killed with SIGKILL right after its COMMIT) leaves the
  event under a parked flag: the relay's sweep delivers it, exactly once;
* a file whose marker names a flag that is not there (the metadata restored from before, a tenant imported
  from another root or from an older copy) never strands an event: the emit writes the flag durably, or the
  wake-up finds the flag gone and writes it;
* expiry clears the marker before the flag; ``meta copy`` keeps parked flags parked and markers valid.

No timing assertions: waits poll with a deadline.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_outbox import DEADLINE, SCHEMA, applied, emit, marker, record, wait_for
from helpers_routers import internal_rows

from shardlite import AsyncRouter, Router

pytestmark = pytest.mark.usefixtures("any_meta")  # both metadata backends


def outbox(router: Router, key: str) -> list[int]:
    return [int(r[0]) for r in internal_rows(router, key, "SELECT seq FROM _shardlite_outbox ORDER BY seq")]


def spy_flags(router: Router | AsyncRouter) -> list[list[str]]:
    """Record every durable flag write of ``router``'s emitter (the write before a commit)."""
    emitter = router._store.emitter
    calls: list[list[str]] = []
    real = emitter._flag_many

    def flag_many(keys: list[str]) -> None:
        calls.append(list(keys))
        real(keys)

    emitter._flag_many = flag_many
    return calls


def parked_source(router: Router, source: str = "src:1", dest: str = "dst:1", n: int = 0) -> int:
    """Emit from ``source`` and drain: its flag ends parked, with its version in the file. Returns it."""
    emit(router, n, source, dest)
    router.relay.drain(timeout=DEADLINE)
    flag = router._store.meta.pending.row(source)
    assert flag is not None and flag.parked is not None, "a drained source's flag is parked, not deleted"
    assert marker(router, source) == flag.version, "the file records the parked version"
    return flag.version


def test_an_emit_after_the_park_writes_no_flag_and_is_delivered(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    version = parked_source(router)
    flags = spy_flags(router)
    emit(router, 1)
    emit(router, 2)  # the outbox holds an event: no marker read needed either
    assert flags == [], "the parked flag stands in for the flag write before the commit"
    router.relay.drain(timeout=DEADLINE)
    assert applied(router) == [0, 1, 2]
    flag = router._store.meta.pending.row("src:1")
    assert flag is not None and flag.parked is not None and flag.version == version  # parked again, same flag
    assert marker(router, "src:1") == version
    assert [r for r in router._store.meta.pending.all() if r.parked is None] == []


def test_a_relay_in_another_router_is_woken_by_the_wake_up(make_router: Callable[..., Router]) -> None:
    writer = make_router(schema=SCHEMA)
    relay_side = make_router(schema=SCHEMA)
    relay_side.handler("t")(record)
    writer.handler("t")(record)
    parked_source(writer)
    relay_side.relay.sweeper.interval = 3600.0  # the wake-up, not a sweep, must bring it
    relay_side.relay.sweeper.sweep()
    relay_side.relay.start()
    try:
        emit(writer, 1)
        wait_for(lambda: applied(writer) == [0, 1], "the woken source's event")
    finally:
        relay_side.relay.stop()
    assert relay_side.relay.sweeper.woken == 0


def test_a_lost_wake_up_is_delivered_by_the_sweep_exactly_once(make_router: Callable[..., Router]) -> None:
    writer = make_router(schema=SCHEMA)
    writer.handler("t")(record)
    parked_source(writer)
    wakes = writer._store.emitter.wakes
    assert wakes is not None
    wakes.queue = lambda key, version: None  # type: ignore[method-assign]  # every wake-up is lost
    emit(writer, 1)
    emit(writer, 2)
    assert outbox(writer, "src:1") == [2, 3]
    flag = writer._store.meta.pending.row("src:1")
    assert flag is not None and flag.parked is not None  # committed under a parked flag nobody woke
    relay_side = make_router(schema=SCHEMA)
    relay_side.handler("t")(record)
    relay_side.relay.sweeper.interval = 0.2
    relay_side.relay.start()
    try:
        wait_for(lambda: applied(writer) == [0, 1, 2], "the sweep to deliver the events of a lost wake-up")
    finally:
        relay_side.relay.stop()
    assert relay_side.relay.sweeper.woken >= 1
    assert applied(writer) == [0, 1, 2] and outbox(writer, "src:1") == []


_KILLED_WRITER = """
import os, signal, sys
from shardlite import Router

router = Router({root!r}, schema={schema!r})
flag = router._store.meta.pending.row("src:1")
assert flag is not None and flag.parked is not None, flag

def die(at):
    os.kill(os.getpid(), signal.SIGKILL)  # right after the COMMIT, before the wake-up is written

router._store.emitter.wakes.fault = die
with router.transaction("src:1") as tx:
    tx.emit("dst:1", "t", {{"n": 1}})
print("not killed", flush=True)
"""


def test_a_writer_killed_right_after_its_commit_loses_no_event(make_router: Callable[..., Router], root: str,
                                                                tmp_path: Path) -> None:
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    parked_source(router)
    script = tmp_path / "writer.py"
    script.write_text(textwrap.dedent(_KILLED_WRITER.format(root=root, schema=SCHEMA)))
    killed = subprocess.run([sys.executable, os.fspath(script)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, (killed.stdout, killed.stderr)
    assert outbox(router, "src:1") == [2], "the killed writer's event is committed"
    flag = router._store.meta.pending.row("src:1")
    assert flag is not None and flag.parked is not None, "and nobody woke its flag"
    router.relay.sweeper.interval = 0.2
    router.relay.start()
    try:
        wait_for(lambda: applied(router) == [0, 1], "the sweep to deliver the killed writer's event")
    finally:
        router.relay.stop()
    assert router.relay.sweeper.woken >= 1
    router.relay.drain(timeout=DEADLINE)
    assert applied(router) == [0, 1], "delivered exactly once"


def test_a_marker_whose_flag_is_gone_takes_the_durable_path(make_router: Callable[..., Router], root: str) -> None:
    """The metadata lost the flag (restored from before it existed, another root's metadata): a router that
    has not verified the marker writes the flag before its commit."""
    first = make_router(schema=SCHEMA)
    first.handler("t")(record)
    version = parked_source(first)
    first._store.meta.pending.clear_many([("src:1", version)])  # behind the file's back
    first.close()
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    flags = spy_flags(router)
    assert marker(router, "src:1") == version  # the stale marker is still in the file
    emit(router, 1)
    assert flags == [["src:1"]], "a marker whose flag is not there is not trusted"
    flag = router._store.meta.pending.row("src:1")
    assert flag is not None and flag.parked is None  # durable and due before the commit returned
    router.relay.drain(timeout=DEADLINE)
    assert applied(router) == [0, 1]
    fresh = router._store.meta.pending.row("src:1")
    assert fresh is not None and fresh.parked is not None and marker(router, "src:1") == fresh.version


def test_a_verified_marker_whose_flag_went_away_is_flagged_by_its_wake_up(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    version = parked_source(router)
    emit(router, 1)  # verifies the marker in this process
    router.relay.drain(timeout=DEADLINE)
    other = make_router(schema=SCHEMA)
    other._store.meta.pending.clear_many([("src:1", version)])  # gone behind this router's back
    emit(router, 2)  # the cached verification: no flag before the commit, the wake-up finds none
    wakes = router._store.emitter.wakes
    assert wakes is not None
    wait_for(lambda: router._store.meta.pending.row("src:1") is not None and wakes.pending_count() == 0,
             "the wake-up to write the missing flag")
    flag = router._store.meta.pending.row("src:1")
    assert flag is not None and flag.parked is None
    other.handler("t")(record)
    other.relay.drain(timeout=DEADLINE)
    assert applied(router) == [0, 1, 2]


def test_an_imported_copy_of_a_parked_source_carries_no_marker(make_router: Callable[..., Router], tmp_path: Path,
                                                                second_meta: str | None) -> None:
    """A tenant exported while parked and imported into another root (or as an older copy of itself) comes
    without its marker: the first emit there writes the flag."""
    first = make_router(schema=SCHEMA)
    first.handler("t")(record)
    parked_source(first)
    exported = os.fspath(tmp_path / "src1.db")
    first.export("src:1", exported)
    assert marker(first, "src:1") is not None
    other = make_router(os.fspath(tmp_path / "other"), schema=SCHEMA, meta=second_meta)
    other.handler("t")(record)
    other.import_(exported, "src:1")
    assert marker(other, "src:1") is None
    flags = spy_flags(other)
    emit(other, 1)
    assert flags == [["src:1"]]
    other.relay.drain(timeout=DEADLINE)
    assert applied(other) == [1]
    # the same copy imported over the live tenant of its own root: an older copy, no marker either
    first.relay.drain(timeout=DEADLINE)
    first.import_(exported, "src:1", force=True)
    assert marker(first, "src:1") is None
    flags = spy_flags(first)
    emit(first, 2)
    assert flags == [["src:1"]]
    first.relay.drain(timeout=DEADLINE)
    assert applied(first) == [0, 2]


def test_expiry_clears_the_marker_then_the_flag(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    parked_source(router)
    parked_source(router, "src:2", n=10)
    wakes = router._store.emitter.wakes
    assert wakes is not None
    wakes.queue = lambda key, version: None  # type: ignore[method-assign]  # src:2's event sits under a parked flag
    emit(router, 11, "src:2")
    sweeper = router.relay.sweeper
    sweeper.ttl = 0.0
    stats = sweeper.sweep()
    assert (stats.expired, stats.woken) == (1, 1)  # src:1 idle and empty: expired; src:2 holds an event: woken
    assert router._store.meta.pending.row("src:1") is None and marker(router, "src:1") is None
    flag2 = router._store.meta.pending.row("src:2")
    assert flag2 is not None and flag2.parked is None
    flags = spy_flags(router)
    emit(router, 1)
    assert flags == [["src:1"]]  # no marker: the durable path
    router.relay.drain(timeout=DEADLINE)
    assert sorted(applied(router)) == [0, 1, 10, 11]


def test_an_async_emit_after_the_park_writes_no_flag(root: str, make_router: Callable[..., Router]) -> None:
    import asyncio

    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    parked_source(router)
    router.close()

    async def main() -> list[list[str]]:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            ar.handler("t")(record)
            flags = spy_flags(ar)
            for n in (1, 2):
                async with ar.transaction("src:1") as tx:
                    await tx.emit("dst:1", "t", {"n": n})
                await ar.relay.drain(timeout=DEADLINE)
            return flags

    assert asyncio.run(main()) == []
    router = make_router(schema=SCHEMA)
    assert applied(router) == [0, 1, 2]


def test_a_moved_source_keeps_its_parked_flag_and_delivers(make_router: Callable[..., Router]) -> None:
    """A move copies the file with its marker (same key, same flag): the first emit at the new home checks the
    marker once more (a new generation) and writes no flag."""
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    sources = [f"src:{i}" for i in range(12)]
    for i, source in enumerate(sources):
        emit(router, i, source)
    router.relay.drain(timeout=DEADLINE)
    before = {s: router.locate(s).generation for s in sources}
    router.nodes.add("n2")
    _, plan = router.rebalance.plan()
    assert plan.moves
    router.rebalance.apply()
    moved = [s for s in sources if router.locate(s).generation != before[s]]
    assert moved, "the plan moves some of the sources"
    flags = spy_flags(router)
    for i, source in enumerate(moved):
        assert marker(router, source) is not None
        emit(router, 100 + i, source)
    assert flags == []
    router.relay.drain(timeout=DEADLINE)
    assert sorted(applied(router)) == sorted([*range(12), *(100 + i for i in range(len(moved)))])


def test_the_sweep_rereads_only_a_source_written_since_it_was_found_empty(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=SCHEMA)
    router.handler("t")(record)
    parked_source(router)
    path = str(router.locate("src:1").path)
    old = time.time() - 60
    for name in (path, path + "-wal"):
        if os.path.exists(name):
            os.utime(name, (old, old))  # quiet for a minute: its signature can be trusted
    sweeper = router.relay.sweeper
    assert sweeper.sweep().looked == 1  # read once, found empty
    assert sweeper.sweep().looked == 0  # unchanged since: not read again
    wakes = router._store.emitter.wakes
    assert wakes is not None
    wakes.queue = lambda key, version: None  # type: ignore[method-assign]  # the wake-up is lost
    emit(router, 1)
    stats = sweeper.sweep()
    assert (stats.looked, stats.woken) == (1, 1)  # the commit changed the log: read, and woken
    flag = router._store.meta.pending.row("src:1")
    assert flag is not None and flag.parked is None
    router.relay.drain(timeout=DEADLINE)
    assert applied(router) == [0, 1]
