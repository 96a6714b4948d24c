"""shardlite.files.walcapture.capture_unlocked: lock-free captures add up to the database at every captured
commit while a writer process commits continuously, never stage a frame of a log restarted under them (a
checkpoint that did not go through a capture) nor a damaged one, and never make a writer wait."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import apsw
import pytest
from helpers_wal import beside_writer, open_wal, rows_of

from shardlite.core import walformat as wf
from shardlite.files import walcapture as wc


class HookedFiles(wc.LogFiles):
    """LogFiles that run ``on_wal`` when a capture asks for the ``-wal`` descriptor: after it read the
    wal-index header and before it reads the log (the point where a lock-free capture is exposed)."""

    __slots__ = ("on_wal",)

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.on_wal: Callable[[], None] | None = None

    def wal(self) -> int | None:
        hook, self.on_wal = self.on_wal, None
        if hook is not None:
            hook()
        return super().wal()


class History:
    """A replicator's view of one file: lock-free captures first, the write lock only when needed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.lock = open_wal(path)
        self.ckpt = open_wal(path)
        self.lock.execute("SELECT 1 FROM sqlite_master").fetchall()  # opens the log, as the replicator does
        self.files = HookedFiles(path)
        self.cursor = wc.NO_CURSOR
        self.captures: list[wc.Capture] = []
        self.unlocked = 0
        self.fell_back: list[str] = []

    def keep(self, got: wc.Capture) -> None:
        if not got.empty:
            self.captures.append(got)
        self.cursor = got.cursor

    def capture(self) -> wc.Capture:
        got = wc.capture_unlocked(self.files, self.cursor)
        if isinstance(got, wc.NeedsLock):
            self.fell_back.append(got.reason)
            self.lock.execute("BEGIN IMMEDIATE")
            try:
                got = wc.capture(self.lock, self.files, self.cursor)
            finally:
                self.lock.execute("ROLLBACK")
        else:
            self.unlocked += 1
        self.keep(got)
        return got

    def checkpoint(self) -> wc.Cursor:
        self.capture()
        self.cursor = wc.capture_then_checkpoint(self.lock, self.ckpt, self.files, self.cursor, self.keep)
        return self.cursor

    def checkpoint_briefly_locked(self, refresh: Callable[[wc.Capture], None] | None = None) -> bool:
        guard = open_wal(self.path)
        try:
            self.cursor, done = wc.checkpoint_briefly_locked(self.lock, guard, self.ckpt, self.files, self.cursor,
                                                             self.keep, refresh=refresh)
        finally:
            guard.close()
        return done

    def rows(self) -> list[tuple[object, ...]]:
        return rows_of(wc.image_at(self.captures))

    def close(self) -> None:
        self.lock.close()
        self.ckpt.close()


@pytest.fixture
def db(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, apsw.Connection, list[History]]]:
    path = os.path.join(tmp_path, "t.db")
    conn = open_wal(path)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.execute("CREATE TABLE c(n INTEGER NOT NULL)")
    conn.execute("INSERT INTO c VALUES (0)")
    histories: list[History] = []
    yield path, conn, histories
    conn.close()
    for h in histories:  # descriptors of -shm only after every connection of the file (the -shm trap)
        h.close()
    for h in histories:
        h.files.close()


def _rows(conn: apsw.Connection) -> list[tuple[object, ...]]:
    return list(conn.execute("SELECT id, v FROM t ORDER BY id"))


def _history(histories: list[History], path: str) -> History:
    h = History(path)
    histories.append(h)
    return h


def test_unlocked_captures_continue_the_history(db: tuple[str, apsw.Connection, list[History]]) -> None:
    path, conn, histories = db
    conn.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
    h = _history(histories, path)
    assert isinstance(wc.capture_unlocked(h.files, h.cursor), wc.NeedsLock)  # the first one is a snapshot
    assert h.capture().snapshot is not None
    for round_ in range(12):
        for _ in range(round_ % 3 + 1):
            conn.execute("INSERT INTO t(v) VALUES (randomblob(?))", (700 * (round_ % 4),))
        if round_ % 4 == 3:
            assert h.checkpoint().closed  # the next generation continues from frame 1, lock-free
        else:
            got = h.capture()
            assert got.snapshot is None and got.frames
        assert h.rows() == _rows(conn)
    assert h.fell_back == ["no history yet: a snapshot"]
    assert sum(1 for c in h.captures if c.snapshot is not None) == 1
    assert wc.capture_unlocked(h.files, h.cursor) == wc.Capture([], None, h.cursor, h.cursor.page_size)


def test_a_log_restarted_before_the_log_is_read_falls_back_to_a_snapshot(
        db: tuple[str, apsw.Connection, list[History]]) -> None:
    """A foreign checkpoint (one that did not capture first) and a restart land between the lock-free read
    of the wal-index header and the read of the log: the capture stages nothing of it."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    for _ in range(6):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")

    def restart() -> None:
        conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_RESTART)  # copies every frame, not captured
        for _ in range(10):  # a new generation written over the frames the capture is about to read
            conn.execute("INSERT INTO t(v) VALUES (randomblob(2000))")

    h.files.on_wal = restart
    got = wc.capture_unlocked(h.files, h.cursor)
    assert isinstance(got, wc.NeedsLock) and "does not match" in got.reason
    assert h.capture().snapshot is not None  # the lost generation is a gap, never frames over it
    assert h.rows() == _rows(conn)


def test_a_log_restarted_while_its_frames_are_read_falls_back(
        db: tuple[str, apsw.Connection, list[History]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The restart lands after the lock-free capture read the log's header (same generation as the cursor)
    and before it reads the frames: the frames it then reads carry the new generation's salts."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    for _ in range(6):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    wal_fd = h.files.wal()
    reads: list[int] = []
    real_pread = wc.pread_all

    def pread_all(fd: int, size: int, offset: int) -> bytes:
        if fd == wal_fd and offset > 0 and not reads:  # the frames, after the header was read
            reads.append(offset)
            conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_RESTART)
            for _ in range(10):
                conn.execute("INSERT INTO t(v) VALUES (randomblob(2000))")
        return real_pread(fd, size, offset)

    monkeypatch.setattr(wc, "pread_all", pread_all)
    got = wc.capture_unlocked(h.files, h.cursor)
    monkeypatch.undo()
    assert reads, "the frames were never read"
    assert isinstance(got, wc.NeedsLock) and "do not verify" in got.reason
    assert h.capture().snapshot is not None
    assert h.rows() == _rows(conn)


def test_a_damaged_frame_is_never_staged(db: tuple[str, apsw.Connection, list[History]]) -> None:
    """A page that does not carry its checksum (a torn write) fails the chain: no lock-free capture, and
    the locked capture refuses it too."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    at = wf.frame_offset(h.cursor.frame + 1, h.cursor.page_size) + wf.FRAME_HEADER_SIZE + 100
    wal = os.open(path + "-wal", os.O_RDWR)  # -wal carries no locks: this descriptor may be closed
    try:
        byte = os.pread(wal, 1, at)
        os.pwrite(wal, bytes([byte[0] ^ 0xFF]), at)
        got = wc.capture_unlocked(h.files, h.cursor)
        assert isinstance(got, wc.NeedsLock) and "do not verify" in got.reason
        h.lock.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(wc.CaptureError):
                wc.capture(h.lock, h.files, h.cursor)
        finally:
            h.lock.execute("ROLLBACK")
        os.pwrite(wal, byte, at)
    finally:
        os.close(wal)
    assert h.capture().frames
    assert h.rows() == _rows(conn)


_ONE_WRITE = r"""
import sys, apsw
conn = apsw.Connection(sys.argv[1])
conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.set_busy_timeout(0)
for line in sys.stdin:
    try:
        with conn:
            conn.execute("INSERT INTO t(v) VALUES (?)", (line.strip(),))
        print("ok", flush=True)
    except apsw.BusyError:
        print("busy", flush=True)
"""


def test_a_writer_commits_during_a_lock_free_capture_without_waiting(
        db: tuple[str, apsw.Connection, list[History]]) -> None:
    """A writer process with no busy timeout commits while a lock-free capture is between its reads; a
    capture under the write lock would make it fail with Busy."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    writer = subprocess.Popen([sys.executable, "-c", _ONE_WRITE, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdin is not None and writer.stdout is not None
    answers: list[str] = []

    def write(body: str) -> None:
        assert writer.stdin is not None and writer.stdout is not None
        writer.stdin.write(body + "\n")
        writer.stdin.flush()
        answers.append(writer.stdout.readline().strip())

    try:
        for n in range(5):
            conn.execute("INSERT INTO t(v) VALUES (randomblob(2000))")
            h.files.on_wal = lambda n=n: write(f"during capture {n}")
            got = h.capture()
            assert got.frames and h.fell_back == ["no history yet: a snapshot"]
            assert h.rows() != _rows(conn)  # the write made during the capture is not in it ...
        assert answers == ["ok"] * 5
        h.lock.execute("BEGIN IMMEDIATE")  # ... and a capture under the lock is what would make it wait
        try:
            write("under the lock")
        finally:
            h.lock.execute("ROLLBACK")
        assert answers[-1] == "busy"
    finally:
        writer.stdin.close()
        writer.wait(timeout=30)
        writer.stdout.close()
    h.capture()
    assert h.rows() == _rows(conn)  # ... but the next capture has it


_WRITER = r"""
import sys, apsw
conn = apsw.Connection(sys.argv[1])
conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.set_busy_timeout(10000)
for i in range(int(sys.argv[2])):
    with conn:
        conn.execute("INSERT INTO t(id, v) VALUES (?, ?)", (i + 1, str(i).encode() * (i % 9 * 150)))
        if i % 40 == 39:
            conn.execute("DELETE FROM t WHERE id % 7 = ?", (i % 7,))
        conn.execute("UPDATE c SET n = ?", (i + 1,))
print("done", flush=True)
"""


def _model(n: int) -> list[tuple[object, ...]]:
    """The rows of t after the writer's first ``n`` commits (``_WRITER``)."""
    rows: dict[int, bytes] = {}
    for i in range(n):
        rows[i + 1] = str(i).encode() * (i % 9 * 150)
        if i % 40 == 39:
            for k in [k for k in rows if k % 7 == i % 7]:
                del rows[k]
    return sorted(rows.items())


def test_lock_free_captures_of_a_busy_writer_replay_every_captured_commit(
        db: tuple[str, apsw.Connection, list[History]]) -> None:
    """A writer process commits continuously while captures run lock-free (a checkpoint every few rounds,
    under the lock or mostly without it): the history replayed to each captured commit is exactly the
    database after that many of the writer's commits, and passes integrity_check."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    commits = 1500
    def step(round_: int) -> None:
        if round_ % 10 == 9:
            h.checkpoint()
        elif round_ % 10 == 4:
            h.checkpoint_briefly_locked()
        else:
            h.capture()

    rounds = beside_writer(_WRITER, [path, str(commits)], step)
    h.capture()
    assert h.unlocked > rounds // 2 and h.captures[0].snapshot is not None
    # replay commit by commit: the image at every captured commit is one the writer made
    image = bytearray(h.captures[0].snapshot or b"")
    seen = checked = 0
    for got in h.captures[1:]:
        assert got.snapshot is None, f"a snapshot in the middle: {h.fell_back}"
        frames = list(got.frames)
        for end, frame in enumerate(frames):
            if not frame.header.commit_size:
                continue
            seen += 1
            if end == len(frames) - 1 or seen % 5 == 0:  # every capture's end, and every 5th commit
                at = wf.replay(bytearray(image), frames[:end + 1], got.page_size)
                [(n,)] = rows_of(at, "SELECT n FROM c")
                assert isinstance(n, int) and rows_of(at) == _model(n)
                checked += 1
        wf.replay(image, frames, got.page_size)
    assert checked > 10
    assert rows_of(image) == _model(commits) == _rows(conn)


def _backfilled(files: wc.LogFiles) -> int:
    shm = files.shm()
    assert shm is not None
    return int.from_bytes(os.pread(shm, 4, 96), sys.byteorder)  # WalCkptInfo.nBackfill


def test_a_briefly_locked_checkpoint_copies_only_what_was_captured(
        db: tuple[str, apsw.Connection, list[History]]) -> None:
    """Commits made after the lock-free capture read the log are not copied into the database by the
    unlocked part of the checkpoint (they are not captured yet); with more of them than the lock is held
    for, the checkpoint stops there, and the history goes on without a snapshot."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    for _ in range(8):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")

    def commit_more() -> None:
        for _ in range(4):
            conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")

    h.files.on_wal = commit_more
    guard = open_wal(path)
    try:
        cursor, done = wc.checkpoint_briefly_locked(h.lock, guard, h.ckpt, h.files, h.cursor, h.keep,
                                                    locked_frames=1)
    finally:
        guard.close()
    assert not done and not cursor.closed and cursor == h.cursor
    end = wc.log_end(h.files)
    assert end is not None and end[1] > cursor.frame  # the commits made during the capture ...
    assert 0 < _backfilled(h.files) <= cursor.frame  # ... were not copied: only captured frames were
    conn.execute("INSERT INTO t(v) VALUES (1)")  # no restart: the log goes on
    got = h.capture()
    assert got.snapshot is None and got.frames and h.rows() == _rows(conn)
    guard = open_wal(path)
    try:
        cursor, done = wc.checkpoint_briefly_locked(h.lock, guard, h.ckpt, h.files, h.cursor, h.keep)
    finally:
        guard.close()
    assert done and cursor.closed  # nobody wrote meanwhile: every frame captured and copied
    h.cursor = cursor
    conn.execute("INSERT INTO t(v) VALUES (2)")  # restarts the log: the next generation continues
    got = h.capture()
    assert got.snapshot is None and got.frames[0].number == 1 and h.rows() == _rows(conn)
    assert h.fell_back == ["no history yet: a snapshot"]


def test_refreshed_snapshots_under_a_busy_writer_are_the_database_at_their_closed_cursor(
        db: tuple[str, apsw.Connection, list[History]]) -> None:
    """A writer process commits continuously while briefly locked checkpoints run with ``refresh``: every
    refreshed snapshot is exactly the database after the commit its (closed) cursor names, equal to the
    history replayed to there; with the snapshots in it, the history still replays to the writer's last
    commit. Writers never wait for the snapshot's read (it runs after the lock is let go)."""
    path, conn, histories = db
    h = _history(histories, path)
    h.capture()
    refreshed: list[tuple[int, wc.Capture]] = []  # (captures before it, the snapshot)

    def keep_refresh(got: wc.Capture) -> None:
        assert got.snapshot is not None and got.cursor == h.cursor._replace(closed=True)
        refreshed.append((len(h.captures), got))
        h.keep(got)

    def step(round_: int) -> None:
        if round_ % 4 == 3:
            h.checkpoint_briefly_locked(refresh=keep_refresh)
        else:
            h.capture()

    rounds = beside_writer(_WRITER, [path, "1500"], step)
    h.capture()
    assert len(refreshed) >= 2, (rounds, len(refreshed))
    for before, snap in refreshed:
        assert snap.snapshot is not None
        [(n,)] = rows_of(snap.snapshot, "SELECT n FROM c")
        assert isinstance(n, int) and rows_of(snap.snapshot) == _model(n)
        assert rows_of(wc.image_at(h.captures[:before])) == rows_of(snap.snapshot)
    assert h.rows() == _model(1500) == _rows(conn)  # replayed from the last refreshed snapshot on
    # no gap: the restarted logs were continued (a lock-free read that met the writer restarting the log is
    # taken again under the lock, which continues it: a fallback, not a snapshot)
    assert [reason for reason in h.fell_back if reason.endswith("a snapshot")] == ["no history yet: a snapshot"]
    assert sum(c.snapshot is not None for c in h.captures) == 1 + len(refreshed)
