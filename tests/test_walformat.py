"""shardlite.core.walformat against logs SQLite itself wrote: headers, the checksum chain, the wal-index
header, and replay of the committed frames onto the database file as it was before them."""

from __future__ import annotations

import os
import struct

import apsw
import pytest
from helpers_wal import open_wal, rows_of
from hypothesis import given, settings
from hypothesis import strategies as st

from shardlite.core import walformat as wf


def _dump(conn: apsw.Connection) -> list[tuple[object, ...]]:
    return list(conn.execute("SELECT id, v FROM t ORDER BY id"))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _frames(wal: bytes, header: wf.WalHeader, upto: int) -> list[wf.Frame]:
    body = wal[wf.WAL_HEADER_SIZE:wf.frame_offset(upto + 1, header.page_size)]
    return list(wf.read_frames(body, 1, header.page_size, header.salt))


def _base(tmp_path: os.PathLike[str], page_size: int = 4096) -> tuple[str, apsw.Connection, bytes]:
    path = os.path.join(tmp_path, "t.db")
    conn = open_wal(path, page_size)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_TRUNCATE)
    return path, conn, _read(path)


def test_header_frames_and_shm_agree_with_sqlite(tmp_path: os.PathLike[str]) -> None:
    path, conn, base = _base(tmp_path)
    for i in range(20):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(?))", (300 * i,))
    wal = _read(path + "-wal")
    header = wf.parse_wal_header(wal)
    assert header.page_size == 4096
    shm = wf.parse_shm_header(_read(path + "-shm")[:2 * wf.SHM_HEADER_SIZE])
    assert shm.salt == header.salt and shm.page_size == 4096
    assert shm.mx_frame > 0 and len(wal) >= wf.frame_offset(shm.mx_frame + 1, 4096)
    frames = _frames(wal, header, shm.mx_frame)
    assert len(frames) == shm.mx_frame
    assert wf.verify_chain(header, frames) == shm.mx_frame
    assert frames[-1].header.checksum == shm.frame_checksum
    assert frames[-1].header.commit_size == shm.n_page
    assert rows_of(wf.replay(bytearray(base), frames, 4096)) == _dump(conn)


def test_a_flipped_bit_stops_the_chain_there(tmp_path: os.PathLike[str]) -> None:
    path, conn, _base_image = _base(tmp_path)
    for _ in range(5):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    wal = _read(path + "-wal")
    header = wf.parse_wal_header(wal)
    frames = _frames(wal, header, wf.parse_shm_header(_read(path + "-shm")[:96]).mx_frame)
    bad = 2
    page = bytearray(frames[bad].page)
    page[100] ^= 1
    frames[bad] = frames[bad]._replace(page=bytes(page))
    assert wf.verify_chain(header, frames) == bad
    # a chain continues from the checksum of the frame before
    assert wf.verify_chain(header, frames[bad + 1:], seed=frames[bad].header.checksum) == len(frames) - bad - 1


def test_commit_boundaries_and_partial_commits(tmp_path: os.PathLike[str]) -> None:
    path, conn, base = _base(tmp_path)
    conn.execute("INSERT INTO t(v) VALUES (randomblob(100))")
    first = _dump(conn)
    with conn:
        for _ in range(8):  # one transaction over several pages
            conn.execute("INSERT INTO t(v) VALUES (randomblob(3000))")
    wal = _read(path + "-wal")
    header = wf.parse_wal_header(wal)
    frames = _frames(wal, header, wf.parse_shm_header(_read(path + "-shm")[:96]).mx_frame)
    ends = [f.number for f in frames if f.header.commit_size]
    assert len(ends) == 2 and ends[-1] == len(frames)
    # the second commit cut before its last frame is no commit: replay stops at the first
    assert wf.committed(frames[:-1])[-1].number == ends[0]
    assert rows_of(wf.replay(bytearray(base), frames[:-1], 4096)) == first


def test_a_restarted_log_is_a_new_generation(tmp_path: os.PathLike[str]) -> None:
    path, conn, _base_image = _base(tmp_path)
    for _ in range(3):
        conn.execute("INSERT INTO t(v) VALUES (randomblob(2000))")
    old = wf.parse_wal_header(_read(path + "-wal"))
    conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_RESTART)
    conn.execute("INSERT INTO t(v) VALUES (1)")
    wal = _read(path + "-wal")
    new = wf.parse_wal_header(wal)
    assert new.salt != old.salt and new.checkpoint_seq == old.checkpoint_seq + 1
    assert struct.unpack(">I", new.salt[:4])[0] == (struct.unpack(">I", old.salt[:4])[0] + 1) & 0xFFFFFFFF
    shm = wf.parse_shm_header(_read(path + "-shm")[:96])
    # frames past mxFrame left from the old generation carry the old salts and are not read as this log's
    body = wal[wf.WAL_HEADER_SIZE:]
    assert len(list(wf.read_frames(body, 1, new.page_size, new.salt))) == shm.mx_frame


@pytest.mark.parametrize("data", [b"", b"x" * 31, b"\0" * 32, b"\x37\x7f\x06\x82" + b"\0" * 28])
def test_garbage_is_not_a_header(data: bytes) -> None:
    with pytest.raises(wf.WalFormatError):
        wf.parse_wal_header(data)
    with pytest.raises(wf.WalFormatError):
        wf.parse_shm_header(data * 4)


def test_shm_copies_must_agree(tmp_path: os.PathLike[str]) -> None:
    path, conn, _base_image = _base(tmp_path)
    conn.execute("INSERT INTO t(v) VALUES (1)")
    raw = bytearray(_read(path + "-shm")[:96])
    wf.parse_shm_header(bytes(raw))
    raw[60] ^= 1  # mxFrame of the second copy
    with pytest.raises(wf.WalFormatError):
        wf.parse_shm_header(bytes(raw))


def test_checksum_needs_whole_words() -> None:
    with pytest.raises(wf.WalFormatError):
        wf.checksum(b"1234567", 0, 0, False)
    assert wf.checksum(b"\x01\0\0\0\x02\0\0\0", 0, 0, False) == (1, 3)
    assert wf.checksum(b"\0\0\0\x01\0\0\0\x02", 0, 0, True) == (1, 3)


_ops = st.lists(st.tuples(st.sampled_from(["insert", "update", "delete", "big"]), st.integers(0, 40)),
                min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(batches=st.lists(_ops, min_size=1, max_size=6), page_size=st.sampled_from([512, 1024, 4096, 65536]),
       cut=st.integers(0, 10_000))
def test_replay_of_any_prefix_of_commits_is_that_state(tmp_path_factory: pytest.TempPathFactory,
                                                        batches: list[list[tuple[str, int]]], page_size: int,
                                                        cut: int) -> None:
    """Replaying the committed frames up to any commit onto the pre-log image gives exactly the state
    SQLite had right after that commit."""
    tmp = tmp_path_factory.mktemp("wal")
    path, conn, base = _base(tmp, page_size)
    states = []
    for batch in batches:
        with conn:
            for op, n in batch:
                if op == "insert":
                    conn.execute("INSERT OR REPLACE INTO t(id, v) VALUES (?, randomblob(?))", (n, n * 7 + 1))
                elif op == "update":
                    conn.execute("UPDATE t SET v = randomblob(?) WHERE id <= ?", (n * 13, n))
                elif op == "delete":
                    conn.execute("DELETE FROM t WHERE id % 3 = ?", (n % 3,))
                else:
                    conn.execute("INSERT OR REPLACE INTO t(id, v) VALUES (?, randomblob(?))", (n, n * 1500))
                    conn.execute("DELETE FROM t WHERE id > 35")
        states.append(_dump(conn))
    wal = _read(path + "-wal")
    shm = wf.parse_shm_header(_read(path + "-shm")[:96])
    if not shm.mx_frame:
        return  # nothing written (a batch of no-ops)
    header = wf.parse_wal_header(wal)
    frames = _frames(wal, header, shm.mx_frame)
    assert wf.verify_chain(header, frames) == len(frames) == shm.mx_frame
    ends = [f.number for f in frames if f.header.commit_size]
    assert len(ends) <= len(batches)
    upto = ends[cut % len(ends)]
    replayed = rows_of(wf.replay(bytearray(base), frames[:upto], page_size))
    assert replayed in states
    assert rows_of(wf.replay(bytearray(base), frames, page_size)) == states[-1]
    conn.close()
