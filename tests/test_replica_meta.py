"""The metadata in the replica between snapshots (shardlite.services.replica_meta): deltas carry accounts,
sessions and the catalog to the replica about one interval after they change; a restore reads the newest
snapshot or delta at or before its time; unusable deltas fall back to an earlier point; old deltas, orphaned
deltas and an erase's deltas go; PostgreSQL metadata is snapshots only."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers_cli import run_script
from helpers_procs import child_env
from helpers_s3 import TargetFactory, copy_replicated, crashing_target_code

import shardlite
from shardlite.core import metadelta, metasnap
from shardlite.errors import ConfigurationError, ReplicaUnavailable
from shardlite.replica.target import ReplicaTarget, open_target
from shardlite.services import replica_meta, replica_meta_read
from shardlite.services import replication as replication_module
from shardlite.services.replica_restore import materialize, restore_root_from_replica
from shardlite.services.replication import Replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


@pytest.fixture(autouse=True)
def _a_delta_at_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds follow each other without waiting: a delta whenever the metadata changed, a snapshot only at
    the first round (or when a test says so)."""
    monkeypatch.setattr(replication_module, "META_DELTA_EVERY", 0.0)
    monkeypatch.setattr(replica_meta, "DELTA_SHARE", 1e9)  # no wait after a delta's cost either
    monkeypatch.setattr(replication_module, "META_EVERY", 3600.0)


@contextmanager
def _replicating(root: Path, url: str, target: ReplicaTarget | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> Iterator[tuple[shardlite.Router, Replication]]:
    """A router of a new root replicating to ``url``, and a replication service of it (closed after)."""
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        run = Replication(router._store, target, clock=clock)
        try:
            yield router, run
        finally:
            run.close()


def _names(target: ReplicaTarget, prefix: str) -> list[str]:
    return sorted(name for name, _size in target.list(prefix))


def _emails(root: Path, emails: list[str]) -> set[str]:
    with shardlite.Router(root, schema=SCHEMA, create=False) as back:
        return {email for email in emails if back.accounts.by_email(email) is not None}


def test_an_account_registered_after_the_snapshot_comes_back_from_a_delta(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    with _replicating(tmp_path / "root", url) as (router, run):
        router.accounts.register("first@example.com")
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 0)
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 0)  # nothing changed: nothing uploaded
        between = time.time_ns()
        router.accounts.register("second@example.com")
        with router.transaction("user:a") as tx:  # a new tenant: a catalog row
            tx.execute("INSERT INTO notes(body) VALUES ('a')")
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 1)
        router.accounts.register("third@example.com")
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 2)
    target = make_replica_target()
    deltas = _names(target, metadelta.PREFIX)
    assert len(deltas) == 2 and all(d.startswith(metadelta.PREFIX) for d in deltas)
    emails = ["first@example.com", "second@example.com", "third@example.com"]
    done = restore_root_from_replica(target, str(tmp_path / "back"))
    assert sorted(done.tenants) == ["user:a"]
    assert _emails(tmp_path / "back", emails) == set(emails)
    restore_root_from_replica(target, str(tmp_path / "at"), at_ns=between)  # the snapshot's point
    assert _emails(tmp_path / "at", emails) == {"first@example.com"}
    second_ns = metadelta.times_of(deltas[0])
    assert second_ns is not None
    restore_root_from_replica(target, str(tmp_path / "at2"), at_ns=second_ns[0])  # the first delta's point
    assert _emails(tmp_path / "at2", emails) == {"first@example.com", "second@example.com"}


def _three_points(tmp_path: Path, url: str) -> None:
    """A snapshot (one account), then two deltas (a second account, then a third)."""
    with _replicating(tmp_path / "root", url) as (router, run):
        for email in ("a@example.com", "b@example.com", "c@example.com"):
            router.accounts.register(email)
            run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 2)


def test_an_unusable_delta_gives_the_point_before_it(tmp_path: Path, make_replica_target: TargetFactory,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _three_points(tmp_path, make_replica_target.url())
    target = make_replica_target()
    first, last = _names(target, metadelta.PREFIX)
    emails = ["a@example.com", "b@example.com", "c@example.com"]
    target.put(last, target.get(last)[:-10])  # damaged
    with caplog.at_level(logging.WARNING, logger="shardlite.replicate"):
        restore_root_from_replica(target, str(tmp_path / "back"))
    assert _emails(tmp_path / "back", emails) == {"a@example.com", "b@example.com"}
    assert any(last in record.getMessage() for record in caplog.records)
    # a delta made against another snapshot (say, one an erase rewrote) is not applied to it
    (snapshot,) = _names(target, metasnap.PREFIX)
    header, global_db, app_global_db = metasnap.decode(target.get(snapshot))
    changed = bytearray(global_db)
    changed[-1] ^= 1  # a byte of the last page's free space: a valid image, not the one the delta knows
    target.put(snapshot, metasnap.encode(header.created_ns, header.root, bytes(changed), app_global_db))
    restore_root_from_replica(target, str(tmp_path / "back2"))
    assert _emails(tmp_path / "back2", emails) == {"a@example.com"}
    # no snapshot: nothing to apply a delta to, and the error says what to do
    target.delete_many([snapshot])
    with pytest.raises(ConfigurationError, match="no metadata snapshot"):
        materialize(target, str(tmp_path / "none"))
    assert first in _names(target, metadelta.PREFIX)


def test_deltas_older_than_the_fine_window_go_with_the_next_snapshot_and_orphans_with_retention(
        tmp_path: Path, make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    with _replicating(tmp_path / "root", url) as (router, run):
        for email in ("a@example.com", "b@example.com", "c@example.com"):
            router.accounts.register(email)
            run.run_round()
        assert len(_names(target, metadelta.PREFIX)) == 2
        run.run_round()  # unchanged: no snapshot, no pruning
        assert len(_names(target, metadelta.PREFIX)) == 2
        monkeypatch.setattr(replica_meta, "FINE_WINDOW", 0.0)
        monkeypatch.setattr(replication_module, "META_EVERY", 0.0)
        router.accounts.register("d@example.com")
        run.run_round()  # a snapshot: the deltas before it are older than the (empty) fine window
        assert run.meta.snapshots == 2
        assert _names(target, metadelta.PREFIX) == []
        monkeypatch.setattr(replication_module, "META_EVERY", 3600.0)
        router.accounts.register("e@example.com")
        run.run_round()
        (kept,) = _names(target, metadelta.PREFIX)
    snapshots = _names(target, metasnap.PREFIX)
    orphan = metadelta.object_name(time.time_ns(), 5)  # made against a snapshot the replica does not hold
    target.put(orphan, target.get(kept))
    assert replica_meta_read.prune(target, 0) == 1  # the orphan only: no snapshot is before the window's start
    assert _names(target, metadelta.PREFIX) == [kept] and _names(target, metasnap.PREFIX) == snapshots
    assert replica_meta_read.prune(target, time.time_ns()) == 1  # the older snapshot; the newest stays with its delta
    assert _names(target, metasnap.PREFIX) == snapshots[-1:] and _names(target, metadelta.PREFIX) == [kept]
    restore_root_from_replica(target, str(tmp_path / "back"))
    assert _emails(tmp_path / "back", ["d@example.com", "e@example.com"]) == {"d@example.com", "e@example.com"}


def test_an_erase_deletes_the_deltas_and_the_next_upload_is_a_snapshot(
        tmp_path: Path, make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    with _replicating(tmp_path / "root", url) as (router, run):
        router.accounts.register("a@example.com")
        run.run_round()
        with router.transaction("user:gone") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('personal')")
        router.accounts.register("b@example.com")
        run.run_round()
        assert run.meta.deltas == 1 and len(_names(target, metadelta.PREFIX)) == 1
        receipt = router.drop("user:gone", erase=True)
        assert receipt["metadata_deltas_deleted"] == 1
        assert _names(target, metadelta.PREFIX) == []
        router.accounts.register("c@example.com")
        run.run_round()  # the erase may have rewritten the snapshot: a snapshot, not a delta against it
        assert (run.meta.snapshots, run.meta.deltas) == (2, 1)
        router.accounts.register("d@example.com")
        run.run_round()
        assert run.meta.deltas == 2
    done = restore_root_from_replica(target, str(tmp_path / "back"))
    assert "user:gone" not in done.tenants
    emails = ["a@example.com", "b@example.com", "c@example.com", "d@example.com"]
    assert _emails(tmp_path / "back", emails) == set(emails)


def test_postgresql_metadata_is_replicated_as_snapshots_only(any_meta: str, tmp_path: Path,
                                                            make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    with _replicating(tmp_path / "root", url) as (router, run):
        router.accounts.register("a@example.com")
        run.run_round()
        router.accounts.register("b@example.com")
        run.run_round()
        expected = (1, 0) if any_meta == "postgresql" else (1, 1)
        assert (run.meta.snapshots, run.meta.deltas) == expected


def test_a_delta_as_large_as_half_the_images_is_a_snapshot_instead(tmp_path: Path,
                                                                  make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    with _replicating(tmp_path / "root", url) as (router, run):
        run.run_round()
        for i in range(3000):  # many more pages than the snapshot had
            router.accounts.register(f"u{i}@example.com", bio="x" * 100)
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (2, 0)
        router.accounts.register("one.more@example.com")
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (2, 1)
    target = make_replica_target()
    (delta,) = _names(target, metadelta.PREFIX)
    header, _g, _a = metadelta.decode(target.get(delta))
    snapshot = _names(target, metasnap.PREFIX)[-1]
    assert header.base == snapshot
    assert len(target.get(delta)) < len(target.get(snapshot)) // 4


def test_status_says_what_the_replica_holds_of_the_metadata(tmp_path: Path,
                                                          make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    root = tmp_path / "root"
    with _replicating(root, url) as (router, run):
        assert run.status()["metadata"] is None
        router.accounts.register("a@example.com")
        run.run_round()
        run.run_round()  # a first read of app_global.db may touch its time: the next look settles it
        first = run.status()["metadata"]
        assert first["object"].startswith(metasnap.PREFIX) and first["changed_since"] is False
        assert first["lag_s"] == 0.0
        time.sleep(0.01)  # a file time after the record's (not a timing assertion: ordering only)
        router.accounts.register("b@example.com")
        pending = run.status()["metadata"]
        assert pending["changed_since"] is True and pending["object"] == first["object"]
        run.run_round()
        second = run.status()["metadata"]
        assert second["object"].startswith(metadelta.PREFIX) and second["changed_since"] is False
    ran = run_script("--root", str(root), "replicate", "status", env=child_env())
    assert ran.returncode == 0, ran.stderr
    assert f"metadata: {second['object']}" in ran.stdout and "unchanged since" in ran.stdout


class FailingPuts:
    """A real target whose next ``fail`` puts raise ReplicaUnavailable (the S3 server gone for a moment)."""

    def __init__(self, target: ReplicaTarget) -> None:
        self.target, self.fail = target, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.target, name)

    def put(self, name: str, data: bytes) -> None:
        if self.fail:
            self.fail -= 1
            raise ReplicaUnavailable("the replica is gone for a moment")
        self.target.put(name, data)


def test_a_failed_upload_is_tried_again_at_the_next_round(tmp_path: Path,
                                                          make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    target = FailingPuts(make_replica_target())
    with _replicating(tmp_path / "root", url, target) as (router, run):  # type: ignore[arg-type]
        router.accounts.register("a@example.com")
        run.run_round()
        router.accounts.register("b@example.com")
        target.fail = 1
        with pytest.raises(ReplicaUnavailable):
            run._meta_round()
        run.run_round()  # nothing changed in the files since: the delta is uploaded all the same
        assert (run.meta.snapshots, run.meta.deltas) == (1, 1)
    restore_root_from_replica(make_replica_target(), str(tmp_path / "back"))
    assert _emails(tmp_path / "back", ["a@example.com", "b@example.com"]) == {"a@example.com", "b@example.com"}


def test_a_snapshot_follows_the_deltas_once_the_interval_passed_even_without_a_new_change(
        tmp_path: Path, make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replication_module, "META_EVERY", 30.0)
    clock = [1000.0]
    url = make_replica_target.url()
    with _replicating(tmp_path / "root", url, clock=lambda: clock[0]) as (router, run):
        run.run_round()
        router.accounts.register("a@example.com")
        clock[0] += 1
        run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 1)
        clock[0] += 10
        run.run_round()  # nothing changed, the interval has not passed: nothing
        assert (run.meta.snapshots, run.meta.deltas) == (1, 1)
        clock[0] += 30
        run.run_round()  # nothing changed since the delta, but a snapshot must stand for it before it goes
        assert (run.meta.snapshots, run.meta.deltas) == (2, 1)
        clock[0] += 300
        run.run_round()  # idle: nothing
        assert (run.meta.snapshots, run.meta.deltas) == (2, 1)
        router.accounts.register("b@example.com")
        run.run_round()  # the first change after a long idle time: a snapshot (the interval has passed)
        assert (run.meta.snapshots, run.meta.deltas) == (3, 1)


def test_an_erase_with_no_replicator_running_keeps_what_the_deltas_held(tmp_path: Path,
                                                                       make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url) as router:
        run = Replication(router._store)
        try:
            router.accounts.register("a@example.com")
            run.run_round()
            router.accounts.register("b@example.com")
            run.run_round()
            assert run.meta.deltas == 1
        finally:
            run.close()  # the replicator stops
        receipt = router.drop("user:never-existed", erase=True)
        assert receipt["metadata_deltas_deleted"] == 1 and receipt["metadata_snapshot_taken"]
    assert _names(target, metadelta.PREFIX) == []
    restore_root_from_replica(target, str(tmp_path / "back"))
    assert _emails(tmp_path / "back", ["a@example.com", "b@example.com"]) == {"a@example.com", "b@example.com"}


class DeletingGets:
    """A real target that deletes an object right before reading it (pruned between a listing and a read)."""

    def __init__(self, target: ReplicaTarget, doomed: set[str]) -> None:
        self.target, self.doomed = target, doomed
        self.gets: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.target, name)

    def get(self, name: str) -> bytes:
        self.gets.append(name)
        if name in self.doomed:
            self.target.delete_many([name])
        return self.target.get(name)


def test_a_delta_gone_meanwhile_or_a_damaged_snapshot_read_once(tmp_path: Path,
                                                                make_replica_target: TargetFactory) -> None:
    _three_points(tmp_path, make_replica_target.url())
    target = make_replica_target()
    first, last = _names(target, metadelta.PREFIX)
    (snapshot,) = _names(target, metasnap.PREFIX)
    meta = replica_meta_read.meta_at(DeletingGets(target, {last}), None)  # type: ignore[arg-type]
    assert meta.objects == (snapshot, first)
    target.put(snapshot, target.get(snapshot)[:-1])  # damaged
    counting = DeletingGets(target, set())
    with pytest.raises(ConfigurationError, match="damaged"):
        replica_meta_read.meta_at(counting, None)  # type: ignore[arg-type]
    assert counting.gets.count(snapshot) == 1 and first in counting.gets  # both deltas tried, one GET of it


def test_a_hostile_status_file_is_no_status(tmp_path: Path, make_replica_target: TargetFactory) -> None:
    root = tmp_path / "root"
    with shardlite.Router(root, schema=SCHEMA, replicate=make_replica_target.url()) as router:
        status = root / ".replica" / replica_meta.SHIPPED
        status.parent.mkdir(mode=0o700, exist_ok=True)
        for text in ('{"object": "v1/meta/00000000000000000001.meta", "uploaded_ns": Infinity, "as_of_ns": 1}',
                     '{"object": "v1/meta/00000000000000000001.meta", "uploaded_ns": 1, "as_of_ns": 1e300}',
                     '{"object": "../../etc/passwd", "uploaded_ns": 1, "as_of_ns": 1}', "[1, 2", "\x00\xff"):
            status.write_text(text)
            assert replica_meta.shipped(router._store, time.time_ns()) is None, text


_ERASE_KILLED = crashing_target_code("put", "put_if_absent", "delete_many") + (
    "from shardlite.services import erase\n"
    "router = shardlite.Router(sys.argv[1])\n"
    "erase.erase(router._store, 'user:gone', target=target)\n")


def test_kill_9_after_each_write_of_an_erase_keeps_every_account(tmp_path: Path) -> None:
    """An erase killed after each of its writes (PUT, delete) in turn, each time from the same replica and root
    (copied aside; a directory target: the order of the writes is the target's business, not the point),
    then run again: after every kill a whole-root restore holds every account the deltas held (never the
    snapshot's older state alone), and after the rerun no delta is left and the tenant is gone."""
    first = tmp_path / "first"
    url = "file://" + str(first / "replica")
    emails = ["a@example.com", "b@example.com", "c@example.com"]
    with _replicating(first / "root", url) as (router, run):
        router.accounts.register(emails[0])
        run.run_round()
        with router.transaction("user:gone") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('personal')")
        for email in emails[1:]:
            router.accounts.register(email)
            run.run_round()
        assert (run.meta.snapshots, run.meta.deltas) == (1, 2)
    for kill_after in range(1, 30):
        case = tmp_path / f"kill-{kill_after}"
        case_url = copy_replicated(first, case)
        ran = subprocess.run([sys.executable, "-c", _ERASE_KILLED, str(case / "root"), case_url, str(kill_after)],
                             capture_output=True, text=True, env=child_env(), timeout=300)
        target = open_target(case_url)
        if ran.returncode == 0:
            break  # no write left to kill after: the erase ran whole
        assert ran.returncode == -signal.SIGKILL, ran.stderr
        restore_root_from_replica(target, str(case / "after-kill"))
        assert _emails(case / "after-kill", emails) == set(emails), kill_after
        ran = run_script("--root", str(case / "root"), "tenants", "drop", "user:gone", "--erase", env=child_env())
        assert ran.returncode == 0, ran.stderr
        assert _names(target, metadelta.PREFIX) == [], kill_after
        done = restore_root_from_replica(target, str(case / "end"))
        assert "user:gone" not in done.tenants and _emails(case / "end", emails) == set(emails), kill_after
    else:
        raise AssertionError("the erase never finished")
    assert kill_after >= 5  # tombstone, segment, pack, snapshot, deltas: each write was a kill point
