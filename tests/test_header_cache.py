"""The compaction's cache of pack headers (shardlite.files.headercache), on both targets: a second compaction
reads from the replica only the headers of packs it has not seen; a pack an erase rewrote is read again; a
pack not recorded as shipped is never cached; a damaged cache row is read again from the replica; the cache
forgets packs that are gone."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import apsw
from helpers_s3 import CountingTarget, TargetFactory

import shardlite
from shardlite.core import pack
from shardlite.files.headercache import FILE_NAME
from shardlite.files.replica_locks import STAGING_DIR
from shardlite.files.staging import Staging
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_read, replica_retention
from shardlite.services.replication import Replication
from shardlite.services.replicator import pack_name

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


def _pack_of_one_snapshot(node: str, name: str) -> bytes:
    """A pack holding one snapshot capture of a tenant of its own (inside the window: kept by compactions)."""
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE t(x)")
    image = conn.serialize("main")
    now = time.time_ns()
    entry = pack.Entry("user:planted", "f" * 32, 1, "snapshot", 4096, "", 0, 0, [(0, now)], now, 0, 0)
    seq = int(name.rsplit("/", 1)[1].split(".")[0])
    return pack.encode(node, seq, now, [(entry, image)])


def _headers_read(store: Any, target: ReplicaTarget, later: int = 0) -> int:
    counting = CountingTarget(target)
    replica_retention.compact(store, counting, now_ns=time.time_ns() + later)  # type: ignore[arg-type]
    return counting.headers


def _damage(root: Path, sql: str, name: str) -> None:
    conn = apsw.Connection(str(root / STAGING_DIR / FILE_NAME))
    try:
        conn.execute(sql, (name,))
    finally:
        conn.close()


def _cached(root: Path) -> dict[str, int]:
    conn = apsw.Connection(str(root / STAGING_DIR / FILE_NAME))
    try:
        return {name: size for name, size in conn.execute("SELECT name, size FROM headers")}
    finally:
        conn.close()


def test_a_compaction_reads_only_the_headers_it_has_not_seen(tmp_path: Path,
                                                             make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    root = tmp_path / "root"
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        store = router._store
        run = Replication(store, target)
        try:
            for i in range(12):
                with router.transaction(f"user:{i % 3}") as tx:
                    tx.execute("INSERT INTO notes(body) VALUES (?)", (f"note {i}",))
                run.run_round()
            packs = dict(replica_read.list_packs(target))
            assert len(packs) >= 12
            assert _headers_read(store, target) == len(packs)  # the first compaction: every header
            assert _cached(root) == packs
            assert _headers_read(store, target) == 0  # then none
            with router.transaction("user:0") as tx:
                tx.execute("INSERT INTO notes(body) VALUES ('later')")
            run.run_round()
            assert _headers_read(store, target) == 1  # the new pack only
            # a pack uploaded and not recorded as shipped (a replicator killed between the two) is read each time
            node = router.nodes.list()[0].name
            staging = Staging(store.node_path(node))
            try:
                unrecorded = pack_name(node, staging.next_seq())
            finally:
                staging.close()
            target.put(unrecorded, _pack_of_one_snapshot(node, unrecorded))
            assert _headers_read(store, target) == 1 and unrecorded not in _cached(root)
            assert unrecorded in dict(replica_read.list_packs(target))  # kept by the compaction: read again
            assert _headers_read(store, target) == 1
            target.delete_many([unrecorded])
            # an erase rewrites the packs holding the key, smaller: they are read again, and only they
            receipt = router.drop("user:1", erase=True)
            rewritten = [o["object"] for o in receipt["objects"] if o["action"] == "rewritten"]
            deleted = [o["object"] for o in receipt["objects"] if o["action"] == "deleted"]
            assert rewritten or deleted
            assert _headers_read(store, target) == len(rewritten)
            assert not set(deleted) & set(_cached(root))  # forgotten with the packs
            # a damaged summary (it fails its check): read again from the replica
            name = next(iter(_cached(root)))
            _damage(root, "UPDATE headers SET keys = zeroblob(8) WHERE name = ?", name)
            assert _headers_read(store, target) == 1
            assert _headers_read(store, target) == 0
            # a damaged header: decoded only when the pack is old enough to be planned over, then read again
            _damage(root, "UPDATE headers SET head = X'534C5041434B310A000000057B626164' WHERE name = ?", name)
            assert _headers_read(store, target) == 0  # inside every window: its summary is all a compaction reads
            assert _headers_read(store, target, later=8 * 86_400 * 10**9) == 1
        finally:
            run.close()
    assert oct(os.stat(root / STAGING_DIR / FILE_NAME).st_mode & 0o777) == "0o600"


def test_a_cache_file_that_is_not_a_database_starts_again_empty(tmp_path: Path,
                                                                make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    root = tmp_path / "root"
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        run = Replication(router._store, target)
        try:
            for i in range(3):
                with router.transaction("user:a") as tx:
                    tx.execute("INSERT INTO notes(body) VALUES (?)", (f"note {i}",))
                run.run_round()
            packs = dict(replica_read.list_packs(target))
            assert _headers_read(router._store, target) == len(packs)
            (root / STAGING_DIR / FILE_NAME).write_bytes(b"not a database, " * 512)
            assert _headers_read(router._store, target) == len(packs)  # read again, and cached again
            assert _cached(root) == packs and _headers_read(router._store, target) == 0
        finally:
            run.close()
