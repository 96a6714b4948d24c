"""pytest-benchmark suite for the rows of brief §6 / issue 2 (one benchmark group per row).

Run: ``.venv/bin/python -m pytest benchmarks -q --benchmark-only`` (add ``--benchmark-group-by=group``,
the default, to read each row's sides next to each other). Every benchmarked call runs a *batch* of
operations, the same number on both sides of a row (``extra_info["ops_per_call"]``); divide by it for the
time per operation. The ratios against the targets, measured interleaved in one run, come from
``benchmarks/compare.py`` (``make bench``). No timing is asserted here.

Row 6 (memory) runs in its own processes at a reduced scale unless ``SHARDLITE_BENCH_FULL=1`` (then: 10,000
real tenants, 100,000 in the catalog), and reports its peak RSS in ``extra_info``.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import apsw
import pytest
import workloads as w

from shardlite import AsyncRouter, Router

READS = 1024  # point reads per call (rows 1 and 3; a multiple of 64)
WRITES = 128  # single-row write transactions per call (row 2)
ASYNC_WRITES = 256  # rows 4: 64 tasks x 4 transactions
CREATES = 20  # new tenants per call (row 5)


def per_op(benchmark: Any, ops: int, **info: Any) -> None:
    """Record how many operations one benchmarked call performs (divide the figures by it)."""
    benchmark.extra_info["ops_per_call"] = ops
    benchmark.extra_info.update(info)


# -- row 1: routed sync point read vs direct APSW (and stdlib sqlite3 as a reference) -------------------------


@pytest.mark.benchmark(group="1 sync point read")
def test_point_read_routed(benchmark: Any, router: Router, params: list[tuple[int]]) -> None:
    per_op(benchmark, READS)
    benchmark(w.routed_reads(router, params), READS)


@pytest.mark.benchmark(group="1 sync point read")
def test_point_read_direct_apsw(benchmark: Any, direct: apsw.Connection, params: list[tuple[int]]) -> None:
    per_op(benchmark, READS)
    benchmark(w.direct_reads(direct, params), READS)


@pytest.mark.benchmark(group="1 sync point read")
def test_point_read_stdlib_sqlite3_reference(benchmark: Any, stdlib_worker: w.RemoteSide) -> None:
    """Reference only: a worker process on its own file; each call includes one pipe round trip."""
    per_op(benchmark, READS, sqlite_version=stdlib_worker.sqlite_version, process="separate")
    benchmark(stdlib_worker.run, READS)


# -- row 2: routed single-row write transaction vs direct BEGIN IMMEDIATE/INSERT/COMMIT ------------------------


@pytest.mark.benchmark(group="2 sync single-row write tx (NORMAL)")
def test_write_tx_routed(benchmark: Any, router: Router) -> None:
    per_op(benchmark, WRITES)
    benchmark(w.routed_writes(router), WRITES)


@pytest.mark.benchmark(group="2 sync single-row write tx (NORMAL)")
def test_write_tx_direct_apsw(benchmark: Any, direct: apsw.Connection) -> None:
    per_op(benchmark, WRITES)
    benchmark(w.direct_writes(direct), WRITES)


# -- row 3: async point reads from 64 tasks vs direct sync reads and aiosqlite --------------------------------


@pytest.mark.benchmark(group="3 point reads, 64 async tasks")
def test_async_reads_64_tasks(benchmark: Any, loop: asyncio.AbstractEventLoop, async_router: AsyncRouter,
                              params: list[tuple[int]]) -> None:
    per_op(benchmark, READS, tasks=w.TASKS)
    benchmark(w.async_reads(loop, async_router, params), READS)


@pytest.mark.benchmark(group="3 point reads, 64 async tasks")
def test_async_reads_baseline_direct_sync(benchmark: Any, direct: apsw.Connection, params: list[tuple[int]]) -> None:
    per_op(benchmark, READS)
    benchmark(w.direct_reads(direct, params), READS)


@pytest.mark.benchmark(group="3 point reads, 64 async tasks")
def test_async_reads_baseline_aiosqlite_64_tasks(benchmark: Any, aiosqlite_worker: w.RemoteSide) -> None:
    """64 tasks sharing one aiosqlite connection, in a worker process; each call includes one pipe round trip."""
    per_op(benchmark, READS, tasks=w.TASKS, process="separate")
    benchmark(aiosqlite_worker.run, READS)


# -- row 4: async single-row write transactions, 64 tasks on one tenant, vs direct sync commits ---------------


@pytest.mark.benchmark(group="4a single-row write tx, 64 async tasks (NORMAL)")
def test_async_writes_64_tasks_normal(benchmark: Any, loop: asyncio.AbstractEventLoop,
                                      async_router: AsyncRouter) -> None:
    per_op(benchmark, ASYNC_WRITES, tasks=w.TASKS)
    benchmark(w.async_writes(loop, async_router), ASYNC_WRITES)


@pytest.mark.benchmark(group="4a single-row write tx, 64 async tasks (NORMAL)")
def test_async_writes_baseline_direct_normal(benchmark: Any, direct: apsw.Connection) -> None:
    per_op(benchmark, ASYNC_WRITES)
    benchmark(w.direct_writes(direct), ASYNC_WRITES)


@pytest.mark.benchmark(group="4b single-row write tx, 64 async tasks (FULL)")
def test_async_writes_64_tasks_full(benchmark: Any, loop: asyncio.AbstractEventLoop,
                                    async_router_full: AsyncRouter) -> None:
    per_op(benchmark, ASYNC_WRITES, tasks=w.TASKS)
    benchmark(w.async_writes(loop, async_router_full), ASYNC_WRITES)


@pytest.mark.benchmark(group="4b single-row write tx, 64 async tasks (FULL)")
def test_async_writes_baseline_direct_full(benchmark: Any, direct_full: apsw.Connection) -> None:
    per_op(benchmark, ASYNC_WRITES)
    benchmark.pedantic(w.direct_writes(direct_full), args=(ASYNC_WRITES,), rounds=10, warmup_rounds=1)


# -- row 5: first write to a new tenant vs the same by hand ---------------------------------------------------


@pytest.mark.benchmark(group="5 first write to a new tenant (6 tables, NORMAL)")
def test_new_tenant_shardlite(benchmark: Any, shardlite_creator: w.ShardliteCreator) -> None:
    """Each round: CREATES new tenants; between rounds (untimed) the router is reopened and warmed up."""
    per_op(benchmark, CREATES)
    benchmark.pedantic(shardlite_creator.block, args=(CREATES,), setup=shardlite_creator.reset, rounds=15,
                       warmup_rounds=1)


@pytest.mark.benchmark(group="5 first write to a new tenant (6 tables, NORMAL)")
def test_new_tenant_by_hand_apsw(benchmark: Any, by_hand_creator: w.ByHandCreator) -> None:
    """Each round: CREATES new files by hand; between rounds (untimed) their connections are closed."""
    per_op(benchmark, CREATES)
    benchmark.pedantic(by_hand_creator.block, args=(CREATES,), setup=by_hand_creator.reset, rounds=15,
                       warmup_rounds=1)


@pytest.mark.benchmark(group="5 first write to a new tenant (6 tables, NORMAL)")
def test_new_tenant_by_hand_schema_before_wal_reference(benchmark: Any,
                                                        by_hand_schema_first_creator: w.ByHandCreator) -> None:
    """Reference variant: schema and first row committed in rollback-journal mode, then switched to WAL."""
    creator = by_hand_schema_first_creator
    per_op(benchmark, CREATES)
    benchmark.pedantic(creator.block, args=(CREATES,), setup=creator.reset, rounds=15, warmup_rounds=1)


# -- row 6: memory ----------------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="6 memory (peak RSS in extra_info)")
def test_memory_large_catalog(benchmark: Any, bench_dir: str) -> None:
    """Peak RSS of a process reading at random across many tenants with max_open=256 (see memory_worker.py).

    The time reported is the whole setup + measurement; the figure that matters is
    ``extra_info["peak_rss_mb"]`` (target: under 200 MB at 100,000 catalog tenants / 10,000 read).
    """
    full = os.environ.get("SHARDLITE_BENCH_FULL") == "1"
    real, reads = (10_000, 20_000) if full else (1_000, 2_000)
    runs = iter(range(1_000_000))

    def measure() -> dict[str, Any]:
        root = os.path.join(bench_dir, f"memory-{next(runs)}")
        return w.memory_row(root, real=real, total=100_000, reads=reads, max_open=256)

    result = benchmark.pedantic(measure, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in result.items() if isinstance(v, (int, float))})
