"""The relay confines a tenant's failure to that tenant (brief rule 15).

* Hostile schemas, built for real: the tenant file is opened with a plain ``apsw.Connection`` (no
  authorizer) and given a table with a foreign key into one of shardlite's tables (every UPDATE/DELETE of
  that table then fails with "foreign key mismatch") or a trigger on one of them. As a *source* it is
  recorded and backed off; as a *destination* its events count failed attempts and end as dead letters
  with the error text; every other tenant's events are delivered, in order, exactly once, and
  ``shardlite relay run --once`` ends with its one-line report (no traceback).
* Unavailable destinations: fenced by the rebalancer's fence (the retired marker) for a while, or locked
  by another connection holding ``BEGIN IMMEDIATE``. Their events are deferred without counting attempts,
  other destinations are delivered in the same pass, no pass waits on them past the relay's lock wait,
  and once they are free every event arrives in order per (source, destination).

Effects are countable: the handler inserts one row per application into ``applied`` (no UNIQUE
constraint), so a duplicate shows as a second row; its AUTOINCREMENT id is the order of application.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows

from shardlite import Router, UnknownTenant
from shardlite.core.outbox import Event, RetryPolicy, backoff
from shardlite.files.tenant import open_tenant
from shardlite.services.lifecycle import fence_file
from shardlite.services.relay import LOCK_WAIT_MS

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, n INTEGER NOT NULL, "
          "seq INTEGER NOT NULL)"]
FAST = RetryPolicy(max_attempts=3, backoff_base=0.001, backoff_cap=0.01)
#: tried again almost at once while unavailable, so that a pass attempts it every time
EAGER = RetryPolicy(max_attempts=3, backoff_base=0.001, backoff_cap=0.01, unavailable_base=0.001,
                    unavailable_cap=0.002)
SOURCES = [f"src:{i}" for i in range(4)]
DESTS = [f"dst:{i}" for i in range(3)]
DEADLINE = 30.0  # generous bound for waiting loops; never a timing assertion
SHARDLITE = Path(sys.executable).with_name("shardlite")

#: Hostile source schemas: which of shardlite's own statements each one breaks.
SOURCE_TRAPS = {
    "fk-relay": "CREATE TABLE trap(x REFERENCES _shardlite_relay(claimed_by))",  # the claim
    "fk-outbox": "CREATE TABLE trap(x REFERENCES _shardlite_outbox(dest))",  # the acknowledgement
    "trigger-ack": ("CREATE TRIGGER trap AFTER DELETE ON _shardlite_outbox BEGIN "
                    "SELECT RAISE(ROLLBACK, 'hostile trigger'); END"),  # ... rolling everything back
    "trigger-claim": ("CREATE TRIGGER trap BEFORE UPDATE ON _shardlite_relay BEGIN "
                      "SELECT RAISE(ABORT, 'hostile trigger'); END"),
}
DEST_TRAPS = {
    "fk-inbox": "CREATE TABLE trap(x REFERENCES _shardlite_inbox(last_seq))",  # the inbox mark
    "trigger-inbox": ("CREATE TRIGGER trap AFTER INSERT ON _shardlite_inbox BEGIN "
                      "SELECT RAISE(ROLLBACK, 'hostile trigger'); END"),
}


def record(tx: Any, event: Event) -> None:
    tx.execute("INSERT INTO applied(source, n, seq) VALUES (?, ?, ?)", (event.source, event.payload["n"], event.seq))


def applied(router: Router, dest: str, source: str | None = None) -> list[int]:
    if not router.exists(dest):
        return []
    if source is None:
        return [n for (n,) in router.query(dest, "SELECT n FROM applied ORDER BY id")]
    return [n for (n,) in router.query(dest, "SELECT n FROM applied WHERE source = ? ORDER BY id", (source,))]


def outbox(router: Router, key: str) -> list[tuple[Any, ...]]:
    return internal_rows(router, key, "SELECT seq, dest, attempts FROM _shardlite_outbox ORDER BY seq")


def emit(router: Router, source: str, dest: str, n: int) -> None:
    with router.transaction(source) as tx:
        tx.emit(dest, "t", {"n": n})


def install(router: Router, key: str, ddl: str) -> None:
    """Give ``key``'s file a hostile schema the way an attacker with the file would: a plain connection,
    no authorizer."""
    path = router.locate(key).path
    assert path is not None
    conn = apsw.Connection(path)
    try:
        conn.execute(ddl)
    finally:
        conn.close()


def innocent_traffic(router: Router) -> dict[tuple[str, str], list[int]]:
    """20 events from 4 sources to 3 destinations; returns what each pair must receive, in order."""
    sent: dict[tuple[str, str], list[int]] = {}
    for n in range(20):
        source, dest = SOURCES[n % 4], DESTS[n % 3]
        emit(router, source, dest, n)
        sent.setdefault((source, dest), []).append(n)
    return sent


def assert_delivered(router: Router, sent: dict[tuple[str, str], list[int]]) -> None:
    for (source, dest), numbers in sent.items():
        assert applied(router, dest, source) == numbers, (source, dest)


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def factory(**kwargs: Any) -> Router:
        kwargs.setdefault("schema", SCHEMA)
        kwargs.setdefault("retry", FAST)
        router = Router(tmp_path / "data", **kwargs)
        router.handler("t")(record)
        made.append(router)
        return router

    yield factory
    for router in reversed(made):
        router.close()  # never raises, whatever a hostile tenant does to the release of its lease


# -- hostile schemas ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trap", sorted(SOURCE_TRAPS))
def test_a_hostile_source_is_recorded_and_backed_off_and_every_other_event_is_delivered(
        make: Callable[..., Router], trap: str, caplog: pytest.LogCaptureFixture) -> None:
    router = make()
    emit(router, "bad:src", "dst:0", 100)
    emit(router, "bad:src", "dst:1", 101)
    install(router, "bad:src", SOURCE_TRAPS[trap])
    sent = innocent_traffic(router)
    with caplog.at_level(logging.WARNING, logger="shardlite.relay"):
        stats = router.relay.drain(timeout=DEADLINE)
    assert_delivered(router, sent)
    for dest, n in (("dst:0", 100), ("dst:1", 101)):  # the hostile source's own events: at most once
        assert applied(router, dest, "bad:src") in ([], [n])
    assert router._store.meta.dead_letters.list() == []
    for source in SOURCES:
        assert outbox(router, source) == []
    assert "bad:src" in stats.failing
    assert [row[2] for row in outbox(router, "bad:src")] == [0, 0]  # still there; no attempt counted on events
    status = router.relay.status()
    failing = status["failing"]["bad:src"]
    cause = "hostile trigger" if trap.startswith("trigger") else "foreign key mismatch"
    assert failing["role"] == "source" and cause in failing["error"] and "'bad:src'" in failing["error"]
    assert router.locate("bad:src").path in failing["error"]  # the file, too
    assert failing["tries"] >= FAST.max_attempts  # drain() retried it a few times, then left it
    assert router._store.meta.pending.row("bad:src") is not None  # still flagged: nothing is stranded
    assert status["last_error"] is not None and "'bad:src'" in status["last_error"]["error"]
    lines = [r.getMessage() for r in caplog.records if "'bad:src'" in r.getMessage()]
    assert lines and all(r.exc_info is None for r in caplog.records)  # a line each, no traceback
    assert len(lines) <= 2  # the first, then what was suppressed (flushed at the end of the drain)


def test_a_source_turned_hostile_while_this_relay_holds_its_lease_does_not_break_stop(
        make: Callable[..., Router], caplog: pytest.LogCaptureFixture) -> None:
    router = make()
    emit(router, "bad:src", "dst:0", 1)
    router.relay.start()
    end = time.monotonic() + DEADLINE
    while applied(router, "dst:0") != [1]:
        assert time.monotonic() < end
        time.sleep(0.01)
    install(router, "bad:src", SOURCE_TRAPS["fk-relay"])  # giving its lease up now fails
    with caplog.at_level(logging.WARNING, logger="shardlite.relay"):
        router.relay.stop()  # also what router.close() does: it must not raise
    assert any("'bad:src'" in r.getMessage() and "foreign key mismatch" in r.getMessage() for r in caplog.records)


def test_a_failing_source_backs_off_exponentially_and_bounded(make: Callable[..., Router]) -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base=0.5, backoff_cap=2.0)
    router = make(retry=policy)
    emit(router, "bad:src", "dst:0", 1)
    install(router, "bad:src", SOURCE_TRAPS["fk-relay"])
    relay = router.relay
    delays = []
    for _ in range(5):
        trouble = relay._failing_sources.get("bad:src")
        if trouble is not None:
            trouble.until = 0.0  # its time has come (instead of sleeping it out)
        before = time.time()
        stats = relay.pass_over("bad:src")
        assert stats.tenant_errors == 1 and stats.failing == {"bad:src"}
        flag = router._store.meta.pending.row("bad:src")
        assert flag is not None
        delays.append(round(flag.due - before, 1))
    assert delays == [backoff(t, 0.5, 2.0) for t in range(1, 6)] == [0.5, 1.0, 2.0, 2.0, 2.0]
    # while it backs off, a pass does not touch it (and says when to look again)
    stats = relay.pass_over("bad:src")
    assert stats.tenant_errors == 0 and stats.failing == {"bad:src"}
    # repaired: the next try delivers and forgets the trouble
    conn = apsw.Connection(router.locate("bad:src").path)
    conn.execute("DROP TABLE trap")
    conn.close()
    trouble = relay._failing_sources.get("bad:src")
    assert trouble is not None
    trouble.until = 0.0
    assert relay.pass_over("bad:src").delivered == 1
    assert applied(router, "dst:0") == [1] and relay.status()["failing"] == {}


@pytest.mark.parametrize("trap", sorted(DEST_TRAPS))
def test_a_hostile_destination_fails_like_a_handler_and_its_events_become_dead_letters(
        make: Callable[..., Router], trap: str) -> None:
    router = make()
    with router.transaction("bad:dst"):
        pass
    install(router, "bad:dst", DEST_TRAPS[trap])
    emit(router, "src:0", "bad:dst", 100)
    emit(router, "src:1", "bad:dst", 101)
    emit(router, "src:0", "bad:dst", 102)
    sent = innocent_traffic(router)  # src:0 and src:1 also write to healthy destinations
    stats = router.relay.drain(timeout=DEADLINE)
    assert_delivered(router, sent)
    assert stats.delivered == 20 and stats.dead == 3 and "bad:dst" in stats.failing
    letters = router._store.meta.dead_letters.list()
    assert sorted((d.source, d.seq) for d in letters) == [("src:0", 1), ("src:0", 2), ("src:1", 1)]
    cause = "hostile trigger" if trap.startswith("trigger") else "foreign key mismatch"
    path = router.locate("bad:dst").path
    for letter in letters:
        assert letter.attempts == FAST.max_attempts and letter.dest == "bad:dst"
        assert "destination 'bad:dst'" in letter.error and cause in letter.error and path in letter.error
    assert router.query("bad:dst", "SELECT count(*) FROM applied") == [(0,)]
    for source in SOURCES:
        assert outbox(router, source) == []
    assert router.relay.status()["pending"] == 0


def test_the_relay_thread_keeps_delivering_beside_hostile_tenants(make: Callable[..., Router]) -> None:
    router = make()
    with router.transaction("bad:dst"):
        pass
    emit(router, "bad:src", "dst:0", 100)
    install(router, "bad:src", SOURCE_TRAPS["fk-relay"])
    install(router, "bad:dst", DEST_TRAPS["fk-inbox"])
    router.relay.start()
    sent = innocent_traffic(router)
    emit(router, "src:0", "bad:dst", 1)
    end = time.monotonic() + DEADLINE
    while sum(len(applied(router, d)) for d in DESTS) < 20 or not router._store.meta.dead_letters.list():
        assert time.monotonic() < end, router.relay.status()
        time.sleep(0.01)
    assert router.relay.running
    assert_delivered(router, sent)


def test_the_async_relay_task_keeps_delivering_beside_hostile_tenants(make: Callable[..., Router]) -> None:
    import asyncio

    from shardlite import AsyncRouter

    router = make()
    with router.transaction("bad:dst"):
        pass
    emit(router, "bad:src", "dst:0", 100)
    install(router, "bad:src", SOURCE_TRAPS["fk-outbox"])
    install(router, "bad:dst", DEST_TRAPS["trigger-inbox"])
    root = router.root
    router.close()

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, retry=FAST, relay=True) as ar:
            ar.handler("t")(record)
            for n in range(20):
                async with ar.transaction(SOURCES[n % 4]) as tx:
                    await tx.emit(DESTS[n % 3], "t", {"n": n})
            async with ar.transaction("src:0") as tx:
                await tx.emit("bad:dst", "t", {"n": 1})
            async def count(dest: str) -> int:
                try:
                    rows = await ar.query(dest, "SELECT count(*) FROM applied WHERE source LIKE 'src:%'")
                except UnknownTenant:  # not created yet
                    return 0
                return int(rows[0][0])

            end = time.monotonic() + DEADLINE
            while True:
                counts = [await count(dest) for dest in DESTS]
                status = await ar.relay.status()
                if sum(counts) == 20 and status["dead_letters"] == 1:
                    break
                assert time.monotonic() < end, (counts, status)
                await asyncio.sleep(0.01)
            assert ar.relay.running and "bad:src" in status["failing"]

    asyncio.run(main())


_APP = """
from shardlite import Router, UnknownTenant
from shardlite.core.outbox import RetryPolicy

def record(tx, event):
    tx.execute("INSERT INTO applied(source, n, seq) VALUES (?, ?, ?)", (event.source, event.payload["n"], event.seq))

def make():
    router = Router({root!r}, schema={schema!r}, retry=RetryPolicy(max_attempts=3, backoff_base=0.001,
                                                                    backoff_cap=0.01))
    router.handler("t")(record)
    return router
"""


def test_relay_run_once_with_hostile_tenants_delivers_the_rest_and_exits_cleanly(
        make: Callable[..., Router], tmp_path: Path) -> None:
    router = make()
    with router.transaction("bad:dst"):
        pass
    for n, source in enumerate(("bad:src1", "bad:src2")):
        emit(router, source, "dst:0", 100 + n)
    install(router, "bad:src1", SOURCE_TRAPS["fk-relay"])
    install(router, "bad:src2", SOURCE_TRAPS["fk-outbox"])
    install(router, "bad:dst", DEST_TRAPS["fk-inbox"])
    emit(router, "src:0", "bad:dst", 1)
    sent = innocent_traffic(router)
    (tmp_path / "hostile_app.py").write_text(_APP.format(root=router.root, schema=SCHEMA))
    proc = subprocess.run([os.fspath(SHARDLITE), "relay", "run", "--app", "hostile_app:make", "--once"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stdout.strip().splitlines()  # the one-line report
    assert line.startswith("delivered ") and "dead-lettered 1" in line
    assert "failing tenants" in line and "bad:src1" in line and "bad:src2" in line
    assert "bad:src1" in proc.stderr and "foreign key mismatch" in proc.stderr  # each error: one line
    assert_delivered(router, sent)
    assert [d.dest for d in router._store.meta.dead_letters.list()] == ["bad:dst"]


# -- unavailable destinations ----------------------------------------------------------------------------------


def set_fence(router: Router, key: str, marker: str | None) -> None:
    """Fence ``key``'s file with the rebalancer's fence (``marker``), or lift it (None)."""
    store = router._store
    record_ = store.meta.tenants.lookup(key)
    assert record_ is not None
    path = store.path_of(record_)
    if marker is not None:
        fence_file(store, record_, path, marker)
        return
    conn, guard, _ = open_tenant(path, key=key, incarnation=record_.incarnation, settings=store.settings, steps=(),
                                 read_only=False)
    try:
        guard.trusted = True
        conn.execute("UPDATE _shardlite_meta SET retired = NULL WHERE id = 1")
    finally:
        conn.close()


class Spy:
    """Records the waits each write transaction of the relay asked for, per tenant (the real begin_write
    runs)."""

    def __init__(self, router: Router) -> None:
        self.store = router._store
        self.plain = self.store.begin_write
        self.calls: list[tuple[str, int | None, float | None]] = []

        def begin_write(canon: str, **kwargs: Any) -> Any:
            self.calls.append((canon, kwargs.get("wait_ms"), kwargs.get("move_wait")))
            return self.plain(canon, **kwargs)

        self.store.begin_write = begin_write  # type: ignore[method-assign]

    def waits(self, key: str) -> set[tuple[int | None, float | None]]:
        return {(w, m) for k, w, m in self.calls if k == key}

    def close(self) -> None:
        self.store.begin_write = self.plain  # type: ignore[method-assign]


def unavailable_traffic(router: Router, dest: str, start: int) -> None:
    """Events to ``dest`` and to a healthy destination, interleaved, from two sources."""
    for n in range(start, start + 3):
        for source in ("src:0", "src:1"):
            emit(router, source, dest, n)
            emit(router, source, "dst:ok", n)


@pytest.mark.parametrize("how", ["fenced", "locked"])
def test_an_unavailable_destination_waits_without_attempts_and_others_go_on(
        make: Callable[..., Router], how: str) -> None:
    # the router's own waits are long: a pass that used them would take 20-30 s per look at the destination
    router = make(retry=EAGER, busy_timeout_ms=20_000, move_wait=30.0)
    dest = "dst:away"
    with router.transaction(dest):
        pass
    unavailable_traffic(router, dest, 0)
    holder: apsw.Connection | None = None
    if how == "fenced":
        set_fence(router, dest, "moving (test)")
    else:
        holder = apsw.Connection(router.locate(dest).path)
        holder.execute("BEGIN IMMEDIATE")
    spy = Spy(router)
    try:
        for round_ in range(3 * EAGER.max_attempts):  # many more tries than max_attempts
            started = time.monotonic()
            stats = router.relay.run_once()
            assert time.monotonic() - started < 10.0  # never the router's 20 s busy timeout or 30 s move wait
            assert stats.failed == 0 and stats.dead == 0 and stats.tenant_errors == 0
            if round_ == 0:  # the healthy destination gets its events in the first pass
                assert stats.delivered == 6 and stats.deferred == 6
                assert applied(router, "dst:ok", "src:0") == [0, 1, 2] == applied(router, "dst:ok", "src:1")
            if round_ == 4:  # more events while it is away: they wait behind the first ones
                unavailable_traffic(router, dest, 3)
            time.sleep(0.003)  # past the (tiny) backoff, so that the next pass tries the destination again
        assert spy.waits(dest) == {(LOCK_WAIT_MS, 0)}  # every try: a few ms for the lock, none for a move
        assert router._store.meta.dead_letters.list() == []
        for source in ("src:0", "src:1"):
            rows = outbox(router, source)
            assert [(d, a) for _, d, a in rows] == [(dest, 0)] * 6  # all still there, no attempt counted
        status = router.relay.status()
        assert dest in status["unavailable"] and status["unavailable"][dest]["tries"] >= 2
        assert status["failing"] == {}
        if holder is not None:  # (a fenced file is not read at all)
            assert applied(router, dest) == []
    finally:
        spy.close()
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
        else:
            set_fence(router, dest, None)
    stats = router.relay.drain(timeout=DEADLINE)
    assert stats.failed == 0 and stats.dead == 0
    for source in ("src:0", "src:1"):
        assert applied(router, dest, source) == list(range(6))  # in order per pair
        assert applied(router, "dst:ok", source) == list(range(6))
        assert outbox(router, source) == []
    assert router._store.meta.dead_letters.list() == []
    assert router.relay.status()["unavailable"] == {}


def test_an_unavailable_destination_is_retried_after_a_growing_backoff(make: Callable[..., Router]) -> None:
    policy = RetryPolicy(unavailable_base=0.2, unavailable_cap=1.0)
    router = make(retry=policy)
    dest = "dst:away"
    with router.transaction(dest):
        pass
    emit(router, "src:0", dest, 0)
    holder = apsw.Connection(router.locate(dest).path)
    holder.execute("BEGIN IMMEDIATE")
    spy = Spy(router)
    relay = router.relay
    try:
        delays = []
        for _ in range(4):
            trouble = relay._unavailable.get(dest)
            if trouble is not None:
                trouble.until = 0.0  # its time has come (instead of sleeping it out)
            before = time.time()
            stats = relay.pass_over("src:0")
            assert stats.deferred == 1 and stats.next_retry is not None
            delays.append(round(stats.next_retry - before, 1))
        assert delays == [0.2, 0.4, 0.8, 1.0]
        assert sum(1 for call in spy.calls if call[0] == dest) == 4
        assert relay.pass_over("src:0").deferred == 1  # within the backoff: not even tried
        assert sum(1 for call in spy.calls if call[0] == dest) == 4
    finally:
        spy.close()
        holder.execute("ROLLBACK")
        holder.close()
    relay.drain(timeout=DEADLINE)
    assert applied(router, dest) == [0]
    assert outbox(router, "src:0") == []
