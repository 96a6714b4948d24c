"""SQLite's write-ahead log, read the way SQLite reads it: the WAL header, frame headers, the cumulative
checksum, the wal-index header in ``-shm``, and the replay of committed frames onto a database image.

Replication captures a tenant's changes as the WAL frames SQLite wrote (the page images of each commit),
and restore replays them onto a snapshot. Both sides need the log's on-disk format, which SQLite documents
(https://www.sqlite.org/fileformat2.html#the_write_ahead_log) but exposes through no API, and no
maintained Python library parses it; hence this module, written by hand from the format description. It
only ever *reads* a WAL; logs are written by SQLite.

The format, in short:

* a 32-byte WAL header: magic (``0x377f0682``: checksums over little-endian words, ``0x377f0683``:
  big-endian), format version 3007000, page size, checkpoint sequence, two salts, and a checksum over
  the first 24 bytes;
* frames of a 24-byte header (page number, the database size in pages for the last frame of a commit and 0
  otherwise, the two salts of the header, a checksum) followed by one page image. The checksum of a frame
  covers the first 8 bytes of its header and its page, seeded with the previous frame's checksum (the
  header's for the first frame): a frame belongs to the log only if its salts match the header's and the
  chain of checksums holds up to it;
* a log is restarted (frames written from the start again) only after a checkpoint copied every frame;
  the restart increments salt 1 and draws a new salt 2, so frames of the old generation never pass for
  frames of the new one (the header's checkpoint sequence is the restarting connection's own count, and a
  header written anew into an emptied log file by a connection that never restarted one gets random
  salts);
* the wal-index (``-shm``) starts with two copies of a 48-byte header in the machine's byte order that
  holds, among others, ``mxFrame``: the last frame of the last commit. While a connection holds the
  database's write lock, frames 1 to ``mxFrame`` are exactly the committed log; without the lock they
  stay so until a checkpoint lets the log restart (a writer appends after ``mxFrame``), which
  :mod:`shardlite.files.walcapture` relies on for its lock-free captures.

Pure: no I/O; callers read the bytes.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterator, Sequence
from typing import NamedTuple

__all__ = [
    "WAL_HEADER_SIZE", "FRAME_HEADER_SIZE", "SHM_HEADER_SIZE", "WAL_MAGIC_LE", "WAL_MAGIC_BE", "WAL_VERSION",
    "WalHeader", "FrameHeader", "ShmHeader", "Frame", "WalFormatError",
    "checksum", "parse_wal_header", "parse_frame_header", "parse_shm_header", "frame_offset", "read_frames",
    "committed", "replay", "verify_chain", "encode_frame",
]

WAL_HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
SHM_HEADER_SIZE = 48
WAL_MAGIC_LE = 0x377F0682
WAL_MAGIC_BE = 0x377F0683
WAL_VERSION = 3007000
_MASK = 0xFFFFFFFF


class WalFormatError(ValueError):
    """Bytes that are not what SQLite writes there (a torn, truncated or foreign file)."""


class WalHeader(NamedTuple):
    """The 32-byte header of a WAL file."""

    big_endian: bool  #: checksums are computed over big-endian 32-bit words
    page_size: int
    checkpoint_seq: int
    salt: bytes  #: the two salts as stored (8 bytes); every frame of this generation repeats them
    checksum: tuple[int, int]  #: the header's checksum: the seed of the first frame's


class FrameHeader(NamedTuple):
    """The 24-byte header of one frame."""

    pgno: int
    commit_size: int  #: the database size in pages after this commit, on a commit's last frame; else 0
    salt: bytes
    checksum: tuple[int, int]


class ShmHeader(NamedTuple):
    """The wal-index header (the first of its two copies, both checked)."""

    change: int  #: incremented by every commit
    big_endian: bool
    page_size: int
    mx_frame: int  #: the last frame of the last commit (0: the log holds no commit)
    n_page: int  #: the database size in pages after that commit
    frame_checksum: tuple[int, int]  #: the checksum of frame ``mx_frame``
    salt: bytes


class Frame(NamedTuple):
    """One frame of the log: its 1-based number, its header, and the page image."""

    number: int
    header: FrameHeader
    page: bytes


def checksum(data: bytes | memoryview, s1: int, s2: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes) continued from ``(s1, s2)``.

    Pure Python: about 60 µs per 4 KiB page here, so callers use it to verify, not on a hot path."""
    n = len(data)
    if n % 8:
        raise WalFormatError(f"a checksummed run must be a multiple of 8 bytes, not {n}")
    words = struct.unpack((">" if big_endian else "<") + f"{n // 4}I", data)
    it = iter(words)
    for a, b in zip(it, it, strict=True):
        s1 = (s1 + a + s2) & _MASK
        s2 = (s2 + b + s1) & _MASK
    return s1, s2


def _page_size(raw: int) -> int | None:
    """A page size as a WAL header stores it (65,536 as 1 in the wal-index), or None when invalid."""
    size = 65536 if raw == 1 else raw
    if size < 512 or size > 65536 or size & (size - 1):
        return None
    return size


def parse_wal_header(data: bytes) -> WalHeader:
    """The header at the start of a WAL file; :class:`WalFormatError` when these 32 bytes are not a valid
    one (wrong magic or version, impossible page size, checksum mismatch)."""
    if len(data) < WAL_HEADER_SIZE:
        raise WalFormatError(f"a WAL header is {WAL_HEADER_SIZE} bytes, got {len(data)}")
    magic, version, raw_size, seq = struct.unpack(">4I", data[:16])
    if magic not in (WAL_MAGIC_LE, WAL_MAGIC_BE):
        raise WalFormatError(f"not a WAL header (magic {magic:#x})")
    if version != WAL_VERSION:
        raise WalFormatError(f"unknown WAL format version {version}")
    size = _page_size(raw_size)
    if size is None:
        raise WalFormatError(f"impossible page size {raw_size} in a WAL header")
    big = magic == WAL_MAGIC_BE
    stored = struct.unpack(">2I", data[24:32])
    if checksum(data[:24], 0, 0, big) != stored:
        raise WalFormatError("the WAL header's checksum does not match")
    return WalHeader(big, size, seq, bytes(data[16:24]), stored)


def parse_frame_header(data: bytes | memoryview) -> FrameHeader:
    """The 24-byte header of a frame (not validated: see :func:`read_frames`)."""
    if len(data) < FRAME_HEADER_SIZE:
        raise WalFormatError(f"a frame header is {FRAME_HEADER_SIZE} bytes, got {len(data)}")
    pgno, size = struct.unpack(">2I", data[:8])
    c1, c2 = struct.unpack(">2I", data[16:24])
    return FrameHeader(pgno, size, bytes(data[8:16]), (c1, c2))


def parse_shm_header(data: bytes, byteorder: str = sys.byteorder) -> ShmHeader:
    """The wal-index header at the start of a ``-shm`` file, written in the machine's byte order.

    :class:`WalFormatError` when the two copies differ (a writer was updating it: read again under the
    write lock), when it is not initialised, or when its own checksum does not match."""
    if len(data) < 2 * SHM_HEADER_SIZE:
        raise WalFormatError(f"a wal-index header is 2 x {SHM_HEADER_SIZE} bytes, got {len(data)}")
    first, second = data[:SHM_HEADER_SIZE], data[SHM_HEADER_SIZE:2 * SHM_HEADER_SIZE]
    if first != second:
        raise WalFormatError("the two copies of the wal-index header differ")
    order = "<" if byteorder == "little" else ">"
    version, _unused, change = struct.unpack(order + "3I", first[:12])
    is_init, big = first[12], first[13]
    (raw_size,) = struct.unpack(order + "H", first[14:16])
    mx_frame, n_page, f1, f2 = struct.unpack(order + "4I", first[16:32])
    if not is_init or version != WAL_VERSION:
        raise WalFormatError("the wal-index header is not initialised")
    # a log no frame was ever written to (a file installed whole: an import, a restore) has a wal-index
    # with page size 0 until its first commit: no frame to read, so no page size is needed
    size = 0 if raw_size == 0 and mx_frame == 0 else _page_size(raw_size)
    if size is None:
        raise WalFormatError(f"impossible page size {raw_size} in the wal-index header")
    stored = struct.unpack(order + "2I", first[40:48])
    # SQLite checksums this header over the machine's own words (walIndexTryHdr)
    if checksum(first[:40], 0, 0, byteorder == "big") != stored:
        raise WalFormatError("the wal-index header's checksum does not match")
    return ShmHeader(change, bool(big), size, mx_frame, n_page, (f1, f2), bytes(first[32:40]))


def frame_offset(index: int, page_size: int) -> int:
    """The file offset of frame ``index`` (1-based) in a log of ``page_size`` pages."""
    if index < 1:
        raise ValueError("frames are numbered from 1")
    return WAL_HEADER_SIZE + (index - 1) * (FRAME_HEADER_SIZE + page_size)


def read_frames(data: bytes | memoryview, first_index: int, page_size: int, salt: bytes) -> Iterator[Frame]:
    """The frames in ``data`` (consecutive frames starting with frame ``first_index``), stopping before the
    first that is incomplete or whose salts are not ``salt``. No checksum is computed: callers that read
    under the write lock up to the wal-index's ``mxFrame`` know these frames are committed; others use
    :func:`verify_chain`."""
    step = FRAME_HEADER_SIZE + page_size
    view = memoryview(data)
    for n in range(len(view) // step):
        start = n * step
        header = parse_frame_header(view[start:start + FRAME_HEADER_SIZE])
        if header.salt != salt:
            return
        yield Frame(first_index + n, header, bytes(view[start + FRAME_HEADER_SIZE:start + step]))


def encode_frame(frame: Frame) -> bytes:
    """A frame's bytes as SQLite wrote them: its 24-byte header, then the page (:func:`read_frames` reads
    them back)."""
    h = frame.header
    return struct.pack(">2I", h.pgno, h.commit_size) + h.salt + struct.pack(">2I", *h.checksum) + frame.page


def committed(frames: Sequence[Frame]) -> list[Frame]:
    """``frames`` cut after the last commit frame (a commit's frames without its last are not a commit)."""
    for i in range(len(frames) - 1, -1, -1):
        if frames[i].header.commit_size:
            return list(frames[:i + 1])
    return []


def verify_chain(header: WalHeader, frames: Sequence[Frame], seed: tuple[int, int] | None = None) -> int:
    """How many of ``frames`` (consecutive, the first continuing from ``seed``, the checksum of the frame
    before it, or the header's when it is frame 1) pass SQLite's checks: salts and the checksum chain.
    The count stops at the first frame that fails; callers keep only :func:`committed` frames of the
    valid prefix, as SQLite's recovery does."""
    s1, s2 = seed if seed is not None else header.checksum
    good = 0
    for frame in frames:
        h = frame.header
        if h.salt != header.salt or len(frame.page) != header.page_size:
            break
        s1, s2 = checksum(struct.pack(">2I", h.pgno, h.commit_size), s1, s2, header.big_endian)
        s1, s2 = checksum(frame.page, s1, s2, header.big_endian)
        if (s1, s2) != h.checksum:
            break
        good += 1
    return good


def replay(image: bytearray, frames: Sequence[Frame], page_size: int, *,
           max_bytes: int | None = None) -> bytearray:
    """Apply committed ``frames`` in order to a database ``image`` (modified in place and returned): each
    page written at its place, the image cut or extended to the last commit's size, as a checkpoint of
    those frames would leave the database file. Frames after the last commit frame are ignored.

    ``max_bytes``: frames from outside (a replica) name page numbers and sizes that could make the image
    any size; a page or a commit size past this bound is :class:`WalFormatError` (checked before the image
    grows)."""
    frames = committed(frames)
    if not frames:
        return image
    limit = max_bytes if max_bytes is not None else 1 << 62
    if any(f.header.pgno * page_size > limit for f in frames) or frames[-1].header.commit_size * page_size > limit:
        raise WalFormatError(f"frames {frames[0].number}-{frames[-1].number} name pages past {limit} bytes")
    for frame in frames:
        pgno = frame.header.pgno
        if pgno < 1:
            raise WalFormatError(f"frame {frame.number} names page {pgno}")
        if len(frame.page) != page_size:
            raise WalFormatError(f"frame {frame.number} holds {len(frame.page)} bytes, not a {page_size}-byte page")
        start = (pgno - 1) * page_size
        if len(image) < start:
            image.extend(bytes(start - len(image)))
        image[start:start + page_size] = frame.page
    size = frames[-1].header.commit_size * page_size
    if len(image) > size:
        del image[size:]
    elif len(image) < size:
        image.extend(bytes(size - len(image)))
    return image
