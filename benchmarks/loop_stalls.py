"""How long the event loop stalls while many tasks write to one tenant through ``AsyncRouter``.

Usage::

    .venv/bin/python benchmarks/loop_stalls.py              # 3 runs of 64 tasks x 400 rows of 3 KB
    .venv/bin/python benchmarks/loop_stalls.py --runs 1 --tasks 64 --rows 200 --blob 3000

Sustained writes of large rows to one tenant make the WAL reach its checkpoint thresholds over and over
(``shardlite.files.checkpoints``): a checkpoint inside a commit on the loop (SQLite's autocheckpoint, or a
committer copying a 4,000-frame log) stalls every tenant served by that loop. A monitor task yields to the
loop in a tight loop (``await asyncio.sleep(0)``) and records how long each turn took; the longest turn
and the 99.9th percentile are the stalls every other tenant's request would have felt. Also reported:
transactions per second and the store's checkpoint counters (worker rounds, log restarts).

Not part of ``make test``; a diagnostic for the README's Async semantics section, with no target of the
brief behind it. Scratch files live in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

from shardlite import AsyncRouter

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, blob BLOB NOT NULL)"]
KEY = "room:stalls"


async def one_run(root: str, tasks: int, rows: int, blob: int) -> dict[str, float]:
    async with AsyncRouter(root, schema=SCHEMA) as ar:
        turns: list[float] = []
        done = False

        async def monitor() -> None:
            while not done:
                t0 = time.perf_counter()
                await asyncio.sleep(0)
                turns.append(time.perf_counter() - t0)

        async def writer() -> None:
            for _ in range(rows):
                async with ar.transaction(KEY) as tx:
                    await tx.execute("INSERT INTO t(blob) VALUES (randomblob(?))", (blob,))

        watcher = asyncio.create_task(monitor())
        t0 = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(tasks)))
        elapsed = time.perf_counter() - t0
        done = True
        await watcher
        turns.sort()
        checkpoints = ar._store.checkpoints
        return {
            "tx_per_s": tasks * rows / elapsed,
            "turn_max_ms": turns[-1] * 1e3,
            "turn_p999_ms": turns[int(len(turns) * 0.999)] * 1e3,
            "worker_rounds": float(checkpoints.worker_runs if checkpoints else 0),
            "restarts": float(checkpoints.restart_runs if checkpoints else 0),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--rows", type=int, default=400, help="rows per task")
    parser.add_argument("--blob", type=int, default=3000, help="bytes per row")
    args = parser.parse_args()
    print(f"{args.tasks} tasks x {args.rows} rows of {args.blob} B on one tenant (AsyncRouter, NORMAL)")
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as root:
            r = asyncio.run(one_run(root, args.tasks, args.rows, args.blob))
        print(f"run {i + 1}: {r['tx_per_s']:,.0f} tx/s; longest loop turn {r['turn_max_ms']:.1f} ms, "
              f"p99.9 {r['turn_p999_ms']:.2f} ms; checkpoint rounds on workers {r['worker_rounds']:.0f}, "
              f"log restarts {r['restarts']:.0f}")


if __name__ == "__main__":
    main()
