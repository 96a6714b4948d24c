"""Plain drops reach the replica as drop records, so a whole-root restore gives the root as it was at its time: a
tenant dropped at or before the time is absent, one dropped after it is present with its data, also when the
drop came after the last metadata snapshot (the snapshots here are kept provably older than the drops:
``META_EVERY`` is an hour, and no metadata delta is taken). On both targets: a drop then a restore at the
latest state and between the last write and the drop; a drop then a new tenant under the same key; a move
after the snapshot; a drop while no replicator runs; compaction keeping the drop records it needs; erase
taking them away; kill -9 of the replicator and of a dropping process."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from helpers_cli import run_script
from helpers_drops import SCHEMA, rows, write
from helpers_drops import snapshots_stay_old as snapshots_stay_old
from helpers_procs import child_env, spawn, write_script
from helpers_rebalance import move_to_a_new_node
from helpers_s3 import TargetFactory

import shardlite
from shardlite.core import metasnap, pack, timeline
from shardlite.core import retention as rt
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_read, replica_retention, replication
from shardlite.services.replica_restore import live_at, restore_root_from_replica, restore_tenant
from shardlite.services.replication import Replication


def _restored(target: ReplicaTarget, dest: Path, at_ns: int | None = None) -> dict[str, list[tuple[object, ...]]]:
    """Every tenant of a whole root restored from ``target`` at ``at_ns`` into ``dest``, with its rows."""
    done = restore_root_from_replica(target, str(dest), at_ns=at_ns)
    with shardlite.Router(dest, schema=SCHEMA, create=False) as back:
        assert sorted(back.tenants()) == sorted(done.tenants)
        return {key: rows(back, key) for key in done.tenants}


def _drops(target: ReplicaTarget) -> list[pack.Drop]:
    return [drop for name, size in replica_read.list_packs(target)
            for drop in replica_read.read_header(target, name, size).header.drops]


def _snapshot_times(target: ReplicaTarget) -> list[int]:
    return sorted(t for name, _ in target.list(metasnap.PREFIX) if (t := metasnap.time_of(name)) is not None)


@pytest.fixture
def replicated(tmp_path: Path, make_replica_target: TargetFactory) -> Iterator[
        tuple[shardlite.Router, Replication, ReplicaTarget]]:
    router = shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url(),
                              nodes=["n1", "n2"])
    run = Replication(router._store)
    yield router, run, make_replica_target()
    run.close()
    router.close()


@pytest.fixture
def shipped(replicated: tuple[shardlite.Router, Replication, ReplicaTarget]) -> tuple[
        shardlite.Router, Replication, ReplicaTarget]:
    """``replicated`` after a first write to ``user:a`` and ``user:gone`` and a round that shipped them."""
    router, run, _target = replicated
    for key in ("user:a", "user:gone"):
        write(router, key, f"{key} one")
    run.run_round()
    return replicated


def test_a_drop_after_the_last_snapshot_leaves_the_tenant_out_from_then_on(
        tmp_path: Path, shipped: tuple[shardlite.Router, Replication, ReplicaTarget]) -> None:
    router, run, target = shipped
    write(router, "user:gone", "the last write")
    write(router, "user:a", "a two")
    run.run_round()
    before_drop = time.time_ns()  # after the last write to user:gone was shipped, before its drop
    gone = router._store.meta.tenants.lookup("user:gone")
    assert gone is not None
    expected = {key: rows(router, key) for key in ("user:a", "user:gone")}
    router.drop("user:gone")
    after_drop = time.time_ns()
    assert replication.status(router._store)["total"]["drops_staged"] == 1
    assert "user:gone" not in replication.status(router._store)["tenants"]  # its cursor went with the drop
    run.run_round()
    assert run.meta_snapshots == 1 and _snapshot_times(target)[-1] < before_drop  # the snapshot predates the drop
    [drop] = _drops(target)
    assert (drop.key, drop.incarnation, drop.generation) == ("user:gone", gone.incarnation, gone.generation)
    assert before_drop < drop.dropped_ns < after_drop
    assert replication.status(router._store)["total"]["drops_staged"] == 0

    assert _restored(target, tmp_path / "latest") == {"user:a": expected["user:a"]}
    assert _restored(target, tmp_path / "after", after_drop) == {"user:a": expected["user:a"]}
    assert _restored(target, tmp_path / "before", before_drop) == expected  # present, with its last write
    # one tenant at a time, the dropped history is still there: that is how a drop is undone
    restore_tenant(router._store, target, "user:gone")
    assert rows(router, "user:gone") == expected["user:gone"]


def test_a_drop_then_a_new_tenant_under_the_same_key(
        tmp_path: Path, replicated: tuple[shardlite.Router, Replication, ReplicaTarget]) -> None:
    router, run, target = replicated
    write(router, "user:b", "b stays")
    write(router, "user:x", "first tenant")
    run.run_round()
    first = rows(router, "user:x")
    before_drop = time.time_ns()
    router.drop("user:x")
    run.run_round()
    between = time.time_ns()  # dropped, not created again yet
    write(router, "user:x", "second tenant")
    run.run_round()
    second = rows(router, "user:x")
    assert second == [(1, "second tenant")] and run.meta_snapshots == 1

    assert _restored(target, tmp_path / "latest")["user:x"] == second
    assert "user:x" not in _restored(target, tmp_path / "between", between)
    assert _restored(target, tmp_path / "before", before_drop)["user:x"] == first
    # and once the new one is dropped as well, neither incarnation comes back
    router.drop("user:x")
    run.run_round()
    assert len(_drops(target)) == 2
    assert "user:x" not in _restored(target, tmp_path / "both")


def test_a_move_after_the_snapshot_is_no_drop(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    keys = [f"user:{i}" for i in range(12)]
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url(),
                          nodes=["n1"]) as router:
        run = Replication(router._store)
        try:
            for key in keys:
                write(router, key, f"{key} before the move")
            run.run_round()
            moved = move_to_a_new_node(router, keys)
            for key in moved:
                write(router, key, f"{key} after the move")
            run.run_round()
            run.run_round()
            assert run.meta_snapshots == 1
            expected = {key: rows(router, key) for key in keys}
        finally:
            run.close()
    target = make_replica_target()
    assert _drops(target) == []  # a move retires the old file without a drop record
    assert _restored(target, tmp_path / "back") == expected


def test_a_drop_while_no_replicator_runs_ships_when_one_starts(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        run = Replication(router._store)
        try:
            for key in ("user:a", "user:gone"):
                write(router, key, f"{key} one")
            run.run_round()
        finally:
            run.close()
        expected = {key: rows(router, key) for key in ("user:a", "user:gone")}
        before_drop = time.time_ns()
        router.drop("user:gone")
        after_drop = time.time_ns()
        assert replication.status(router._store)["total"]["drops_staged"] == 1
        target = make_replica_target()
        assert _drops(target) == []
        later = Replication(router._store)  # its first round takes a new snapshot too, after the drop
        try:
            later.run_round()
        finally:
            later.close()
    [drop] = _drops(target)
    assert drop.key == "user:gone" and before_drop < drop.dropped_ns < after_drop
    assert _snapshot_times(target)[0] < before_drop < after_drop < _snapshot_times(target)[-1]
    # at a time the older snapshot serves, only the drop record says the tenant was gone
    assert _restored(target, tmp_path / "after", after_drop) == {"user:a": expected["user:a"]}
    assert _restored(target, tmp_path / "before", before_drop) == expected
    assert _restored(target, tmp_path / "latest") == {"user:a": expected["user:a"]}


def test_the_async_router_drop_records_the_drop_too(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    root = tmp_path / "root"

    async def main() -> None:
        async with shardlite.AsyncRouter(root, schema=SCHEMA, replicate=make_replica_target.url()) as router:
            for key in ("user:a", "user:gone"):
                async with router.transaction(key) as tx:
                    await tx.execute("INSERT INTO notes(body) VALUES (?)", (f"{key} one",))
            with shardlite.Router(root, schema=SCHEMA, create=False) as sync:
                run = Replication(sync._store)
                try:
                    run.run_round()
                    await router.drop("user:gone")
                    run.run_round()
                finally:
                    run.close()

    asyncio.run(main())
    target = make_replica_target()
    assert [d.key for d in _drops(target)] == ["user:gone"]
    assert _restored(target, tmp_path / "back") == {"user:a": [(1, "user:a one")]}


def test_compaction_keeps_the_drop_records_its_window_needs(
        tmp_path: Path, shipped: tuple[shardlite.Router, Replication, ReplicaTarget]) -> None:
    router, run, target = shipped
    router.drop("user:gone")
    run.run_round()  # the drop record alone in a pack: compaction would have deleted it as empty
    [drop_pack] = [name for name, size in replica_read.list_packs(target)
                   if replica_read.read_header(target, name, size).header.drops]
    assert not replica_read.read_header(target, drop_pack, target.head(drop_pack) or 0).header.entries
    expected = {"user:a": rows(router, "user:a")}
    replica_retention.compact(router._store, target)
    assert target.head(drop_pack) is not None  # kept: the dropped tenant's history is inside its window
    assert _restored(target, tmp_path / "compacted") == expected
    # past the window of the dropped tenant, its history and its drop record go together
    report = replica_retention.compact(router._store, target, now_ns=time.time_ns() + 8 * rt.DAY_NS)
    assert target.head(drop_pack) is None and report.deleted_packs >= 1
    assert "user:gone" not in replica_read.captures_of(target, None)


def test_erase_removes_the_drop_records_of_the_key(
        shipped: tuple[shardlite.Router, Replication, ReplicaTarget]) -> None:
    router, run, target = shipped
    router.drop("user:gone")
    write(router, "user:a", "beside the drop record")
    run.run_round()
    assert [d.key for d in _drops(target)] == ["user:gone"]
    receipt = router.drop("user:gone", erase=True)
    assert receipt["complete"] and sum(o["drop_records_removed"] for o in receipt["objects"]) == 1
    assert _drops(target) == []
    for name, _size in target.list(replica_read.PACKS_PREFIX):  # no pack names the key any more
        assert b"user:gone" not in target.get(name)


# -- drop records in packs: hostile input --------------------------------------------------------------------


def _pack_with(drops: list[pack.Drop]) -> bytes:
    entry = pack.Entry("user:1", "inc-1", 1, "snapshot", 512, "", 0, 0, [(0, 5)], 6, 0, 0)
    return pack.encode("n1", 1, 1, [(entry, b"\x01" * 512)], drops)


def test_packs_without_drops_stay_version_1_and_drops_make_version_2() -> None:
    plain = _pack_with([])
    assert b'"drops"' not in plain and pack.decode_header(plain)[0].version == 1
    drop = pack.Drop("user:2", "inc-9", 4, 1_700_000_000_000_000_000)
    header, _at = pack.decode_header(_pack_with([drop]))
    assert header.version == 2 and header.drops == [drop]
    # a reader of version 1 (no drops field) refuses such a header whole instead of misreading it
    head = pack.decode_header(_pack_with([drop]))[1]
    body = _pack_with([drop])[len(pack.MAGIC) + 4:head]

    class OldHeader(msgspec.Struct, forbid_unknown_fields=True):
        version: int
        node: str
        seq: int
        created_ns: int
        entries: list[pack.Entry]

    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(body, type=OldHeader)


def _tampered(drop: dict[str, object], version: int = 2) -> bytes:
    header = msgspec.json.decode(msgspec.json.encode(pack.decode_header(_pack_with(
        [pack.Drop("user:2", "inc-9", 4, 5)]))[0]), type=dict)
    header["drops"] = [{**header["drops"][0], **drop}]
    header["version"] = version
    head = msgspec.json.encode(header)
    return pack.MAGIC + len(head).to_bytes(4, "big") + head + b"\x01" * 512


@pytest.mark.parametrize("changes", [
    {"key": "a\x00b"}, {"key": " user:1"}, {"key": ""}, {"incarnation": ""}, {"incarnation": "x" * 129},
    {"generation": -1}, {"dropped_ns": -1}, {"dropped_ns": 1 << 63}, {"dropped_ns": "5"}, {"other": 1},
])
def test_hostile_drop_records_are_refused(changes: dict[str, object]) -> None:
    with pytest.raises(pack.PackError):
        pack.decode_header(_tampered(changes))


def test_a_version_1_header_with_drops_and_too_many_drops_are_refused() -> None:
    with pytest.raises(pack.PackError, match="version-1"):
        pack.decode_header(_tampered({}, version=1))
    plain = _pack_with([])
    _header, at = pack.decode_header(plain)
    head = plain[len(pack.MAGIC) + 4:at].replace(b'"version":1', b'"version":2')
    with pytest.raises(pack.PackError, match="version-2"):
        pack.decode_header(pack.MAGIC + len(head).to_bytes(4, "big") + head + plain[at:])
    with pytest.raises(ValueError, match="at most"):
        _pack_with([pack.Drop("user:2", "inc", 1, 1)] * (pack.MAX_DROPS + 1))


def test_without_key_takes_the_drop_records_of_the_key_too() -> None:
    mine, other = pack.Drop("user:1", "inc-1", 1, 9), pack.Drop("user:2", "inc-2", 1, 9)
    blob = _pack_with([mine, other])
    new, removed, dropped = pack.without_key(blob, "user:1")
    assert new is not None  # user:2's drop record keeps the pack
    header, _ = pack.decode_header(new)
    assert [e.key for e in removed] == ["user:1"] and dropped == [mine]
    assert header.entries == [] and header.drops == [other] and header.version == 2
    assert pack.without_key(new, "user:2") == (None, [], [other])
    assert pack.without_key(new, "user:3") == (new, [], [])
    assert pack.without(blob, "user:1")[1] == removed  # the older call: the pack and the entries


# -- which tenants a whole-root restore holds (pure) ----------------------------------------------------------


def test_live_at_decides_by_drop_records_then_the_snapshot() -> None:
    row = ("n1", 3, "inc-1", 1, "active")
    dropped_at_20 = [pack.Drop("user:1", "inc-1", 3, 20)]
    assert live_at(row, "inc-1", 5, 10, [], 30)
    assert not live_at(row, "inc-1", 5, 10, dropped_at_20, 30)  # dropped after the snapshot, before the time
    assert live_at(row, "inc-1", 5, 10, dropped_at_20, 15)  # dropped after the time
    assert not live_at(row[:4] + ("dropped",), "inc-1", 5, 10, [], 30)
    assert live_at(None, "inc-2", 12, 10, [], 30)  # created after the snapshot
    assert live_at(row[:4] + ("dropped",), "inc-2", 12, 10, [], 30)  # created again after the snapshot
    assert not live_at(row, "inc-0", 2, 10, [], 30)  # an older incarnation, superseded before the snapshot
    assert not live_at(None, "inc-2", 12, 10, [pack.Drop("user:1", "inc-2", 0, 25)], 30)


def _capture(pack_name: str, key: str, inc: str, kind: str, at: int) -> rt.Located:
    entry = pack.Entry(key, inc, 1, kind, 512, "00112233aabbccdd", 0 if kind == "snapshot" else 1, 1,  # type: ignore[arg-type]
                       [(1, at)], at, 0, 512 if kind == "snapshot" else 536, "0" * 32)
    return rt.Located(pack_name, timeline.Capture((at, 1, 0), entry, b"", "n1"))


def test_the_plan_keeps_a_drop_records_pack_while_its_history_stays() -> None:
    located = [_capture("p1", "user:gone", "g", "snapshot", 100), _capture("p1", "user:a", "a", "snapshot", 100),
               _capture("p2", "user:a", "a", "snapshot", 200)]
    drops = [rt.LocatedDrop("p3", "user:gone", "g", 300)]
    packs = ["p1", "p2", "p3"]
    # inside the window: the dropped tenant's history stays, and the pack saying it was dropped
    planned = rt.plan(located, lambda key: 50, live=["user:a"], packs=packs, drops=drops)
    assert planned.keep == packs and planned.delete == []
    # the window starts after the last capture but before the drop: it was live at the start, so it stays
    planned = rt.plan(located, lambda key: 250, live=["user:a"], packs=packs, drops=drops)
    assert "p3" in planned.keep and "user:gone" not in planned.expired
    assert "user:gone" in {snap.key for snap in planned.snapshots} or "p1" in planned.keep
    # dropped before the window: nothing of it stays, its drop record neither
    planned = rt.plan(located, lambda key: 400, live=["user:a"], packs=packs, drops=drops)
    assert "p3" in planned.delete and planned.expired == ["user:gone"]


# -- kill -9 ---------------------------------------------------------------------------------------------------


REPLICATOR = """
import sys
from shardlite.services import replication
replication.META_EVERY = 3600.0  # one metadata snapshot, at the first round: every drop comes after it
replication.META_DELTA_EVERY = 3600.0  # and no delta
from shardlite.cli import main
sys.exit(main(sys.argv[1:]))
"""

DROPPER = """
import sys, time
import shardlite
router = shardlite.Router(sys.argv[1], schema={"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]})
for key in sys.argv[2].split(","):
    router.drop(key)
    sys.stdout.write(f"dropped {key} {time.time_ns()}\\n")
    sys.stdout.flush()
    time.sleep(0.01)
sys.stdout.write("done\\n")
sys.stdout.flush()
time.sleep(60)
"""


def test_kill_9_of_the_replicator_and_of_a_dropping_process_loses_no_drop(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """A replicator running drops into packs is killed -9 while a process drops tenants, drops go on while
    none runs, a new one starts; then the dropping process is killed -9 in the middle of its drops, and a
    drop it left half-done is run again. Every acknowledged drop reaches the replica, and a whole-root
    restore at a time the first (only) metadata snapshot serves leaves out exactly the tenants whose drop
    record is older than that time; at the latest state, every dropped tenant is absent."""
    rng = random.Random(16)
    url = make_replica_target.url()
    root = str(tmp_path / "root")
    env = child_env()
    keys = [f"user:{i}" for i in range(24)]
    victims = keys[:16]
    with shardlite.Router(root, schema=SCHEMA, replicate=url, nodes=["n1", "n2"]) as router:
        for key in keys:
            write(router, key, f"{key} data")
        data = {key: rows(router, key) for key in keys}
    replicator_script = write_script(tmp_path, "replicator.py", REPLICATOR)

    def replicator() -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, str(replicator_script), "--root", root, "replicate", "run",
                                 "--interval", "0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                text=True, env=env)

    target = make_replica_target()
    running = replicator()
    dropper: subprocess.Popen[str] | None = None
    acked: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not _snapshot_times(target):  # its first round: every tenant captured, then the snapshot
            assert time.monotonic() < deadline and running.poll() is None
            time.sleep(0.05)
        dropper = spawn(write_script(tmp_path, "dropper.py", DROPPER), root, ",".join(victims), env=env)
        assert dropper.stdout is not None
        for _ in range(rng.randint(3, 6)):
            acked.append(dropper.stdout.readline().split()[1])
        running.send_signal(signal.SIGKILL)  # the replicator dies while drops go on
        running.wait()
        for _ in range(rng.randint(2, 5)):
            acked.append(dropper.stdout.readline().split()[1])
        middle = time.time_ns()  # no replicator, one metadata snapshot (older than every drop)
        running = replicator()  # a new one (its first round takes a second snapshot), drops still going on
        for _ in range(rng.randint(1, 3)):
            acked.append(dropper.stdout.readline().split()[1])
        time.sleep(rng.uniform(0.0, 0.02))
        dropper.send_signal(signal.SIGKILL)  # the dropping process dies anywhere in its next drop
        dropper.wait()
        with shardlite.Router(root, schema=SCHEMA, create=False) as router:
            half_done = [key for key in victims if (r := router._store.meta.tenants.lookup(key)) is not None
                         and r.state == "dropping"]
            for key in half_done:  # a drop killed half-way is finished by dropping again
                router.drop(key)
            dropped = [key for key in victims
                       if router._store.meta.tenants.lookup(key).state == "dropped"]  # type: ignore[union-attr]
            assert set(acked) <= set(dropped)
            deadline = time.monotonic() + 120
            # its first round ships the drop records, then takes its metadata snapshot: wait for both
            while replication.status(router._store)["total"]["drops_staged"] or len(_snapshot_times(target)) < 2:
                assert time.monotonic() < deadline, "the restarted replicator did not ship the drop records"
                time.sleep(0.05)
    finally:
        for proc in (running, dropper):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                for stream in (proc.stdout, proc.stderr):
                    if stream is not None:
                        stream.close()
    records = {d.key: d.dropped_ns for d in _drops(target)}
    assert sorted(records) == sorted(dropped)
    first_snapshot = _snapshot_times(target)[0]
    assert first_snapshot < min(records.values()) and len(_snapshot_times(target)) == 2
    assert any(t <= middle for t in records.values())  # some drops lie between the snapshots
    at_middle = _restored(target, tmp_path / "middle", middle)
    assert at_middle == {key: data[key] for key in keys if records.get(key, middle + 1) > middle}
    assert _restored(target, tmp_path / "latest") == {key: data[key] for key in keys if key not in records}
    ran = run_script("--root", root, "replicate", "status", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    assert not set(dropped) & set(msgspec.json.decode(ran.stdout)["tenants"])
