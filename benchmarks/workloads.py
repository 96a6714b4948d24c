"""Workloads shared by ``compare.py`` and the pytest-benchmark suite (brief §6, rows of issue 2).

Every *side* of a comparison is a callable ``run(n) -> seconds`` that performs ``n`` operations and returns
the elapsed time measured with ``time.perf_counter`` around the operations only (setup and cleanup are
outside the timed region). Both sides of a row use the same table, the same rows, the same parameters in
the same order and the same ``synchronous`` setting.

The stdlib ``sqlite3`` module (and so ``aiosqlite``) is never imported here: two SQLite libraries in one
process must never touch a shardlite file (brief §3). Those baselines run in a separate process
(``sqlite3_worker.py``) on their own file, driven in lockstep through :class:`RemoteSide` so their rounds
still interleave with the in-process sides.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from itertools import cycle, islice
from typing import Any

import apsw

from shardlite import AsyncRouter, Router

HERE = os.path.dirname(os.path.abspath(__file__))

#: Rows in the point-read table ``t``.
ROWS = 10_000
#: Concurrent tasks of the async rows.
TASKS = 64

T_DDL = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"
W_DDL = "CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"
#: The schema of the tenants used by rows 1 to 4 (and of the direct files).
BASE_SCHEMA: list[str] = [T_DDL, W_DDL]
READ_SQL = "SELECT v FROM t WHERE id=?"
WRITE_SQL = "INSERT INTO w(v) VALUES (?)"
WRITE_PARAMS = ("a 32-byte payload for every write",)
READ_KEY = "bench:read"
WRITE_KEY = "bench:write"

#: Row 5: a six-table schema with indexes, one step per table (each step is run whole).
SIX_TABLES: list[str] = [
    """CREATE TABLE members(id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT NOT NULL,
           role TEXT NOT NULL DEFAULT 'member', joined REAL NOT NULL);
       CREATE UNIQUE INDEX members_by_email ON members(email);
       CREATE INDEX members_by_name ON members(name)""",
    """CREATE TABLE channels(id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, topic TEXT,
           created_by INTEGER REFERENCES members(id), created REAL NOT NULL)""",
    """CREATE TABLE messages(id INTEGER PRIMARY KEY, channel_id INTEGER NOT NULL REFERENCES channels(id),
           author_id INTEGER NOT NULL REFERENCES members(id), body TEXT NOT NULL, at REAL NOT NULL);
       CREATE INDEX messages_by_channel ON messages(channel_id, at);
       CREATE INDEX messages_by_author ON messages(author_id, at)""",
    """CREATE TABLE reactions(message_id INTEGER NOT NULL REFERENCES messages(id),
           member_id INTEGER NOT NULL REFERENCES members(id), emoji TEXT NOT NULL,
           PRIMARY KEY (message_id, member_id, emoji)) WITHOUT ROWID;
       CREATE INDEX reactions_by_member ON reactions(member_id)""",
    """CREATE TABLE attachments(id INTEGER PRIMARY KEY, message_id INTEGER NOT NULL REFERENCES messages(id),
           name TEXT NOT NULL, size INTEGER NOT NULL, sha256 BLOB NOT NULL);
       CREATE INDEX attachments_by_message ON attachments(message_id)""",
    """CREATE TABLE settings(name TEXT PRIMARY KEY, value TEXT NOT NULL, updated REAL NOT NULL) WITHOUT ROWID""",
]
FIRST_INSERT = "INSERT INTO members(email, name, joined) VALUES (?, ?, ?)"
FIRST_PARAMS = ("founder@example.com", "Founder", 1_700_000_000.0)

Run = Callable[[int], float]


def point_params(count: int = 8192, seed: int = 42) -> list[tuple[int]]:
    """Random ids of ``t`` (the same sequence on every side of a row)."""
    rng = random.Random(seed)
    return [(rng.randrange(ROWS),) for _ in range(count)]


def _rows() -> list[tuple[int, str]]:
    return [(i, f"value number {i:06d}") for i in range(ROWS)]


# -- direct APSW baselines -----------------------------------------------------------------------------------


def open_direct(path: str, synchronous: str = "NORMAL") -> apsw.Connection:
    """One open APSW connection on its own file: WAL, the given ``synchronous``, tables t (filled) and w."""
    fresh = not os.path.exists(path)
    conn = apsw.Connection(path)
    conn.execute("PRAGMA journal_mode=WAL").fetchall()
    conn.execute(f"PRAGMA synchronous={synchronous}")
    if fresh:
        with conn:
            conn.execute(T_DDL)
            conn.execute(W_DDL)
            conn.executemany("INSERT INTO t(id, v) VALUES (?, ?)", _rows())
    return conn


def direct_reads(conn: apsw.Connection, params: Sequence[tuple[int]]) -> Run:
    execute = conn.execute

    def run(n: int) -> float:
        todo = list(islice(cycle(params), n))
        t0 = time.perf_counter()
        for p in todo:
            execute(READ_SQL, p).fetchall()
        return time.perf_counter() - t0
    return run


def direct_writes(conn: apsw.Connection) -> Run:
    """``BEGIN IMMEDIATE; INSERT; COMMIT`` per operation."""
    execute = conn.execute

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            execute("BEGIN IMMEDIATE")
            execute(WRITE_SQL, WRITE_PARAMS)
            execute("COMMIT")
        return time.perf_counter() - t0
    return run


class ByHandCreator:
    """Row 5 baseline: create a file, WAL, the six tables with their indexes, first insert, commit.

    ``synchronous`` is set first, so everything (including the switch to WAL, a rollback-journal commit on
    a new file) runs at the same setting as the shardlite side. ``schema_first=True`` is a variant (a
    reference, not the brief's order): the tables and the first row are committed in rollback-journal mode
    and the file is switched to WAL afterwards.

    After each timed block the block's connections are closed, untimed (as :class:`ShardliteCreator` closes
    its router): the timed region never pays for a close (a checkpoint), and the number of open files in
    the process (SQLite's unix VFS scans a list of open inodes on every open) stays the same from round to
    round instead of growing through the run.
    """

    def __init__(self, directory: str, synchronous: str = "NORMAL", *, schema_first: bool = False) -> None:
        self.directory = directory
        self.synchronous = synchronous
        self.schema_first = schema_first
        os.makedirs(directory, exist_ok=True)
        self.count = 0
        self.opened: list[apsw.Connection] = []

    def block(self, n: int) -> None:
        """Create ``n`` new files (the timed part); their connections stay open until :meth:`reset`."""
        paths = [os.path.join(self.directory, f"tenant{self.count + i}.db") for i in range(n)]
        self.count += n
        keep = self.opened.append
        sync_pragma = f"PRAGMA synchronous={self.synchronous}"
        wal_first = not self.schema_first
        for path in paths:
            conn = apsw.Connection(path)
            conn.execute(sync_pragma)
            if wal_first:
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
            conn.execute("BEGIN IMMEDIATE")
            for step in SIX_TABLES:
                conn.execute(step)
            conn.execute(FIRST_INSERT, FIRST_PARAMS)
            conn.execute("COMMIT")
            if not wal_first:
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
            keep(conn)

    def reset(self) -> None:
        """Untimed: close the connections of the last block."""
        for conn in self.opened:
            conn.close()
        self.opened.clear()

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        self.block(n)
        elapsed = time.perf_counter() - t0
        self.reset()
        return elapsed

    def close(self) -> None:
        self.reset()


# -- shardlite sides -----------------------------------------------------------------------------------------


def make_router(root: str, *, synchronous: str = "NORMAL", fill: bool = True, **kwargs: Any) -> Router:
    router = Router(root, schema=BASE_SCHEMA, synchronous=synchronous, **kwargs)
    if fill:
        with router.transaction(READ_KEY) as tx:
            if not tx.execute("SELECT 1 FROM t LIMIT 1").fetchall():
                for row in _rows():
                    tx.execute("INSERT INTO t(id, v) VALUES (?, ?)", row)
        with router.transaction(WRITE_KEY) as tx:
            tx.execute("SELECT 1 FROM w LIMIT 1").fetchall()
    return router


def routed_reads(router: Router, params: Sequence[tuple[int]], key: str = READ_KEY) -> Run:
    query = router.query

    def run(n: int) -> float:
        todo = list(islice(cycle(params), n))
        t0 = time.perf_counter()
        for p in todo:
            query(key, READ_SQL, p)
        return time.perf_counter() - t0
    return run


def routed_writes(router: Router, key: str = WRITE_KEY) -> Run:
    transaction = router.transaction

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with transaction(key) as tx:
                tx.execute(WRITE_SQL, WRITE_PARAMS)
        return time.perf_counter() - t0
    return run


class ShardliteCreator:
    """Row 5, shardlite side: ``with router.transaction(new_key) as tx: tx.execute(FIRST_INSERT)``.

    ``max_open`` is above the block size, so no eviction (a close) lands in a timed block. After each block
    the router is closed and reopened, untimed, and one untimed tenant is created on the new router so its
    schema template is built (once per router and prefix) and its catalog connection is warm before the next
    timed block. Only public API is used. ``router_options`` are more ``Router`` keyword arguments (``meta=``).
    """

    def __init__(self, root: str, synchronous: str = "NORMAL", prefix: str = "org", **router_options: Any) -> None:
        self.root = root
        self.synchronous = synchronous
        self.prefix = prefix
        self.router_options = router_options
        self.count = 0
        self.warm = 0
        self.router = self._open()

    def _open(self) -> Router:
        router = Router(self.root, schema=SIX_TABLES, synchronous=self.synchronous, max_open=4096,
                        **self.router_options)
        self.warm += 1
        with router.transaction(f"warm:{self.warm}") as tx:
            tx.execute(FIRST_INSERT, FIRST_PARAMS)
        return router

    def block(self, n: int) -> None:
        """Create ``n`` new tenants with their first write (the timed part)."""
        keys = [f"{self.prefix}:{self.count + i}" for i in range(n)]
        self.count += n
        transaction = self.router.transaction
        for key in keys:
            with transaction(key) as tx:
                tx.execute(FIRST_INSERT, FIRST_PARAMS)

    def reset(self) -> None:
        """Untimed: close the router (its connections) and open a fresh, warmed-up one."""
        self.router.close()
        self.router = self._open()

    def run(self, n: int) -> float:
        t0 = time.perf_counter()
        self.block(n)
        elapsed = time.perf_counter() - t0
        self.reset()
        return elapsed

    def close(self) -> None:
        self.router.close()


def make_async_router(root: str, loop: asyncio.AbstractEventLoop, *, synchronous: str = "NORMAL",
                      **kwargs: Any) -> AsyncRouter:
    ar = AsyncRouter(root, schema=BASE_SCHEMA, synchronous=synchronous, **kwargs)

    async def fill() -> None:
        async with ar.transaction(READ_KEY) as tx:
            if not (await tx.execute("SELECT 1 FROM t LIMIT 1")).fetchall():
                for row in _rows():
                    await tx.execute("INSERT INTO t(id, v) VALUES (?, ?)", row)
        async with ar.transaction(WRITE_KEY) as tx:
            (await tx.execute("SELECT 1 FROM w LIMIT 1")).fetchall()
        # Open the read connection with one lone read before any concurrent one: the rows measure warm
        # steady state, and (found while writing this suite) 64 tasks reading a tenant whose read connection
        # is still cold can fail with apsw.ThreadingViolationError: AsyncRouter.query's inline path calls
        # setprogresshandler on the handle while a worker thread runs Store.read's lock-only fast path on it.
        await ar.query(READ_KEY, READ_SQL, (0,))
    loop.run_until_complete(fill())
    return ar


def async_reads(loop: asyncio.AbstractEventLoop, ar: AsyncRouter, params: Sequence[tuple[int]],
                key: str = READ_KEY, tasks: int = TASKS) -> Run:
    """``n`` point reads (a multiple of ``tasks``) from ``tasks`` concurrent tasks."""
    query = ar.query

    async def one(todo: list[tuple[int]]) -> None:
        for p in todo:
            await query(key, READ_SQL, p)

    async def many(n: int) -> float:
        todo = list(islice(cycle(params), n))
        per = n // tasks
        chunks = [todo[i * per:(i + 1) * per] for i in range(tasks)]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        return time.perf_counter() - t0

    def run(n: int) -> float:
        return loop.run_until_complete(many(n))
    return run


def async_writes(loop: asyncio.AbstractEventLoop, ar: AsyncRouter, key: str = WRITE_KEY,
                 tasks: int = TASKS) -> Run:
    """``n`` single-row write transactions (a multiple of ``tasks``) from ``tasks`` concurrent tasks."""
    transaction = ar.transaction

    async def one(count: int) -> None:
        for _ in range(count):
            async with transaction(key) as tx:
                await tx.execute(WRITE_SQL, WRITE_PARAMS)

    async def many(n: int) -> float:
        per = n // tasks
        t0 = time.perf_counter()
        await asyncio.gather(*(one(per) for _ in range(tasks)))
        return time.perf_counter() - t0

    def run(n: int) -> float:
        return loop.run_until_complete(many(n))
    return run


# -- baselines in another process ------------------------------------------------------------------------------


class RemoteSide:
    """A side measured in ``sqlite3_worker.py`` (stdlib sqlite3 / aiosqlite on its own file).

    ``run(n)`` asks the worker for ``n`` operations and returns the time the *worker* measured around
    them, so the pipe round trip is not counted. The parent waits idle while the worker runs, so the
    rounds still alternate with the in-process sides.
    """

    def __init__(self, mode: str, path: str, *, tasks: int = TASKS) -> None:
        self.mode = mode
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "sqlite3_worker.py"), mode, path, str(ROWS), str(tasks)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            self.close()
            raise RuntimeError(f"sqlite3_worker {mode} did not start: {line!r}")
        #: the worker's ``sqlite3.sqlite_version``
        self.sqlite_version = line[1]

    def run(self, n: int) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"sqlite3_worker {self.mode} exited")
        return float(answer)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# -- row 6: memory ---------------------------------------------------------------------------------------------


def memory_row(root: str, *, real: int = 10_000, total: int = 100_000, reads: int = 20_000, max_open: int = 256,
               parallel: int | None = None) -> dict[str, Any]:
    """Build a root whose catalog holds ``total`` tenants (``real`` of them with files), then measure the
    peak RSS of a fresh process reading at random across the ``real`` ones (``memory_worker.py``)."""
    import json

    worker = [sys.executable, os.path.join(HERE, "memory_worker.py")]
    t0 = time.perf_counter()
    subprocess.run([*worker, "init", root], check=True)
    procs = max(1, min(parallel or (os.cpu_count() or 1), 4))
    bounds = [real * i // procs for i in range(procs + 1)]
    running = [subprocess.Popen([*worker, "create", root, str(bounds[i]), str(bounds[i + 1])]) for i in range(procs)]
    failed = [p.args for p in running if p.wait() != 0]
    if failed:
        raise RuntimeError(f"memory_worker create failed: {failed}")
    subprocess.run([*worker, "fill", root, str(real), str(total)], check=True)
    setup = time.perf_counter() - t0
    out = subprocess.run([*worker, "measure", root, str(real), str(reads), str(max_open)], check=True,
                         capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result.update(real_tenants=real, fake_catalog_rows=total - real, setup_s=setup)
    return result
