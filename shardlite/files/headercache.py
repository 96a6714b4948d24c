"""A local cache of pack headers, so that a compaction reads from the replica only the headers of packs it has
not seen (``<root>/.replica/headers.db``).

A compaction plans from every pack's header. Packs accumulate over the retention window (one per node per
upload interval with writes: about 7,200 an hour, 1.2 million over the default 7 days), and reading each one's
header again every hour would cost a ranged GET per pack per hour. The headers of *final* packs do not change:

* a numbered pack up to the sequence number its node's replicator recorded as shipped (one not recorded yet
  may be uploaded again, with other captures, after a crash: it is never cached);
* a compaction pack (written once by a compaction);
* except that an erase rewrites a pack under the same name without the erased key's entries and drop
  records. That makes it strictly smaller (every entry and every drop record takes bytes of the header), so
  the cache is keyed by name *and size*: a rewritten pack misses and is read again.

Each row also holds a summary of its header (the newest time in it, the digests of the keys of its entries and
drop records), so that a compaction decodes only the headers of the packs it plans over
(:mod:`shardlite.services.compact_scan`), with an xxh3-64 of name, size and summary. What the cache holds is
read back through :func:`shardlite.core.pack.decode_header` like bytes from the replica (validated whole), and
a summary whose check does not match is read again: a damaged row, or a damaged file (started again empty),
costs reads, never a wrong plan. Rows of packs no
longer listed are deleted after each use. Losing the file (or a crash while it is written: it is a cache,
``synchronous=NORMAL``) costs one compaction's reads. One user at a time: the compaction, under the root's
compaction lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable

import apsw
import xxhash

from .engine import ensure_private_dir

log = logging.getLogger("shardlite.replicate")

__all__ = ["HeaderCache", "FILE_NAME"]

FILE_NAME = "headers.db"
#: The layout of the file (``PRAGMA user_version``); a file of another layout is a cache: started again.
_VERSION = 2
_SCHEMA = ("CREATE TABLE IF NOT EXISTS headers(name TEXT PRIMARY KEY, size INTEGER NOT NULL, head BLOB NOT NULL, "
           "newest INTEGER NOT NULL, keys BLOB NOT NULL, dropped BLOB NOT NULL, checked INTEGER NOT NULL)")


def _check(name: str, size: int, newest: int, keys: bytes, dropped: bytes) -> int:
    """The xxh3-64 (63 bits: an SQLite integer) of a row's name, size and summary."""
    text = b"\0".join([name.encode("utf-8"), str(size).encode(), str(newest).encode()])
    return xxhash.xxh3_64_intdigest(b"".join([text, len(keys).to_bytes(8, "big"), keys, dropped])) >> 1


class HeaderCache:
    """Cached pack headers of one root (module docstring), and a summary of each: the newest time it holds, and
    the digests of the keys of its entries and of its drop records (64-bit, 8 bytes big-endian each, sorted),
    so that a compaction decodes only the headers of the packs it plans over. Not thread-safe."""

    def __init__(self, directory: str) -> None:
        ensure_private_dir(directory)
        self.path = os.path.join(directory, FILE_NAME)
        try:
            self.conn = self._open()
        except apsw.Error as exc:  # not a database any more (damaged): a cache, so it starts again empty
            log.warning("replicate: the pack header cache %s cannot be read (%s); starting it again", self.path, exc)
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path + suffix)
            self.conn = self._open()

    def _open(self) -> apsw.Connection:
        if not os.path.exists(self.path):  # created 0600 before SQLite opens it
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            except FileExistsError:
                pass
        conn = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
        try:
            conn.set_busy_timeout(5000)
            conn.execute("PRAGMA journal_mode=WAL").fetchall()
            conn.execute("PRAGMA synchronous=NORMAL")
            version = conn.execute("PRAGMA user_version").fetchall()[0][0]
            if version != _VERSION:  # an older layout (or none): the rows are read again from the replica
                with conn:
                    conn.execute("DROP TABLE IF EXISTS headers")
                    conn.execute(f"PRAGMA user_version = {_VERSION}")
            conn.execute(_SCHEMA)
            conn.execute("SELECT count(*) FROM headers").fetchall()
        except apsw.Error:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        self.conn.close()

    def summaries(self, listed: dict[str, int]) -> dict[str, tuple[int, bytes, bytes]]:
        """(newest, keys, dropped) of every pack of ``listed`` (name -> size) whose name and size are cached
        (rows that are not well formed or fail their check are left out: read again)."""
        found: dict[str, tuple[int, bytes, bytes]] = {}
        try:
            for name, size, newest, keys, dropped, checked in self.conn.execute(
                    "SELECT name, size, newest, keys, dropped, checked FROM headers"):
                if (listed.get(name) == size and type(newest) is int and isinstance(keys, bytes)
                        and isinstance(dropped, bytes) and len(keys) % 8 == 0 and len(dropped) % 8 == 0
                        and checked == _check(name, size, newest, keys, dropped)):
                    found[name] = (newest, keys, dropped)
        except apsw.Error as exc:  # damaged pages: what was found so far, the rest read from the replica
            log.warning("replicate: the pack header cache %s is damaged (%s)", self.path, exc)
        return found

    def heads(self, names: Iterable[str]) -> dict[str, bytes]:
        """The cached first bytes (magic, length, header) of the packs ``names`` that are cached."""
        found: dict[str, bytes] = {}
        try:
            for name in names:
                for (head,) in self.conn.execute("SELECT head FROM headers WHERE name = ?", (name,)):
                    if isinstance(head, bytes):
                        found[name] = head
        except apsw.Error as exc:
            log.warning("replicate: the pack header cache %s is damaged (%s)", self.path, exc)
        return found

    def store(self, rows: Iterable[tuple[str, int, bytes, int, bytes, bytes]]) -> None:
        """Cache (name, size, first bytes, newest, keys, dropped) of final packs (a damaged file: logged, not
        cached)."""
        try:
            with self.conn:
                self.conn.executemany(
                    "INSERT OR REPLACE INTO headers(name, size, head, newest, keys, dropped, checked) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)", ((*row, _check(row[0], row[1], *row[3:])) for row in rows))
        except apsw.Error as exc:
            log.warning("replicate: the pack header cache %s cannot be written (%s)", self.path, exc)

    def retain(self, listed: Iterable[str]) -> int:
        """Delete the rows of packs not in ``listed``; how many went."""
        keep = set(listed)
        try:
            gone = [(name,) for (name,) in self.conn.execute("SELECT name FROM headers") if name not in keep]
            if gone:
                with self.conn:
                    self.conn.executemany("DELETE FROM headers WHERE name = ?", gone)
        except apsw.Error as exc:
            log.warning("replicate: the pack header cache %s cannot be pruned (%s)", self.path, exc)
            return 0
        return len(gone)
