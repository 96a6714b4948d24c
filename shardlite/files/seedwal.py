"""A seed WAL shipped with every new tenant file, so its first commit skips SQLite's WAL-header fsync.

SQLite syncs the WAL header, and the directory that holds the new ``-wal`` file, whenever it writes the
first frame of a WAL (a fresh file, or one restarted after a checkpoint), even at ``synchronous=NORMAL``.
For a new tenant that made the first commit cost two fsyncs (~0.9 ms of ~1.3 ms here). A tenant therefore
starts life the way a tenant looks after its first transaction: a database file plus a ``-wal`` holding
one committed frame. SQLite recovers that WAL when the file is first opened and *appends* the first real
commit to it, so no header is (re)written and nothing is synced at NORMAL; at FULL the commit's own fsync
covers the file, as for any later commit.

The seed frame is a copy of the database's page 1, written by SQLite itself (a ``PRAGMA user_version``
that sets the value it already has, on a scratch copy with ``synchronous=OFF``), so it changes nothing
but the header counters SQLite keeps current in WAL mode. It is only ever attached to an image whose page
1 (counters masked) and length equal those it was made from; any other image gets no seed and SQLite
creates its WAL as usual. Losing or tearing the seed in a crash is harmless for the same reason: the
database file already holds that page, and SQLite ignores WAL frames whose checksums do not match.

Written by hand because no library does this; the WAL itself is produced by SQLite, never by this code.
"""

from __future__ import annotations

import os
import tempfile

import apsw

__all__ = ["SeedWal", "page_size_of"]

# Page 1 header fields SQLite rewrites when it commits page 1 (file change counter, in-header database
# size, version-valid-for and the writing library's version number); the size is checked through the
# image length instead.
_COUNTERS = ((24, 32), (92, 100))


def page_size_of(image: bytes) -> int:
    """The page size an SQLite database image declares (header bytes 16-17; 1 means 65,536)."""
    size = int.from_bytes(image[16:18], "big")
    return 65536 if size == 1 else size


def _masked_page1(image: bytes) -> bytes:
    page = bytearray(image[:page_size_of(image)])
    for start, end in _COUNTERS:
        page[start:end] = bytes(end - start)
    return bytes(page)


class SeedWal:
    """The seed WAL for images like ``image`` (a WAL-mode database image), made once.

    ``for_image(other)`` returns the seed's bytes when ``other`` has the same length and the same page 1
    apart from its counters, else ``None``. When SQLite cannot make the seed (no writable temporary
    directory), every answer is ``None``: tenants are then created exactly as without a seed.
    """

    def __init__(self, image: bytes) -> None:
        self._length = len(image)
        self._page1 = _masked_page1(image)
        self._wal = _make(image)

    def for_image(self, image: bytes) -> bytes | None:
        if self._wal is None or len(image) != self._length or _masked_page1(image) != self._page1:
            return None
        return self._wal


def _make(image: bytes) -> bytes | None:
    page = page_size_of(image)
    try:
        with tempfile.TemporaryDirectory(prefix="shardlite-seed-") as scratch:
            path = os.path.join(scratch, "seed.db")
            with open(path, "wb") as f:
                f.write(image)
            conn = apsw.Connection(path)
            try:
                conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
                conn.execute("PRAGMA synchronous=OFF")
                if str(conn.execute("PRAGMA journal_mode").fetchall()[0][0]).lower() != "wal":
                    return None
                version = int.from_bytes(image[60:64], "big", signed=True)  # the header's user_version
                conn.execute(f"PRAGMA user_version = {version}")
            finally:
                conn.close()
            with open(path + "-wal", "rb") as f:
                wal = f.read()
    except (OSError, apsw.Error):
        return None
    # exactly the WAL header (32 bytes) and one commit frame (24-byte frame header + page 1) whose
    # "database size after commit" is the image's, or no seed at all
    frame_page = int.from_bytes(wal[32:36], "big")
    commit_size = int.from_bytes(wal[36:40], "big")
    if len(wal) != 32 + 24 + page or frame_page != 1 or commit_size * page != len(image):
        return None
    return wal
