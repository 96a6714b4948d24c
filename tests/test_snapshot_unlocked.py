"""Snapshots read after the write lock is let go (walcapture.capture_locked with a reader): writers commit
while the image is serialized, the image is the database at the cursor, and the history continues from it
without a second snapshot, also when every frame of the log was already in the database file (the cursor is
then closed, and the log restarts under the read)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import apsw
import pytest
from helpers_s3 import TargetFactory
from helpers_wal import beside_writer, open_wal, rows_of

import shardlite
from shardlite.core import timeline
from shardlite.core import walformat as wf
from shardlite.files import walcapture as wc
from shardlite.services import replica_read
from shardlite.services import replicator as replicator_module
from shardlite.services.replicator import NodeReplicator


class WritesFirst:
    """A reader connection whose ``serialize`` first commits a row through ``writer`` (busy timeout 0: it
    fails at once if the write lock is still held), so the image is read after a commit it must not hold."""

    def __init__(self, reader: apsw.Connection, writer: apsw.Connection) -> None:
        self.reader, self.writer, self.wrote = reader, writer, 0

    def execute(self, sql: str) -> apsw.Cursor:
        return self.reader.execute(sql)

    def serialize(self, name: str) -> bytes | None:
        self.writer.execute("INSERT INTO t(v) VALUES ('during the read')")
        self.wrote += 1
        return self.reader.serialize(name)


@pytest.fixture
def tenant(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]]:
    path = os.path.join(tmp_path, "t.db")
    conn = open_wal(path)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    for n in range(20):
        conn.execute("INSERT INTO t(v) VALUES (?)", (f"row {n}",))
    lock = open_wal(path)
    lock.execute("SELECT 1 FROM sqlite_master").fetchall()  # opens the log, as the replicator's connection does
    conn.set_busy_timeout(0)
    files = wc.LogFiles(path)
    yield path, conn, lock, files
    conn.close()
    lock.close()
    files.close()  # after every connection of the file (walcapture's -shm trap)


def _rows(conn: apsw.Connection) -> list[tuple[object, ...]]:
    return list(conn.execute("SELECT id, v FROM t ORDER BY id"))


def _salt(files: wc.LogFiles) -> bytes:
    fd = files.shm()
    assert fd is not None
    return wf.parse_shm_header(os.pread(fd, 2 * wf.SHM_HEADER_SIZE, 0)).salt


def _snapshot_during_a_write(tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]) -> wc.Capture:
    path, conn, lock, files = tenant
    before = _rows(conn)
    reader = open_wal(path)
    try:
        hooked = WritesFirst(reader, conn)
        got = wc.capture_locked(lock, files, wc.NO_CURSOR, reader=hooked)  # type: ignore[arg-type]
    finally:
        reader.close()
    assert hooked.wrote == 1  # the write went through while the image was read: the lock was let go
    assert got.snapshot is not None and rows_of(got.snapshot, "SELECT id, v FROM t ORDER BY id") == before
    return got


def test_a_first_snapshot_is_read_after_the_lock_and_the_history_continues_in_the_same_log(
        tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]) -> None:
    _path, conn, _lock, files = tenant
    salt = _salt(files)
    got = _snapshot_during_a_write(tenant)
    assert not got.cursor.closed and got.cursor.salt == salt == _salt(files)  # frames not in the file: no restart
    after = wc.capture_unlocked(files, got.cursor)
    assert isinstance(after, wc.Capture) and after.snapshot is None and len(after.frames) >= 1
    assert rows_of(wc.image_at([got, after]), "SELECT id, v FROM t ORDER BY id") == _rows(conn)


@pytest.mark.parametrize("read_after_the_lock", [True, False])
def test_a_snapshot_of_a_log_copied_whole_then_restarted_is_followed_by_another_snapshot(
        tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles], read_after_the_lock: bool) -> None:
    """Every frame is in the database file (a checkpoint of another process copied them) when the snapshot is
    taken: its cursor stays open, so once the next write restarts the log, the next capture is another
    snapshot, exact, never frames continuing past commits it cannot see."""
    path, conn, lock, files = tenant
    checkpointer = open_wal(path)
    try:
        log, copied = checkpointer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    finally:
        checkpointer.close()
    assert log == copied > 0
    salt = _salt(files)
    if read_after_the_lock:
        got = _snapshot_during_a_write(tenant)  # its write restarts the log under the read (read mark 0)
    else:
        got = wc.capture_locked(lock, files, wc.NO_CURSOR)
        conn.execute("INSERT INTO t(v) VALUES ('after the snapshot')")
    assert _salt(files) != salt and not got.cursor.closed and got.cursor.salt == salt
    assert isinstance(wc.capture_unlocked(files, got.cursor), wc.NeedsLock)
    again = wc.capture_locked(lock, files, got.cursor)
    assert again.snapshot is not None and rows_of(again.snapshot, "SELECT id, v FROM t ORDER BY id") == _rows(conn)


def test_commits_appended_to_a_log_copied_whole_are_never_skipped(
        tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]) -> None:
    """A reader holding the log keeps the next writer from restarting it: the writer appends to the same
    generation, and a checkpoint of another process may copy those frames and let the log restart before a
    capture reads them. The history must not go on from the next generation's frame 1 past them."""
    path, conn, lock, files = tenant
    conn.execute("CREATE TABLE u(id INTEGER PRIMARY KEY, v TEXT)")
    query = "SELECT 't', id, v FROM t UNION ALL SELECT 'u', id, v FROM u"
    reader, foreign = open_wal(path), open_wal(path)
    try:
        reader.execute("BEGIN")
        reader.execute(query).fetchall()  # its read mark: the log's end
        log, copied = foreign.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        assert log == copied > 0
        got = wc.capture_locked(lock, files, wc.NO_CURSOR)
        salt = _salt(files)
        conn.execute("INSERT INTO u(v) VALUES ('appended')")  # no restart: the reader holds a read mark
        assert _salt(files) == salt
        reader.execute("COMMIT")
        foreign.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)  # copies it; the next write restarts
        conn.execute("INSERT INTO t(v) VALUES ('after the restart')")
        assert _salt(files) != salt
        after = wc.capture_unlocked(files, got.cursor)
        if isinstance(after, wc.NeedsLock):
            after = wc.capture_locked(lock, files, got.cursor)
        assert rows_of(wc.image_at([got, after]), query) == list(conn.execute(query))
    finally:
        reader.close()
        foreign.close()


def test_a_closed_log_restarted_by_another_connection_continues_and_a_skipped_generation_is_a_gap(
        tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]) -> None:
    """The link between log generations is the first salt word (one more at each restart, whoever restarts);
    the checkpoint sequence in the header is each connection's own count, so a closed log restarted by
    another writer than the last one was taken for a gap (a whole snapshot after every such checkpoint)."""
    path, conn, lock, files = tenant
    other = open_wal(path)
    checkpointer = open_wal(path)
    try:
        history = [wc.capture_locked(lock, files, wc.NO_CURSOR)]
        for writer in (other, conn, other, other, conn):  # restarts by alternating connections
            cursor = wc.capture_then_checkpoint(lock, checkpointer, files, history[-1].cursor, history.append)
            assert cursor.closed
            writer.execute("INSERT INTO t(v) VALUES ('next generation')")
            after = wc.capture_unlocked(files, cursor)
            assert isinstance(after, wc.Capture) and after.frames[0].number == 1, after
            history.append(after)
        assert rows_of(wc.image_at(history), "SELECT id, v FROM t ORDER BY id") == _rows(conn)
        cursor = wc.capture_then_checkpoint(lock, checkpointer, files, history[-1].cursor, history.append)
        conn.execute("INSERT INTO t(v) VALUES ('a generation nobody captures')")
        checkpointer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)  # a checkpoint not through a capture
        other.execute("INSERT INTO t(v) VALUES ('the one after')")
        assert isinstance(wc.capture_unlocked(files, cursor), wc.NeedsLock)  # two restarts on: a gap
        got = wc.capture_locked(lock, files, cursor)
        assert got.snapshot is not None and rows_of(got.snapshot, "SELECT id, v FROM t ORDER BY id") == _rows(conn)
    finally:
        other.close()
        checkpointer.close()


def test_a_snapshot_read_after_the_lock_is_timed_while_the_lock_was_held(
        tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]) -> None:
    """Commits made while the image is read come after the capture's time (its notes are then not taken as the
    snapshot's), so the next capture times them by their notes."""
    path, conn, lock, files = tenant
    ticks = iter(range(100, 200))
    reader = open_wal(path)
    try:
        hooked = WritesFirst(reader, conn)
        got = wc.capture_locked(lock, files, wc.NO_CURSOR, reader=hooked, clock=lambda: next(ticks))  # type: ignore[arg-type]
    finally:
        reader.close()
    assert hooked.wrote == 1 and got.taken_ns == 100  # read once, under the lock, before the write
    assert wc.capture_locked(lock, files, got.cursor, clock=lambda: next(ticks)).taken_ns == 0  # frames: none


WRITER = r"""
import sys, apsw
conn = apsw.Connection(sys.argv[1])
conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.set_busy_timeout(10000)
for n in range(int(sys.argv[2])):
    conn.execute("UPDATE notes SET body = ? WHERE id = ?", (f"w{n}".ljust(300, "."), 1 + n % 50))
conn.close()
print("done")
"""


def test_a_large_tenant_is_first_captured_beside_a_busy_writer_without_a_copy_under_the_lock(
        tmp_path: os.PathLike[str], make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tenant past ``UNLOCKED_SNAPSHOT_BYTES`` gets its first snapshot read by a second connection after the
    write lock is let go, while a writer process commits; the replica then holds exactly the live tenant."""
    url = make_replica_target.url()
    router = shardlite.Router(os.path.join(tmp_path, "root"),
                              schema={"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]},
                              replicate=url)
    target = make_replica_target()
    replicator = NodeReplicator(router._store, router.nodes.list()[0].name, target)
    readers: list[bool] = []
    real = wc.capture_locked

    def recording(*args: object, reader: apsw.Connection | None = None, **kwargs: object) -> wc.Capture:
        got = real(*args, reader=reader, **kwargs)  # type: ignore[arg-type]
        readers.append(reader is not None and got.snapshot is not None)
        return got

    monkeypatch.setattr(wc, "capture_locked", recording)
    try:
        with router.transaction("user:big") as tx:
            tx.executemany("INSERT INTO notes(body) VALUES (?)", [("x" * 1000,) for _ in range(3000)])
        path = router._store.path_of(router._store.meta.tenants.lookup("user:big"))  # type: ignore[arg-type]
        assert os.path.getsize(path) + os.path.getsize(path + "-wal") >= replicator_module.UNLOCKED_SNAPSHOT_BYTES
        replicator.reconcile()

        def step(_round: int) -> None:
            replicator.mark("user:big")
            replicator.run_round()

        beside_writer(WRITER, [path, "400"], step)
        step(0)
        assert readers and readers[0]  # the first capture: a snapshot read after the lock
        stats = replicator.run_round()
        assert stats.snapshots == 0
        found = timeline.image_at(replica_read.captures_of(target, ["user:big"])["user:big"])
        assert found is not None
        live = [tuple(r) for r in router.query("user:big", "SELECT id, body FROM notes ORDER BY id")]
        assert rows_of(found[0], "SELECT id, body FROM notes ORDER BY id") == live
    finally:
        replicator.close()
        router.close()


def test_a_snapshot_at_the_cursor_is_read_after_the_lock_and_none_once_a_writer_committed_past_it(
        tenant: tuple[str, apsw.Connection, apsw.Connection, wc.LogFiles]) -> None:
    """An aged refresh (core/refresh.py): a snapshot at the position the last capture reached, its image read
    after the lock while a writer commits; when the log has moved past the cursor there is none (a later
    capture tries again)."""
    path, conn, lock, files = tenant
    first = wc.capture_locked(lock, files, wc.NO_CURSOR)
    conn.execute("INSERT INTO t(v) VALUES ('captured')")
    frames = wc.capture_unlocked(files, first.cursor)
    assert isinstance(frames, wc.Capture) and frames.frames
    at = _rows(conn)
    reader = open_wal(path)
    try:
        hooked = WritesFirst(reader, conn)
        got = wc.snapshot_at_cursor(lock, hooked, files, frames.cursor)  # type: ignore[arg-type]
        assert hooked.wrote == 1 and got is not None and got.cursor == frames.cursor
        assert got.snapshot is not None and rows_of(got.snapshot, "SELECT id, v FROM t ORDER BY id") == at
        assert rows_of(wc.image_at([first, frames]), "SELECT id, v FROM t ORDER BY id") == at  # the same point
        assert wc.snapshot_at_cursor(lock, reader, files, frames.cursor) is None  # the write moved the log on
        later = wc.capture_unlocked(files, frames.cursor)
        assert isinstance(later, wc.Capture)
        again = wc.snapshot_at_cursor(lock, reader, files, later.cursor)
        assert again is not None and again.snapshot is not None
        assert rows_of(again.snapshot, "SELECT id, v FROM t ORDER BY id") == _rows(conn)
    finally:
        reader.close()


def test_a_tenant_that_writes_a_little_every_hour_gets_a_snapshot_a_day(
        tmp_path: os.PathLike[str], make_replica_target: TargetFactory) -> None:
    """A small tenant written once an hour never reaches the ratio bound nor a checkpoint; after a day its
    next capture adds a snapshot, so a restore reads about a day of history, not a week. A large tenant
    written as little gets none (its frames stay below a quarter of its size). Every restore point stays
    exact."""
    from shardlite.services.replica_restore import restore_tenant

    hour = 3600 * 1_000_000_000
    now = [1_800_000_000 * 1_000_000_000]
    url = make_replica_target.url()
    router = shardlite.Router(os.path.join(tmp_path, "root"),
                              schema={"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]},
                              replicate=url)
    target = make_replica_target()
    replicator = NodeReplicator(router._store, router.nodes.list()[0].name, target, clock=lambda: now[0])

    def live(key: str) -> list[tuple[object, ...]]:
        return [tuple(r) for r in router.query(key, "SELECT id, body FROM notes ORDER BY id")]

    try:
        with router.transaction("user:small") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('h0')")
        with router.transaction("user:big") as tx:
            tx.executemany("INSERT INTO notes(body) VALUES (?)", [("x" * 4000,) for _ in range(500)])
        replicator.reconcile()
        assert replicator.run_round().snapshots == 2
        points: list[tuple[int, str]] = []
        refreshed: list[int] = []
        for h in range(1, 31):
            now[0] += hour
            for key in ("user:small", "user:big"):
                with router.transaction(key) as tx:
                    tx.execute("UPDATE notes SET body = ? WHERE id = 1", (f"h{h}",))
                replicator.mark(key)
            stats = replicator.run_round()
            assert stats.failed == 0 and stats.checkpoints == 0, stats
            refreshed += [h] * stats.refreshed
            cursor = replicator.staging.cursor("user:small")
            assert cursor is not None
            points.append((cursor.last_commit_ns, f"h{h}"))
        assert refreshed == [24]  # one, a day after the first snapshot: the small tenant's
        captures = replica_read.captures_of(target, ["user:small", "user:big"])
        assert [c.entry.kind for c in captures["user:big"]].count("snapshot") == 1
        small = captures["user:small"]
        assert [c.entry.kind for c in small].count("snapshot") == 2
        restore_tenant(router._store, target, "user:small", as_key="user:latest")
        assert live("user:latest") == live("user:small")
        # a restore at the latest commit replays from the refresh: its 6 hours of frames, not the 30 before
        last = max(c for c in small if c.entry.kind == "snapshot")
        assert sum(c.entry.kind == "frames" for c in small if c.order > last.order) == 6
        for i, (when, body) in enumerate(points):  # every restore point, before and after the refresh
            restore_tenant(router._store, target, "user:small", as_key=f"user:at{i}", at_ns=when)
            assert live(f"user:at{i}") == [(1, body)]
    finally:
        replicator.close()
        router.close()


def _mx_frame_elsewhere(path: str) -> int:
    """The log's last commit frame, read from ``-shm`` by another process: this one holds connections of the
    file, and closing a descriptor of ``-shm`` here would drop their locks (walcapture's ``-shm`` trap)."""
    import subprocess
    import sys

    code = ("import sys; from shardlite.core import walformat as wf; "
            "print(wf.parse_shm_header(open(sys.argv[1], 'rb').read(2 * wf.SHM_HEADER_SIZE)).mx_frame)")
    return int(subprocess.run([sys.executable, "-c", code, path + "-shm"], capture_output=True, text=True,
                              check=True).stdout)


def test_a_commit_made_while_a_first_snapshot_is_read_keeps_its_noted_time(
        tmp_path: os.PathLike[str], make_replica_target: TargetFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The replicator stages a snapshot read after the lock with the time taken under it: a commit made during
    the read is timed by its writer's note at the next capture, not at that capture (a restore at a time in
    between would miss it)."""
    import time

    url = make_replica_target.url()
    router = shardlite.Router(os.path.join(tmp_path, "root"),
                              schema={"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]},
                              replicate=url)
    replicator = NodeReplicator(router._store, router.nodes.list()[0].name, make_replica_target())
    monkeypatch.setattr(replicator_module, "UNLOCKED_SNAPSHOT_BYTES", 0)
    made: dict[str, int] = {}
    real = wc._snapshot

    def commit_during_the_read(conn: apsw.Connection, due: object, taken_ns: int = 0) -> wc.Capture:
        if taken_ns and not made:  # the lock is let go: a writer commits, then the image is read
            with router.transaction("user:a") as tx:
                tx.execute("INSERT INTO notes(body) VALUES ('during the read')")
            made["at"] = time.time_ns()
        return real(conn, due, taken_ns)  # type: ignore[arg-type]

    try:
        with router.transaction("user:a") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('first')")
        path = router._store.path_of(router._store.meta.tenants.lookup("user:a"))  # type: ignore[arg-type]
        monkeypatch.setattr(wc, "_snapshot", commit_during_the_read)
        replicator.mark("user:a")
        replicator.run_round(upload=False)
        assert made, "the snapshot was not read after the lock"
        frame = _mx_frame_elsewhere(path)
        replicator.mark("user:a", [(frame, made["at"])])  # the writer's note of that commit
        replicator.run_round(upload=False)
        frames = [s for s in replicator.staging.staged(1 << 30) if s.kind == "frames"]
        assert dict(frames[-1].commits)[frame] == made["at"]
    finally:
        replicator.close()
        router.close()


PROBE = r"""
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
found = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 128, 1, 0))
kind, _whence, _start, _len, pid = struct.unpack("hhqqi", found)
print(0 if kind == fcntl.F_UNLCK else pid)
"""

WRITE_ONE = r"""
import apsw, sys
conn = apsw.Connection(sys.argv[1])
conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("UPDATE notes SET body = ? WHERE id = 1", (sys.argv[2],))
conn.close()
"""


def test_an_aged_refresh_keeps_this_process_s_locks_on_the_tenant_s_wal_index(
        tmp_path: os.PathLike[str], make_replica_target: TargetFactory) -> None:
    """The refresh's lock-free look at the log's end goes through the kept connection's descriptors: a
    descriptor of ``-shm`` opened and closed beside that connection would drop every lock this process holds
    on it (walcapture's ``-shm`` trap), and a writer process could then re-initialise the wal-index under the
    connection. Its read lock on the wal-index's DMS byte (offset 128) must still be held after the refresh."""
    import subprocess
    import sys

    url = make_replica_target.url()
    root = os.path.join(tmp_path, "root")
    with shardlite.Router(root, schema={"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]},
                          replicate=url) as router:
        with router.transaction("user:a") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('h0')")
    hour = 3600 * 1_000_000_000
    now = [1_800_000_000 * 1_000_000_000]
    router = shardlite.Router(root, create=False)  # no tenant connection of its own: writes come from processes
    replicator = NodeReplicator(router._store, router.nodes.list()[0].name, make_replica_target(),
                                clock=lambda: now[0])
    path = router._store.path_of(router._store.meta.tenants.lookup("user:a"))  # type: ignore[arg-type]

    def holder() -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, path + "-shm"], capture_output=True, text=True, check=True)
        return int(out.stdout)

    try:
        replicator.reconcile()
        replicator.run_round()
        assert "user:a" in replicator._open and holder() == os.getpid()
        refreshed = 0
        for h in range(1, 26):
            now[0] += hour
            subprocess.run([sys.executable, "-c", WRITE_ONE, path, f"h{h}"], check=True)
            replicator.mark("user:a")
            refreshed += replicator.run_round().refreshed
        assert refreshed == 1 and "user:a" in replicator._open
        assert holder() == os.getpid()
    finally:
        replicator.close()
        router.close()
