"""PostgreSQL unavailable (issue 15 point 4), on a real server killed with ``kill -9`` and started again.

The behaviour under test, in the issue's words: reads and writes of tenants that are already open keep
working as long as they need no metadata; whatever needs it (creating a tenant, accounts, sessions not in
cache, an emit whose pending-work flag must be written) fails with a clear retryable error naming the cause
(:class:`~shardlite.MetaUnavailable`), within the pool timeout rather than hanging; everything resumes by
itself when the server is back, without a new router, and no acknowledged write or event is lost.

* in-process, :class:`~shardlite.Router` and :class:`~shardlite.AsyncRouter` (for the async router also: the
  event loop keeps serving warm tenants while a metadata call waits, and a group-commit batch is not failed
  whole for one member that needed a flag once the outage is known);
* three writer processes, the postmaster killed mid-run and restarted: every acknowledged write present
  exactly once, every acknowledged emit's event delivered once by a relay drain.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_pg import separate_server
from helpers_procs import DEADLINE, LineReader, close_pipes, kill9, spawn, write_script

from shardlite import AsyncRouter, MetaUnavailable, Router
from shardlite.core.outbox import Event
from shardlite.front.transaction import Transaction
from shardlite.testing.postgres import PgServer

SCHEMA = ["CREATE TABLE t(w INTEGER, i INTEGER, kind TEXT)", "CREATE TABLE got(w INTEGER, i INTEGER)"]
PASSWORD = "correct horse battery staple"
#: A metadata call while the server is down must fail within the pool timeout (5 s); this bound is generous
#: for a loaded machine: it tells "fails promptly" from "hangs", it does not time the pool.
BOUND = 30.0


def _unavailable(fn: Callable[[], object]) -> str:
    """Run ``fn``, which must raise MetaUnavailable within BOUND seconds naming the cause and saying to
    retry; returns the message."""
    started = time.monotonic()
    with pytest.raises(MetaUnavailable) as caught:
        fn()
    took = time.monotonic() - started
    assert took < BOUND, f"{fn} took {took:.1f} s to fail"
    return _checked(caught.value)


def _checked(exc: BaseException) -> str:
    assert isinstance(exc, MetaUnavailable), repr(exc)
    text = str(exc)
    assert "cannot be reached" in text and "retry" in text, text
    assert "postgresql://" in text and "@127.0.0.1:" in text, text  # names the store (without a password)
    return text


def _eventually(fn: Callable[[], Any]) -> Any:
    """``fn()`` once it stops raising MetaUnavailable (the server is back: shardlite must reconnect by
    itself), within DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while True:
        try:
            return fn()
        except MetaUnavailable:
            assert time.monotonic() < deadline, "the router did not come back after the server did"
            time.sleep(0.05)


def _hints_connected(router: Router | AsyncRouter) -> None:
    """Wait until the route hints are connected: their first connect drops every cached route (anything
    may have changed before it), which would make a tenant resolved earlier cold again."""
    listener = router._store.meta._hints  # type: ignore[attr-defined]  # PgMeta's
    assert listener is not None and listener.wait_connected(30)


def _on_ev(tx: Transaction, event: Event) -> None:
    tx.execute("INSERT INTO got(w, i) VALUES (?, ?)", (event.payload["w"], event.payload["i"]))


@pytest.fixture
def server() -> Iterator[PgServer]:
    with separate_server() as started:
        yield started


def test_router_keeps_warm_tenants_while_postgres_is_down_and_resumes_by_itself(server: PgServer,
                                                                                  tmp_path: Path) -> None:
    router = Router(tmp_path / "root", meta=server.dsn(), schema=SCHEMA)
    router.handler("ev")(_on_ev)

    def write(key: str, i: int, emit_to: str | None = None) -> None:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(w, i, kind) VALUES (0, ?, 'x')", (i,))
            if emit_to is not None:
                tx.emit(emit_to, "ev", {"w": 0, "i": i})

    def count(key: str, table: str = "t") -> int:
        return int(router.query(key, f"SELECT count(*) FROM {table}")[0][0])

    _hints_connected(router)
    write("a", 0, emit_to="b")  # a's outbox stays non-empty (no relay runs): its emits need no flag
    write("b", 0)
    assert count("a") == 1 and count("b") == 1  # both open for reads and writes
    uid = router.accounts.register("ann@example.com", password=PASSWORD)
    warm_token, cold_token = router.sessions.create(uid), router.sessions.create(uid)
    assert router._store.meta.sessions.wait_listening(30)  # type: ignore[attr-defined]  # PgMeta's cache
    assert router.sessions.resolve(warm_token) is not None  # now in the session cache

    server.kill()
    # what needs no metadata keeps working
    for i in range(1, 21):
        write("a", i)
        write("a", 100 + i, emit_to="b")
        write("b", i)
    assert count("a") == 41 and count("b") == 21
    warm = router.sessions.resolve(warm_token)
    assert warm is not None and warm.account_id == uid
    # what needs it fails promptly, retryable, naming the cause; nothing of it is written
    _unavailable(lambda: write("new", 1))
    flag_error = _unavailable(lambda: write("b", 999, emit_to="a"))  # b's outbox is empty: its flag is needed
    _unavailable(lambda: router.sessions.resolve(cold_token))
    _unavailable(lambda: router.accounts.register("bob@example.com", password=PASSWORD))
    _unavailable(lambda: router.accounts.by_email("ann@example.com"))
    _unavailable(lambda: router.relay.drain(timeout=1))
    assert "reconnects by itself" in flag_error
    assert count("b") == 21  # the refused emit's transaction committed nothing
    write("a", 50)  # and the warm tenants are still fine after those failures
    assert count("a") == 42

    server.start()  # the same router, never reopened
    _eventually(lambda: write("new", 1))
    _eventually(lambda: write("b", 999, emit_to="a"))
    assert _eventually(lambda: router.sessions.resolve(cold_token)) is not None
    assert _eventually(lambda: router.accounts.register("bob@example.com", password=PASSWORD)) > uid
    assert router.accounts.by_email("ann@example.com") is not None
    stats = _eventually(lambda: router.relay.drain(timeout=DEADLINE))
    assert not stats.failing
    assert count("new") == 1 and count("b") == 22
    got_b = router.query("b", "SELECT i FROM got ORDER BY i")
    assert got_b == [(0,)] + [(100 + i,) for i in range(1, 21)]  # every event emitted during the outage, once
    assert router.query("a", "SELECT i FROM got") == [(999,)]
    router.close()


def test_a_parked_source_emits_while_postgres_is_down_and_its_events_follow(server: PgServer,
                                                                              tmp_path: Path) -> None:
    """A drained source whose parked flag this process checked needs no metadata to emit: its wake-up waits
    for the server (retried), and nothing is lost."""
    router = Router(tmp_path / "root", meta=server.dsn(), schema=SCHEMA)
    router.handler("ev")(_on_ev)

    def write(key: str, i: int, emit_to: str | None = None) -> None:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(w, i, kind) VALUES (0, ?, 'x')", (i,))
            if emit_to is not None:
                tx.emit(emit_to, "ev", {"w": 0, "i": i})

    _hints_connected(router)
    write("a", 0, emit_to="b")  # the first event of a's outbox: the flag is written
    router.relay.drain(timeout=DEADLINE)  # ...and parked
    write("a", 1, emit_to="b")  # the marker is checked once (one read), then the flag woken
    router.relay.drain(timeout=DEADLINE)
    flag = router._store.meta.pending.row("a")
    assert flag is not None and flag.parked is not None

    server.kill()
    for i in range(2, 12):  # the first finds a's outbox empty: the parked flag stands in for the flag write
        write("a", i, emit_to="b")
    assert router.query("a", "SELECT count(*) FROM t") == [(12,)]
    _unavailable(lambda: router.relay.drain(timeout=1))

    server.start()
    stats = _eventually(lambda: router.relay.drain(timeout=DEADLINE))
    assert not stats.failing
    assert router.query("b", "SELECT i FROM got ORDER BY i") == [(i,) for i in range(12)]  # each once
    router.close()


def test_async_router_serves_warm_tenants_while_a_metadata_call_waits(server: PgServer, tmp_path: Path) -> None:
    asyncio.run(_async_scenario(server, tmp_path))


async def _async_scenario(server: PgServer, tmp_path: Path) -> None:
    router = AsyncRouter(tmp_path / "root", meta=server.dsn(), schema=SCHEMA)
    router.handler("ev")(_on_ev)

    async def write(key: str, i: int, emit_to: str | None = None) -> None:
        async with router.transaction(key) as tx:
            await tx.execute("INSERT INTO t(w, i, kind) VALUES (0, ?, 'x')", (i,))
            if emit_to is not None:
                await tx.emit(emit_to, "ev", {"w": 0, "i": i})

    async def count(key: str) -> int:
        return int((await router.query(key, "SELECT count(*) FROM t"))[0][0])

    async def unavailable(call: Any) -> str:
        started = time.monotonic()
        with pytest.raises(MetaUnavailable) as caught:
            await call
        assert time.monotonic() - started < BOUND
        return _checked(caught.value)

    async def eventually(make: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                return await make()
            except MetaUnavailable:
                assert time.monotonic() < deadline, "the router did not come back after the server did"
                await asyncio.sleep(0.05)

    _hints_connected(router)
    await write("a", 0, emit_to="b")
    await write("b", 0)
    assert await count("a") == 1 and await count("b") == 1  # both open for reads and writes
    uid = await router.accounts.register("ann@example.com", password=PASSWORD)
    warm_token, cold_token = await router.sessions.create(uid), await router.sessions.create(uid)
    assert router._store.meta.sessions.wait_listening(30)  # type: ignore[attr-defined]  # PgMeta's cache
    assert await router.sessions.resolve(warm_token) is not None

    server.kill()
    # A metadata read waits (up to the pool timeout) on a worker thread, never on the loop: warm tenants
    # are served meanwhile. (A call on the loop would stall it: the writes below would finish after it.)
    emitted = []
    for waiting in (router.accounts.get(uid), router.sessions.resolve(cold_token), write("new", 1)):
        task = asyncio.ensure_future(waiting)
        await asyncio.sleep(0)  # let it start
        for _ in range(10):
            n = 100 + len(emitted)
            await write("a", n, emit_to="b")  # a's outbox is not empty: no flag needed
            emitted.append(n)
            assert await router.sessions.resolve(warm_token) is not None
        assert not task.done(), "a metadata call finished before 10 warm writes: did it stall the loop?"
        await unavailable(task)
    assert await count("a") == 31
    await unavailable(router.accounts.register("bob@example.com", password=PASSWORD))

    # Group commit: the first batch whose commit must write a flag learns of the outage and fails whole
    # (nothing of it committed, every member retryable); from then on only the members that need a flag
    # are refused, at once, and the batch's other members commit.
    before = await count("b")
    first = await asyncio.gather(write("b", 500, emit_to="a"), write("b", 501), write("b", 502),
                                 return_exceptions=True)
    for outcome in first:
        _checked(outcome)
    assert await count("b") == before
    started = time.monotonic()
    second = await asyncio.gather(write("b", 500, emit_to="a"), write("b", 501), write("b", 502),
                                  return_exceptions=True)
    assert time.monotonic() - started < BOUND
    assert second[1:] == [None, None], second
    assert "pending-work flag" in _checked(second[0])
    assert await count("b") == before + 2

    server.start()
    await eventually(lambda: write("b", 500, emit_to="a"))
    await eventually(lambda: write("new", 1))
    assert await eventually(lambda: router.sessions.resolve(cold_token)) is not None
    assert await eventually(lambda: router.accounts.register("bob@example.com", password=PASSWORD)) > uid
    stats = await eventually(lambda: router.relay.drain(timeout=DEADLINE))
    assert not stats.failing
    assert await count("new") == 1 and await count("b") == before + 3
    got_b = await router.query("b", "SELECT i FROM got ORDER BY i")
    assert got_b == [(0,)] + [(n,) for n in emitted]  # every event emitted during the outage, once
    assert await router.query("a", "SELECT i FROM got") == [(500,)]
    await router.aclose()


WRITER = """
{prelude}
import threading
from shardlite import MetaUnavailable, Router

root, dsn, w, log_path, stop_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
SCHEMA = ["CREATE TABLE t(w INTEGER, i INTEGER, kind TEXT)", "CREATE TABLE got(w INTEGER, i INTEGER)"]
router = Router(root, meta=dsn, schema=SCHEMA, relay=(w == 0))  # writer 0 relays: outboxes empty, flags needed

@router.handler("ev")
def on_ev(tx, event):
    tx.execute("INSERT INTO got(w, i) VALUES (?, ?)", (event.payload["w"], event.payload["i"]))

log = open(log_path, "a")
lock = threading.Lock()
failures = {"warm": 0, "meta": 0}

def acked(*fields):
    # recorded only after the commit returned, made durable before the next write
    with lock:
        log.write(" ".join(map(str, fields)) + "\\n")
        log.flush()
        os.fsync(log.fileno())

def insert(key, i, kind, emit_to=None):
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO t(w, i, kind) VALUES (?, ?, ?)", (w, i, kind))
        if emit_to is not None:
            tx.emit(emit_to, "ev", {"w": w, "i": i})

def warm():
    i = 0
    while not os.path.exists(stop_path):
        key = f"w{w}-old-{i % 4}"
        try:
            insert(key, i, "old")
        except MetaUnavailable as exc:  # must never happen: the test fails on it
            failures["warm"] += 1
            ack("warm-unavailable", exc)
        else:
            acked("old", key, i)
        i += 1
        time.sleep(0.002)  # pace: the machine is shared

def meta():
    i = 0
    said = False
    while not os.path.exists(stop_path):
        if i % 2:
            key, emit_to, kind = f"w{w}-new-{i}", None, "new"
        else:
            key, emit_to, kind = f"w{w}-src-{i % 6}", f"w{w}-sink", "emit"
        try:
            insert(key, i, kind, emit_to)
        except MetaUnavailable:
            failures["meta"] += 1
            if not said:
                ack("unavailable")
                said = True
            time.sleep(0.02)
            continue  # the same write again
        said = False
        acked(kind, key, i)
        i += 1
        time.sleep(0.002)

for k in range(4):
    insert(f"w{w}-old-{k}", -1, "warmup")
ack("warm")
errors = []

def guarded(body):
    def run():
        try:
            body()
        except BaseException:
            import traceback
            traceback.print_exc()
            errors.append(body.__name__)
    return run

threads = [threading.Thread(target=guarded(warm)), threading.Thread(target=guarded(meta))]
for t in threads:
    t.start()
for t in threads:
    t.join()
router.close()
ack("done", failures["warm"], failures["meta"])
sys.exit(f"a writer thread failed: {errors}" if errors else 0)
"""


def _acks(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split() for line in path.read_text().splitlines() if line.endswith(tuple("0123456789"))]


def _wait(what: str, ok: Callable[[], bool], procs: list[Any]) -> None:
    deadline = time.monotonic() + 120
    while not ok():
        for proc in procs:
            assert proc.poll() is None, f"a writer died while waiting for {what}: {close_pipes(proc)}"
        if time.monotonic() > deadline:
            for proc in procs:
                kill9(proc)
            raise AssertionError(f"never: {what}; the writers' stderr:\n" + "\n".join(map(close_pipes, procs)))
        time.sleep(0.05)


def test_postmaster_killed_and_restarted_under_writer_processes_loses_nothing(server: PgServer,
                                                                              tmp_path: Path) -> None:
    root = tmp_path / "root"
    Router(root, meta=server.dsn(), schema=SCHEMA).close()
    script = write_script(tmp_path, "writer.py", WRITER)
    stop = tmp_path / "stop"
    logs = [tmp_path / f"acks-{w}.log" for w in range(3)]
    procs = [spawn(script, root, server.dsn(), w, logs[w], stop) for w in range(3)]
    readers = [LineReader(p.stdout) for p in procs]  # type: ignore[arg-type]
    try:
        for reader in readers:
            assert reader.next() == "warm"

        def kinds(w: int) -> dict[str, int]:
            seen: dict[str, int] = {}
            for fields in _acks(logs[w]):
                seen[fields[0]] = seen.get(fields[0], 0) + 1
            return seen

        _wait("30 acknowledged writes of each kind", lambda: all(
            min(kinds(w).get(k, 0) for k in ("old", "new", "emit")) >= 30 for w in range(3)), procs)
        server.kill()
        at_kill = [kinds(w) for w in range(3)]
        for reader in readers:  # every writer's metadata thread meets the outage
            assert reader.next(timeout=120) == "unavailable"
        # meanwhile the warm tenants are written (the other thread of each writer)
        _wait("40 warm writes in each writer during the outage",
              lambda: all(kinds(w)["old"] >= at_kill[w]["old"] + 40 for w in range(3)), procs)
        server.start()
        at_start = [kinds(w) for w in range(3)]
        _wait("20 new tenants and 20 emits in each writer after the restart", lambda: all(
            kinds(w)["new"] >= at_start[w]["new"] + 20 and kinds(w)["emit"] >= at_start[w]["emit"] + 20
            for w in range(3)), procs)
        stop.touch()
        for proc, reader in zip(procs, readers, strict=True):
            rest = reader.rest(timeout=120)
            assert proc.wait(timeout=120) == 0, close_pipes(proc)
            assert not [line for line in rest if line.startswith("warm-unavailable")], rest
            done = rest[-1].split()
            assert done[0] == "done" and done[1] == "0" and int(done[2]) > 0, rest
    finally:
        stop.touch()
        for proc in procs:
            kill9(proc)
            close_pipes(proc)

    router = Router(root, meta=server.dsn(), schema=SCHEMA)
    router.handler("ev")(_on_ev)
    stats = router.relay.drain(timeout=120)
    assert not stats.failing
    for w in range(3):
        acks = _acks(logs[w])
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for fields in acks:
            key = fields[1]
            if key not in rows:
                rows[key] = router.query(key, "SELECT i, kind FROM t WHERE w = ? AND kind != 'warmup'", (w,))
        expected: dict[str, list[tuple[Any, ...]]] = {}
        for kind, key, i in acks:
            expected.setdefault(key, []).append((int(i), kind))
        for key, want in expected.items():  # every acknowledged write present exactly once
            assert sorted(rows[key]) == sorted(want), key
        emitted = sorted(int(i) for kind, _, i in acks if kind == "emit")
        got = sorted(i for (i,) in router.query(f"w{w}-sink", "SELECT i FROM got WHERE w = ?", (w,)))
        assert got == emitted  # every acknowledged emit's event delivered, once
        assert len(acks) > 0 and os.path.getsize(logs[w]) > 0
    router.close()
