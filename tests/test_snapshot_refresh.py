"""Refreshed snapshots (shardlite.core.refresh): when one is due, how a node's staging counts the frames
staged since a tenant file's last snapshot, and a staging file written before that count existed."""

from __future__ import annotations

import os
from pathlib import Path

import apsw
from hypothesis import given
from hypothesis import strategies as st

from shardlite.core import walformat as wf
from shardlite.core.refresh import REFRESH_FLOOR, REFRESH_RATIO, snapshot_due
from shardlite.files import walcapture as wc
from shardlite.files.staging import Staging


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
        assert found is not None and (found.frame_bytes, found.image_bytes) == (0, 4096)
        staging.stage("user:a", "inc1", 1, _capture(_frames(1, 3), None, 3), [(3, 2)], 2)
        staging.stage("user:a", "inc1", 1, _capture(_frames(4, 2), None, 5), [(5, 3)], 3)
        found = staging.cursor("user:a")
        assert found is not None
        frame = len(wf.encode_frame(_frames(1, 1)[0]))
        assert (found.frame_bytes, found.image_bytes) == (5 * frame, 4096)
        staging.set_cursor("user:a", "inc1", 1, found.cursor._replace(closed=True), 3)  # a checkpoint keeps them
        found = staging.cursor("user:a")
        assert found is not None and (found.frame_bytes, found.image_bytes) == (5 * frame, 4096)
        staging.stage("user:a", "inc1", 1, _capture(None, b"y" * 1024, 5), [(5, 3)], 4)  # a refreshed snapshot
        found = staging.cursor("user:a")
        assert found is not None and (found.frame_bytes, found.image_bytes) == (0, 1024)
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
        staging.stage("user:a", "inc1", 1, _capture(_frames(8, 1), None, 8), [(8, 11)], 11)
        found = staging.cursor("user:a")
        assert found is not None and found.frame_bytes == len(wf.encode_frame(_frames(8, 1)[0]))
    finally:
        staging.close()
