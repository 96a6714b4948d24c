"""The replicated history of one tenant file, end to end without storage: captures (with commit times from
the WAL hook, as writers note them) staged, packed, read back, and replayed to any time: every restore
point gives exactly the commits made at or before it."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import apsw
import pytest
from helpers_wal import open_wal, rows_of

from shardlite.core import pack, timeline
from shardlite.files import walcapture as wc
from shardlite.files.staging import Staging


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        self.now += 10
        return self.now


@pytest.fixture
def world(tmp_path: os.PathLike[str]) -> Iterator[tuple[str, apsw.Connection, apsw.Connection, apsw.Connection,
                                                       wc.LogFiles, Staging]]:
    path = os.path.join(tmp_path, "t.db")
    writer, lock, ckpt = open_wal(path), open_wal(path), open_wal(path)
    writer.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    files = wc.LogFiles(path)
    staging = Staging(str(tmp_path))
    yield path, writer, lock, ckpt, files, staging
    for conn in (writer, lock, ckpt):
        conn.close()
    files.close()  # after every connection of the file
    staging.close()


@pytest.mark.parametrize("seed", range(6))
def test_every_restore_point_is_exactly_its_commits(world: tuple[str, apsw.Connection, apsw.Connection,
                                                                 apsw.Connection, wc.LogFiles, Staging],
                                                    seed: int) -> None:
    _path, writer, lock, ckpt, files, staging = world
    rng = random.Random(seed)
    clock = Clock()
    notes: list[tuple[int, int]] = []
    states: list[tuple[int, list[tuple[object, ...]]]] = []  # (commit time, rows after it)

    def hook(_conn: apsw.Connection, _name: str, frames: int) -> int:
        notes.append((frames, clock()))  # what a writer notes: frames after the commit, commit time
        return apsw.SQLITE_OK

    writer.set_wal_hook(hook)
    cursor, captured_ns, packs = wc.NO_CURSOR, 0, []

    def stage(got: wc.Capture) -> None:
        nonlocal captured_ns
        now = clock()
        times = wc.commit_times(got, notes, now, captured_ns)
        staging.stage("user:1", "inc", 1, got, times, now)
        captured_ns = now
        notes.clear()

    for _round in range(25):
        for _ in range(rng.randint(0, 4)):
            n = rng.randint(0, 30)
            writer.execute("INSERT OR REPLACE INTO t(id, v) VALUES (?, randomblob(?))", (n, rng.randint(0, 5000)))
            if rng.random() < 0.2:
                writer.execute("DELETE FROM t WHERE id % 7 = ?", (rng.randint(0, 6),))
            states.append((notes[-1][1] if notes else 0, list(writer.execute("SELECT id, v FROM t ORDER BY id"))))
        if rng.random() < 0.4:
            cursor = wc.capture_then_checkpoint(lock, ckpt, files, cursor, stage)
        else:
            lock.execute("BEGIN IMMEDIATE")
            try:
                got = wc.capture(lock, files, cursor)
                if not got.empty:
                    stage(got)
                cursor = got.cursor
            finally:
                lock.execute("ROLLBACK")
        if rng.random() < 0.5:
            staged = staging.staged(1 << 30)
            if staged:
                items = [(pack.Entry(s.key, s.incarnation, s.generation, "snapshot" if s.kind == "snapshot"
                                     else "frames", s.page_size, s.salt, s.first, s.last, s.commits,
                                     s.captured_ns, 0, 0), s.data) for s in staged]
                seq = staging.next_seq()
                packs.append(pack.encode("n1", seq, clock(), items))
                staging.shipped(seq, f"p{seq}", 0, 0, len(packs[-1]), [s.id for s in staged])
    cursor = wc.capture_then_checkpoint(lock, ckpt, files, cursor, stage)
    staged = staging.staged(1 << 30)
    if staged:
        items = [(pack.Entry(s.key, s.incarnation, s.generation, "snapshot" if s.kind == "snapshot" else "frames",
                             s.page_size, s.salt, s.first, s.last, s.commits, s.captured_ns, 0, 0), s.data)
                 for s in staged]
        packs.append(pack.encode("n1", staging.next_seq(), clock(), items))

    captures = []
    for blob in packs:
        header, at = pack.decode_header(blob)
        for position, entry in enumerate(header.entries):
            captures.append(timeline.Capture((entry.captured_ns, header.seq, position), entry,
                                             pack.entry_bytes(blob, at, entry)))
    latest = timeline.image_at(captures)
    assert latest is not None
    assert rows_of(latest[0]) == list(writer.execute("SELECT id, v FROM t ORDER BY id"))
    points = timeline.points(captures)
    assert points == sorted(points)
    first_point = points[0].time_ns
    for when, rows in states:
        if when < first_point:
            continue  # before the first snapshot: not restorable
        found = timeline.image_at(captures, when)
        assert found is not None
        image, point = found
        assert point.time_ns <= when
        assert rows_of(image) == rows, (seed, when)
    assert timeline.image_at(captures, first_point - 1) is None


def test_commit_times_ignore_notes_of_commits_captured_before() -> None:
    """A note read late, after its commit was captured, names a frame number that a later log generation
    uses again: it must not date that later commit (a point-in-time restore would count it too early)."""
    from shardlite.core import walformat as wf

    def frame(number: int, commit: int) -> wf.Frame:
        return wf.Frame(number, wf.FrameHeader(1, commit, b"s" * 8, (0, 0)), b"")

    got = wc.Capture([frame(1, 0), frame(2, 5), frame(3, 0), frame(4, 6)], None,
                     wc.Cursor(b"s" * 8, 1, 4, (0, 0), 512), 512)
    assert wc.commit_times(got, [(2, 150), (4, 160)], 200, after_ns=100) == [(2, 150), (4, 160)]
    assert wc.commit_times(got, [(2, 50), (4, 160)], 200, after_ns=100) == [(2, 200), (4, 160)]
    assert wc.commit_times(got, [(4, 900)], 200, after_ns=100) == [(2, 200), (4, 200)]  # never after the capture


@pytest.mark.parametrize("pgno, commit_size", [(2**31, 1), (1, 2**32 - 1)])
def test_a_crafted_page_number_or_size_is_refused_before_it_allocates(pgno: int, commit_size: int) -> None:
    """Frames from a replica name page numbers and sizes; a crafted one must not make the image huge."""
    from shardlite.core import walformat as wf

    salt = b"\x01" * 8
    snap = pack.Entry("user:1", "inc", 1, "snapshot", 512, salt.hex(), 0, 1, [(1, 10)], 10, 0, 512)
    frame = wf.Frame(2, wf.FrameHeader(pgno, commit_size, salt, (0, 0)), b"\0" * 512)
    frames = pack.Entry("user:1", "inc", 1, "frames", 512, salt.hex(), 2, 2, [(2, 20)], 20, 0, 536)
    captures = [timeline.Capture((10, 1, 0), snap, b"\0" * 512),
                timeline.Capture((20, 2, 0), frames, wf.encode_frame(frame))]
    with pytest.raises(timeline.TimelineError, match="past"):
        timeline.image_at(captures)
