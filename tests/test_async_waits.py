"""AsyncRouter: no caller waits past its bound, and one tenant (or caller) never starves the others (issue 13,
items 7 and 12).

Before: four abandoned endless reads pinned all four workers (logins, cold reads and first writes then
hung, and aclose() blocked the loop for ever); one randomblob(3e8) stalled the loop 1-2.4 s; with a tenant
locked elsewhere the k-th of 10 queued transactions got Busy after k timeouts, and reads of a fenced
tenant each held a worker thread for the whole wait.

Bounds in these tests are guards against hanging (``asyncio.wait_for``) or generous limits far from the old
behaviour; what they check is an outcome, not a speed.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import apsw
import pytest

from shardlite import AsyncRouter, Busy, ResultTooLarge, Router, TenantMoving
from shardlite.front.accounts import ScryptParams

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
ENDLESS = "WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c) SELECT count(*) FROM c"
GUARD = 20.0  # a hang guard, never a measured bound


def _seed(root: str, *keys: str) -> None:
    with Router(root, schema=SCHEMA) as router:
        for key in keys:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(v) VALUES ('seed')")


# -- item 7: cancellation, pools, aclose, the inline budget ---------------------------------------------------


def test_cancelled_reads_stop_and_free_their_workers(root: str) -> None:
    _seed(root, "org:hog", "org:other")

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, statement_timeout=None, read_workers=2) as ar:
            hogs = [asyncio.ensure_future(ar.query("org:hog", ENDLESS)) for _ in range(6)]
            await asyncio.sleep(0.2)  # let them start on the workers
            for hog in hogs:
                hog.cancel()
            results = await asyncio.gather(*hogs, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            # with the endless statements interrupted, a cold read of another tenant gets a worker
            assert await asyncio.wait_for(ar.query("org:other", "SELECT count(*) FROM t"), GUARD) == [(1,)]
            assert await asyncio.wait_for(ar.query("org:hog", "SELECT count(*) FROM t"), GUARD) == [(1,)]

    asyncio.run(main())


def test_one_tenant_never_takes_every_read_worker(root: str) -> None:
    _seed(root, "org:hog", *(f"org:{i}" for i in range(5)))

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, statement_timeout=None, read_workers=3) as ar:
            hogs = [asyncio.ensure_future(ar.query("org:hog", ENDLESS)) for _ in range(5)]
            await asyncio.sleep(0.2)
            try:
                for i in range(5):  # cold tenants: each read needs a worker thread
                    rows = await asyncio.wait_for(ar.query(f"org:{i}", "SELECT count(*) FROM t"), GUARD)
                    assert rows == [(1,)]
                assert not any(h.done() for h in hogs)  # the hog's reads are still running or queued
            finally:
                for hog in hogs:
                    hog.cancel()
                await asyncio.gather(*hogs, return_exceptions=True)

    asyncio.run(main())


def test_logins_never_occupy_the_threads_writes_and_sessions_need(root: str) -> None:
    """Password hashing runs on a pool of its own: the threads that run BEGINs, commits and session writes
    are never the ones hashing passwords."""
    threads: dict[str, set[str]] = {"register": set(), "create": set()}
    current = {"op": "register"}

    def clock() -> float:  # Accounts and Sessions read the clock on the thread doing the work
        threads[current["op"]].add(threading.current_thread().name)
        return time.time()

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, clock=clock, kdf_workers=1, workers=2) as ar:
            ar.accounts.sync.scrypt = ScryptParams(n=2**12, r=8, p=1)
            ids = await asyncio.gather(*(ar.accounts.register(f"u{i}@example.com", password="pw-12345678")
                                         for i in range(6)))
            current["op"] = "create"
            await asyncio.gather(*(ar.sessions.create(uid) for uid in ids))
            assert await ar.accounts.authenticate("u1@example.com", "pw-12345678") == ids[1]

    asyncio.run(main())
    assert threads["register"] and all(name.startswith("shardlite-kdf") for name in threads["register"])
    assert threads["create"] and not any(name.startswith("shardlite-kdf") for name in threads["create"])


def test_aclose_returns_while_a_read_runs_forever(tmp_path: Any) -> None:
    """aclose() interrupts statements still running on workers and never blocks the loop waiting for
    them. In a subprocess: before, this hung for ever."""
    root = os.fspath(tmp_path / "data")
    _seed(root, "org:1")
    script = textwrap.dedent(f"""
        import asyncio, time
        from shardlite import AsyncRouter
        async def main():
            ar = AsyncRouter({root!r}, schema={SCHEMA!r}, statement_timeout=None, close_timeout=5)
            task = asyncio.ensure_future(ar.query("org:1", {ENDLESS!r}))
            await asyncio.sleep(0.3)
            ticks = 0
            async def ticker():
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.01)
            t = asyncio.ensure_future(ticker())
            started = time.monotonic()
            await ar.aclose()
            took = time.monotonic() - started
            t.cancel()
            state = type(task.exception()).__name__ if task.done() else "pending"
            print("closed", round(took, 2), "ticks", ticks, "read", state)
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    words = done.stdout.split()
    assert words[0] == "closed", done.stdout
    assert float(words[1]) < 10  # bounded by close_timeout (5 s); it used to block for ever
    assert int(words[3]) > 0  # the loop kept running while aclose() waited


def test_the_inline_budget_bounds_time_on_the_loop(root: str) -> None:
    """A read that builds large values never runs long on the loop: it goes to a worker at once."""
    _seed(root, "org:1")
    loop_thread = threading.get_ident()
    on_loop: list[float] = []

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            await ar.query("org:1", "SELECT count(*) FROM t")  # warm: later reads try the loop first
            store = ar._store
            plain = store._query

            def timed(*args: Any) -> Any:
                started = time.perf_counter()
                try:
                    return plain(*args)
                finally:
                    if threading.get_ident() == loop_thread:
                        on_loop.append(time.perf_counter() - started)

            store._query = timed  # type: ignore[method-assign]
            heavy = ["SELECT length(randomblob(30000000))",
                     "SELECT sum(length(randomblob(60000))) FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL "
                     "SELECT n + 1 FROM c WHERE n < 2000) SELECT n FROM c)",
                     "SELECT count(*) FROM (WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c "
                     "WHERE n < 3000000) SELECT n FROM c)"]
            for sql in heavy:
                assert len(await asyncio.wait_for(ar.query("org:1", sql), GUARD)) == 1
            with pytest.raises(ResultTooLarge):  # 300 MB: past the byte cap, built nowhere
                await asyncio.wait_for(ar.query("org:1", "SELECT length(randomblob(300000000))"), GUARD)
            assert await ar.query("org:1", "SELECT count(*) FROM t") == [(1,)]

    asyncio.run(main())
    assert on_loop, "the reads were tried on the loop first"
    assert max(on_loop) < 0.25, f"a read held the loop {max(on_loop):.3f} s (it held it 1-2.4 s before)"


# -- item 12: every caller gets its error within one bound of when it began to wait -------------------------


def _queued_outcomes(root: str, count: int, **kwargs: Any) -> list[tuple[str, float]]:
    """``count`` transactions queued at once on org:stuck: each one's outcome (the error's class name, or
    "committed") and how long it took from when it began to wait."""
    async def main() -> list[tuple[str, float]]:
        async with AsyncRouter(root, schema=SCHEMA, **kwargs) as ar:
            async def one() -> tuple[str, float]:
                started = time.monotonic()
                try:
                    async with ar.transaction("org:stuck") as tx:
                        await tx.execute("INSERT INTO t(v) VALUES ('x')")
                except (Busy, TenantMoving) as exc:
                    return type(exc).__name__, time.monotonic() - started
                return "committed", time.monotonic() - started
            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), GUARD)

    return asyncio.run(main())


def _stuck_file(root: str) -> str:
    _seed(root, "org:stuck")
    with Router(root, schema=SCHEMA) as r:
        path = r.locate("org:stuck").path
    assert path is not None
    return path


def test_queued_transactions_on_a_locked_tenant_all_fail_within_one_timeout(root: str) -> None:
    holder = apsw.Connection(_stuck_file(root))
    holder.execute("BEGIN IMMEDIATE")
    try:
        results = _queued_outcomes(root, 10, busy_timeout_ms=500)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert [r for r, _ in results] == ["Busy"] * 10
    slowest = max(took for _, took in results)
    assert slowest < 2.0, f"the last of 10 waited {slowest:.2f} s (each waited its own 0.5 s in turn before)"


def test_queued_transactions_on_a_fenced_tenant_all_fail_within_move_wait(root: str) -> None:
    fence = apsw.Connection(_stuck_file(root))
    fence.execute("UPDATE _shardlite_meta SET retired = 'moved:elsewhere:99' WHERE id = 1")
    try:
        results = _queued_outcomes(root, 20, move_wait=0.5)
    finally:
        fence.execute("UPDATE _shardlite_meta SET retired = NULL WHERE id = 1")
        fence.close()
    assert [r for r, _ in results] == ["TenantMoving"] * 20
    assert max(took for _, took in results) < 2.0  # the 20th waited 39.5 s (move_wait 2 s) before


def test_reads_of_a_fenced_tenant_hold_no_worker_while_they_wait(root: str) -> None:
    _seed(root, "org:fenced", *(f"org:{i}" for i in range(4)))
    with Router(root, schema=SCHEMA) as r:
        path = r.locate("org:fenced").path
    assert path is not None
    fence = apsw.Connection(path)
    fence.execute("UPDATE _shardlite_meta SET retired = 'moved:elsewhere:99' WHERE id = 1")
    try:
        async def main() -> None:
            async with AsyncRouter(root, schema=SCHEMA, move_wait=30, read_workers=2) as ar:
                waiting = [asyncio.ensure_future(ar.query("org:fenced", "SELECT 1")) for _ in range(4)]
                await asyncio.sleep(0.2)
                try:
                    for i in range(4):  # cold reads need workers: they get them at once
                        rows = await asyncio.wait_for(ar.query(f"org:{i}", "SELECT count(*) FROM t"), 10)
                        assert rows == [(1,)]
                    assert not any(w.done() for w in waiting)  # still waiting for the move, on the loop
                finally:
                    for w in waiting:
                        w.cancel()
                    await asyncio.gather(*waiting, return_exceptions=True)

        asyncio.run(main())
    finally:
        fence.close()


def test_a_stuck_transaction_body_makes_the_others_fail_not_hang(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, busy_timeout_ms=300) as ar:
            release = asyncio.Event()

            async def stuck() -> None:
                async with ar.transaction("org:1") as tx:
                    await tx.execute("INSERT INTO t(v) VALUES ('stuck')")
                    await release.wait()

            async def other() -> str:
                try:
                    async with ar.transaction("org:1") as tx:
                        await tx.execute("INSERT INTO t(v) VALUES ('other')")
                except Busy:
                    return "Busy"
                return "committed"

            holder = asyncio.ensure_future(stuck())
            await asyncio.sleep(0.05)
            outcomes = await asyncio.wait_for(asyncio.gather(*(other() for _ in range(5))), GUARD)
            assert outcomes == ["Busy"] * 5
            release.set()
            await holder
            assert await other() == "committed"  # the tenant works again
            assert await ar.query("org:1", "SELECT v FROM t ORDER BY id") == [("stuck",), ("other",)]

    asyncio.run(main())
