"""Retention and compaction of a replica end to end, on both targets (file:// and SeaweedFS): random histories
replicated over many packs, compacted with an explicit clock that puts the window start in the middle of them;
every restore inside the window gives exactly the image it gave before, earlier times are refused, a prefix
window keeps more, a dropped tenant past its window goes, a second compaction changes nothing, the index
spares a one-tenant restore the headers of packs without the tenant, and a compaction killed (SIGKILL) at any
step and run again ends the same."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from helpers_s3 import CountingTarget, TargetFactory, crashing_target_code
from helpers_wal import rows_of

import shardlite
from shardlite.core import keyindex, retention, rollup, timeline
from shardlite.errors import ConfigurationError, UnknownTenant
from shardlite.files.staging import Staging
from shardlite.meta.replica_record import record_windows
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_index, replica_meta_read, replica_read, replica_restore, replica_retention
from shardlite.services.replication import Replication

SCHEMA = {prefix: ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body BLOB)"] for prefix in ("user", "dm")}
KEYS = ["user:1", "user:2", "dm:1", "user:gone"]
DAY = retention.DAY_NS


class World:
    """A replicated root with a recorded history: for each key, (time after a commit, rows after it)."""

    def __init__(self, root: str, url: str, target: ReplicaTarget, seed: int) -> None:
        self.root, self.url = root, url
        self.router = shardlite.Router(root, schema=SCHEMA, replicate=url)
        self.target = target
        self.replication = Replication(self.router._store, target)
        self.states: dict[str, list[tuple[int, list[tuple[object, ...]]]]] = {k: [] for k in KEYS}
        self.rng = random.Random(seed)

    def write(self, key: str) -> None:
        rng = self.rng
        with self.router.transaction(key) as tx:
            tx.execute("INSERT OR REPLACE INTO notes(id, body) VALUES (?, randomblob(?))",
                       (rng.randint(0, 40), rng.randint(0, 3000)))
            if rng.random() < 0.2:
                tx.execute("DELETE FROM notes WHERE id % 5 = ?", (rng.randint(0, 4),))
        rows = [tuple(r) for r in self.router.query(key, "SELECT id, body FROM notes ORDER BY id")]
        self.states[key].append((time.time_ns(), rows))

    def history(self, rounds: int) -> None:
        for number in range(rounds):
            for _ in range(self.rng.randint(1, 4)):
                key = self.rng.choice(KEYS[:3] if number > rounds // 4 else KEYS)
                self.write(key)
            if number == rounds // 4 and self.states["user:gone"]:
                self.router.drop("user:gone")
            self.replication.run_round()
        self.replication.run_round()

    def close(self) -> None:
        self.replication.close()
        self.router.close()


def _rows(target: ReplicaTarget, key: str, at: int) -> list[tuple[object, ...]] | None:
    found = timeline.image_at(replica_read.captures_of(target, [key])[key], at)
    return None if found is None else rows_of(found[0], "SELECT id, body FROM notes ORDER BY id")


@pytest.fixture
def world(tmp_path: os.PathLike[str], make_replica_target: TargetFactory) -> Iterator[World]:
    url = make_replica_target.url()
    made = World(os.path.join(tmp_path, "root"), url, make_replica_target(), seed=7)
    yield made
    made.close()


def _window_start_inside(world: World) -> tuple[int, int]:
    """A clock 7 days after the middle of user:1's history: (now, its window start)."""
    times = [t for t, _ in world.states["user:1"]]
    start = times[len(times) // 2] + 1
    return start + 7 * DAY, start


def test_compaction_keeps_every_restore_inside_the_window(world: World) -> None:
    world.history(24)
    store, target = world.router._store, world.target
    record_windows(store.meta.kv, retention.Windows(prefixes={"dm:": 30 * DAY}))
    packs_before = len(list(replica_read.list_packs(target)))
    before = {key: {t: _rows(target, key, t) for t, _rows_ in states} for key, states in world.states.items()}
    for key in KEYS[:3]:  # the replica was exact before compaction (from each key's first capture on: commits
        states = world.states[key]  # before it were not captured one by one)
        for t, rows in states:
            assert before[key][t] in (rows, None), (key, t)
        assert before[key][states[-1][0]] == states[-1][1]
    assert replica_read.captures_of(target, ["user:gone"])["user:gone"]  # dropped: its history stays for now
    now, start = _window_start_inside(world)
    report = replica_retention.compact(store, target, now_ns=now)
    assert report.deleted_packs > 0 and report.snapshots > 0 and report.pinned == []
    assert report.rolled_packs > 0 and report.rollup_parts  # what stays of the numbered packs is joined
    assert len(list(replica_read.list_packs(target))) == (packs_before - report.deleted_packs - report.rolled_packs
                                                          + len(report.written) + len(report.rollup_parts))
    for key in ("user:1", "user:2"):
        for t, _after_t in world.states[key]:
            if t >= start:
                assert _rows(target, key, t) == before[key][t], (key, t)
        early = [t for t, _ in world.states[key] if t < start]
        if early:
            with pytest.raises(ConfigurationError, match="before the retention window"):
                replica_restore.restore_tenant(store, target, key, as_key=f"{key}:old", at_ns=early[0])
    for t, _rows_dm in world.states["dm:1"]:  # a 30-day prefix window: everything is still there
        assert _rows(target, "dm:1", t) == before["dm:1"][t]
    with pytest.raises(UnknownTenant):  # dropped, past its window: nothing of it is restored
        replica_restore.restore_tenant(store, target, "user:gone", as_key="user:gone-again")
    # through the real restore path, at the window start itself
    done = replica_restore.restore_tenant(store, target, "user:1", as_key="user:1:at-start", at_ns=start)
    expected = [rows for t, rows in world.states["user:1"] if t <= start][-1]
    assert [tuple(r) for r in world.router.query("user:1:at-start", "SELECT id, body FROM notes ORDER BY id")] \
        == expected
    assert done["commit_ns"] <= start
    with pytest.raises(ConfigurationError, match="whole root"):
        replica_restore.materialize(target, os.path.join(world.root, "..", "whole"), start - 1)
    # a second compaction at the same time: nothing more to do
    again = replica_retention.compact(store, target, now_ns=now)
    assert (again.snapshots, again.deleted_packs) == (0, 0)
    # the history goes on after the compaction's snapshots, and the latest state is exact
    for key in ("user:1", "user:2"):
        world.write(key)
    world.replication.run_round()
    for key in ("user:1", "user:2"):
        assert _rows(target, key, time.time_ns()) == world.states[key][-1][1]
    # the staging's pack list lost the deleted packs (the newest row stays: sequences are never reused)
    node = world.router.nodes.list()[0].name
    staging = Staging(store.node_path(node))
    try:
        names = [row[1] for row in staging.packs()]
    finally:
        staging.close()
    assert len(names) < packs_before
    # every row names a pack still there but the one kept for its sequence number (its pack joined a rollup)
    assert len([name for name in names if target.head(name) is None]) <= 1


def _holding(target: ReplicaTarget, key: str) -> set[str]:
    return {name for name, size in replica_read.list_packs(target)
            if any(e.key == key for e in replica_read.read_header(target, name, size).header.entries)}


def test_the_index_spares_a_one_tenant_restore_every_other_header(world: World) -> None:
    world.history(16)
    store, target = world.router._store, world.target
    for _ in range(8):  # packs holding dm:1 only
        world.write("dm:1")
        world.replication.run_round()
    now, _start = _window_start_inside(world)
    expected = {key: _rows(target, key, time.time_ns()) for key in ("user:1", "user:2", "dm:1")}
    replica_retention.compact(store, target, now_ns=now)
    indexed = {name for name, _ in replica_read.list_packs(target)}
    for key in ("user:2", "user:1"):
        world.write(key)  # a pack after the base index: listed past its coverage and read through its header
    world.replication.run_round()
    expected["user:1"], expected["user:2"] = world.states["user:1"][-1][1], world.states["user:2"][-1][1]
    packs = list(replica_read.list_packs(target))
    [(base, _size)] = list(target.list(replica_index.BASE_PREFIX))
    tail = [name for name, _ in packs if name not in indexed]
    assert len(tail) == 1
    for key, rows in expected.items():
        counting = CountingTarget(target)
        assert _rows(counting, key, time.time_ns()) == rows  # type: ignore[arg-type]
        assert counting.headers == len(_holding(target, key) | set(tail)), key
    # the replicator's segment covers the packs shipped since: then only packs holding the key are read
    written = replica_retention.refresh_index(store, target, now_ns=now)
    assert written is not None and written.startswith(replica_index.SEGMENT_PREFIX)
    assert replica_retention.refresh_index(store, target, now_ns=now) is None  # nothing shipped since
    for key, rows in expected.items():
        counting = CountingTarget(target)
        assert _rows(counting, key, time.time_ns()) == rows  # type: ignore[arg-type]
        assert counting.headers == len(_holding(target, key)), key
    # a damaged segment is ignored (the base's coverage, the tail read); a damaged base: every header read
    blob = bytearray(target.get(written))
    blob[-3] ^= 0xFF
    target.put(written, bytes(blob))
    for key, rows in expected.items():
        counting = CountingTarget(target)
        assert _rows(counting, key, time.time_ns()) == rows  # type: ignore[arg-type]
        # (every header, after the packs the base named were started: a damaged section is met meanwhile)
        assert counting.headers == len(_holding(target, key)) or counting.headers >= len(packs), key
    target.put(base, b"SLKIDX1\n" + b"\0" * 24)
    for key, rows in expected.items():
        counting = CountingTarget(target)
        assert _rows(counting, key, time.time_ns()) == rows  # type: ignore[arg-type]
        assert counting.headers == len(packs), key


def test_a_compaction_killed_at_any_step_and_run_again_ends_the_same(
        tmp_path: os.PathLike[str], make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    world = World(os.path.join(tmp_path, "root"), url, make_replica_target(), seed=11)
    try:
        world.history(16)
        target = world.target
        now, start = _window_start_inside(world)
        inside = {key: [(t, rows) for t, rows in world.states[key] if t >= start] for key in ("user:1", "user:2")}
        root = world.root
    finally:
        world.close()
    codes = []
    # after the compaction pack written, each rollup part (small parts: several), the run's marker, the horizon,
    # the index, each delete
    for crash_at in range(1, 10):
        code = (
            crashing_target_code("put", "delete_many") +
            "from shardlite.core import rollup\n"
            "from shardlite.services import replica_retention\n"
            "rollup.PART_HEADER = 2048\n"
            "router = shardlite.Router(sys.argv[1])\n"
            "replica_retention.compact(router._store, target, now_ns=int(sys.argv[4]))\n"
        )
        proc = subprocess.run([sys.executable, "-c", code, root, url, str(crash_at), str(now)],
                              capture_output=True, timeout=120, env=os.environ.copy())
        assert proc.returncode in (-9, 0), proc.stderr.decode()[-2000:]
        codes.append(proc.returncode)
        target = make_replica_target()
        for key, states in inside.items():
            for t, rows in states:
                assert _rows(target, key, t) == rows, (crash_at, key)
    assert codes.count(-9) >= 4  # killed at successive steps of successive runs (a run after a kill has less to do)
    router = shardlite.Router(root)
    try:
        target = make_replica_target()
        replica_retention.compact(router._store, target, now_ns=now)
        again = replica_retention.compact(router._store, target, now_ns=now)
        assert (again.snapshots, again.deleted_packs, again.rolled_packs) == (0, 0, 0)
        listing = rollup.sort_out(target.list(replica_read.PACKS_PREFIX))
        assert listing.hidden == [] and listing.spent == []  # nothing left over from the killed runs
        assert not [name for name, _size in listing.packs if keyindex.pack_seq(name) is not None]  # all joined
        for key, states in inside.items():
            for t, rows in states:
                assert _rows(target, key, t) == rows
    finally:
        router.close()


def test_metadata_snapshots_outside_the_window_go_but_the_base_one(tmp_path: os.PathLike[str]) -> None:
    from shardlite.core import metasnap
    from shardlite.replica.target import open_target

    target = open_target(f"file://{os.path.join(tmp_path, 'rep')}")
    for t in (10, 20, 30, 40, 50):
        target.put(metasnap.object_name(t * DAY), b"x")
    assert replica_meta_read.prune(target, 35 * DAY) == 2
    assert [metasnap.time_of(n) for n, _ in target.list(metasnap.PREFIX)] == [30 * DAY, 40 * DAY, 50 * DAY]
    target.close()


def test_a_dropped_tenant_past_its_window_is_not_restored_from_a_pack_kept_for_another(world: World) -> None:
    """The first captures of two tenants (snapshots) share a pack; one is dropped. Past the window the pack
    stays (the other's snapshot is its base, and most of the pack: it is not copied), but nothing of the
    dropped one is restored from it; the pack that holds only the drop's record goes (nothing it ends is
    restorable any more)."""
    for _ in range(12):
        world.write("user:1")
    world.write("user:gone")
    world.replication.run_round()
    world.router.drop("user:gone")
    world.replication.run_round()
    store, target = world.router._store, world.target
    packs = [name for name, _size in replica_read.list_packs(target)]
    assert len(packs) == 2  # the second holds the drop record alone
    sizes = {e.key: e.length for e in replica_read.read_header(target, packs[0], dict(
        replica_read.list_packs(target))[packs[0]]).header.entries}
    assert sizes["user:1"] > sizes["user:gone"]
    now = time.time_ns() + 8 * DAY
    report = replica_retention.compact(store, target, now_ns=now)
    assert report.deleted_packs == 1 and report.snapshots == 0
    assert [name for name, _size in replica_read.list_packs(target)] == packs[:1]
    assert replica_read.captures_of(target, ["user:gone"])["user:gone"]  # still in the kept pack...
    with pytest.raises(UnknownTenant):  # ...but not restored
        replica_restore.restore_tenant(store, target, "user:gone", as_key="user:gone-again")
    done = replica_restore.restore_tenant(store, target, "user:1", as_key="user:1-again")
    assert done["from_key"] == "user:1"


def test_compaction_never_writes_a_snapshot_of_an_erased_history(world: World) -> None:
    """An erase tombstone (``v1/erased/<xxh3-128 of the incarnation>.erased``, tenants drop --erase) makes
    compaction treat the history as gone: no base snapshot of it, its packs deleted once nothing else needs
    them."""
    from shardlite.core import pack

    world.history(12)
    store, target = world.router._store, world.target
    incarnations = {c.entry.incarnation for c in replica_read.captures_of(target, ["user:2"])["user:2"]}
    assert incarnations
    for inc in incarnations:
        target.put(replica_read.tombstone_name(inc), b"{}")
    report = replica_retention.compact(store, target, now_ns=time.time_ns() + 8 * DAY)
    assert report.snapshots > 0
    for name in report.written:
        header, _at = pack.decode_header(target.get(name))
        assert "user:2" not in {entry.key for entry in header.entries}
        assert "user:1" in {entry.key for entry in header.entries}
    left = replica_read.captures_of(target, ["user:2"])["user:2"]
    assert all(c.entry.kind == "frames" or c.order[1] != 0 for c in left)  # nothing compaction wrote


def test_the_replicator_compacts_when_the_last_compaction_is_an_hour_old(world: World) -> None:
    world.history(8)
    target = world.target
    assert world.replication.compactions == []  # a new replica: first compaction an hour after its first snapshot
    old = time.time_ns() - int(replica_retention.COMPACT_EVERY * 1e9) - 1
    replica_index.write_horizon(target, old, retention.Windows())
    world.replication.run_round()
    assert world.replication.compactions == []  # checked at most every COMPACT_EVERY / 12 seconds
    world.replication._compact_checked = None
    world.replication.run_round()
    assert len(world.replication.compactions) == 1
    horizon = replica_index.read_horizon(target)
    assert horizon is not None and horizon.compacted_ns > old
    world.replication._compact_checked = None
    world.replication.run_round()
    assert len(world.replication.compactions) == 1  # not due again for an hour
