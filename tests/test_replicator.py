"""The node replicator end to end on a directory target: tenants captured, packed, uploaded, and read back
into the exact database of each tenant; busy tenants wait for the next round; big logs are checkpointed
by the replicator with the history continuing."""

from __future__ import annotations

import os
from collections.abc import Iterator

import apsw
import pytest
from helpers_s3 import TargetFactory
from helpers_wal import beside_writer, rows_of

import shardlite
from shardlite.core import timeline
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_read
from shardlite.services import replicator as replicator_module
from shardlite.services.replicator import NodeReplicator

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


def _live(router: shardlite.Router, key: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in router.query(key, "SELECT id, body FROM notes ORDER BY id")]


def _replicated(target: ReplicaTarget, key: str) -> list[tuple[object, ...]]:
    found = timeline.image_at(replica_read.captures_of(target, [key])[key])
    assert found is not None, f"{key} has no history in the replica"
    return rows_of(found[0], "SELECT id, body FROM notes ORDER BY id")


@pytest.fixture
def setup(tmp_path: os.PathLike[str], make_replica_target: TargetFactory) -> Iterator[
        tuple[shardlite.Router, NodeReplicator, ReplicaTarget]]:
    url = make_replica_target.url()
    router = shardlite.Router(os.path.join(tmp_path, "root"), schema=SCHEMA, replicate=url)
    target = make_replica_target()
    node = router.nodes.list()[0].name
    replicator = NodeReplicator(router._store, node, target)
    yield router, replicator, target
    replicator.close()
    router.close()


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


def test_a_round_ships_every_tenant(setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget]) -> None:
    router, replicator, target = setup
    keys = ["user:a", "user:b", "user:ü"]
    for i, key in enumerate(keys):
        for n in range(i + 2):
            _write(router, key, f"{key} {n}")
    assert replicator.reconcile() == 3
    stats = replicator.run_round()
    assert (stats.captured, stats.snapshots, stats.uploaded_packs, stats.failed) == (3, 3, 1, 0)
    assert [name for name, _size in replica_read.list_packs(target)] == [
        f"v1/packs/{replicator.node}/{1:020d}.pack"]
    for key in keys:
        assert _replicated(target, key) == _live(router, key)
    assert replicator.reconcile() == 0  # every tenant has its cursor now
    _write(router, "user:b", "later")
    replicator.mark("user:b")
    stats = replicator.run_round()
    assert (stats.captured, stats.snapshots, stats.uploaded_packs) == (1, 0, 1)  # frames, not a snapshot
    assert _replicated(target, "user:b") == _live(router, "user:b")
    assert replicator.staging.staged_count() == (0, 0)


def test_a_busy_tenant_waits_for_the_next_round(setup: tuple[shardlite.Router, NodeReplicator,
                                                             ReplicaTarget]) -> None:
    router, replicator, target = setup
    _write(router, "user:a", "one")
    _write(router, "user:b", "one")
    replicator.reconcile()
    path = router._store.path_of(router._store.meta.tenants.lookup("user:a"))  # type: ignore[arg-type]
    holder = apsw.Connection(path)
    holder.execute("BEGIN IMMEDIATE")
    try:
        stats = replicator.run_round()
        assert (stats.busy, stats.captured) == (1, 1)  # user:b did not wait for user:a
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    stats = replicator.run_round()
    assert (stats.busy, stats.captured) == (0, 1)
    assert _replicated(target, "user:a") == _live(router, "user:a")


def test_a_tenant_whose_write_lock_is_held_is_captured_without_it(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget]) -> None:
    """After its first capture (a snapshot, under the lock) a tenant's commits are captured without its write
    lock: a writer in the middle of a transaction neither waits for the replicator nor holds it up."""
    router, replicator, target = setup
    _write(router, "user:a", "one")
    replicator.reconcile()
    assert replicator.run_round().locked == 1  # the snapshot
    _write(router, "user:a", "two")
    path = router._store.path_of(router._store.meta.tenants.lookup("user:a"))  # type: ignore[arg-type]
    holder = apsw.Connection(path)
    holder.set_busy_timeout(0)
    holder.execute("BEGIN IMMEDIATE")
    try:
        holder.execute("INSERT INTO notes(body) VALUES ('uncommitted')")
        replicator.mark("user:a")
        stats = replicator.run_round()
        assert (stats.busy, stats.captured, stats.locked, stats.snapshots) == (0, 1, 0, 0)
        assert _replicated(target, "user:a") == _live(router, "user:a")
        holder.execute("INSERT INTO notes(body) VALUES ('after the capture')")  # the lock stayed the writer's
    finally:
        holder.execute("COMMIT")
        holder.close()
    replicator.mark("user:a")
    assert replicator.run_round().captured == 1
    assert _replicated(target, "user:a") == _live(router, "user:a")
    assert [body for _id, body in _live(router, "user:a")][-2:] == ["uncommitted", "after the capture"]


_OLD_WRITER = r"""
import sys, apsw
conn = apsw.Connection(sys.argv[1])
conn.execute("PRAGMA wal_autocheckpoint=40")  # a writer opened before the root replicated: it checkpoints
conn.set_busy_timeout(10000)
for i in range(int(sys.argv[2])):
    with conn:
        conn.execute("INSERT INTO notes(body) VALUES (?)", (f"old writer {i} " + "y" * (i % 5 * 900),))
print("done", flush=True)
"""


def _forget_connections(replicator: NodeReplicator) -> None:
    """Close every tenant connection the replicator keeps (as its ``KEEP_OPEN`` bound does at 5,000 tenants): its
    next capture of those tenants goes without a connection."""
    for key in list(replicator._open):
        replicator._close(key)


def test_a_tenant_without_a_kept_connection_is_captured_without_opening_one(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget], monkeypatch: pytest.MonkeyPatch) -> None:
    router, replicator, target = setup
    _write(router, "user:a", "one")
    replicator.reconcile()
    assert replicator.run_round().snapshots == 1  # the first capture opens a connection (and checks identity)
    _forget_connections(replicator)

    def no_connection(path: str) -> None:
        raise AssertionError(f"a connection of {path} was opened")

    monkeypatch.setattr(replicator_module, "_tenant_connection", no_connection)
    for n in range(3):
        _write(router, "user:a", f"more {n}")
    replicator.mark("user:a")
    stats = replicator.run_round()
    assert (stats.captured, stats.snapshots, stats.locked, stats.failed) == (1, 0, 0, 0)
    assert "capture.bare" in stats.phases and not replicator._open
    assert _replicated(target, "user:a") == _live(router, "user:a")


@pytest.mark.parametrize("kept", [True, False], ids=["kept-connection", "no-connection"])
def test_a_writer_that_still_checkpoints_leaves_no_hole(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget], kept: bool) -> None:
    """A writer process that checkpoints by itself (and so restarts the log under lock-free captures)
    while rounds run: captures fall back to the lock and to snapshots, and the replica ends equal to the
    tenant; also when the replicator keeps no connection of the tenant between rounds (its lock-free
    captures then open none)."""
    router, replicator, target = setup
    _write(router, "user:a", "first")
    replicator.reconcile()
    replicator.run_round()
    path = router._store.path_of(router._store.meta.tenants.lookup("user:a"))  # type: ignore[arg-type]
    # captures run in a process that holds no other connection of the file (the rule of walcapture.LogFiles):
    # when the replicator closes a log descriptor (a connection it stops keeping), every POSIX lock this
    # process holds on the file goes; with the router's connection still open, a connection opened next may
    # see itself alone and truncate the -shm the other has mapped (a SIGBUS here in a clean-clone CI run)
    assert router._store.pool.close_all() == []
    locked = [0]

    def step(_round: int) -> None:
        if not kept:
            _forget_connections(replicator)
        replicator.mark("user:a")
        stats = replicator.run_round()
        assert stats.failed == 0, stats.errors
        locked[0] += stats.locked

    rounds = beside_writer(_OLD_WRITER, [path, "2000"], step)
    replicator.mark("user:a")
    assert replicator.run_round().failed == 0
    assert rounds > 2 and locked[0] > 0  # the restarted logs were caught (a gap: a snapshot under the lock)
    _forget_connections(replicator)  # its log descriptors closed before the router opens the file again
    assert _replicated(target, "user:a") == _live(router, "user:a")


@pytest.mark.parametrize("kept", [True, False], ids=["kept-connection", "no-connection"])
def test_the_replicator_checkpoints_a_big_log_and_the_history_goes_on(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget], kept: bool) -> None:
    router, replicator, target = setup
    _write(router, "user:a", "first")
    replicator.reconcile()
    replicator.run_round()
    for n in range(1200):  # past DUE_FRAMES frames in the log
        _write(router, "user:a", f"row {n}" + "x" * 200)
    if not kept:  # captured without a connection, then one is opened for the checkpoint
        _forget_connections(replicator)
    replicator.mark("user:a")
    stats = replicator.run_round()
    assert stats.checkpoints == 1 and stats.snapshots == 0 and stats.locked == 0  # the lock: checkpoint only
    cursor = replicator.staging.cursor("user:a")
    assert cursor is not None and cursor.cursor.closed
    # marked again before any write (a late note, a reconcile pass): its log is still the full closed one, all
    # in the database file already, so no checkpoint (nor its write lock) is taken again
    replicator.mark("user:a")
    stats = replicator.run_round()
    assert (stats.checkpoints, stats.deferred, stats.captured) == (0, 0, 0)
    assert replicator.staging.cursor("user:a") == cursor
    for n in range(3):  # the next log generation continues the history from frame 1
        _write(router, "user:a", f"after {n}")
    if not kept:  # a closed cursor: the next generation is continued through a connection
        _forget_connections(replicator)
    replicator.mark("user:a")
    stats = replicator.run_round()
    assert (stats.captured, stats.snapshots) == (1, 0)
    assert _replicated(target, "user:a") == _live(router, "user:a")


def test_a_busy_tenant_gets_refreshed_snapshots_and_a_restore_reads_only_from_the_last(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget]) -> None:
    """A small tenant rewritten thousands of times: each checkpoint that closes its log after frames of more
    than its size (bounds lowered here) adds a refreshed snapshot. Every restore point stays exact, and a
    restore at the latest commit fetches the last snapshot and what follows it, not the whole history."""
    from helpers_s3 import CountingTarget

    from shardlite.services.replica_restore import restore_tenant

    router, replicator, target = setup
    replicator.refresh_ratio, replicator.refresh_floor = 1, 64 * 1024
    _write(router, "user:a", "v0")
    replicator.reconcile()
    replicator.run_round()
    # (a round's last commit time, the body then): without the writers' notes a commit's time is its capture's
    points = [(replicator.staging.cursor("user:a").last_commit_ns, "v0")]  # type: ignore[union-attr]
    refreshed = 0
    for batch in range(4):
        for n in range(1, 1101):  # past DUE_FRAMES frames: each round checkpoints (one page per commit)
            with router.transaction("user:a") as tx:
                tx.execute("UPDATE notes SET body = ? WHERE id = 1", (f"v{batch}.{n}",))
        replicator.mark("user:a")
        stats = replicator.run_round()
        assert stats.checkpoints == 1 and stats.failed == 0, stats
        refreshed += stats.refreshed
        points.append((replicator.staging.cursor("user:a").last_commit_ns, f"v{batch}.1100"))  # type: ignore[union-attr]
    assert refreshed == 4  # one per closed log: each saw more frames than the database since the last
    captures = replica_read.captures_of(target, ["user:a"])["user:a"]
    assert sum(c.entry.kind == "snapshot" for c in captures) == 5  # the first capture and the refreshes
    assert _replicated(target, "user:a") == _live(router, "user:a")
    counting = CountingTarget(target)
    restore_tenant(router._store, counting, "user:a", as_key="user:latest")  # type: ignore[arg-type]
    assert _live(router, "user:latest") == _live(router, "user:a")
    history = sum(c.entry.length for c in captures)
    last = max(c for c in captures if c.entry.kind == "snapshot")
    after = sum(c.entry.length for c in captures if c.order > last.order)
    assert counting.pack_bytes < history / 3, (counting.pack_bytes, history)
    assert counting.pack_bytes >= last.entry.length + after
    for i, (when, body) in enumerate(points):  # every restore point as before, also right before a refresh's
        restore_tenant(router._store, target, "user:a", as_key=f"user:at{i}", at_ns=when)
        assert _live(router, f"user:at{i}") == [(1, body)]
        if i:
            restore_tenant(router._store, target, "user:a", as_key=f"user:before{i}", at_ns=when - 1)
            assert _live(router, f"user:before{i}") == [(1, points[i - 1][1])]


def test_the_locked_allowance_doubles_with_each_deferral_and_has_no_bound_at_the_limit() -> None:
    from shardlite.files.walcapture import LOCKED_FRAMES

    allowances = [replicator_module.locked_allowance(n) for n in range(replicator_module.DEFER_LIMIT + 2)]
    assert allowances[:replicator_module.DEFER_LIMIT] == [LOCKED_FRAMES << n for n in range(5)]
    assert all(a >= 1 << 62 for a in allowances[replicator_module.DEFER_LIMIT:])


def test_checkpoints_deferred_in_a_row_widen_the_locked_part_until_one_runs(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget], monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that outruns every capture made every checkpoint wait for a later round, and its log grew
    without end: each deferral now doubles what the next checkpoint takes the lock for, then any amount."""
    from shardlite.files import walcapture as wc

    router, replicator, target = setup
    _write(router, "user:a", "first")
    replicator.reconcile()
    replicator.run_round()
    for n in range(1100):  # past DUE_FRAMES frames in the log
        _write(router, "user:a", f"row {n}")
    real = wc.checkpoint_briefly_locked
    asked: list[int] = []

    def outrun(*args: object, locked_frames: int, **kwargs: object) -> tuple[wc.Cursor, bool]:
        asked.append(locked_frames)
        if len(asked) <= replicator_module.DEFER_LIMIT:  # a writer committed more than that meanwhile
            return args[4], False  # type: ignore[return-value]
        return real(*args, locked_frames=locked_frames, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(wc, "checkpoint_briefly_locked", outrun)
    deferred = 0
    for _ in range(replicator_module.DEFER_LIMIT + 1):
        replicator.mark("user:a")
        stats = replicator.run_round()
        deferred += stats.deferred
    assert deferred == replicator_module.DEFER_LIMIT
    assert asked == [replicator_module.locked_allowance(n) for n in range(replicator_module.DEFER_LIMIT + 1)]
    cursor = replicator.staging.cursor("user:a")
    assert cursor is not None and cursor.cursor.closed  # the checkpoint at the limit ran
    for n in range(1100):  # the next log generation grows past DUE_FRAMES frames too
        _write(router, "user:a", f"again {n}")
    replicator.mark("user:a")
    assert replicator.run_round().checkpoints == 1
    assert asked[-1] == wc.LOCKED_FRAMES  # and the count started again
    assert _replicated(target, "user:a") == _live(router, "user:a")


def test_a_round_with_a_capture_budget_ships_what_it_captured_and_keeps_the_rest_marked(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget]) -> None:
    router, replicator, target = setup
    keys = [f"user:{i}" for i in range(4)]
    for key in keys:
        _write(router, key, f"{key} one")
    assert replicator.reconcile() == 4
    stats = replicator.run_round(budget=0.0)  # out of budget after the first capture
    assert (stats.captured, stats.left, stats.uploaded_packs) == (1, 3, 1)
    assert len(replicator.marked()) == 3
    stats = replicator.run_round(upload=False)  # captures and stages only
    assert (stats.captured, stats.left, stats.uploaded_packs) == (3, 0, 0)
    assert replicator.staging.staged_count()[0] == 3 and not replicator.marked()
    stats = replicator.run_round()
    assert (stats.captured, stats.uploaded_packs) == (0, 1)
    for key in keys:
        assert _replicated(target, key) == _live(router, key)


def test_a_dropped_tenant_is_forgotten(setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget]) -> None:
    router, replicator, _target = setup
    _write(router, "user:a", "one")
    replicator.reconcile()
    replicator.run_round()
    router.drop("user:a")
    replicator.mark("user:a")
    stats = replicator.run_round()
    assert (stats.captured, stats.failed) == (0, 0)
    replicator.reconcile()
    assert replicator.staging.cursor("user:a") is None


def test_an_imported_tenant_is_captured_before_its_first_write(
        setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget], tmp_path: os.PathLike[str]) -> None:
    """A file installed whole (an import; a restore alike) has a log nothing was ever written to, whose
    wal-index holds page size 0: its first capture is a snapshot, not "impossible page size 0" every round."""
    router, replicator, target = setup
    _write(router, "user:a", "exported")
    exported = os.path.join(tmp_path, "a.db")
    router.export("user:a", exported)
    router.import_(exported, "user:b")
    replicator.mark("user:b")
    stats = replicator.run_round()
    assert stats.failed == 0 and stats.errors == {}, stats.errors
    assert _replicated(target, "user:b") == _live(router, "user:b") == [(1, "exported")]
    _write(router, "user:b", "after")  # and the history goes on from there
    replicator.mark("user:b")
    assert replicator.run_round().failed == 0
    assert _replicated(target, "user:b") == [(1, "exported"), (2, "after")]


def test_restore_a_tenant_latest_and_at_times(setup: tuple[shardlite.Router, NodeReplicator,
                                                            ReplicaTarget]) -> None:
    """Restores at several times give exactly the commits captured at or before each time (here without
    writers' notes, a commit's time is its capture's); the latest restore equals the live tenant."""
    from shardlite.services.replica_restore import format_time, parse_time, restore_tenant

    router, replicator, target = setup
    clock = iter(range(1_000_000_000_000, 2_000_000_000_000, 1_000_000_000))
    replicator.clock = lambda: next(clock)
    states = []
    _write(router, "user:a", "zero")
    replicator.reconcile()
    for n in range(5):
        replicator.mark("user:a")
        replicator.run_round()
        states.append((replicator.staging.cursor("user:a").last_commit_ns, _live(router, "user:a")))  # type: ignore[union-attr]
        _write(router, "user:a", f"row {n}")
    for when, rows in states:
        done = restore_tenant(router._store, target, "user:a", as_key=f"user:at{when}", at_ns=when)
        assert done["commit_ns"] == when and done["key"] == f"user:at{when}"
        assert _live(router, f"user:at{when}") == rows
        assert parse_time(format_time(when)) // 1000 == when // 1000
    with pytest.raises(shardlite.UnknownTenant, match="no commit"):
        restore_tenant(router._store, target, "user:a", as_key="user:early", at_ns=states[0][0] - 1)
    with pytest.raises(shardlite.ConfigurationError, match="exists"):
        restore_tenant(router._store, target, "user:a")  # the live tenant is not replaced without force
    replicator.mark("user:a")
    replicator.run_round()
    live = _live(router, "user:a")
    _write(router, "user:a", "not replicated yet")
    done = restore_tenant(router._store, target, "user:a", force=True)
    assert _live(router, "user:a") == live and done["from_key"] == "user:a"
    with pytest.raises(shardlite.ConfigurationError, match="time zone"):
        parse_time("2026-12-06T18:00:00")


def test_a_moved_tenant_is_noted_on_its_new_node(tmp_path: os.PathLike[str],
                                                make_replica_target: TargetFactory) -> None:
    """After a move's flip, the destination node's replicator hears of the new file within one round,
    without waiting for a write to it or for its reconcile pass."""
    from shardlite.files import notesfile

    url = make_replica_target.url()
    keys = [f"user:{i}" for i in range(12)]
    with shardlite.Router(os.path.join(tmp_path, "root"), schema=SCHEMA, replicate=url, nodes=["n1"]) as router:
        for key in keys:
            _write(router, key, "one")
        router.nodes.add("n2")
        router.rebalance.plan()
        router.rebalance.apply()
        moved = [key for key in keys if router._store.meta.tenants.lookup(key).node == "n2"]  # type: ignore[union-attr]
        assert moved, "the ring moved nothing to the new node"
        path = router._store.node_path("n2")
        noted = {n.key for name in notesfile.list_notes(path) for n in notesfile.read_notes(path, name).notes}
        assert noted == set(moved)  # nothing was written on n2: only the moves noted these


@pytest.mark.parametrize("node", ["n1", "Node-A", ".hidden", "-x", "ü", "a" * 80])
def test_pack_names_are_valid_object_names(node: str) -> None:
    from shardlite.replica.target import check_name
    from shardlite.services.replicator import pack_name

    name = pack_name(node, 7)
    assert check_name(name) == name and name.endswith(f"{7:020d}.pack")
    assert pack_name(node, 7) != pack_name(node + "2", 7)
