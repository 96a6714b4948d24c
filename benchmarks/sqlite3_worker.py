"""Baselines that use the stdlib ``sqlite3`` module, run in their own process on their own file.

Never import APSW or shardlite here: two SQLite libraries in one process must never open a shardlite
file (brief §3), so these baselines live in a process that only ever sees the file named on its command
line, which it creates itself.

Usage: ``sqlite3_worker.py MODE PATH ROWS TASKS``. MODE is ``sqlite3-read`` (sync point reads) or
``aiosqlite-read`` (TASKS tasks sharing one aiosqlite connection, each doing point reads). The worker
prints ``ready <sqlite version>``, then for every line ``N`` on stdin runs N operations and prints the
seconds they took (``time.perf_counter`` around the operations only). It exits at end of input.
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import sys
import time
from itertools import cycle, islice

READ_SQL = "SELECT v FROM t WHERE id=?"


def prepare(path: str, rows: int) -> None:
    if os.path.exists(path):
        raise SystemExit(f"{path} exists: the worker only uses a file it creates itself")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL").fetchall()
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t(id, v) VALUES (?, ?)", ((i, f"value number {i:06d}") for i in range(rows)))
        conn.execute("COMMIT")
    finally:
        conn.close()


def params(rows: int) -> list[tuple[int]]:
    rng = random.Random(42)  # the same sequence as workloads.point_params
    return [(rng.randrange(rows),) for _ in range(8192)]


def serve(run: object) -> None:
    assert callable(run)
    for line in sys.stdin:
        n = int(line)
        print(repr(run(n)), flush=True)


def sync_reads(path: str, rows: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=NORMAL")
    execute = conn.execute
    ps = params(rows)

    def run(n: int) -> float:
        todo = list(islice(cycle(ps), n))
        t0 = time.perf_counter()
        for p in todo:
            execute(READ_SQL, p).fetchall()
        return time.perf_counter() - t0

    print("ready", sqlite3.sqlite_version, flush=True)
    try:
        serve(run)
    finally:
        conn.close()


def aiosqlite_reads(path: str, rows: int, tasks: int) -> None:
    import aiosqlite

    loop = asyncio.new_event_loop()
    ps = params(rows)

    async def connect() -> aiosqlite.Connection:
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA synchronous=NORMAL")
        return db

    db = loop.run_until_complete(connect())

    async def one(todo: list[tuple[int]]) -> None:
        for p in todo:
            await db.execute_fetchall(READ_SQL, p)

    async def many(n: int) -> float:
        todo = list(islice(cycle(ps), n))
        per = n // tasks
        chunks = [todo[i * per:(i + 1) * per] for i in range(tasks)]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in chunks))
        return time.perf_counter() - t0

    def run(n: int) -> float:
        return loop.run_until_complete(many(n))

    print("ready", sqlite3.sqlite_version, flush=True)
    try:
        serve(run)
    finally:
        loop.run_until_complete(db.close())
        loop.close()


def main() -> None:
    mode, path, rows_text, tasks_text = sys.argv[1:5]
    rows, tasks = int(rows_text), int(tasks_text)
    prepare(path, rows)
    if mode == "sqlite3-read":
        sync_reads(path, rows)
    elif mode == "aiosqlite-read":
        aiosqlite_reads(path, rows, tasks)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
