"""What ``durability="replicated"`` costs a writer (issue 16, "Durability modes"): the same writes acknowledged
once local (the default: the replica follows within the replicator's lag) and once in the replica, side by
side on one replicated root, with a replicator process running on it, in one run.

Usage::

    .venv/bin/python benchmarks/replication_durable.py            # own SeaweedFS server, 7 paired rounds
    .venv/bin/python benchmarks/replication_durable.py --quick    # 3 rounds
    .venv/bin/python benchmarks/replication.py --only durable     # the same rows inside the replication figures

Rows:

* d1: routed sync single-row write transactions, one thread, one warm tenant per side;
* d2: async single-row write transactions, 64 tasks on one tenant per side (group commit: the replicated side
  asks the replicator once per batch);
* d3: routed sync single-row write transactions, 8 threads, each on a tenant of its own (their waits overlap:
  the replicator ships every request of a round in one upload).

How: both sides are routers of this process, each on a replicated root of its own with a replicator process of
its own (the local side ``Router(root)``, the replicated side ``Router(root2, durability="replicated")``; the
same for ``AsyncRouter``). Separate roots because one replicator serves a node's tenants one after another: the
local side commits tens of thousands of times a second, and the capture of that backlog (checksums verified in
Python) would hold up the replicated side's confirmations for seconds.
The sides run alternately (A B, B A, ...) for ``--rounds`` rounds of ``--round-time`` seconds each; ops/s is
per round (the ratio is the median of the per-round ratios, the range the lowest and highest round); the
latency of a write is from ``BEGIN`` to the return of its transaction (its acknowledgement), over every write
of every round of that side (p50/p99). The replicators run ``shardlite replicate run --interval 1``: the
replicated side's requests start a round at once (one upload per round for every waiting writer), the local
side ships at the interval. This process never imports the stdlib ``sqlite3``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from compare import loadavg, log, print_markdown_rows  # noqa: E402

import shardlite  # noqa: E402

SCHEMA = ["CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]
TASKS = 64
THREADS = 8


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))]


def _sync_round(router: shardlite.Router, key: str, seconds: float, lat: list[float]) -> float:
    end = time.perf_counter() + seconds
    n = 0
    began = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        if t0 >= end:
            break
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO w(v) VALUES ('x')")
        lat.append(time.perf_counter() - t0)
        n += 1
    return n / (time.perf_counter() - began)


def _threads_round(router: shardlite.Router, key: str, seconds: float, lat: list[float]) -> float:
    """THREADS threads, each on a tenant of its own (``key:<i>``): their waits for the replica overlap, and the
    replicator ships every request of a round in one upload."""
    import threading

    lats: list[list[float]] = [[] for _ in range(THREADS)]

    def one(i: int) -> None:
        _sync_round(router, f"{key}:{i}", seconds, lats[i])

    began = time.perf_counter()
    workers = [threading.Thread(target=one, args=(i,)) for i in range(THREADS)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for part in lats:
        lat.extend(part)
    return sum(len(part) for part in lats) / (time.perf_counter() - began)


async def _async_round(router: shardlite.AsyncRouter, key: str, seconds: float, lat: list[float]) -> float:
    end = time.perf_counter() + seconds
    done = 0

    async def task() -> None:
        nonlocal done
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            async with router.transaction(key) as tx:
                await tx.execute("INSERT INTO w(v) VALUES ('x')")
            lat.append(time.perf_counter() - t0)
            done += 1

    began = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(TASKS)))
    return done / (time.perf_counter() - began)


def _row(rid: str, what: str, ops: dict[str, list[float]], lat: dict[str, list[float]]) -> dict[str, Any]:
    ratios = [d / max(local, 1e-9) for local, d in zip(ops["local"], ops["replicated"], strict=True)]
    med = statistics.median(ratios)

    def ms(seconds: float) -> str:
        return f"{seconds * 1e3:.1f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"

    def side(name: str) -> str:
        return (f"{statistics.median(ops[name]):,.0f} ops/s, latency p50 {ms(pct(lat[name], 50))}, "
                f"p99 {ms(pct(lat[name], 99))}")
    return {"id": rid, "what": what, "shardlite": f"replicated: {side('replicated')}",
            "baseline": f"local (async replication): {side('local')}",
            "ratio": f"{med:.3f}× ({min(ratios):.3f}–{max(ratios):.3f})", "target": "reference (no target: the "
            "price of waiting for the replica)", "result": "info",
            "data": {"ops": ops, "ratio_median": med, "ratios": ratios,
                     "latency_ms": {k: {"p50": pct(v, 50) * 1e3, "p99": pct(v, 99) * 1e3, "n": len(v)}
                                    for k, v in lat.items()}}}


def run_rows(tmp: str, url: Callable[[str], str], start_replicator: Callable[[str], Callable[[], None]], *,
             rounds: int, round_time: float, ids: tuple[str, str, str] = ("d1", "d2", "d3")) -> list[dict[str, Any]]:
    """The two rows, on two new roots under ``tmp`` (one per side), replicated to ``url(name)``;
    ``start_replicator(root)`` starts a replicator on a root and returns what stops it."""
    roots = {name: os.path.join(tmp, f"durable-{name}") for name in ("local", "replicated")}
    stops = []
    try:
        for name, root in roots.items():
            shardlite.Router(root, schema=SCHEMA, replicate=url(f"durable-{name}")).close()
            stops.append(start_replicator(root))
        return _measure(roots, rounds, round_time, ids)
    finally:
        for stop in stops:
            stop()


def _measure(roots: dict[str, str], rounds: int, round_time: float, ids: tuple[str, str, str]
             ) -> list[dict[str, Any]]:
    local = shardlite.Router(roots["local"], schema=SCHEMA)
    durable = shardlite.Router(roots["replicated"], schema=SCHEMA, durability="replicated")
    sides = {"local": (local, "sync:t"), "replicated": (durable, "sync:t")}
    rows = []
    try:
        for rid, fn, what in (
                (ids[0], _sync_round, "routed sync single-row write tx, one thread"),
                (ids[2], _threads_round, f"routed sync single-row write tx, {THREADS} threads on a tenant each")):
            ops: dict[str, list[float]] = {"local": [], "replicated": []}
            lat: dict[str, list[float]] = {"local": [], "replicated": []}
            for router, key in sides.values():  # warm up: the tenants exist, the replicator answers
                fn(router, key, 0.3, [])
            for r in range(rounds):
                for name in (("local", "replicated") if r % 2 == 0 else ("replicated", "local")):
                    router, key = sides[name]
                    ops[name].append(fn(router, key, round_time, lat[name]))
            rows.append(_row(rid, f"{what}, durability=\"replicated\" vs the default (replication on, a replicator "
                                  "running, S3)", ops, lat))
            log(f"  {rows[-1]['id']}: {rows[-1]['shardlite']} | {rows[-1]['baseline']} | {rows[-1]['ratio']}")
    finally:
        durable.close()
        local.close()

    async def both() -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        aops: dict[str, list[float]] = {"local": [], "replicated": []}
        alat: dict[str, list[float]] = {"local": [], "replicated": []}
        async with shardlite.AsyncRouter(roots["local"], schema=SCHEMA) as alocal, shardlite.AsyncRouter(
                roots["replicated"], schema=SCHEMA, durability="replicated") as adurable:
            asides = {"local": (alocal, "async:t"), "replicated": (adurable, "async:t")}
            for router, key in asides.values():
                await _async_round(router, key, 0.3, [])
            for r in range(rounds):
                for name in (("local", "replicated") if r % 2 == 0 else ("replicated", "local")):
                    router, key = asides[name]
                    aops[name].append(await _async_round(router, key, round_time, alat[name]))
        return aops, alat

    aops, alat = asyncio.run(both())
    rows.append(_row(ids[1], f"async single-row write tx, {TASKS} tasks on one tenant (group commit), "
                             "durability=\"replicated\" vs the default (replication on, a replicator running, S3)",
                     aops, alat))
    log(f"  {rows[-1]['id']}: {rows[-1]['shardlite']} | {rows[-1]['baseline']} | {rows[-1]['ratio']}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--round-time", type=float, default=1.0, help="seconds per side per round (default 1)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (3 if args.quick else 7)
    from shardlite.testing.s3 import seaweedfs

    load_start = loadavg()
    with seaweedfs(("bench",)) as server, tempfile.TemporaryDirectory(prefix="shardlite-durable-") as tmp:
        env = dict(os.environ)
        server.apply_env(env)
        server.apply_env(os.environ)

        def start(root: str) -> Callable[[], None]:
            proc = subprocess.Popen([sys.executable, "-m", "shardlite", "--root", root, "replicate", "run"],
                                    env=env, stdout=subprocess.DEVNULL)

            def stop() -> None:
                proc.terminate()
                proc.wait(30)
            return stop

        rows = run_rows(tmp, lambda name: server.url(name, bucket="bench"), start, rounds=rounds,
                        round_time=args.round_time)
    print(f"`{' '.join([os.path.relpath(sys.executable), *sys.argv])}`; load average {load_start} at start, "
          f"{loadavg()} at end; {rounds} paired rounds of {args.round_time:g} s per side")
    print_markdown_rows(rows, [], id_column="id")
    return 0


if __name__ == "__main__":
    sys.exit(main())
