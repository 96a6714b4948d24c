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

from helpers_s3 import CountingTarget, TargetFactory, copy_replicated, crashing_target_code
from test_retention import KEYS, World, _holding, _rows

import shardlite
from shardlite.core import keyindex, rollup
from shardlite.replica.target import ReplicaTarget, open_target
from shardlite.services import replica_read, replica_retention

HOUR = 3600 * 10**9


def _numbered(target: ReplicaTarget) -> list[str]:
    return [name for name, _size in replica_read.list_packs(target) if keyindex.pack_seq(name) is not None]


def _once(target: ReplicaTarget, key: str) -> None:
    """No capture of ``key`` is read twice (a run's parts and the numbered packs it superseded)."""
    caps = replica_read.captures_of(target, [key])[key]
    seen = Counter((c.entry.incarnation, c.entry.generation, c.entry.kind, c.entry.salt, c.entry.first, c.entry.last)
                   for c in caps)
    assert [ident for ident, count in seen.items() if count > 1] == [], key


def _drops(target: ReplicaTarget) -> list[tuple[str, int]]:
    return sorted((d.key, d.dropped_ns) for name, size in replica_read.list_packs(target)
                  for d in replica_read.read_header(target, name, size).header.drops)


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
        held = {e.incarnation for name, size in replica_read.list_packs(target)
                for e in replica_read.read_header(target, name, size).header.entries}
        assert incarnation not in held and held
    finally:
        world.close()
