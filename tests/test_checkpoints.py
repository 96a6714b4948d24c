"""WAL checkpoints under AsyncRouter run on worker threads, the log stays bounded, nothing is lost.

``shardlite.files.checkpoints``: an AsyncRouter's write connections have no autocheckpoint; a WAL hook notes
the log's size and the store's commit hands passive checkpoints to a worker, or checkpoints inline once
the log is ``INLINE_FRAMES`` long. The sync Router keeps SQLite's autocheckpoint.
"""

from __future__ import annotations

import asyncio
import os
import threading
import types
from collections.abc import Callable
from pathlib import Path

import apsw
import pytest

from shardlite import AsyncRouter, Router
from shardlite.files import checkpoints
from shardlite.files.checkpoints import DUE_FRAMES, INLINE_FRAMES, RETRY_FRAMES, Checkpointer, WalWatch, decide

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, blob BLOB NOT NULL)"]
K = "room:wal"
PAGE = 4096


@pytest.mark.parametrize(("frames", "copied", "pending", "expected"), [
    (0, 0, False, None),
    (DUE_FRAMES - 1, 0, False, None),
    (DUE_FRAMES, 0, False, "worker"),
    (DUE_FRAMES, 0, True, None),  # one worker checkpoint at a time
    (DUE_FRAMES + 500, 600, False, None),  # fewer than DUE_FRAMES added since the last checkpoint
    (2 * DUE_FRAMES, DUE_FRAMES, False, "worker"),
    (INLINE_FRAMES - 1, INLINE_FRAMES - 2, False, None),
    (INLINE_FRAMES, INLINE_FRAMES - 1, False, "inline"),  # the log must restart: its committer copies
    (INLINE_FRAMES, 0, True, "inline"),
])
def test_decide(frames: int, copied: int, pending: bool, expected: str | None) -> None:
    assert decide(frames, copied, pending) == expected


def test_the_watch_notices_a_restarted_log() -> None:
    watch = WalWatch()
    watch.copied = 1500
    assert watch(None, "main", 1800) == apsw.SQLITE_OK  # type: ignore[arg-type]
    assert (watch.frames, watch.copied) == (1800, 1500)
    watch(None, "main", 3)  # type: ignore[arg-type]
    assert (watch.frames, watch.copied) == (3, 0)


def wal_frames(path: str) -> int:
    """Frames the -wal file has room for (its size: SQLite reuses a restarted log from the start)."""
    size = os.path.getsize(path + "-wal") if os.path.exists(path + "-wal") else 0
    return max(0, size - 32) // (PAGE + 24)


def autocheckpoint(handle: object) -> int:
    """SQLite's autocheckpoint setting on a handle's connection (0: none; a WAL hook replaces it)."""
    handle.guard.trusted = True  # type: ignore[attr-defined]
    try:
        return int(handle.conn.execute("PRAGMA wal_autocheckpoint").fetchall()[0][0])  # type: ignore[attr-defined]
    finally:
        handle.guard.trusted = False  # type: ignore[attr-defined]


def run(coro: Callable[[], object]) -> None:
    asyncio.run(coro())  # type: ignore[arg-type]


def test_async_checkpoints_run_on_workers_and_keep_the_log_bounded(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "data")
    rows = 0

    async def main() -> None:
        nonlocal rows
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            store = ar._store
            checkpoints = store.checkpoints
            assert checkpoints is not None

            async def one(i: int) -> None:
                async with ar.transaction(K) as tx:
                    await tx.execute("INSERT INTO t(blob) VALUES (randomblob(3000))")

            for _burst in range(12):  # ~12 x 400 frames: several checkpoints are due
                await asyncio.gather(*(one(i) for i in range(400)))
                rows += 400
                handle = store.pool.get(K, "w")
                assert handle is not None and handle.wal is not None
                while handle.wal.pending:  # let the worker finish (bounded: a checkpoint takes ms)
                    await asyncio.sleep(0.001)
            path = handle.path
            assert autocheckpoint(handle) == 0
            assert checkpoints.worker_runs >= 3, "checkpoints were handed to workers"
            assert checkpoints.restart_runs == 0, "with pauses between bursts no commit had to checkpoint itself"
            assert wal_frames(path) < INLINE_FRAMES
            assert await ar.query(K, "SELECT count(*) FROM t") == [(rows,)]

    run(main)
    with Router(root, schema=SCHEMA) as router:
        assert router.query(K, "SELECT count(*) FROM t") == [(rows,)]
        assert router.query(K, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_sustained_async_writes_bound_the_log_and_never_checkpoint_on_the_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str) -> None:
    """No pause for a worker to catch up: passive checkpoints cannot restart the log, so once it is
    INLINE_FRAMES long it is copied between two of the tenant's batches (on a worker before the next batch
    at NORMAL, by the committing worker at FULL), and the -wal file never grows much past that. No
    checkpoint ever runs on the event loop's thread."""
    root = os.fspath(tmp_path / "data")
    threads: set[int] = set()
    real = checkpoints._checkpoint

    def recording(conn: apsw.Connection, watch: WalWatch) -> tuple[int, int]:
        threads.add(threading.get_ident())
        return real(conn, watch)

    monkeypatch.setattr(checkpoints, "_checkpoint", recording)
    rows = 200

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, synchronous=synchronous) as ar:

            async def writer() -> None:
                for _ in range(rows):
                    async with ar.transaction(K) as tx:
                        await tx.execute("INSERT INTO t(blob) VALUES (randomblob(3000))")

            await asyncio.gather(*(writer() for _ in range(64)))  # 12,800 rows, ~25,000 frames
            handle = ar._store.pool.get(K, "w")
            assert handle is not None
            assert wal_frames(handle.path) <= INLINE_FRAMES + 2 * 64 * 2, "the log stayed bounded"
            assert ar._store.checkpoints is not None and ar._store.checkpoints.restart_runs >= 1
            assert await ar.query(K, "SELECT count(*) FROM t") == [(64 * rows,)]
            assert threads and threading.get_ident() not in threads, "a checkpoint ran on the event loop"

    run(main)


def test_the_loop_marks_a_long_log_and_a_worker_restarts_it(tmp_path: Path) -> None:
    """after_commit on the deferring thread (the loop's) only marks ``restart_due``; restart() copies the
    whole log on a connection of its own and clears the mark."""
    conn = apsw.Connection(os.fspath(tmp_path / "t.db"))
    conn.execute("PRAGMA journal_mode=WAL")
    opened: list[apsw.Connection] = []

    def open_for(handle: object) -> apsw.Connection:
        opened.append(apsw.Connection(os.fspath(tmp_path / "t.db")))
        opened[-1].execute("SELECT count(*) FROM sqlite_schema").fetchall()  # as open_tenant reads it
        return opened[-1]

    checkpointer = Checkpointer(lambda *a: pytest.fail("no worker is due"), open_for)
    checkpointer.defer_thread = threading.get_ident()
    watch = checkpointer.watch(conn)
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (randomblob(40000))")
    watch.frames = INLINE_FRAMES  # what the hook reports once the log is that long
    handle = types.SimpleNamespace(conn=conn)
    checkpointer.after_commit(handle, watch)  # type: ignore[arg-type]
    assert watch.restart_due and watch.copied == 0 and not opened, "the loop's thread did not checkpoint"
    worker = threading.Thread(target=checkpointer.restart, args=(handle, watch))
    worker.start()
    worker.join()
    assert not watch.restart_due and checkpointer.restart_runs == 1 and len(opened) == 1
    log, copied = conn.wal_checkpoint()
    assert watch.copied == copied == log > 10, "the worker copied the whole log"
    conn.close()


def test_a_restart_that_left_the_log_is_retried_only_after_more_frames(tmp_path: Path) -> None:
    """A reader holding an old snapshot (another process, a backup) keeps a checkpoint from copying the
    whole log: the loop's next commits do not make every batch wait for a worker; the next attempt comes
    RETRY_FRAMES later, and a restarted log starts the count again."""
    conn = apsw.Connection(os.fspath(tmp_path / "t.db"))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(x)")
    reader = apsw.Connection(os.fspath(tmp_path / "t.db"))
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchall()  # a snapshot from before the rows below
    opened: list[apsw.Connection] = []

    def open_for(handle: object) -> apsw.Connection:
        opened.append(apsw.Connection(os.fspath(tmp_path / "t.db")))
        opened[-1].execute("SELECT count(*) FROM sqlite_schema").fetchall()
        return opened[-1]

    checkpointer = Checkpointer(lambda *a: pytest.fail("no worker is due"), open_for)
    checkpointer.defer_thread = threading.get_ident()
    watch = checkpointer.watch(conn)
    conn.execute("INSERT INTO t VALUES (randomblob(40000))")
    handle = types.SimpleNamespace(conn=conn)
    watch.frames = INLINE_FRAMES
    checkpointer.after_commit(handle, watch)  # type: ignore[arg-type]
    assert watch.restart_due
    checkpointer.restart(handle, watch)  # type: ignore[arg-type]
    assert not watch.restart_due and watch.restart_from == INLINE_FRAMES
    log, copied = conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    assert copied < log, "the reader's snapshot kept the checkpoint from copying everything"
    watch.frames = INLINE_FRAMES + RETRY_FRAMES - 1
    checkpointer.after_commit(handle, watch)  # type: ignore[arg-type]
    assert not watch.restart_due, "retried before RETRY_FRAMES more frames"
    watch.frames = INLINE_FRAMES + RETRY_FRAMES
    checkpointer.after_commit(handle, watch)  # type: ignore[arg-type]
    assert watch.restart_due
    watch(conn, "main", 5)  # the log restarted
    assert watch.restart_from == 0
    reader.execute("COMMIT")
    for c in (*opened, reader, conn):
        c.close()


def test_a_transaction_cancelled_while_its_batch_waits_for_the_restart_never_runs(
        tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "data")
    started, release = threading.Event(), threading.Event()

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            async with ar.transaction(K) as tx:
                await tx.execute("INSERT INTO t(blob) VALUES (x'01')")
            store = ar._store
            assert store.checkpoints is not None
            handle = store.pool.get(K, "w")
            assert handle is not None and handle.wal is not None
            real_restart = store.checkpoints.restart

            def slow_restart(h: object, watch: WalWatch) -> None:
                started.set()
                release.wait(30)
                real_restart(h, watch)  # type: ignore[arg-type]

            store.checkpoints.restart = slow_restart  # type: ignore[method-assign]
            handle.wal.restart_due = True  # as a loop commit leaves a log of INLINE_FRAMES

            async def doomed() -> None:
                async with ar.transaction(K) as tx:
                    await tx.execute("INSERT INTO t(blob) VALUES (x'02')")

            task = asyncio.ensure_future(doomed())
            while not started.is_set():
                await asyncio.sleep(0.001)  # until the batch waits for the worker's restart
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            release.set()
            async with ar.transaction(K) as tx:  # the tenant is usable at once
                await tx.execute("INSERT INTO t(blob) VALUES (x'03')")
            assert await ar.query(K, "SELECT hex(blob) FROM t ORDER BY id") == [("01",), ("03",)]

    run(main)


def test_an_inline_checkpoint_waits_for_a_worker_round_in_flight(tmp_path: Path) -> None:
    """SQLite refuses a checkpoint while another runs (SQLITE_BUSY at once): a committer whose log reached
    INLINE_FRAMES while a worker round runs waits for that round, then copies the log itself, instead of
    skipping and letting the log grow past the bound (the failure this replaced: 4,407 frames)."""
    conn = apsw.Connection(os.fspath(tmp_path / "t.db"))
    conn.execute("PRAGMA journal_mode=WAL")
    checkpointer = Checkpointer(lambda *a: pytest.fail("no worker is due"), lambda h: pytest.fail("no open"))
    watch = checkpointer.watch(conn)
    conn.execute("CREATE TABLE t(x)")
    conn.execute("INSERT INTO t VALUES (randomblob(40000))")
    assert watch.frames > 10 and watch.copied == 0
    watch.frames = INLINE_FRAMES  # what the hook reports once the log is that long
    handle = types.SimpleNamespace(conn=conn)
    watch.lock.acquire()  # a worker's checkpoint round is running
    committer = threading.Thread(target=checkpointer.after_commit, args=(handle, watch))
    committer.start()
    committer.join(0.3)
    try:
        assert committer.is_alive(), "the committer did not wait for the worker's round"
        assert watch.copied == 0
    finally:
        watch.lock.release()
    committer.join()
    assert checkpointer.restart_runs == 1
    assert watch.copied == int(conn.wal_checkpoint()[0]) > 10, "then it copied the whole log"
    conn.close()


def test_a_checkpoint_of_a_dropped_tenant_is_skipped_and_leaves_no_files(tmp_path: Path) -> None:
    root = os.fspath(tmp_path / "data")

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            async with ar.transaction(K) as tx:
                await tx.execute("INSERT INTO t(blob) VALUES (x'00')")
            store = ar._store
            handle = store.pool.get(K, "w")
            assert handle is not None and handle.wal is not None and store.checkpoints is not None
            path = handle.path
            await ar.drop(K)
            store.checkpoints._run(handle, handle.wal)  # what a worker handed this handle would do
            assert not handle.wal.pending
            assert store.checkpoints.worker_runs == 0
            leftovers = [n for n in os.listdir(os.path.dirname(path)) if n.startswith(os.path.basename(path))]
            assert leftovers == []

    run(main)


def test_the_sync_router_keeps_sqlites_autocheckpoint(make_router: Callable[..., Router]) -> None:
    router = make_router(schema=SCHEMA)
    assert router._store.checkpoints is None
    for _ in range(1500):
        with router.transaction(K) as tx:
            tx.execute("INSERT INTO t(blob) VALUES (randomblob(3000))")
    handle = router._store.pool.get(K, "w")
    assert handle is not None and handle.wal is None
    assert autocheckpoint(handle) == 1000
    assert wal_frames(handle.path) < 2 * DUE_FRAMES, "SQLite checkpointed and restarted the log"
