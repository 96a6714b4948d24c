"""Pack sequence numbers of a node folder another staging wrote (shardlite.services.pack_upload,
PackUploader._sequence_floor), on both targets: a root restored from a replica and then replicating to the
same replica continues past the first root's packs instead of overwriting them, so the history before the
restore stays restorable; a pack this staging uploaded without recording it is still uploaded again under its
own name; two roots numbering packs in one folder at once never overwrite each other's (PackUploader._put)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers_s3 import TargetFactory
from helpers_wal import rows_of

import shardlite
from shardlite.core import timeline
from shardlite.files.staging import Staging
from shardlite.services import replica_read, replica_restore, replica_retention
from shardlite.services.replication import Replication
from shardlite.services.replicator import pack_name

SCHEMA = {"t": ["CREATE TABLE w(v INTEGER)"]}


def _rows(target: object, key: str, at: int | None) -> list[tuple[object, ...]] | None:
    found = timeline.image_at(replica_read.captures_of(target, [key])[key], at)  # type: ignore[arg-type]
    return None if found is None else rows_of(found[0], "SELECT v FROM w ORDER BY v")


def _replicate(router: shardlite.Router, target: object, values: list[int]) -> None:
    """In a replication service of its own (a process's first uploads): each of ``values`` written to ``t:1``,
    then a round."""
    run = Replication(router._store, target)  # type: ignore[arg-type]
    try:
        for value in values:
            with router.transaction("t:1") as tx:
                tx.execute("INSERT INTO w VALUES (?)", (value,))
            run.run_round()
    finally:
        run.close()


@pytest.mark.parametrize("joined", [False, True], ids=["packs", "rollup"])
def test_a_restored_root_replicating_to_the_same_replica_continues_past_its_packs(
        tmp_path: Path, make_replica_target: TargetFactory, joined: bool) -> None:
    """``rollup``: the first root's packs were joined by a compaction (only its run's parts and marker say how far
    its sequence numbers went)."""
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=url) as router:
        _replicate(router, target, [0, 1, 2])
        if joined:
            report = replica_retention.compact(router._store, target, now_ns=time.time_ns() + 2 * 3600 * 10**9)
            assert report.rolled_packs == 3
    before = {name: target.get(name) for name, _size in replica_read.list_packs(target)}
    assert len(before) == (1 if joined else 3)
    between = time.time_ns()
    replica_restore.restore_root_from_replica(target, str(tmp_path / "b"))
    with shardlite.Router(tmp_path / "b", replicate=url) as router:
        _replicate(router, target, [10, 11])
        node = router.nodes.list()[0].name
    after = dict(replica_read.list_packs(target))
    assert all(target.get(name) == blob for name, blob in before.items())  # the first root's packs, untouched
    assert pack_name(node, 4) in after and len(after) > len(before)
    assert _rows(target, "t:1", between) == [(0,), (1,), (2,)]  # before the restore: the first root's history
    assert _rows(target, "t:1", None) == [(0,), (1,), (2,), (10,), (11,)]


def test_a_pack_uploaded_and_not_recorded_is_uploaded_again_under_its_name(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """The replicator killed between an upload and its record: the next process uploads the same captures again
    under the same name (it holds only captures still staged here), not past it."""
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url) as router:
        run = Replication(router._store, target)
        try:
            with router.transaction("t:1") as tx:
                tx.execute("INSERT INTO w VALUES (1)")
            run.run_round()
            node = router.nodes.list()[0].name
            replicator = run.nodes[node].replicator
            real = replicator.staging.shipped
            replicator.staging.shipped = lambda *a, **k: None  # type: ignore[method-assign]
            with router.transaction("t:1") as tx:
                tx.execute("INSERT INTO w VALUES (2)")
            run.run_round()  # uploaded, not recorded
            replicator.staging.shipped = real  # type: ignore[method-assign]
        finally:
            run.close()
        staging = Staging(router._store.node_path(node))
        try:
            assert staging.next_seq() == 2
        finally:
            staging.close()
        assert pack_name(node, 2) in dict(replica_read.list_packs(target))
        _replicate(router, target, [3])  # a new process: its floor is read from the replica
        assert [name for name, _size in replica_read.list_packs(target)] == [pack_name(node, 1), pack_name(node, 2)]
        assert _rows(target, "t:1", None) == [(1,), (2,), (3,)]


def test_a_crafted_pack_name_does_not_push_the_numbering_past_what_a_replicator_reaches(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """An object named like the last possible pack (20 nines) in a node's folder is ignored for the numbering:
    uploads go on at the next sequence number (it would otherwise overflow the staging's integers and stop the
    node's replication for good)."""
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url) as router:
        node = router.nodes.list()[0].name
        crafted = pack_name(node, 0).replace("0" * 20, "9" * 20)
        target.put(crafted, b"not a pack")
        _replicate(router, target, [1, 2])
    names = {name for name, _size in target.list("v1/packs/")}
    assert {pack_name(node, 1), pack_name(node, 2), crafted} <= names


def test_two_roots_numbering_packs_in_one_folder_never_overwrite_each_other(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """Two roots replicating to one location under the same node name (a misconfiguration), both running: each
    computed its next number before the other uploaded under it. The later upload is refused instead of
    replacing the other's pack (put if absent), says why, and ships under the next free number; both
    histories stay whole."""
    from shardlite.services.replicator import NodeReplicator

    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=url) as a, \
            shardlite.Router(tmp_path / "b", schema=SCHEMA, replicate=url) as b:
        node = a.nodes.list()[0].name
        assert b.nodes.list()[0].name == node
        ra, rb = NodeReplicator(a._store, node, target), NodeReplicator(b._store, node, target)
        try:
            def write(router: shardlite.Router, replicator: NodeReplicator, key: str, value: int) -> str | None:
                with router.transaction(key) as tx:
                    tx.execute("INSERT INTO w VALUES (?)", (value,))
                replicator.reconcile()
                replicator.mark(key)
                return replicator.run_round().upload_error

            assert write(a, ra, "t:a", 1) is None  # a: pack 1
            assert write(b, rb, "t:b", 1) is None  # b lists the folder, continues past a's: pack 2
            theirs = target.get(pack_name(node, 2))
            refused = write(a, ra, "t:a", 2)  # a's next number is 2, taken by b meanwhile
            assert refused is not None and "another writer" in refused
            assert target.get(pack_name(node, 2)) == theirs
            assert ra.run_round().upload_error is None  # a lists again: pack 3
            assert "another writer" in (write(b, rb, "t:b", 2) or "")  # b's next number, 3, is a's now
            assert rb.run_round().upload_error is None  # b goes on past it: pack 4
            assert write(b, rb, "t:b", 3) is None
            assert target.get(pack_name(node, 2)) == theirs
        finally:
            ra.close()
            rb.close()
    assert _rows(target, "t:a", None) == [(1,), (2,)]
    assert _rows(target, "t:b", None) == [(1,), (2,), (3,)]
