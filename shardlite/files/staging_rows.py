"""The rows of a node's replication staging (:mod:`shardlite.files.staging`): its schema and the records it
hands out (cursors, staged captures, drop records, what an erase removed)."""

from __future__ import annotations

import re
from typing import NamedTuple

from ..errors import Busy
from .walcapture import Capture, Cursor

__all__ = ["StaleCursor", "Tail", "ANY_CURSOR", "Erased", "TenantCursor", "Staged", "StagedDrop", "SCHEMA",
           "TABLES", "ADDED_CURSOR_COLUMNS"]


class StaleCursor(Busy):
    """Another process staged a capture of this tenant (or its drop record) since this capture read its cursor:
    nothing was staged. The replicator leaves the tenant for its next round; a drop captures again."""


class Tail(NamedTuple):
    """A capture staged with a drop record (:meth:`Staging.stage_drop`): the commits of the dropped file that
    its cursor did not reach, with their (frame, commit time), the capture's time, and the cursor it continued
    (:data:`~shardlite.files.walcapture.NO_CURSOR`: the tenant had none of this file)."""

    capture: Capture
    commits: list[tuple[int, int]]
    captured_ns: int
    expect: Cursor  #: the stored cursor it continued (NO_CURSOR: none of this file)


#: ``expect`` of :meth:`Staging.stage` that checks nothing (tests, tools that stage by hand).
ANY_CURSOR = Cursor(b"*", -1, -1, (-1, -1), -1)


class Erased(NamedTuple):
    """What :meth:`Staging.erase` removed of one key."""

    incarnations: list[str]  #: of the staged captures and the cursor removed
    captures: int
    bytes: int
    cursor: bool
    scrubbed: bool  #: the file was rewritten without free pages and its log emptied (:meth:`Staging.scrub`)
    drops: int = 0  #: staged drop records of the key removed
    shipped_drops: int = 0  #: records of the key's drop records shipped (``drops_shipped``) removed

SCHEMA = """
CREATE TABLE IF NOT EXISTS cursors(
    key TEXT PRIMARY KEY, incarnation TEXT NOT NULL, generation INTEGER NOT NULL,
    salt BLOB NOT NULL, ckpt_seq INTEGER NOT NULL, frame INTEGER NOT NULL, c1 INTEGER NOT NULL,
    c2 INTEGER NOT NULL, page_size INTEGER NOT NULL, closed INTEGER NOT NULL,
    captured_ns INTEGER NOT NULL, last_commit_ns INTEGER NOT NULL,
    frame_bytes INTEGER NOT NULL DEFAULT 0, image_bytes INTEGER NOT NULL DEFAULT 0,
    snapshot_ns INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE TABLE IF NOT EXISTS staged(
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, incarnation TEXT NOT NULL,
    generation INTEGER NOT NULL, kind TEXT NOT NULL, page_size INTEGER NOT NULL, salt TEXT NOT NULL,
    first INTEGER NOT NULL, last INTEGER NOT NULL, commits TEXT NOT NULL, captured_ns INTEGER NOT NULL,
    data BLOB NOT NULL
) STRICT;
CREATE INDEX IF NOT EXISTS staged_by_key ON staged(key);
CREATE TABLE IF NOT EXISTS packs(
    seq INTEGER PRIMARY KEY, name TEXT NOT NULL, created_ns INTEGER NOT NULL, uploaded_ns INTEGER NOT NULL,
    bytes INTEGER NOT NULL, entries INTEGER NOT NULL
) STRICT;
CREATE TABLE IF NOT EXISTS notes_read(file TEXT PRIMARY KEY, offset INTEGER NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS erased(incarnation TEXT PRIMARY KEY, erased_ns INTEGER NOT NULL) STRICT;
CREATE TABLE IF NOT EXISTS drops(
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL, incarnation TEXT NOT NULL,
    generation INTEGER NOT NULL, dropped_ns INTEGER NOT NULL, UNIQUE(key, incarnation)
) STRICT;
CREATE TABLE IF NOT EXISTS drops_shipped(
    key TEXT NOT NULL, incarnation TEXT NOT NULL, generation INTEGER NOT NULL, pack TEXT NOT NULL,
    shipped_ns INTEGER NOT NULL, PRIMARY KEY(key, incarnation)
) STRICT;
CREATE INDEX IF NOT EXISTS drops_shipped_by_time ON drops_shipped(shipped_ns);
"""
#: The tables :data:`SCHEMA` makes.
TABLES = frozenset(re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", SCHEMA))
#: Columns added to ``cursors`` since its first layout (a staging file written before gets them, 0).
ADDED_CURSOR_COLUMNS = ("frame_bytes", "image_bytes", "snapshot_ns")


class TenantCursor(NamedTuple):
    """A tenant's cursor with the identity of the file it was taken on."""

    incarnation: str
    generation: int
    cursor: Cursor
    captured_ns: int
    last_commit_ns: int
    #: bytes of frames staged for this file since its last snapshot (what a restore at its end replays)
    frame_bytes: int = 0
    #: bytes of the file's last snapshot staged (0: none staged since this count began)
    image_bytes: int = 0
    #: when the file's last snapshot was staged (its capture time, ns; a cursor older than this count: the time
    #: the count began)
    snapshot_ns: int = 0


class Staged(NamedTuple):
    """One staged capture, as it goes into a pack."""

    id: int
    key: str
    incarnation: str
    generation: int
    kind: str
    page_size: int
    salt: str
    first: int
    last: int
    commits: list[tuple[int, int]]
    captured_ns: int
    data: bytes


class StagedDrop(NamedTuple):
    """One staged drop record, as it goes into a pack (:class:`shardlite.core.pack.Drop`)."""

    id: int
    key: str
    incarnation: str
    generation: int
    dropped_ns: int
