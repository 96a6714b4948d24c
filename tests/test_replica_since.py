"""A one-tenant restore reads the key index's packs newest first per node folder and leaves a folder's older
packs unread once it has read a usable snapshot at or before its time (services/replica_since.py): the image at
every restore point is the one a read of every pack gives, across refreshed snapshots, a move to another node,
a drop and a new tenant under the key, rollup parts and compaction packs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers_s3 import TargetFactory
from helpers_wal import rows_of

import shardlite
from shardlite.core import timeline
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_index, replica_meta, replica_read, replica_retention
from shardlite.services.replica_restore import _image_at
from shardlite.services.replica_since import captures_since_snapshot
from shardlite.services.replication import Replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}
KEYS = ["user:busy", "user:quiet", "user:moved", "user:dropped", "user:other"]
HOUR_NS = 3600 * 10**9


def _round(replication: Replication) -> None:
    for node in replication.nodes.values():  # refresh as soon as the frames outgrow the snapshot
        node.replicator.refresh_ratio, node.replicator.refresh_floor = 1, 64 * 1024
    replication.run_round()


def _write(router: shardlite.Router, key: str, body: str, times: int = 1) -> None:
    for _ in range(times):
        with router.transaction(key) as tx:
            tx.execute("INSERT OR REPLACE INTO notes(id, body) VALUES (1, ?)", (body,))


def _rows(image: bytes | bytearray | None) -> object:
    return None if image is None else rows_of(image, "SELECT id, body FROM notes ORDER BY id")


def _compare(target: ReplicaTarget, points: list[int]) -> tuple[int, int]:
    """Every key at every point and at the latest: the image and commit the newest-first read gives are those
    of a read of every pack. Returns (points compared, packs left unread)."""
    horizon = replica_index.read_horizon(target)
    left_total = compared = 0
    for key in KEYS:
        every = replica_index.without_expired(horizon, replica_read.captures_of(target, [key])[key])
        for at in [*points, None]:
            since = captures_since_snapshot(target, key, at,
                                            lambda got: bool(replica_index.without_expired(horizon, [got])))
            assert since is not None
            captures, left = since
            left_total += left
            expected = timeline.image_at(every, at)
            got = _image_at(target, replica_index.without_expired(horizon, captures), at, key)
            assert _rows(got[0] if got else None) == _rows(expected[0] if expected else None), (key, at)
            assert (got[1] if got else None) == (expected[1] if expected else None), (key, at)
            compared += expected is not None
    return compared, left_total


def test_every_restore_point_is_the_one_a_read_of_every_pack_gives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_replica_target: TargetFactory) -> None:
    monkeypatch.setattr(replica_meta, "DELTA_SHARE", 1e9)
    monkeypatch.setattr(replica_index, "READERS", 1)  # one pack a folder at a time: what is left unread shows
    points: list[int] = []
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url(),
                          nodes=["n1"]) as router:
        replication = Replication(router._store)
        try:
            for round_ in range(8):
                for key in KEYS:
                    if key != "user:quiet" or round_ % 3 == 0:
                        _write(router, key, f"{key} {round_}", 1100 if key == "user:busy" and round_ % 2 else 1)
                if round_ == 3:  # some tenants move to a new node: their history goes on in that folder
                    router.nodes.add("n2")
                    router.rebalance.plan()
                    router.rebalance.apply()
                if round_ == 5:  # a drop, then a new tenant under the key
                    router.drop("user:dropped")
                _round(replication)
                points.append(time.time_ns())
                time.sleep(0.002)  # points strictly between rounds
        finally:
            replication.close()
        assert {router.locate(k).node for k in KEYS} == {"n1", "n2"}, "the rebalance moved nothing"
        target = make_replica_target()
        compared, left = _compare(target, points)
        assert compared >= 30 and left > 0  # refreshed snapshots let restores leave older packs unread
        # rollup parts of every pack, and a compaction's packs: two hours later
        report = replica_retention.compact(router._store, target, now_ns=time.time_ns() + 2 * HOUR_NS)
        assert report.rollup_parts, "no rollup part to read"
    compared, _left = _compare(make_replica_target(), points)
    assert compared >= 30
