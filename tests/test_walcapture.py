"""shardlite.files.walcapture: captures under the write lock add up to the database, across checkpoints,
log restarts, checkpoints that did not go through a capture, and a writer in another process."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import apsw
import pytest
from helpers_wal import beside_writer, open_wal, rows_of

from shardlite.files import walcapture as wc


def _rows(conn: apsw.Connection) -> list[tuple[object, ...]]:
    return list(conn.execute("SELECT id, v FROM t ORDER BY id"))


_open_histories: list[History] = []


class History:
    def __init__(self, path: str) -> None:
        _open_histories.append(self)
        self.path = path
        self.lock = open_wal(path)
        self.ckpt = open_wal(path)
        self.files = wc.LogFiles(path)  # closed after every connection of the file (module docstring)
        self.cursor = wc.NO_CURSOR
        self.captures: list[wc.Capture] = []

    def capture(self) -> wc.Capture:
        self.lock.execute("BEGIN IMMEDIATE")
        try:
            got = wc.capture(self.lock, self.files, self.cursor)
        finally:
            self.lock.execute("ROLLBACK")
        self._keep(got)
        return got

    def _keep(self, got: wc.Capture) -> None:
        if not got.empty:
            self.captures.append(got)
        self.cursor = got.cursor

    def checkpoint(self) -> wc.Cursor:
        self.cursor = wc.capture_then_checkpoint(self.lock, self.ckpt, self.files, self.cursor, self._keep)
        return self.cursor

    def rows(self) -> list[tuple[object, ...]]:
        return rows_of(wc.image_at(self.captures))

    def close_connections(self) -> None:
        self.lock.close()
        self.ckpt.close()


@pytest.fixture
def db(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, apsw.Connection]]:
    path = os.path.join(tmp_path, "t.db")
    conn = open_wal(path)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    yield path, conn
    conn.close()
    for h in _open_histories:  # descriptors of -shm only after every connection of the file
        h.close_connections()
    for h in _open_histories:
        h.files.close()
    _open_histories.clear()


def test_first_capture_is_a_snapshot_then_frames(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    conn.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
    h = History(path)
    assert h.capture().snapshot is not None
    assert h.rows() == _rows(conn)
    assert h.capture().empty  # nothing new
    for _ in range(5):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    got = h.capture()
    assert got.snapshot is None and got.frames and got.frames[-1].header.commit_size
    assert h.rows() == _rows(conn)


def test_checkpoints_through_capture_continue_the_history(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    h = History(path)
    h.capture()
    snapshots = 0
    for round_ in range(30):
        for _ in range(round_ % 4 + 1):
            conn.execute("INSERT INTO t(v) VALUES (randomblob(?))", (1000 * (round_ % 5),))
        if round_ % 3 == 0:
            conn.execute("DELETE FROM t WHERE id % 4 = ?", (round_ % 4,))
        if round_ % 2:
            assert h.checkpoint().closed  # nobody else reads: the checkpoint copies everything
        else:
            h.capture()
        assert h.rows() == _rows(conn)
    snapshots = sum(1 for c in h.captures if c.snapshot is not None)
    assert snapshots == 1  # the log restarted 15 times, each continued from frame 1
    assert wc.Cursor(*h.cursor).salt != h.captures[0].cursor.salt


def test_a_checkpoint_that_skipped_the_capture_is_a_gap(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    h = History(path)
    h.capture()
    conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_RESTART)  # not captured first: those frames are lost
    conn.execute("INSERT INTO t(v) VALUES (1)")  # restarts the log over them
    got = h.capture()
    assert got.snapshot is not None  # never frames that would skip the lost ones
    assert h.rows() == _rows(conn)


def test_a_reader_holding_the_log_back_keeps_the_generation(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    h = History(path)
    h.capture()
    conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    reader = open_wal(path)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM t").fetchall()
    conn.execute("INSERT INTO t(v) VALUES (2)")  # after the reader's snapshot: not copied
    assert not h.checkpoint().closed
    conn.execute("INSERT INTO t(v) VALUES (3)")
    reader.execute("COMMIT")
    got = h.capture()
    assert got.snapshot is None and got.frames
    assert h.rows() == _rows(conn)


def test_capture_needs_the_write_lock(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    with pytest.raises(ValueError, match="write lock"):
        wc.capture(conn, wc.LogFiles(path), wc.NO_CURSOR)
    with pytest.raises(wc.CaptureError, match="snapshot"):
        wc.image_at([])


def test_a_failed_stage_skips_the_checkpoint(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    h = History(path)

    def fail(_got: wc.Capture) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError):
        wc.capture_then_checkpoint(h.lock, h.ckpt, h.files, h.cursor, fail)
    shm = h.files.shm()
    assert shm is not None
    backfilled = int.from_bytes(os.pread(shm, 4, 96), sys.byteorder)  # WalCkptInfo.nBackfill
    assert backfilled == 0  # nothing of the log was copied into the database
    assert h.lock.txn_state("main") == apsw.SQLITE_TXN_NONE  # the write lock was let go


_WRITER = r"""
import sys, apsw
conn = apsw.Connection(sys.argv[1])
conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.set_busy_timeout(10000)
for i in range(int(sys.argv[2])):
    with conn:
        conn.execute("INSERT INTO t(v) VALUES (randomblob(?))", (i % 7 * 600,))
        if i % 50 == 49:
            conn.execute("DELETE FROM t WHERE id % 5 = 0")
print("done", flush=True)
"""


def test_captures_keep_up_with_a_writer_in_another_process(db: tuple[str, apsw.Connection]) -> None:
    path, conn = db
    h = History(path)
    h.capture()
    def step(round_: int) -> None:
        if round_ % 3 == 2:
            h.checkpoint()
        else:
            h.capture()

    rounds = beside_writer(_WRITER, [path, "3000"], step)
    h.checkpoint()
    assert rounds > 5
    assert h.rows() == _rows(conn)
    assert sum(1 for c in h.captures if c.snapshot is not None) == 1


def test_stage_and_checkpoint_run_under_the_write_lock(db: tuple[str, apsw.Connection]) -> None:
    """No commit can slip in between a capture and the checkpoint after it (its frames would be copied
    and overwritten by the log's restart without ever being captured)."""
    path, conn = db
    conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    seen: list[str] = []

    def try_write(where: str) -> None:
        other = open_wal(path)  # a fresh connection: a failed statement leaves no reader behind
        other.set_busy_timeout(0)
        try:
            with pytest.raises(apsw.BusyError):
                other.execute("INSERT INTO t(v) VALUES (1)")
        finally:
            other.close()
        seen.append(where)

    class Checkpointer(apsw.Connection):  # type: ignore[misc]
        def wal_checkpoint(self, dbname: str | None = None,
                           mode: int = apsw.SQLITE_CHECKPOINT_PASSIVE) -> tuple[int, int]:
            try_write("checkpoint")
            return super().wal_checkpoint(dbname, mode)  # type: ignore[no-any-return]

    h = History(path)
    ckpt = Checkpointer(path)
    try:
        cursor = wc.capture_then_checkpoint(h.lock, ckpt, h.files, h.cursor, lambda got: try_write("stage"))
    finally:
        ckpt.close()
    assert seen == ["stage", "checkpoint"] and cursor.closed
    conn.execute("INSERT INTO t(v) VALUES (2)")  # the lock was let go afterwards
