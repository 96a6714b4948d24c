"""Refreshed snapshots (shardlite.core.refresh): when one is due, how a node's staging counts the frames
staged since a tenant file's last snapshot, and a staging file written before that count existed."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_procs import spawn, write_script
from helpers_s3 import TargetFactory
from hypothesis import given
from hypothesis import strategies as st

import shardlite
from shardlite.core import walformat as wf
from shardlite.core.refresh import (
    AGE_DIVISOR,
    REFRESH_AGE_NS,
    REFRESH_FLOOR,
    REFRESH_RATIO,
    aged_snapshot_due,
    snapshot_due,
)
from shardlite.files import walcapture as wc
from shardlite.files.staging import Staging
from shardlite.replica.target import open_target as make_target
from shardlite.services import replica_meta, replica_read
from shardlite.services.replica_restore import restore_tenant
from shardlite.services.replication import Replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


@given(st.integers(0, 1 << 40), st.integers(0, 1 << 36), st.integers(1, 64), st.integers(1, 1 << 30))
def test_a_snapshot_is_due_once_the_frames_reach_the_ratio_and_the_floor(frame_bytes: int, image_bytes: int,
                                                                          ratio: int, floor: int) -> None:
    due = snapshot_due(frame_bytes, image_bytes, ratio=ratio, floor=floor)
    assert due == (frame_bytes >= ratio * image_bytes and frame_bytes >= floor)
    if due:  # more frames never make it not due
        assert snapshot_due(frame_bytes + 1, image_bytes, ratio=ratio, floor=floor)


def test_the_defaults() -> None:
    assert not snapshot_due(REFRESH_FLOOR - 1, 0)
    assert snapshot_due(REFRESH_FLOOR, 0)
    big = 10 * REFRESH_FLOOR
    assert not snapshot_due(REFRESH_RATIO * big - 1, big) and snapshot_due(REFRESH_RATIO * big, big)


@given(st.integers(0, 1 << 62), st.integers(0, 1 << 62), st.integers(0, 1 << 40), st.integers(0, 1 << 36),
       st.integers(1, 1 << 50), st.integers(1, 64))
def test_a_snapshot_is_due_by_age_once_old_enough_and_the_frames_reach_its_share(
        now: int, snapshot_ns: int, frame_bytes: int, image_bytes: int, age: int, divisor: int) -> None:
    due = aged_snapshot_due(now, snapshot_ns, frame_bytes, image_bytes, age_ns=age, divisor=divisor)
    assert due == (frame_bytes > 0 and snapshot_ns > 0 and now - snapshot_ns >= age
                   and frame_bytes * divisor >= image_bytes)
    if due:  # later, or with more frames, it stays due
        assert aged_snapshot_due(now + 1, snapshot_ns, frame_bytes + 1, image_bytes, age_ns=age, divisor=divisor)


def test_the_age_defaults() -> None:
    day, image = REFRESH_AGE_NS, 1 << 20
    assert not aged_snapshot_due(10 + day - 1, 10, image, image)  # younger than a day
    assert aged_snapshot_due(10 + day, 10, image // AGE_DIVISOR, image)
    assert not aged_snapshot_due(10 + day, 10, image // AGE_DIVISOR - 1, image)  # too few frames for its size
    assert not aged_snapshot_due(10 + day, 10, 0, image) and not aged_snapshot_due(10 + day, 0, image, image)


def _frames(first: int, count: int, page_size: int = 512) -> list[wf.Frame]:
    out = []
    for number in range(first, first + count):
        header = wf.FrameHeader(number, 1, b"salt0001", (0, 0))
        out.append(wf.Frame(number, header, b"\0" * page_size))
    return out


def _capture(frames: list[wf.Frame] | None, snapshot: bytes | None, last: int) -> wc.Capture:
    cursor = wc.Cursor(b"salt0001", 1, last, (0, 0), 512)
    return wc.Capture(frames or [], snapshot, cursor, 512)


def test_the_staging_counts_frames_since_the_last_snapshot_per_file(tmp_path: Path) -> None:
    node = os.fspath(tmp_path / "n1")
    os.makedirs(node, mode=0o700)
    staging = Staging(node)
    try:
        staging.stage("user:a", "inc1", 1, _capture(None, b"x" * 4096, 0), [(0, 1)], 1)
        found = staging.cursor("user:a")
        assert found is not None and (found.frame_bytes, found.image_bytes, found.snapshot_ns) == (0, 4096, 1)
        staging.stage("user:a", "inc1", 1, _capture(_frames(1, 3), None, 3), [(3, 2)], 2)
        staging.stage("user:a", "inc1", 1, _capture(_frames(4, 2), None, 5), [(5, 3)], 3)
        found = staging.cursor("user:a")
        assert found is not None
        frame = len(wf.encode_frame(_frames(1, 1)[0]))
        assert (found.frame_bytes, found.image_bytes) == (5 * frame, 4096)
        staging.set_cursor("user:a", "inc1", 1, found.cursor._replace(closed=True), 3)  # a checkpoint keeps them
        found = staging.cursor("user:a")
        assert found is not None and (found.frame_bytes, found.image_bytes) == (5 * frame, 4096)
        assert found.snapshot_ns == 1
        staging.stage("user:a", "inc1", 1, _capture(None, b"y" * 1024, 5), [(5, 3)], 4)  # a refreshed snapshot
        found = staging.cursor("user:a")
        assert found is not None and (found.frame_bytes, found.image_bytes, found.snapshot_ns) == (0, 1024, 4)
        staging.stage("user:a", "inc1", 1, _capture(_frames(1, 1), None, 1), [(1, 5)], 5)
        staging.stage("user:a", "inc2", 2, _capture(_frames(1, 2), None, 2), [(2, 6)], 6)  # another file: anew
        found = staging.cursor("user:a")
        assert found is not None and (found.incarnation, found.frame_bytes, found.image_bytes) == ("inc2", 2 * frame, 0)
    finally:
        staging.close()


def test_a_staging_written_before_the_count_gets_it(tmp_path: Path) -> None:
    node = os.fspath(tmp_path / "n1")
    directory = tmp_path / "n1" / ".replica"
    os.makedirs(directory, mode=0o700)
    Staging(node).close()
    path = os.fspath(directory / "staging.db")
    conn = apsw.Connection(path)  # the first layout of ``cursors``, with one tenant's cursor in it
    conn.execute("DROP TABLE cursors")
    conn.execute("CREATE TABLE cursors(key TEXT PRIMARY KEY, incarnation TEXT NOT NULL, generation INTEGER NOT NULL,"
                 " salt BLOB NOT NULL, ckpt_seq INTEGER NOT NULL, frame INTEGER NOT NULL, c1 INTEGER NOT NULL,"
                 " c2 INTEGER NOT NULL, page_size INTEGER NOT NULL, closed INTEGER NOT NULL,"
                 " captured_ns INTEGER NOT NULL, last_commit_ns INTEGER NOT NULL) STRICT")
    conn.execute("INSERT INTO cursors VALUES ('user:a', 'inc1', 1, x'73616c7430303031', 1, 7, 1, 2, 512, 0, 10, 9)")
    conn.close()
    staging = Staging(node)
    try:
        found = staging.cursor("user:a")
        assert found is not None and found.cursor.frame == 7 and found.last_commit_ns == 9
        assert (found.frame_bytes, found.image_bytes) == (0, 0)
        assert found.snapshot_ns == 10  # a snapshot's age counts from the last capture before the count began
        staging.stage("user:a", "inc1", 1, _capture(_frames(8, 1), None, 8), [(8, 11)], 11)
        found = staging.cursor("user:a")
        assert found is not None and found.frame_bytes == len(wf.encode_frame(_frames(8, 1)[0]))
        assert found.snapshot_ns == 10
    finally:
        staging.close()


def test_a_commit_made_while_a_refreshed_snapshot_is_read_keeps_its_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_replica_target: TargetFactory) -> None:
    """Writers go on while the replicator reads a refreshed snapshot; a commit made then is timed by its
    writer's note like any other, so a restore at a time right after it holds it (the refresh is staged with
    the capture time of the capture it follows: a later one would make the next capture ignore that note)."""
    monkeypatch.setattr(replica_meta, "DELTA_SHARE", 1e9)
    real = wc.checkpoint_briefly_locked
    during: list[int] = []

    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=make_replica_target.url()) as router:
        def briefly_locked(*args: Any, refresh: Callable[[wc.Capture], None] | None = None, **kwargs: Any) -> Any:
            if refresh is None:
                return real(*args, **kwargs)

            def commit_then_refresh(got: wc.Capture) -> None:  # the lock is let go, the image read: a writer commits
                with router.transaction("user:a") as tx:
                    tx.execute("UPDATE notes SET body = 'during' WHERE id = 1")
                during.append(time.time_ns())
                refresh(got)
            return real(*args, refresh=commit_then_refresh, **kwargs)

        monkeypatch.setattr(wc, "checkpoint_briefly_locked", briefly_locked)
        replication = Replication(router._store)
        try:
            with router.transaction("user:a") as tx:
                tx.execute("INSERT INTO notes(id, body) VALUES (1, 'first')")
            replication.run_round()
            for node in replication.nodes.values():
                node.replicator.refresh_ratio, node.replicator.refresh_floor = 1, 64 * 1024
            for n in range(1100):  # past DUE_FRAMES: the next round checkpoints and refreshes
                with router.transaction("user:a") as tx:
                    tx.execute("UPDATE notes SET body = ? WHERE id = 1", (f"v{n}",))
            replication.run_round()
            assert len(during) == 1
            with router.transaction("user:a") as tx:
                tx.execute("UPDATE notes SET body = 'after' WHERE id = 1")
            replication.run_round()
        finally:
            replication.close()
    target = make_replica_target()
    with shardlite.Router(tmp_path / "live", schema=SCHEMA) as live:
        restore_tenant(live._store, target, "user:a", at_ns=during[0])
        assert [tuple(r) for r in live.query("user:a", "SELECT body FROM notes")] == [("during",)]
        restore_tenant(live._store, target, "user:a", as_key="user:latest")
        assert [tuple(r) for r in live.query("user:latest", "SELECT body FROM notes")] == [("after",)]


KILLED_AT_A_REFRESH = """
import os, signal, sys
import shardlite
from shardlite.files import walcapture as wc
from shardlite.services.replication import Replication

root, point = sys.argv[1], sys.argv[2]
real = wc.checkpoint_briefly_locked


def briefly_locked(*args, refresh=None, **kwargs):
    if refresh is None:
        return real(*args, **kwargs)

    def killed(got):
        if point == "before":  # the image read, nothing staged
            os.kill(os.getpid(), signal.SIGKILL)
        refresh(got)
        os.kill(os.getpid(), signal.SIGKILL)  # staged, the closed cursor not stored, nothing uploaded
    return real(*args, refresh=killed, **kwargs)


wc.checkpoint_briefly_locked = briefly_locked
with shardlite.Router(root, create=False) as router:
    replication = Replication(router._store)
    for node in replication.nodes.values():
        node.replicator.refresh_ratio, node.replicator.refresh_floor = 1, 64 * 1024
    print("ready", flush=True)
    while True:
        replication.run_round()
"""


@pytest.mark.parametrize("point", ["before", "after"])
def test_a_replicator_killed_around_a_refresh_loses_nothing(tmp_path: Path, point: str) -> None:
    """kill -9 of the replicator right after it read a refreshed snapshot's image (nothing staged), or right
    after it staged it (nothing uploaded): the closed cursor was stored first, so the next replicator continues
    the next log generation with frames (no snapshot for a gap), the refresh is there exactly when it was
    staged, the latest restore is exact and every restore point is a state the tenant went through."""
    url = "file://" + os.fspath(tmp_path / "replica")
    with shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url) as router:
        with router.transaction("user:a") as tx:
            tx.execute("INSERT INTO notes(id, body) VALUES (1, 'v0')")
        first = Replication(router._store)
        try:
            first.run_round()  # the tenant's history starts with its snapshot
        finally:
            first.close()
        times: list[int] = []  # a time right after each commit n (n = 1, 2, ...)
        replicator = spawn(write_script(tmp_path, "killed.py", KILLED_AT_A_REFRESH), router.root, point)
        try:
            assert replicator.stdout is not None and replicator.stdout.readline().strip() == "ready"
            for n in range(1, 1201):  # past DUE_FRAMES: once the writes pause, a checkpoint and a refresh
                with router.transaction("user:a") as tx:
                    tx.execute("UPDATE notes SET body = ? WHERE id = 1", (f"v{n}",))
                times.append(time.time_ns())
            replicator.wait(timeout=120)
        finally:
            if replicator.poll() is None:
                replicator.kill()
            replicator.communicate()
        assert replicator.returncode == -signal.SIGKILL, "the replicator never reached a refresh"
        for n in range(1201, 1204):  # the next log generation
            with router.transaction("user:a") as tx:
                tx.execute("UPDATE notes SET body = ? WHERE id = 1", (f"v{n}",))
            times.append(time.time_ns())
        replication = Replication(router._store)
        try:
            for _ in range(2):
                replication.run_round()
        finally:
            replication.close()
    target = make_target(url)
    history = replica_read.captures_of(target, ["user:a"])["user:a"]
    snapshots = [c for c in history if c.entry.kind == "snapshot"]
    assert len(snapshots) == (1 if point == "before" else 2)  # no snapshot for a gap; the staged refresh shipped
    with shardlite.Router(tmp_path / "live", schema=SCHEMA) as live:
        restore_tenant(live._store, target, "user:a", as_key="user:latest")
        assert [tuple(r) for r in live.query("user:latest", "SELECT body FROM notes")] == [("v1203",)]
        reached = []
        for n in range(1, 1204, 67):  # a commit timed by its note or, when captured first, a little later
            restore_tenant(live._store, target, "user:a", as_key=f"user:at{n}", at_ns=times[n - 1])
            [(body,)] = [tuple(r) for r in live.query(f"user:at{n}", "SELECT body FROM notes")]
            assert isinstance(body, str) and int(body[1:]) <= n
            reached.append(int(body[1:]))
        assert reached == sorted(reached)
        restore_tenant(live._store, target, "user:a", as_key="user:end", at_ns=times[-1])  # noted before the round
        assert [tuple(r) for r in live.query("user:end", "SELECT body FROM notes")] == [("v1203",)]


def test_two_processes_opening_an_old_staging_file_at_once_both_migrate_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process adds the new columns between this one's look at them and its write: the write looks
    again inside its transaction instead of failing on a duplicate column."""
    import contextlib
    from collections.abc import Iterator

    node = os.fspath(tmp_path / "n1")
    Staging(node).close()
    conn = apsw.Connection(os.path.join(node, ".replica", "staging.db"))
    conn.execute("ALTER TABLE cursors DROP COLUMN snapshot_ns")  # the layout before that column
    conn.close()
    real = Staging._write
    others: list[Staging] = []
    started: list[bool] = []

    @contextlib.contextmanager
    def another_opens_first(self: Staging) -> Iterator[None]:
        if not started:
            started.append(True)
            others.append(Staging(node))  # migrates the file meanwhile
        with real(self):
            yield

    monkeypatch.setattr(Staging, "_write", another_opens_first)
    staging = Staging(node)
    try:
        assert len(others) == 1 and staging._columns() >= {"snapshot_ns", "frame_bytes", "image_bytes"}
    finally:
        staging.close()
        for other in others:
            other.close()
