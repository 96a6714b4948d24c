"""`tenants drop KEY --erase` (``Router.drop(key, erase=True)``): the tenant leaves the live root and every object
of the replica, on both targets; the other tenants of the same packs still restore exactly; a restore of the
erased key fails clearly; a plain drop keeps the history; the receipt says what went, where and when."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers_cli import run_script
from helpers_procs import child_env
from helpers_rebalance import move_to_a_new_node
from helpers_s3 import TargetFactory
from helpers_wal import rows_of

import shardlite
from shardlite.core import timeline
from shardlite.replica.target import ReplicaTarget
from shardlite.services import erase, replica_read
from shardlite.services.replica_restore import restore_tenant
from shardlite.services.replicator import NodeReplicator, RoundStats

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}
VICTIM = "user:[bold]Zoë"  # rich markup and non-ASCII: printed as it is
OTHERS = ["user:a", "user:b"]


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


def _live(router: shardlite.Router, key: str) -> list[tuple[object, ...]]:
    return [tuple(r) for r in router.query(key, "SELECT id, body FROM notes ORDER BY id")]


def _replicated(target: ReplicaTarget, key: str) -> list[tuple[object, ...]]:
    found = timeline.image_at(replica_read.captures_of(target, [key])[key])
    assert found is not None, f"{key} has no history in the replica"
    return rows_of(found[0], "SELECT id, body FROM notes ORDER BY id")


def holders(target: ReplicaTarget, marker: bytes) -> list[str]:
    """Every object of the replica whose bytes hold ``marker``."""
    return [name for name, _size in target.list("") if marker in target.get(name)]


def local_holders(node_path: str, marker: bytes) -> list[str]:
    """Files of the node's replication directory (staging, its log) whose bytes hold ``marker``."""
    found = []
    directory = os.path.join(node_path, ".replica")
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            with open(path, "rb") as handle:
                if marker in handle.read():
                    found.append(name)
    return found


@pytest.fixture
def setup(tmp_path: Path, make_replica_target: TargetFactory) -> Iterator[
        tuple[shardlite.Router, NodeReplicator, ReplicaTarget]]:
    router = shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url())
    target = make_replica_target()
    replicator = NodeReplicator(router._store, router.nodes.list()[0].name, target)
    yield router, replicator, target
    replicator.close()
    router.close()


def _history_with_victim(router: shardlite.Router, replicator: NodeReplicator, marker: str) -> None:
    """Packs shared by the victim and the others over several rounds, two incarnations of the victim (a drop
    and a new tenant under the same key), and captures of the victim staged but not uploaded."""
    for round_ in range(3):
        for key in [VICTIM, *OTHERS]:
            _write(router, key, f"{key} round {round_} {marker if key == VICTIM else 'plain'}")
            replicator.mark(key)
        replicator.reconcile()
        replicator.run_round()
    router.drop(VICTIM)  # a plain drop: the first incarnation's history stays
    replicator.reconcile()
    for round_ in range(2):
        for key in [VICTIM, *OTHERS]:
            _write(router, key, f"{key} again {round_} {marker if key == VICTIM else 'plain'}")
            replicator.mark(key)
        replicator.reconcile()
        replicator.run_round()
    _write(router, VICTIM, f"staged only {marker}")
    replicator._capture(VICTIM, [], RoundStats())  # staged, not uploaded
    assert replicator.staging.staged_count()[0] == 1


def test_erase_leaves_no_object_holding_the_tenant(setup: tuple[shardlite.Router, NodeReplicator,
                                                                ReplicaTarget]) -> None:
    router, replicator, target = setup
    marker = f"ERASE-ME-{uuid.uuid4().hex}"
    _history_with_victim(router, replicator, marker)
    before = holders(target, marker.encode())
    assert len(before) >= 5  # the scan sees the marker where it is
    packs_before = [name for name, _ in replica_read.list_packs(target)]
    others = {key: _live(router, key) for key in OTHERS}
    first = replica_read.captures_of(target, [VICTIM])[VICTIM]
    incarnations = {c.entry.incarnation for c in first} | {router._store.meta.tenants.lookup(VICTIM).incarnation}  # type: ignore[union-attr]
    assert len(incarnations) == 2

    receipt = router.drop(VICTIM, erase=True)

    assert holders(target, marker.encode()) == []
    assert local_holders(replicator.staging_node_path, marker.encode()) == []
    assert not router.exists(VICTIM)
    for key in OTHERS:  # the tenants that shared the packs restore exactly
        assert _replicated(target, key) == others[key]
    with pytest.raises(shardlite.UnknownTenant, match="holds no commit"):
        restore_tenant(router._store, target, VICTIM)
    assert receipt["key"] == VICTIM and receipt["complete"] and not receipt["already_erased"]
    assert set(receipt["incarnations"]) == incarnations
    assert receipt["live"]["action"] == "dropped"
    assert receipt["replica"] == target.url
    assert {o["object"] for o in receipt["objects"]} == set(before) & set(packs_before)
    assert all(o["action"] == "rewritten" for o in receipt["objects"])  # every pack also held the others
    # the erase's drop staged a drop record and forgot the cursor (drop_tail.fence_and_stage); the erase
    # removed the record
    assert receipt["staged"][0]["captures_removed"] == 1 and receipt["staged"][0]["drop_records_removed"] == 1
    assert replicator.staging.cursor(VICTIM) is None and replicator.staging.drops_count() == 0
    assert receipt["totals"]["captures_removed"] == 5 + 1
    assert receipt["totals"]["bytes_removed"] > 0
    assert receipt["started"] <= receipt["finished"]
    assert len(receipt["tombstones"]) == 2

    # the replicator goes on: nothing of the victim is uploaded later, the others keep replicating
    for key in OTHERS:
        _write(router, key, "after the erase")
        replicator.mark(key)
    replicator.reconcile()
    stats = replicator.run_round()
    assert stats.uploaded_packs == 1 and stats.upload_error is None
    assert holders(target, marker.encode()) == []
    for key in OTHERS:
        assert _replicated(target, key) == _live(router, key)

    again = router.drop(VICTIM, erase=True)  # idempotent: reports what it finds
    assert again["already_erased"] and again["objects"] == [] and again["live"]["action"] == "already dropped"
    assert {t["action"] for t in again["tombstones"]} == {"present"}


def test_a_pack_holding_only_the_tenant_is_deleted(setup: tuple[shardlite.Router, NodeReplicator,
                                                                 ReplicaTarget]) -> None:
    router, replicator, target = setup
    _write(router, VICTIM, "alone SECRET-ALONE")
    replicator.reconcile()
    replicator.run_round()
    [name] = [n for n, _ in replica_read.list_packs(target)]
    receipt = router.drop(VICTIM, erase=True)
    assert [(o["object"], o["action"]) for o in receipt["objects"]] == [(name, "deleted")]
    assert target.head(name) is None and holders(target, b"SECRET-ALONE") == []
    _write(router, "user:a", "next")  # the next pack takes a new sequence number, never the deleted one's
    replicator.reconcile()
    replicator.run_round()
    assert [n for n, _ in replica_read.list_packs(target)] == [name.replace("1.pack", "2.pack")]


def test_a_capture_in_flight_during_the_erase_is_never_uploaded(setup: tuple[shardlite.Router, NodeReplicator,
                                                                             ReplicaTarget]) -> None:
    """The replicator captured the victim's file just before the drop deleted it, and stages the frames
    after the erase: its next upload drops them (the node's staging records the erased incarnation)."""
    router, replicator, target = setup
    _write(router, VICTIM, "first IN-FLIGHT-SECRET")
    replicator.reconcile()
    replicator.run_round()
    _write(router, VICTIM, "second IN-FLIGHT-SECRET")
    record = router._store.meta.tenants.lookup(VICTIM)
    assert record is not None
    opened = replicator._connection(VICTIM, router._store.path_of(record))  # the replicator's open file
    router.drop(VICTIM, erase=True)
    # the capture that was in flight: the replicator's connection still reads the deleted file
    from shardlite.files import walcapture as wc
    opened.conn.execute("BEGIN IMMEDIATE")
    try:
        got = wc.capture(opened.conn, opened.files, wc.NO_CURSOR)
        replicator.staging.stage(VICTIM, record.incarnation, record.generation, got, [], 1)
    finally:
        opened.conn.execute("ROLLBACK")
    assert replicator.staging.staged_count()[0] == 1
    _write(router, "user:a", "beside")
    replicator.mark("user:a")
    replicator.reconcile()
    replicator.run_round()
    assert replicator.staging.staged_count() == (0, 0)
    assert holders(target, b"IN-FLIGHT-SECRET") == []
    assert local_holders(replicator.staging_node_path, b"IN-FLIGHT-SECRET") == []  # nor the staging's free pages
    assert replicator.staging.cursor(VICTIM) is None


def test_a_plain_drop_keeps_the_history(setup: tuple[shardlite.Router, NodeReplicator, ReplicaTarget]) -> None:
    router, replicator, target = setup
    _write(router, "user:a", "kept")
    replicator.reconcile()
    replicator.run_round()
    rows = _live(router, "user:a")
    before_drop = replica_read.captures_of(target, ["user:a"])["user:a"][-1].entry.commits[-1][1]
    assert router.drop("user:a") is None
    replicator.reconcile()
    replicator.run_round()
    assert holders(target, b"kept")  # still there
    restored = restore_tenant(router._store, target, "user:a", at_ns=before_drop)
    assert restored["key"] == "user:a" and _live(router, "user:a") == rows
    # an erase afterwards also forgets that the drop's record shipped (the staging's drops_shipped), and says so
    receipt = router.drop("user:a", erase=True)
    assert [s["shipped_drop_records_removed"] for s in receipt["staged"]] == [1]
    assert "1 records of shipped drops removed" in "\n".join(erase.describe(receipt))


def test_erase_without_a_replica_drops_and_says_so(tmp_path: Path) -> None:
    with shardlite.Router(tmp_path / "root", schema=SCHEMA) as router:
        _write(router, VICTIM, "x")
        receipt = router.drop(VICTIM, erase=True)
        assert receipt["replica"] is None and "no replica history" in receipt["note"]
        assert not router.exists(VICTIM) and receipt["live"]["action"] == "dropped"
        again = router.drop(VICTIM, erase=True)
        assert again["live"]["action"] == "already dropped"


def test_the_async_router_erases(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    async def main() -> None:
        async with shardlite.AsyncRouter(tmp_path / "root", schema=SCHEMA,
                                         replicate=make_replica_target.url()) as router:
            async with router.transaction(VICTIM) as tx:
                await tx.execute("INSERT INTO notes(body) VALUES ('x')")
            receipt = await router.drop(VICTIM, erase=True)
            assert receipt["live"]["action"] == "dropped" and receipt["complete"]
            nobody = await router.drop("user:nobody", erase=True)  # a key never seen: reported, no error
            assert nobody["live"]["catalog"] == "absent" and nobody["objects"] == []

    asyncio.run(main())


def test_the_cli_prints_the_receipt_and_restore_refuses_the_key(tmp_path: Path,
                                                                make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    root = str(tmp_path / "root")
    env = child_env()
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        replicator = NodeReplicator(router._store, router.nodes.list()[0].name, make_replica_target())
        try:
            for key in [VICTIM, *OTHERS]:
                _write(router, key, f"{key} CLI-SECRET" if key == VICTIM else key)
            replicator.reconcile()
            replicator.run_round()
        finally:
            replicator.close()
    ran = run_script("--root", root, "tenants", "drop", VICTIM, "--erase", env=env)
    assert ran.returncode == 0, ran.stderr
    assert f"erase of tenant {VICTIM!r}" in ran.stdout and "rewritten v1/packs/" in ran.stdout
    assert "1 objects rewritten, 0 deleted, 1 captures" in ran.stdout
    assert holders(make_replica_target(), b"CLI-SECRET") == []
    ran = run_script("--root", root, "tenants", "drop", VICTIM, "--erase", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    again = json.loads(ran.stdout)
    assert again["key"] == VICTIM and again["already_erased"] and again["replica"] == url
    ran = run_script("--root", root, "restore", "--from", url, "--key", VICTIM, env=env)
    assert ran.returncode != 0 and "holds no commit of tenant" in ran.stderr
    ran = run_script("--root", root, "restore", "--from", url, "--key", "user:a", "--as", "user:copy", env=env)
    assert ran.returncode == 0, ran.stderr


def test_metadata_snapshots_lose_the_tenants_dead_letters(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """A dead letter holds an event's payload (tenant data): the live metadata and every metadata snapshot
    taken before the erase lose the erased key's, and keep the others'."""
    from shardlite.core import metasnap
    from shardlite.meta.pending import DeadLetter
    from shardlite.services.replication import Replication
    from shardlite.services.restore import open_image

    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        target = make_replica_target()
        for key in (VICTIM, "user:a"):
            _write(router, key, "x")
            secret = "LETTER-SECRET" if key == VICTIM else "kept letter"
            router._store.meta.dead_letters.add(DeadLetter(key, "inc", 1, "user:z", "t", json.dumps(secret),
                                                           1.0, 3, "boom", 2.0))
        replication = Replication(router._store, target)
        try:
            replication.run_round()
        finally:
            replication.close()
        assert holders(target, b"LETTER-SECRET")
        receipt = router.drop(VICTIM, erase=True)
        assert receipt["live"]["dead_letters_removed"] == 1
        assert [s["dead_letters_removed"] for s in receipt["snapshots"]] == [1]
        assert holders(target, b"LETTER-SECRET") == []
        assert [letter.source for letter in router._store.meta.dead_letters.list()] == ["user:a"]
        [(name, _size)] = list(target.list(metasnap.PREFIX))
        _header, global_db, _app = metasnap.decode(target.get(name))
        conn = open_image(global_db)
        try:
            assert conn.execute("SELECT source, payload FROM _shardlite_dead_letters").fetchall() == [
                ("user:a", json.dumps("kept letter"))]
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            # the snapshot's catalog still lists the victim as live: a whole-root restore leaves it out all the
            # same (it has no capture left), and brings back the others
            assert conn.execute("SELECT state FROM _shardlite_tenants WHERE key = ?", (VICTIM,)).fetchall() == [
                ("active",)]
        finally:
            conn.close()
        from shardlite.services.replica_restore import restore_root_from_replica
        done = restore_root_from_replica(target, str(tmp_path / "new"))
        assert done.tenants == ["user:a"]
        with shardlite.Router(tmp_path / "new", schema=SCHEMA, create=False) as back:
            assert not back.exists(VICTIM) and _live(back, "user:a") == _live(router, "user:a")


def test_a_damaged_pack_makes_the_receipt_incomplete(setup: tuple[shardlite.Router, NodeReplicator,
                                                                   ReplicaTarget]) -> None:
    """A pack whose header cannot be read might hold the tenant: the erase does the rest and says so."""
    router, replicator, target = setup
    _write(router, VICTIM, "DAMAGED-CASE-SECRET")
    _write(router, "user:a", "a")
    replicator.reconcile()
    replicator.run_round()
    bad = "v1/packs/n1/00000000000000000099.pack"
    target.put(bad, b"SLPACK1\n\xff\xff\xff\xff garbage DAMAGED-CASE-SECRET")
    receipt = router.drop(VICTIM, erase=True)
    assert not receipt["complete"] and [u["object"] for u in receipt["unreadable"]] == [bad]
    assert holders(target, b"DAMAGED-CASE-SECRET") == [bad]  # the good pack was rewritten all the same
    from shardlite.services.erase import describe
    assert any(line.startswith("  UNREADABLE " + bad) for line in describe(receipt))


def test_a_moved_tenant_is_erased_from_both_nodes_and_an_import_under_its_key_replicates(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """History on two nodes (a move between them): both nodes' packs lose it. A tenant imported under the key
    afterwards is a new incarnation: replicated and restorable as any other."""
    keys = [f"user:m{i}" for i in range(12)]
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url(),
                          nodes=["n1"]) as router:
        target = make_replica_target()
        for key in keys:
            _write(router, key, f"before the move MARK-{key}")
        one = NodeReplicator(router._store, "n1", target)
        two: NodeReplicator | None = None
        try:
            one.reconcile()
            one.run_round()
            moved = move_to_a_new_node(router, keys)
            victim = moved[0]
            two = NodeReplicator(router._store, "n2", target)
            for key in moved:  # opened once by a writer after the move, as an app's next write does
                _write(router, key, f"after the move MARK-{key}")
            two.reconcile()
            two.run_round()
            marker = f"MARK-{victim}".encode()
            assert {name.split("/")[2] for name in holders(target, marker)} == {"n1", "n2"}
            expected = {k: _live(router, k) for k in keys if k != victim}
            router.export(keys[-1] if keys[-1] != victim else keys[0], tmp_path / "other.db")

            receipt = router.drop(victim, erase=True)

            assert receipt["nodes"] == ["n1", "n2"] and receipt["complete"]
            assert holders(target, marker) == []
            for key, rows in expected.items():
                assert _replicated(target, key) == rows
            router.import_(tmp_path / "other.db", victim)  # a new tenant under the key: not erased
            # its first write (a file whose log was never written cannot be captured yet: its wal-index
            # holds page size 0, which walformat.parse_shm_header refuses)
            _write(router, victim, "after the import")
            two.reconcile()
            one.reconcile()
            two.run_round()
            one.run_round()
            assert _replicated(target, victim) == _live(router, victim)
            assert holders(target, marker) == []
        finally:
            one.close()
            if two is not None:
                two.close()
