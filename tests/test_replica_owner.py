"""A replica location belongs to one root (core/replica_owner.py, services/replica_owners.py), on both targets:
a second root given the same location is refused before anything of it is uploaded there, with an error that
says what to do; a root restored from the replica (or one that ran `replicate adopt`) takes the location over,
after which the old root is refused; compaction and erase check it too."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers_s3 import TargetFactory
from hypothesis import given
from hypothesis import strategies as st

import shardlite
from shardlite.core import replica_owner as ro
from shardlite.errors import ConfigurationError
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_owners, replica_read, replica_restore, replica_retention
from shardlite.services.replication import OWNER_RECHECK, Replication

SCHEMA = {"t": ["CREATE TABLE w(v INTEGER)"]}
OWNER = "0" * 31 + "1"


@given(st.binary(max_size=80), st.sets(st.sampled_from([OWNER, "a" * 32, "b" * 32])))
def test_only_an_exact_marker_of_this_root_or_an_adopted_one_is_accepted(data: bytes, adopted: set[str]) -> None:
    judged = ro.judge(data, OWNER, frozenset(adopted))
    found = ro.owner_in(data)
    assert (data == ro.marker(found)) if found else True  # a marker names an owner only in its exact form
    if judged.verdict is ro.Verdict.OURS:
        assert data == ro.marker(OWNER)
    elif judged.verdict is ro.Verdict.TAKE:
        assert found in adopted and found != OWNER
    else:
        assert found is None or (found != OWNER and found not in adopted)


def test_markers_of_owners() -> None:
    other = "f" * 32
    assert ro.judge(ro.marker(OWNER), OWNER, frozenset()).verdict is ro.Verdict.OURS
    assert ro.judge(ro.marker(other), OWNER, frozenset()) == ro.Judged(ro.Verdict.FOREIGN, other)
    assert ro.judge(ro.marker(other), OWNER, frozenset({other})).verdict is ro.Verdict.TAKE
    assert ro.judge(ro.marker(other) + b" ", OWNER, frozenset({other})) == ro.Judged(ro.Verdict.FOREIGN, None)
    with pytest.raises(ValueError):
        ro.marker("F" * 32)


def _round(router: shardlite.Router, target: ReplicaTarget, value: int) -> None:
    with router.transaction("t:1") as tx:
        tx.execute("INSERT INTO w VALUES (?)", (value,))
    run = Replication(router._store, target)
    try:
        run.run_round()
    finally:
        run.close()


def _objects(target: ReplicaTarget) -> dict[str, bytes]:
    return {name: target.get(name) for name, _size in target.list("")}


def test_a_second_root_given_the_same_location_is_refused_before_it_uploads_anything(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=url) as a:
        _round(a, target, 1)
        before = _objects(target)
        assert replica_owners.OWNER_MARKER in before
        with shardlite.Router(tmp_path / "b", schema=SCHEMA, replicate=url) as b:
            with pytest.raises(ConfigurationError, match="another root's history") as refused:
                _round(b, target, 2)
            assert "replicate adopt" in str(refused.value)
            run = Replication(b._store, target)
            stop = threading.Event()
            timer = threading.Timer(30, stop.set)  # were the refusal retried, run() would return at this stop
            timer.start()
            try:
                with pytest.raises(ConfigurationError, match="another root's history"):
                    run.run(stop, interval=0.05)  # stops with the refusal instead of retrying it
            finally:
                timer.cancel()
                run.close()
            assert _objects(target) == before  # no pack, metadata snapshot or marker of b
            with pytest.raises(ConfigurationError, match="another root's history"):
                replica_retention.compact(b._store, target)
            with pytest.raises(ConfigurationError, match="another root's history"):
                b.drop("t:1", erase=True)
            assert b.query("t:1", "SELECT v FROM w") == [(2,)]  # its writes go on locally; nothing was erased
        _round(a, target, 3)  # the owner goes on
        incarnation = a._store.meta.tenants.lookup("t:1").incarnation  # type: ignore[union-attr]
    assert {c.entry.incarnation for c in replica_read.captures_of(target, ["t:1"])["t:1"]} == {incarnation}


def test_a_root_restored_from_the_replica_takes_it_over_and_the_old_root_is_refused(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=url) as a:
        _round(a, target, 1)
    clock = [0.0]
    with shardlite.Router(tmp_path / "a", create=False) as a:
        still_running = Replication(a._store, target, clock=lambda: clock[0])  # the old root goes on meanwhile
        try:
            still_running.run_round()
            replica_restore.restore_root_from_replica(target, str(tmp_path / "b"))
            with shardlite.Router(tmp_path / "b", replicate=url) as b:
                _round(b, target, 2)  # the restored root continues the history
                owner = b._store.meta.kv.get("replicate_owner")
            assert replica_owners.owner_of(target) == (True, owner)
            clock[0] += OWNER_RECHECK  # the old root's next check of the marker: it stops writing there
            with pytest.raises(ConfigurationError, match="taken over"):
                still_running.run_round()
        finally:
            still_running.close()
        with pytest.raises(ConfigurationError, match="another root's history"):
            _round(a, target, 3)  # and from its next start


def test_replicate_adopt_lets_a_root_continue_the_owner_and_replicate_run_stops_with_the_error(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    """The CLI: `replicate run --once` on a refused root exits with the error; after `replicate adopt` it
    replicates, and the first root is refused."""
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=url) as a:
        _round(a, target, 1)
    with shardlite.Router(tmp_path / "b", schema=SCHEMA, replicate=url) as b:
        with b.transaction("t:2") as tx:
            tx.execute("INSERT INTO w VALUES (5)")

    def cli(root: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shardlite", "--root", str(tmp_path / root), "replicate", *args],
                              capture_output=True, text=True, timeout=120)  # the S3 environment: inherited

    refused = cli("b", "run", "--once")
    assert refused.returncode == 2 and "another root's history" in refused.stderr, refused
    adopted = cli("b", "--json", "adopt")
    assert adopted.returncode == 0, adopted
    assert json.loads(adopted.stdout)["adopted"] == replica_owners.owner_of(target)[1]
    assert cli("b", "run", "--once").returncode == 0
    assert "t:2" in replica_read.captures_of(target, ["t:2"])
    assert cli("a", "run", "--once").returncode == 2


def test_a_replica_unreachable_at_the_first_round_stages_the_captures_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The S3 server is down, so the owner marker cannot be read: the round captures and stages, uploads
    nothing, and `run_round` (as `replicate run --once`) raises the replica's error instead of reporting
    success."""
    from helpers_s3 import separate_s3_server

    from shardlite.errors import ReplicaUnavailable
    from shardlite.files.staging import Staging

    with separate_s3_server() as server:  # a server of its own: stopping it disturbs no other test
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        a = shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=server.url("down"))
        server.stop()
    with a:
        with a.transaction("t:1") as tx:
            tx.execute("INSERT INTO w VALUES (1)")
        run = Replication(a._store)
        try:
            with pytest.raises(ReplicaUnavailable):
                run.run_round()
        finally:
            run.close()
        staging = Staging(a._store.node_path(a.nodes.list()[0].name))
        try:
            assert staging.staged_count()[0] == 1
        finally:
            staging.close()


def test_replicate_adopt_repairs_damaged_records(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    url, target = make_replica_target.url(), make_replica_target()
    with shardlite.Router(tmp_path / "a", schema=SCHEMA, replicate=url) as a:
        _round(a, target, 1)
        kv = a._store.meta.kv
        kv.put("replicate_owner", "not an id")
        kv.put("replicate_adopted", "[damaged")
        with pytest.raises(ConfigurationError, match="replicate adopt"):
            _round(a, target, 2)
        assert replica_owners.adopt(target, kv) is not None  # the old id, in the marker: taken over
        _round(a, target, 3)
        assert replica_owners.owner_of(target) == (True, kv.get("replicate_owner"))
