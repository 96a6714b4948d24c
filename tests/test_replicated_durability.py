"""``durability="replicated"`` (shardlite/front/durability.py, shardlite/services/confirmations.py): a write is
acknowledged only once it is in the replica; without a replica to reach it fails, within its bound, with
``ReplicationUnavailable`` and stays committed locally. Both front ends; real replicators (child processes or
``replicate run``), real file:// and SeaweedFS targets, a real S3 outage. Every wait polls with a deadline."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_cli import shardlite_command
from helpers_procs import DEADLINE, child_env
from helpers_s3 import TargetFactory, separate_s3_server

import shardlite
from shardlite.core import timeline
from shardlite.replica.target import ReplicaTarget, open_target
from shardlite.services import replica_read
from shardlite.services.replica_restore import restore_root_from_replica

SCHEMA = {"user": ["CREATE TABLE log(n INTEGER PRIMARY KEY)"]}
FRONTS = ("sync", "async")


def _in_replica(target: ReplicaTarget, key: str) -> set[int]:
    """The rows of ``key``'s latest state in the replica (read from its packs, as a restore does)."""
    import apsw

    history = replica_read.captures_of(target, [key]).get(key)
    found = timeline.image_at(history) if history else None
    if found is None:
        return set()
    data = bytearray(found[0])
    data[18:20] = b"\x01\x01"  # a rollback-journal image: deserialized without its log
    conn = apsw.Connection(":memory:")
    conn.deserialize("main", bytes(data))
    return {n for (n,) in conn.execute("SELECT n FROM log")}


def _restored(replica_url: str, new_root: Path, keys: list[str]) -> dict[str, set[int]]:
    """Restore the whole root from the replica (the disk is gone) and read every key's rows."""
    target = open_target(replica_url)
    try:
        restore_root_from_replica(target, str(new_root))
    finally:
        target.close()
    with shardlite.Router(new_root, schema=SCHEMA, create=False) as router:
        return {key: {n for (n,) in router.query(key, "SELECT n FROM log")} for key in keys}


def _write(router: shardlite.Router, key: str, n: int) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO log(n) VALUES (?)", (n,))


async def _awrite(router: shardlite.AsyncRouter, key: str, n: int) -> None:
    async with router.transaction(key) as tx:
        await tx.execute("INSERT INTO log(n) VALUES (?)", (n,))


class Front:
    """One front end behind one calling convention: ``call(fn, *args)`` runs a sync function, or awaits an async
    one on the test's event loop."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None

    def router(self, root: Path, **options: Any) -> Any:
        if self.loop is None:
            return shardlite.Router(root, schema=SCHEMA, **options)

        async def make() -> shardlite.AsyncRouter:
            return shardlite.AsyncRouter(root, schema=SCHEMA, **options)
        return self.loop.run_until_complete(make())

    def run(self, made: Awaitable[Any] | Any) -> Any:
        if self.loop is None:
            return made
        assert isinstance(made, Awaitable)
        return self.loop.run_until_complete(made)  # type: ignore[arg-type]

    def write(self, router: Any, key: str, n: int) -> None:
        self.run(_awrite(router, key, n) if self.loop is not None else _write(router, key, n))

    def wait_replicated(self, router: Any, key: str, timeout: float) -> None:
        self.run(router.wait_replicated(key, timeout=timeout))

    def close(self, router: Any) -> None:
        self.run(router.aclose() if self.loop is not None else router.close())

    def query(self, router: Any, key: str) -> set[int]:
        return {n for (n,) in self.run(router.query(key, "SELECT n FROM log"))}

    def finish(self) -> None:
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=FRONTS)
def front(request: pytest.FixtureRequest) -> Any:
    made = Front(str(request.param))
    yield made
    made.finish()


def _raises_unavailable(fn: Callable[[], Any]) -> tuple[shardlite.ReplicationUnavailable, float]:
    began = time.monotonic()
    with pytest.raises(shardlite.ReplicationUnavailable) as caught:
        fn()
    return caught.value, time.monotonic() - began


# -- configuration -------------------------------------------------------------------------------------------


def test_replicated_needs_a_root_that_replicates_and_a_known_mode(tmp_path: Path) -> None:
    with pytest.raises(shardlite.ConfigurationError, match="needs a root that replicates"):
        shardlite.Router(tmp_path / "root", durability="replicated")
    with pytest.raises(shardlite.ConfigurationError, match="durability must be one of"):
        shardlite.Router(tmp_path / "root", durability="sync")
    url = "file://" + str(tmp_path / "replica")
    with pytest.raises(shardlite.ConfigurationError, match="durability_timeout"):
        shardlite.Router(tmp_path / "root2", replicate=url, durability="replicated", durability_timeout=0)
    with shardlite.Router(tmp_path / "plain") as plain, pytest.raises(shardlite.ConfigurationError,
                                                                       match="does not replicate"):
        plain.wait_replicated("user:a")

    async def main() -> None:
        with pytest.raises(shardlite.ConfigurationError, match="needs a root that replicates"):
            shardlite.AsyncRouter(tmp_path / "root", durability="replicated")

    asyncio.run(main())


# -- acknowledged means replicated -----------------------------------------------------------------------------


def test_an_acknowledged_write_is_already_in_the_replica(tmp_path: Path, make_replica_target: TargetFactory,
                                                         front: Front) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    router = front.router(tmp_path / "root", replicate=url, replicator=True, durability="replicated",
                          durability_timeout=DEADLINE)
    try:
        for n in range(8):
            front.write(router, "user:a", n)
            assert n in _in_replica(target, "user:a")  # at the moment of the acknowledgement, not later
        if front.loop is not None:
            keys = [f"user:{i}" for i in range(3)]

            async def many() -> None:  # concurrent transactions: group-commit batches, one request per batch
                await asyncio.gather(*(_awrite(router, keys[n % 3], 100 + n) for n in range(60)))
            front.run(many())
            for i, key in enumerate(keys):
                assert {100 + n for n in range(60) if n % 3 == i} <= _in_replica(target, key)
    finally:
        front.close(router)


def test_without_a_replicator_the_write_fails_within_its_bound_and_stays_committed(
        tmp_path: Path, front: Front) -> None:
    url = "file://" + str(tmp_path / "replica")
    root = tmp_path / "root"
    router = front.router(root, replicate=url, durability="replicated", durability_timeout=0.5)
    replicator: subprocess.Popen[bytes] | None = None
    try:
        error, took = _raises_unavailable(lambda: front.write(router, "user:a", 1))
        assert took < 0.5 + 5  # bounded: no hang (the margin is for a loaded machine)
        text = str(error)
        assert "committed locally" in text and "not confirmed" in text and "no replicator is running" in text
        assert "replicate status" in text
        assert front.query(router, "user:a") == {1}  # committed, not rolled back
        # the retry that is safe: wait again, once a replicator runs (the same router, no restart)
        replicator = subprocess.Popen([*shardlite_command(), "--root", str(root), "replicate", "run"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
        front.wait_replicated(router, "user:a", DEADLINE)
        target = open_target(url)
        try:
            assert _in_replica(target, "user:a") == {1}
        finally:
            target.close()
    finally:
        front.close(router)
        if replicator is not None:
            replicator.terminate()
            replicator.wait(DEADLINE)


# -- the S3 server stopped ----------------------------------------------------------------------------------


def test_s3_outage_local_writes_go_on_replicated_writes_fail_then_recover(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, front: Front) -> None:
    with separate_s3_server() as server:  # a server of its own: stopping it disturbs no other test
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        url = server.url("outage")
        root = tmp_path / "root"
        keys = ["user:a", "user:b"]
        local = front.router(root, replicate=url, replicator=True)  # the default: acknowledged once local
        replicated = front.router(root, durability="replicated", durability_timeout=8.0)
        written: dict[str, set[int]] = {key: set() for key in keys}

        def write(router: Any, key: str, n: int) -> None:
            front.write(router, key, n)
            written[key].add(n)

        try:
            write(local, "user:a", 0)
            front.wait_replicated(replicated, "user:a", DEADLINE)  # the replicator runs and the replica answers
            write(replicated, "user:b", 1)

            server.stop()
            for n in range(2, 40):  # local durability: writes go on, nothing waits for the replica
                write(local, keys[n % 2], n)
            error, took = _raises_unavailable(lambda: front.write(replicated, "user:b", 40))
            written["user:b"].add(40)  # committed locally all the same
            assert took < 8.0 + 5  # a clear error, not a hang (margin: a loaded machine)
            assert "committed locally" in str(error) and "not confirmed" in str(error)
            assert front.query(replicated, "user:b") >= {40}

            server.start()  # back: the same routers, no restart
            for key in keys:  # the backlog of the outage ships (the replicator retries its upload every tick;
                front.wait_replicated(replicated, key, DEADLINE)  # an attempt under way may take ~3 s to fail)
            write(replicated, "user:b", 41)  # then replicated writes are confirmed again
            write(replicated, "user:a", 42)
            for n in range(43, 46):
                write(local, keys[n % 2], n)
        finally:
            front.close(replicated)
            front.close(local)  # the replicator child's last round ships the last local writes
        assert _restored(url, tmp_path / "new", keys) == written  # nothing lost, nothing twice


def test_the_async_wait_never_blocks_the_event_loop(tmp_path: Path) -> None:
    url = "file://" + str(tmp_path / "replica")

    async def main() -> tuple[int, shardlite.ReplicationUnavailable]:
        async with shardlite.AsyncRouter(tmp_path / "root", schema=SCHEMA, replicate=url, durability="replicated",
                                         durability_timeout=1.0) as router:
            ticks = 0
            waiting = True

            async def ticker() -> None:
                nonlocal ticks
                while waiting:
                    await asyncio.sleep(0.01)
                    ticks += 1

            running = asyncio.ensure_future(ticker())
            try:
                with pytest.raises(shardlite.ReplicationUnavailable) as caught:  # no replicator runs
                    await _awrite(router, "user:a", 1)
            finally:
                waiting = False
                await running
            assert {n for (n,) in await router.query("user:a", "SELECT n FROM log")} == {1}
            return ticks, caught.value

    ticks, error = asyncio.run(main())
    assert ticks >= 5, f"the loop ran {ticks} other steps during a 1 s wait: it was blocked"
    assert "committed locally" in str(error)


# -- moved or dropped while a write waits ---------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")  # on PostgreSQL the async wait looks a forgotten route up off the loop
def test_a_tenant_moved_or_dropped_meanwhile_gets_a_clear_answer(tmp_path: Path, front: Front) -> None:
    """The replicator of the node a write asked answers only for files still on that node, or dropped there:
    after a move it says where to look (and waiting again, which asks the new node, confirms the write); after
    a drop, a request naming the key only is not confirmed, and waiting again (which names the dropped file)
    is confirmed by the drop's shipped pack. No answer hangs."""
    from shardlite.services import confirmations

    url = (tmp_path / "replica").as_uri()
    router = front.router(tmp_path / "root", replicate=url, replicator=True, durability="replicated",
                          durability_timeout=DEADLINE, nodes=["n1"])
    try:
        keys = [f"user:{i}" for i in range(12)]
        for n, key in enumerate(keys):
            front.write(router, key, n)
        store = router._store
        old_path = store.node_path("n1")
        admin = shardlite.Router(tmp_path / "root", schema=SCHEMA)  # the rebalance: another router
        try:
            admin.nodes.add("n2")
            admin.rebalance.plan()
            admin.rebalance.apply()
            moved = [key for key in keys if admin.locate(key).node == "n2"]
            assert moved, "the ring moved nothing to the new node"
            with pytest.raises(confirmations.Unconfirmed, match="not on node 'n1' any more"):
                confirmations.ask_shipped(old_path, moved[0], DEADLINE)
            for key in moved:
                store.forget(key)  # the route this process cached is a hint: the next look asks the catalog
                front.wait_replicated(router, key, DEADLINE)  # asks n2's replicator now
                assert keys.index(key) in _in_replica(open_target(url), key)
            gone = moved[0]
            admin.drop(gone)
        finally:
            admin.close()
        with pytest.raises(confirmations.Unconfirmed, match="moved or dropped"):
            confirmations.ask_shipped(store.node_path("n2"), gone, DEADLINE)
        store.forget(gone)
        front.wait_replicated(router, gone, DEADLINE)  # its drop shipped: every commit of it is in the replica
        with pytest.raises(shardlite.UnknownTenant):
            front.wait_replicated(router, "user:never", DEADLINE)
    finally:
        front.close(router)
