"""AsyncRouter's operations (shardlite.front.aio_admin): nodes, rebalance, map, backup, restore, export, import_,
migrate_all, status and stats do what Router's do, run off the event loop on the admin threads, and leave
the event loop free meanwhile."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

import pytest

import shardlite
from shardlite import AsyncRouter, Router

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"]
KEYS = [f"user:{i}" for i in range(40)]


async def fill(ar: AsyncRouter, keys: list[str] = KEYS) -> None:
    for i, key in enumerate(keys):
        async with ar.transaction(key) as tx:
            await tx.execute("INSERT INTO t(v) VALUES (?)", (i,))


def test_status_stats_and_settings_match_the_sync_router(root: str) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any], Any, str]:
        async with AsyncRouter(root, schema=SCHEMA, max_rows=77) as ar:
            await fill(ar)
            return await ar.status(), await ar.stats(), ar.settings, repr(ar)

    status, stats, settings, text = asyncio.run(main())
    with Router(root, schema=SCHEMA) as router:
        sync_stats = router.stats()
    assert settings.max_rows == 77
    assert text == f"<AsyncRouter {root!r}>"
    assert sum(status["tenants_per_node"].values()) == len(KEYS)
    assert set(stats) == set(sync_stats)
    assert stats["tenants_per_node"] == sync_stats["tenants_per_node"]
    assert stats["relay"]["pending"] == sync_stats["relay"]["pending"] == 0
    assert all(size > 0 for size in stats["bytes_per_node"].values())


def test_map_streams_every_tenant_off_the_loop(root: str) -> None:
    async def main() -> tuple[dict[str, Any], Any]:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            await fill(ar)
            result = await ar.map("SELECT sum(v) AS s FROM t", keys=[*KEYS, "user:missing"])
            rows = {key: rows async for key, rows in result}
            return rows, result

    rows, result = asyncio.run(main())
    assert rows == {key: [(i,)] for i, key in enumerate(KEYS)}
    assert result.columns == ["s"] and result.count == len(KEYS)
    assert result.errors == {"user:missing": "no such tenant"}


def test_map_refuses_a_write_like_router_map(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            await fill(ar, KEYS[:3])
            result = await ar.map("DELETE FROM t")
            [item async for item in result]

    with pytest.raises(shardlite.StatementNotAllowed):
        asyncio.run(main())
    with Router(root, schema=SCHEMA) as router:
        assert router.query(KEYS[0], "SELECT count(*) FROM t") == [(1,)]


def test_backup_restore_export_import_round_trip(root: str, tmp_path: Path) -> None:
    dest, exported = tmp_path / "backup", tmp_path / "one.db"

    async def main() -> tuple[Any, ...]:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            await fill(ar)
            summary = await ar.backup(dest)
            await ar.export(KEYS[1], exported)
            for key in KEYS[:5]:
                await ar.drop(key)
            restored = await ar.restore(dest, keys=KEYS[:3])
            location = await ar.import_(exported, "user:copy")
            counts = [await ar.query(k, "SELECT count(*), sum(v) FROM t") for k in (*KEYS[:3], "user:copy")]
            return summary, restored, location, counts, await ar.exists(KEYS[4])

    summary, restored, location, counts, exists = asyncio.run(main())
    assert sorted(summary["tenants"]) == sorted(KEYS)
    assert sorted(restored) == sorted(KEYS[:3])
    assert location.key == "user:copy"
    assert counts == [[(1, 0)], [(1, 1)], [(1, 2)], [(1, 1)]]
    assert not exists


def test_nodes_and_rebalance_move_tenants_while_the_loop_serves(root: str, tmp_path: Path) -> None:
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    async def main() -> tuple[Any, ...]:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            await fill(ar)
            node = await ar.nodes.add("far", path=str(tmp_path / "far"))
            _, plan = await ar.rebalance.plan()
            stop = asyncio.Event()
            tick = asyncio.create_task(ticker(stop))
            outcome = await ar.rebalance.apply(parallel=2)
            stop.set()
            await tick
            counts = {n["name"]: n["tenants"] for n in await ar.nodes.counts()}
            sums = [await ar.query(k, "SELECT sum(v) FROM t") for k in KEYS]
            status = await ar.rebalance.status()
            return node, plan, outcome, counts, sums, status

    node, plan, outcome, counts, sums, status = asyncio.run(main())
    assert node.name == "far" and os.path.isdir(node.path)
    assert plan.moves and outcome["state"] == "done" and status["state"] == "done"
    assert counts["far"] == len(plan.moves)
    assert sums == [[(i,)] for i in range(len(KEYS))]
    assert ticks > len(plan.moves), "the event loop ran other tasks while the moves ran"


def test_migrate_all_reports_progress(root: str) -> None:
    seen: list[str] = []

    async def main() -> dict[str, str]:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            await fill(ar, KEYS[:5])
        async with AsyncRouter(root, schema=[*SCHEMA, "CREATE TABLE u(x)"]) as ar:
            return await ar.migrate_all(progress=lambda key, exc: seen.append(key))

    assert asyncio.run(main()) == {}
    assert sorted(seen) == sorted(KEYS[:5])


def test_aclose_waits_for_admin_threads(root: str) -> None:
    async def main() -> None:
        ar = AsyncRouter(root, schema=SCHEMA)
        await fill(ar, KEYS[:3])
        await ar.status()
        await ar.aclose()
        assert ar._admin._shutdown

    asyncio.run(main())
    assert not [t for t in threading.enumerate() if t.name.startswith("shardlite-admin")]


#: endless (until interrupted) on a tenant whose t.v is huge
COUNT_TO_V = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < (SELECT max(v) FROM t)) "
              "SELECT count(*) FROM c")


async def endless(ar: AsyncRouter) -> list[str]:
    keys = ["org:fast", "org:slow1", "org:slow2", "org:slow3"]
    for key in keys:
        async with ar.transaction(key) as tx:
            await tx.execute("INSERT INTO t(v) VALUES (?)", (1 if key == "org:fast" else 10**15,))
    return keys


def map_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shardlite-map")]


def test_leaving_an_async_map_early_interrupts_its_reads(root: str) -> None:
    async def main() -> tuple[Any, ...]:
        async with AsyncRouter(root, schema=SCHEMA, statement_timeout=None) as ar:
            keys = await endless(ar)
            async with await ar.map(COUNT_TO_V, keys=keys, parallel=2) as result:
                async for key, rows in result:
                    first = (key, rows)
                    break
                running = bool(map_threads())
            return first, running, map_threads()

    first, running, after = asyncio.run(main())  # without the interrupt this never ends (suite timeout)
    assert first == ("org:fast", [(1,)]) and running and after == []


def test_aclose_stops_a_map_another_task_is_reading(root: str) -> None:
    async def main() -> tuple[Any, ...]:
        ar = AsyncRouter(root, schema=SCHEMA, statement_timeout=None)
        keys = await endless(ar)
        result = await ar.map(COUNT_TO_V, keys=keys[1:], parallel=2)
        started = asyncio.Event()

        async def reader() -> list[Any]:
            started.set()
            return [item async for item in result]

        task = asyncio.create_task(reader())
        await started.wait()
        while not map_threads():
            await asyncio.sleep(0.001)
        await ar.aclose()
        items = await task
        with pytest.raises(shardlite.ShardliteError, match="closed"):
            await ar.stats()
        return items, map_threads()

    items, after = asyncio.run(main())
    assert items == [] and after == []


def test_a_backup_stops_when_the_router_closes(root: str, tmp_path: Path) -> None:
    from shardlite.services import backup as backup_mod

    dest = tmp_path / "backup"
    with Router(root, schema=SCHEMA) as router:
        for key in KEYS[:6]:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(v) VALUES (1)")
        backup_mod.backup(router._store, os.fspath(dest), parallel=1)
        with router.transaction(KEYS[0]) as tx:  # something to copy again
            tx.execute("INSERT INTO t(v) VALUES (2)")
        manifest = (dest / "manifest.json").read_bytes()
        store = router._store
        with pytest.raises(shardlite.BackupFailed, match="closed during the backup"):
            backup_mod.backup(store, os.fspath(dest), parallel=1, progress=lambda key, copied: store.close())
    assert (dest / "manifest.json").read_bytes() == manifest  # the previous backup stays whole
