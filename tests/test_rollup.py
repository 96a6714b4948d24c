"""Rollups in a compaction (shardlite.services.compact_rollup, core/rollup.py), on both targets: a compaction an
hour or more after the writes joins the numbered packs into parts, and every restore point of every tenant
stays, read once (no capture twice), through the key index and through a whole-root read; a one-tenant
restore reads only the parts holding it; drop records move with the run; an erase reaches the parts; a kill -9
after each write of a compaction (directory target, from copies) leaves every capture visible exactly once,
and the next compaction cleans up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from helpers_s3 import CountingTarget, TargetFactory, copy_replicated, crashing_target_code
from test_retention import KEYS, World, _holding, _rows

import shardlite
from shardlite.core import keyindex, pack, retention, rollup, timeline
from shardlite.meta.replica_record import record_windows
from shardlite.replica.target import ReplicaTarget, open_target
from shardlite.services import compact_rollup, compact_scan, replica_index, replica_read, replica_retention

HOUR = 3600 * 10**9


def _numbered(target: ReplicaTarget) -> list[str]:
    return [name for name, _size in replica_read.list_packs(target) if keyindex.pack_seq(name) is not None]


def _once(target: ReplicaTarget, key: str) -> None:
    """No capture of ``key`` is read twice (a run's parts and the numbered packs it superseded)."""
    caps = replica_read.captures_of(target, [key])[key]
    seen = Counter((c.entry.incarnation, c.entry.generation, c.entry.kind, c.entry.salt, c.entry.first, c.entry.last)
                   for c in caps)
    assert [ident for ident, count in seen.items() if count > 1] == [], key


def _headers(target: ReplicaTarget) -> list[pack.Header]:
    """The headers of the packs readers read."""
    return [replica_read.read_header(target, name, size).header for name, size in replica_read.list_packs(target)]


def _drops(target: ReplicaTarget) -> list[tuple[str, int]]:
    return sorted((d.key, d.dropped_ns) for header in _headers(target) for d in header.drops)


def test_a_rollup_keeps_every_restore_point_and_replaces_the_numbered_packs(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    world = World(str(tmp_path / "root"), make_replica_target.url(), make_replica_target(), seed=3)
    try:
        world.history(20)
        store, target = world.router._store, world.target
        before = {key: {t: _rows(target, key, t) for t, _rows_t in states} for key, states in world.states.items()}
        numbered, drops = _numbered(target), _drops(target)
        assert len(numbered) > 10 and drops
        now = time.time_ns() + 2 * HOUR  # everything an hour old or more, all inside the 7-day window
        report = replica_retention.compact(store, target, now_ns=now)
        assert report.deleted_packs == 0 and report.snapshots == 0
        assert report.rolled_packs == len(numbered) and report.rollup_parts
        assert _numbered(target) == [] and _drops(target) == drops
        for key, states in world.states.items():
            for t, _rows_t in states:
                assert _rows(target, key, t) == before[key][t], (key, t)
            _once(target, key)
            counting = CountingTarget(target)
            assert _rows(counting, key, time.time_ns()) == before[key][states[-1][0]]  # type: ignore[arg-type]
            assert counting.headers == len(_holding(target, key)), key  # the parts holding it, nothing else
        # a whole-root read sees the same captures as the one-tenant reads
        every = replica_read.captures_of(target, None)
        for key in KEYS:
            assert sorted(c.entry.digest for c in every.get(key, [])) == sorted(
                c.entry.digest for c in replica_read.captures_of(target, [key])[key])
        again = replica_retention.compact(store, target, now_ns=now)
        assert (again.rolled_packs, again.rollup_parts, again.deleted_packs) == (0, [], 0)
        # the history goes on in numbered packs after the parts
        for key in ("user:1", "user:2"):
            world.write(key)
        world.replication.run_round()
        for key in ("user:1", "user:2"):
            assert _rows(target, key, time.time_ns()) == world.states[key][-1][1]
        # an erase reaches the parts (and the marker keeps the run read: its other parts stay)
        world.router.drop("user:2", erase=True)
        assert replica_read.captures_of(target, ["user:2"])["user:2"] == []
        for key in ("user:1", "dm:1"):
            assert _rows(target, key, time.time_ns()) == world.states[key][-1][1]
    finally:
        world.close()


_COMPACT_KILLED = crashing_target_code("put", "delete_many") + (
    "from shardlite.core import rollup\n"
    "from shardlite.services import replica_retention\n"
    "rollup.PART_HEADER = 2048\n"  # several parts
    "router = shardlite.Router(sys.argv[1])\n"
    "replica_retention.compact(router._store, target, now_ns=int(sys.argv[4]))\n")


def test_a_compaction_killed_after_each_write_leaves_every_capture_read_once(tmp_path: Path) -> None:
    """From the same root and replica (copied aside; a directory target), a compaction killed after each of its
    writes in turn: every restore point is still there, no capture is read twice, and the next compaction
    leaves nothing over (no unmarked part, no superseded pack, no spent marker)."""
    first = tmp_path / "first"
    url = "file://" + str(first / "replica")
    world = World(str(first / "root"), url, open_target(url), seed=5)
    try:
        world.history(16)
        expected = {key: {t: _rows(world.target, key, t) for t, _r in states} for key, states in world.states.items()}
    finally:
        world.close()
    now = time.time_ns() + 2 * HOUR
    kills = 0
    for kill_after in range(1, 40):
        case = tmp_path / f"kill-{kill_after}"
        case_url = copy_replicated(first, case)
        ran = subprocess.run([sys.executable, "-c", _COMPACT_KILLED, str(case / "root"), case_url, str(kill_after),
                              str(now)], capture_output=True, timeout=120, env=os.environ.copy())
        assert ran.returncode in (-9, 0), ran.stderr.decode()[-2000:]
        target = open_target(case_url)
        for key, at in expected.items():
            for t, rows in at.items():
                assert _rows(target, key, t) == rows, (kill_after, key, t)
            _once(target, key)
        if ran.returncode == 0:
            break  # no write left to kill after: the compaction ran whole
        kills += 1
        with shardlite.Router(case / "root") as router:
            replica_retention.compact(router._store, target, now_ns=now)
        listing = rollup.sort_out(target.list(replica_read.PACKS_PREFIX))
        assert (listing.hidden, listing.spent) == ([], []), kill_after
        assert _numbered(target) == [], kill_after
        for key, at in expected.items():
            for t, rows in at.items():
                assert _rows(target, key, t) == rows, (kill_after, key, t)
            _once(target, key)
        shutil.rmtree(case)
    assert kills >= 6  # parts, the marker, horizon, index, the deletes: each write was a kill point


def test_a_rollup_leaves_out_what_an_erase_tombstone_names(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """Captures of an incarnation with an erase tombstone (an erase's in-flight captures, shipped after it) are
    not carried into the parts."""
    world = World(str(tmp_path / "root"), make_replica_target.url(), make_replica_target(), seed=9)
    try:
        world.history(8)
        store, target = world.router._store, world.target
        [incarnation] = {c.entry.incarnation for c in replica_read.captures_of(target, ["user:1"])["user:1"]}
        target.put(replica_read.tombstone_name(incarnation), b"")
        report = replica_retention.compact(store, target, now_ns=time.time_ns() + 2 * HOUR)
        assert report.rolled_packs and report.rollup_parts
        held = {e.incarnation for header in _headers(target) for e in header.entries}
        assert incarnation not in held and held
    finally:
        world.close()


def _summary(newest: int, drops: int = 0) -> compact_scan.Summary:
    return compact_scan.Summary(newest, b"", b"".join(n.to_bytes(8, "big") for n in range(drops)))


def test_a_run_ends_at_a_pack_the_plan_deletes_and_at_too_many_drop_records() -> None:
    """A run's marker hides every numbered pack of its range at once, so a pack the plan deletes ends the run
    (a restore may still need what that pack's neighbours hold); and a run holds at most half of MAX_DROPS drop
    records (more would make its first part invalid, and every later compaction fail on it)."""
    old = time.time_ns() - 3 * HOUR
    names = [(f"v1/packs/n1/{seq:020d}.pack", 100) for seq in range(1, 9)]
    summaries = {name: _summary(old) for name, _ in names}
    runs = compact_rollup.choose(names, summaries, final=lambda _n: True, now_ns=time.time_ns(),
                                 deleting={names[3][0]})
    assert [(r.first, r.last, len(r.packs)) for r in runs] == [(1, 3, 3), (5, 8, 4)]
    heavy = {name: _summary(old, pack.MAX_DROPS // 5) for name, _ in names}
    runs = compact_rollup.choose(names, heavy, final=lambda _n: True, now_ns=time.time_ns(), deleting=set())
    assert [(r.first, r.last) for r in runs] == [(1, 2), (3, 4), (5, 6), (7, 8)]


def test_drop_records_past_max_drops_are_spread_over_parts(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(pack, "MAX_DROPS", 4)
    target = open_target("file://" + str(tmp_path / "replica"))
    names = []
    for seq in (1, 2, 3):
        drops = [pack.Drop(f"user:{seq}-{n}", "i" * 32, 1, 1000 + n) for n in range(3)]
        names.append((f"v1/packs/n1/{seq:020d}.pack", len(blob := pack.encode("n1", seq, 1000, [], drops))))
        target.put(names[-1][0], blob)
    done = compact_rollup.roll(target, compact_rollup.Run("v1/packs/n1/", 1, 3, names), 5000, lambda _inc: False)
    assert len(done.parts) == 3  # 9 drop records, 4 a part, no captures
    held = sorted(d.key for name, size, _keys in done.parts
                  for d in replica_read.read_header(target, name, size).header.drops)
    assert held == sorted(f"user:{seq}-{n}" for seq in (1, 2, 3) for n in range(3))
    assert [name for name, _ in replica_read.list_packs(target)] == [name for name, _s, _k in done.parts]


def test_a_snapshot_sorted_before_the_capture_it_ends_does_not_hide_that_capture_s_commits() -> None:
    """A compaction's base snapshot sorts before the capture whose end it stands for: a restore at a time inside
    that capture still reaches the commit at or before the time (not the one before the capture)."""
    salt = "00000000000000aa"
    first = pack.Entry("a:1", "i", 1, "snapshot", 512, salt, 0, 3, [(3, 100)], 101, 0, 512, "0" * 32)
    frames = pack.Entry("a:1", "i", 1, "frames", 512, salt, 4, 9, [(5, 200), (7, 280), (9, 300)], 301, 0,
                        6 * (24 + 512), "0" * 32)
    base = pack.Entry("a:1", "i", 1, "snapshot", 512, salt, 0, 9, [(9, 300)], 301, 0, 512, "0" * 32)
    before = [timeline.Capture((101, 1, 0), first, b""), timeline.Capture((301, 2, 0), frames, b"")]
    after = [*before, timeline.Capture((301, 0, 0), base, b"")]
    for at in (150, 200, 285, 300, 400):
        assert timeline.point_at(after, at) == timeline.point_at(before, at), at
    assert timeline.point_at(after, 285).frame == 7


def test_a_restore_reads_the_parts_of_a_node_folder_no_tail_lists(tmp_path: Path) -> None:
    """A node gone from the catalog, with no key index node marker (a legacy replicator): once its packs are all
    joined, no tail lists its folder, yet the parts the index names for the key are read (their markers too)."""
    url = "file://" + str(tmp_path / "replica")
    world = World(str(tmp_path / "root"), url, open_target(url), seed=3)
    try:
        world.history(12)
        store, target = world.router._store, world.target
        want = _rows(target, "user:1", time.time_ns())
        now = time.time_ns() + 2 * HOUR
        assert replica_retention.compact(store, target, now_ns=now).rollup_parts
        nodes = store.meta.nodes

        class NoNodes:
            def __getattr__(self, name: str) -> Any:
                return getattr(nodes, name)

            def list(self) -> list[Any]:
                return []

        store.meta.nodes = NoNodes()  # type: ignore[assignment]
        try:
            replica_retention.compact(store, target, now_ns=now + 60 * 10**9)
        finally:
            store.meta.nodes = nodes  # type: ignore[assignment]
        target.delete_many([name for name, _ in target.list(replica_index.NODE_PREFIX)])
        found = replica_index.candidates(target, {"user:1"}, replica_index.readers())
        assert found is not None and found.packs and all(rollup.parse(name) for name in found.packs)
        assert _rows(target, "user:1", time.time_ns()) == want
    finally:
        world.close()


def test_a_restore_that_read_a_base_older_than_a_compaction_reads_the_newer_one(tmp_path: Path) -> None:
    """A restore that listed the key index before a compaction wrote a new base and deleted a rollup's range of
    packs (more than a tail block) must not stop its tail at that gap: it notices the newer base and uses it."""
    url = "file://" + str(tmp_path / "replica")
    world = World(str(tmp_path / "root"), url, open_target(url), seed=4)
    try:
        store, target = world.router._store, world.target
        world.write("user:1")
        world.replication.run_round()
        first = time.time_ns()
        replica_retention.compact(store, target, now_ns=first)  # a base covering the first pack
        [(old_base, _size)] = list(target.list(replica_index.BASE_PREFIX))
        old_bytes = target.get(old_base)
        for _ in range(3 * replica_index.TAIL_BLOCK):  # more packs than the tail blocks listed at once, joined below
            world.write("user:2")
            world.replication.run_round()
        report = replica_retention.compact(store, target, now_ns=time.time_ns() + 2 * HOUR)
        assert report.rolled_packs > replica_index.TAIL_BLOCK
        world.write("user:1")  # a pack past the gap the rollup left
        world.replication.run_round()
        want = world.states["user:1"][-1][1]
        target.put(old_base, old_bytes)  # the base the restore listed first (a listing from before)
        listings = {"n": 0}
        real_list = target.list

        def listing(prefix: str = "") -> Any:
            if prefix == replica_index.KEYINDEX_PREFIX and listings["n"] == 0:
                listings["n"] += 1
                return iter([(old_base, len(old_bytes))])
            return real_list(prefix)

        last = max(name for name, _size in replica_read.list_packs(target) if keyindex.pack_seq(name))
        target.list = listing  # type: ignore[method-assign]
        found = replica_index.candidates(target, {"user:1"}, replica_index.readers())
        assert found is not None and listings["n"] == 1
        assert last in found.packs  # the pack past the gap, holding the last write
        listings["n"] = 0
        assert _rows(target, "user:1", time.time_ns()) == want
    finally:
        world.close()


def test_a_rollup_leaves_out_a_dropped_tenant_past_its_window(tmp_path: Path,
                                                              make_replica_target: TargetFactory) -> None:
    """A dropped tenant past its window whose captures stay in packs kept for another (a longer window): the
    horizon makes restores ignore them, and a rollup of those packs does not carry them."""
    world = World(str(tmp_path / "root"), make_replica_target.url(), make_replica_target(), seed=6)
    try:
        store, target = world.router._store, world.target
        record_windows(store.meta.kv, retention.Windows(prefixes={"dm:": 30 * retention.DAY_NS}))
        for _ in range(4):
            world.write("dm:1")
            world.write("user:gone")
            world.replication.run_round()
        world.router.drop("user:gone")
        world.replication.run_round()
        report = replica_retention.compact(store, target, now_ns=time.time_ns() + 8 * retention.DAY_NS)
        assert report.rolled_packs >= 2
        held = {e.key for header in _headers(target) for e in header.entries}
        assert "dm:1" in held and "user:gone" not in held
        assert _rows(target, "dm:1", time.time_ns()) == world.states["dm:1"][-1][1]
    finally:
        world.close()


def test_a_run_with_a_damaged_pack_is_left_as_it_is_and_the_compaction_goes_on(tmp_path: Path,
                                                                               monkeypatch: Any) -> None:
    """A pack whose payload is damaged (its header reads; a capture's bytes fail their digest): its run is not
    joined and the compaction reports it, the other runs are joined, and every restore point the damage
    leaves is kept (a failure of one pack never stops retention for the root)."""
    url = "file://" + str(tmp_path / "replica")
    world = World(str(tmp_path / "root"), url, open_target(url), seed=8)
    try:
        world.history(10)
        store, target = world.router._store, world.target
        numbered = _numbered(target)
        damaged = numbered[1]
        blob = bytearray(target.get(damaged))
        blob[-1] ^= 0xFF  # the last capture's bytes
        target.put(damaged, bytes(blob))
        # two runs (as if the plan deleted the sixth pack): the damaged pack's, and one after it
        runs = compact_rollup.choose(replica_read.list_packs(target), {name: _summary(0) for name in numbered},
                                     final=lambda _n: True, now_ns=time.time_ns(), deleting={numbered[5]})
        assert len(runs) == 2 and damaged in dict(runs[0].packs)
        monkeypatch.setattr(compact_rollup, "choose", lambda *_a, **_k: runs)
        report = replica_retention.compact(store, target, now_ns=time.time_ns() + 2 * HOUR)
        assert list(report.rollups_skipped) == [runs[0].packs[0][0]] and "digest" in report.rollups_skipped[
            runs[0].packs[0][0]]
        assert report.rolled_packs == len(runs[1].packs) and report.rollup_parts
        left = _numbered(target)
        assert damaged in left and not set(dict(runs[1].packs)) & set(left)
        assert rollup.sort_out(target.list(replica_read.PACKS_PREFIX)).hidden == []
    finally:
        world.close()
