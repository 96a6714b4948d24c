"""Capture a tenant's new commits from its WAL, mostly without a lock, and without a long-lived reader.

Replication ships what SQLite already wrote: the frames of each commit (the page images it changed). A
capture reads them straight from the ``-wal`` file, between a :class:`Cursor` (where the last capture of
this tenant stopped) and the log's last commit, the wal-index's ``mxFrame``
(:mod:`shardlite.core.walformat`). No reader stays open between captures, so checkpoints are never held
back. Two ways:

* :func:`capture_unlocked` takes no lock at all, so a writer committing tens of thousands of times a
  second never waits for it. It rests on the rule below: only a checkpoint that went through
  :func:`capture_then_checkpoint` lets SQLite restart a replicated tenant's log, so until then frames 1 to
  ``mxFrame`` are committed and nobody writes over them (writers append after ``mxFrame``). The wal-index
  header is read as SQLite's readers read it (both copies in one read, accepted only when they agree, are
  initialised and carry their checksum; tried again a few times otherwise), and the frames are verified
  (below). Anything that does not read consistently, and any capture that must be a snapshot, is
  :class:`NeedsLock`: nothing captured, the caller takes the lock.
* :func:`capture` runs while its caller holds the tenant's write lock (``BEGIN IMMEDIATE`` on a connection
  of the tenant file): no commit can add frames meanwhile. It is the path for snapshots, for what a
  lock-free capture could not read, and for the capture right before a checkpoint.

The rule that keeps a capture complete: **a tenant's log is never checkpointed before it was captured.**
SQLite restarts a log (overwrites it from frame 1) at the first write after a checkpoint that copied
every frame, so a frame not captured by then is gone from the log. Every checkpoint of a replicated tenant
therefore ends with :func:`capture_then_checkpoint`'s steps: capture, hand the capture to ``stage`` (which
must make it durable), then a passive checkpoint on a second connection *while the write lock is still
held*, so no frame can be added between the capture and the checkpoint. :func:`checkpoint_briefly_locked`
does the bulk of it first without the lock (copying only captured frames, under a reader's snapshot), so
the lock covers the last few commits only. When that checkpoint copied every
frame, the cursor is marked ``closed``: the next log generation (its first salt word one higher,
:func:`follows_closed`) continues it from frame 1. Any other change of generation is a gap: the capture
then returns a snapshot (the whole database at the log's last commit) instead of frames, and the history
goes on from it. A checkpoint that did not go through here (a writer opened before the root replicated,
the ``sqlite3`` shell) usually makes such a gap, but not always: after a closed cursor, a writer that a
reader's read mark kept from restarting the log appends to the old generation, and if such a checkpoint
copies those frames and the log restarts before a capture reads them, the next generation follows the
closed cursor and those commits are missing from the history (docs/replication.md, "Writers").
Autocheckpoint and checkpoint-on-close must be off on every connection of a replicated tenant (shardlite's
connections close without checkpointing; see ``open_connection``).

Reading ``-shm`` with a file descriptor of our own has one trap: POSIX record locks belong to a process
and a file, and closing *any* descriptor of a file drops every lock the process holds on it, SQLite's
included. SQLite locks ``-shm``; a process that closed a descriptor of it while one of its SQLite
connections had the file open would silently lose that connection's locks, and another process could then
re-initialise the wal-index under it. :class:`LogFiles` therefore holds the descriptors for as long as its
owner keeps them and must be closed only after every SQLite connection of that file in the process is
closed: captures run in a process that owns all its connections of the tenant files it captures (the
replicator), never beside a router's pool. ``-wal`` carries no locks.

The frames of a capture are verified as SQLite's recovery verifies them (salts, the checksum chain
continued from the cursor), and the last one must carry the checksum the wal-index holds for ``mxFrame``.
A log restarted under a lock-free capture (by a checkpoint that did not go through here: a writer
process opened before the root replicated, the ``sqlite3`` shell) carries new salts: its frames fail these
checks, so such a capture falls back to the lock and, the generation being lost, to a snapshot.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

import apsw

from ..core import walformat as wf
from .rawio import pread_all

__all__ = ["Cursor", "Capture", "CaptureError", "LogFiles", "NeedsLock", "capture", "capture_locked",
           "capture_unlocked", "capture_then_checkpoint", "checkpoint_briefly_locked", "snapshot_at_cursor",
           "follows_closed", "log_end", "LOCKED_FRAMES", "image_at", "commit_times", "NO_CURSOR", "SHM_READ_ATTEMPTS"]


class CaptureError(Exception):
    """The log did not read as SQLite wrote it although the write lock was held (a foreign writer, a
    damaged file): nothing was captured; the caller retries or takes a snapshot."""


class Cursor(NamedTuple):
    """Where the captured history of one tenant file stands (stored by the caller between captures)."""

    salt: bytes  #: the log generation of the last captured frame (b"": nothing captured yet)
    checkpoint_seq: int
    frame: int  #: the last captured frame (0: none of this generation)
    checksum: tuple[int, int]  #: that frame's checksum (the header's when ``frame`` is 0)
    page_size: int
    #: this generation was captured whole right before a checkpoint that copied all of it: the next
    #: generation continues the history from its frame 1
    closed: bool = False


NO_CURSOR = Cursor(b"", 0, 0, (0, 0), 0)


class Capture(NamedTuple):
    """What one capture found: new committed frames, or (``snapshot`` not None) the whole database."""

    frames: list[wf.Frame]
    snapshot: bytes | None  #: the database image at the log's last commit, when the history had a gap
    cursor: Cursor  #: the cursor after this capture
    page_size: int
    #: for a snapshot read after the write lock was let go: the clock read while it was held (0: none), which
    #: its caller takes as the capture's time (every commit it holds was made before, none made after)
    taken_ns: int = 0

    @property
    def empty(self) -> bool:
        return not self.frames and self.snapshot is None


def _open_ro(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


class LogFiles:
    """Read-only descriptors of a tenant file's ``-shm`` and ``-wal``, opened when first needed.

    Close it (:meth:`close`, or leave its ``with`` block) only after every SQLite connection of that file in
    this process is closed: closing a descriptor of ``-shm`` drops the process's POSIX locks on it (module
    docstring)."""

    __slots__ = ("path", "_shm", "_wal")

    def __init__(self, path: str) -> None:
        self.path = path
        self._shm: int | None = None
        self._wal: int | None = None

    def shm(self) -> int | None:
        if self._shm is None:
            self._shm = _open_ro(self.path + "-shm")
        return self._shm

    def wal(self) -> int | None:
        if self._wal is None:
            self._wal = _open_ro(self.path + "-wal")
        return self._wal

    def close(self) -> None:
        for fd in (self._shm, self._wal):
            if fd is not None:
                os.close(fd)
        self._shm = self._wal = None

    def __enter__(self) -> LogFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _snapshot(conn: apsw.Connection, due: _SnapshotDue, taken_ns: int = 0) -> Capture:
    """The snapshot ``due`` names, serialized by ``conn`` in a transaction begun while the write lock was held
    (its view: the database at the log's last commit)."""
    image = conn.serialize("main")
    if image is None:
        raise CaptureError("the database could not be serialized")
    shm = due.shm
    # a log no frame was ever written to has page size 0 in its wal-index: the database header says it
    page_size = shm.page_size or (int.from_bytes(image[16:18], "big") if len(image) >= 100 else 0)
    page_size = 65536 if page_size == 1 else page_size
    cursor = Cursor(shm.salt, due.checkpoint_seq, shm.mx_frame, shm.frame_checksum, page_size)
    return Capture([], bytes(image), cursor, page_size, taken_ns)


class _SnapshotDue(NamedTuple):
    """Read under the write lock: the history needs a snapshot, at the log's last commit (``shm``).

    Its cursor is never ``closed``, even when a checkpoint of another process had copied every frame: a
    writer restarts the log only when no reader holds a read mark of it, else it appends to the same
    generation, and that other process may copy those frames and let the log restart before a capture reads
    them; a closed cursor would then continue from the next generation's frame 1 past them."""

    shm: wf.ShmHeader
    checkpoint_seq: int


class _Gap(NamedTuple):
    """The history cannot continue from the cursor (nothing captured yet, a log generation went by
    uncaptured, or the log shrank): only a snapshot, taken under the write lock, can go on from here."""

    checkpoint_seq: int


class NeedsLock(NamedTuple):
    """:func:`capture_unlocked` could not capture without the write lock; ``reason`` says why. Nothing was
    captured: the caller takes the lock and calls :func:`capture`."""

    reason: str


def _read_shm(path: str, shm_fd: int, attempts: int) -> wf.ShmHeader:
    """The wal-index header, both copies read in one ``pread`` and accepted only when they agree, are
    initialised and carry their checksum (:func:`~shardlite.core.walformat.parse_shm_header`); a writer
    updating it meanwhile makes the copies differ, so a read is tried ``attempts`` times, as SQLite's
    readers retry (``walIndexTryHdr``)."""
    for attempt in range(attempts):
        try:
            return wf.parse_shm_header(pread_all(shm_fd, 2 * wf.SHM_HEADER_SIZE, 0))
        except wf.WalFormatError as exc:
            if attempt + 1 >= attempts:
                raise CaptureError(f"{path}-shm: {exc}") from None
            os.sched_yield()
    raise AssertionError("unreachable")


def follows_closed(cursor: Cursor, header: wf.WalHeader) -> bool:
    """Whether the log whose header is ``header`` is the generation right after ``cursor``'s, which a
    checkpoint closed (copied whole): the history then continues from its frame 1.

    The link is the first salt word: SQLite adds one to it at every restart of a log (``walRestartHdr``), in
    whichever connection restarts it. The checkpoint sequence in the header is no such link: it is the
    restarting connection's own count (two connections restarting a log in turn write 1, 1, 2, ...), so it
    made a closed log restarted by another writer than the last one look like a gap, and took a snapshot. A
    first salt word more than one further means a generation went by uncaptured: a gap. A header written
    anew (a log file emptied by a TRUNCATE checkpoint, or created again, then written by a connection that
    never restarted a log) gets random salts: a gap too (a snapshot), except once in 2**32, when they look
    like the next generation."""
    if not (cursor.salt and cursor.closed and header.salt != cursor.salt and header.page_size == cursor.page_size):
        return False
    return int.from_bytes(header.salt[:4], "big") == (int.from_bytes(cursor.salt[:4], "big") + 1) & 0xFFFFFFFF


def _continue(path: str, wal_fd: int, cursor: Cursor, shm: wf.ShmHeader) -> Capture | _Gap:
    """The frames after ``cursor`` up to the wal-index's ``mxFrame`` (``shm.mx_frame`` > 0), verified, or a
    :class:`_Gap`. :class:`CaptureError` when the log does not read as the wal-index says it is."""
    try:
        header = wf.parse_wal_header(pread_all(wal_fd, wf.WAL_HEADER_SIZE, 0))
    except wf.WalFormatError as exc:
        raise CaptureError(f"{path}-wal: {exc}") from None
    if header.salt != shm.salt or header.page_size != shm.page_size:
        raise CaptureError(f"{path}-wal: its header does not match the wal-index")
    if cursor.salt and header.salt == cursor.salt and shm.mx_frame >= cursor.frame:
        first, seed = cursor.frame + 1, cursor.checksum
    elif follows_closed(cursor, header):
        first, seed = 1, header.checksum
    else:  # nothing captured yet, a generation went by uncaptured, or the log shrank: a snapshot
        return _Gap(header.checkpoint_seq)
    if first > shm.mx_frame:
        return Capture([], None, cursor, shm.page_size)
    start = wf.frame_offset(first, header.page_size)
    body = pread_all(wal_fd, wf.frame_offset(shm.mx_frame + 1, header.page_size) - start, start)
    frames = list(wf.read_frames(body, first, header.page_size, header.salt))
    count = shm.mx_frame - first + 1
    if len(frames) != count or wf.verify_chain(header, frames, seed) != count:
        raise CaptureError(f"{path}-wal: frames {first}-{shm.mx_frame} do not verify")
    if frames[-1].header.checksum != shm.frame_checksum or not frames[-1].header.commit_size:
        raise CaptureError(f"{path}-wal: frame {shm.mx_frame} is not the commit the wal-index names")
    after = Cursor(header.salt, header.checkpoint_seq, shm.mx_frame, shm.frame_checksum, header.page_size)
    return Capture(frames, None, after, header.page_size)


def capture(conn: apsw.Connection, files: LogFiles, cursor: Cursor) -> Capture:
    """The commits of the tenant file ``files.path`` after ``cursor``; ``conn`` is a connection of that file
    that holds its write lock (``BEGIN IMMEDIATE``) for the whole call.

    Returns new frames (possibly none) when the history continues from ``cursor``, or a snapshot when it
    cannot (nothing captured yet, or a log generation was lost). Raises :class:`CaptureError` when the log
    does not read consistently."""
    if conn.txn_state("main") != apsw.SQLITE_TXN_WRITE:
        raise ValueError("capture() needs the file's write lock held by conn (BEGIN IMMEDIATE)")
    got = _read_locked(files, cursor)
    return _snapshot(conn, got) if isinstance(got, _SnapshotDue) else got


def capture_locked(lock: apsw.Connection, files: LogFiles, cursor: Cursor, *,
                   reader: apsw.Connection | None = None, clock: Callable[[], int] | None = None) -> Capture:
    """:func:`capture` with the write lock taken on ``lock`` (``BEGIN IMMEDIATE``, its busy timeout applies;
    ``apsw.BusyError`` with nothing done) and let go before this returns.

    ``reader`` (optional, a second connection of the file with no transaction open): when a snapshot is due,
    ``reader`` begins a read transaction while the lock is held, and the image is serialized in it after the
    lock is let go, so writers wait only for the wal-index read, not for a copy of the whole database (a
    second per GiB). What it reads is still the database at the cursor's commit: its transaction began
    then, a reader's read mark keeps any later checkpoint from copying past it, and writers of a replicated
    root never checkpoint; nor can the log restart under the cursor unless every frame was copied already
    (the reader is then on read mark 0 and reads the database file, which nothing changes meanwhile; a log
    restarted then is a new generation to the cursor, and the next capture takes another snapshot).

    ``clock`` (optional): read while the lock is held when the image is read after it, as the capture's
    :attr:`Capture.taken_ns` (commits made during the read come after it, so their notes still time them)."""
    lock.execute("BEGIN IMMEDIATE")
    try:
        got = _read_locked(files, cursor)
        if not isinstance(got, _SnapshotDue):
            return got
        if reader is None:
            return _snapshot(lock, got)
        taken = clock() if clock is not None else 0
        _begin_read(reader)  # its snapshot: the database at the cursor
    finally:
        lock.execute("ROLLBACK")
    try:
        return _snapshot(reader, got, taken)
    finally:
        reader.execute("COMMIT")


def _begin_read(conn: apsw.Connection) -> None:
    """Begin a read transaction on ``conn`` now: its snapshot is the database as of this call (a ``BEGIN``
    alone takes it at the first read). Nothing is left open when it fails."""
    conn.execute("BEGIN")
    try:
        conn.execute("PRAGMA schema_version").fetchall()
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def snapshot_at_cursor(lock: apsw.Connection, reader: apsw.Connection, files: LogFiles,
                       cursor: Cursor) -> Capture | None:
    """A snapshot of ``files.path`` at ``cursor`` (a refreshed snapshot, :mod:`shardlite.core.refresh`), or None
    when the log no longer ends at the cursor (a writer committed since it was captured: a later capture
    tries again). The write lock is taken on ``lock`` (its busy timeout applies; ``apsw.BusyError`` with
    nothing done) only to read the wal-index and begin ``reader``'s read transaction, which then sees exactly
    the commit the cursor names; the image is serialized after the lock is let go, as in
    :func:`capture_locked`, whose argument for what the reader sees applies."""
    shm_fd = files.shm()
    if shm_fd is None or not cursor.salt:
        return None
    lock.execute("BEGIN IMMEDIATE")
    try:
        shm = _read_shm(files.path, shm_fd, 1)
        if shm.salt != cursor.salt or shm.mx_frame != cursor.frame or (
                cursor.frame and shm.frame_checksum != cursor.checksum):
            return None
        _begin_read(reader)  # its snapshot: the database at the cursor
    finally:
        lock.execute("ROLLBACK")
    try:
        image = reader.serialize("main")
    finally:
        reader.execute("COMMIT")
    if image is None:
        return None
    return Capture([], bytes(image), cursor, cursor.page_size)


def _read_locked(files: LogFiles, cursor: Cursor) -> Capture | _SnapshotDue:
    """Under the write lock: the frames after ``cursor``, or the snapshot due when the history does not
    continue from it."""
    path = files.path
    shm_fd = files.shm()
    if shm_fd is None:
        raise CaptureError(f"{path}-shm is missing although a connection holds the write lock")
    shm = _read_shm(path, shm_fd, 1)  # nobody can change it while the write lock is held
    if shm.mx_frame == 0:  # a log with no commit (new, or restarted): nothing new, the cursor stands
        return _SnapshotDue(shm, 0) if not cursor.salt else Capture([], None, cursor, shm.page_size)
    wal_fd = files.wal()
    if wal_fd is None:
        raise CaptureError(f"{path}-wal is missing but the wal-index says it holds {shm.mx_frame} frames")
    got = _continue(path, wal_fd, cursor, shm)
    if isinstance(got, _Gap):
        return _SnapshotDue(shm, got.checkpoint_seq)
    return got


#: Reads of the wal-index header before a lock-free capture gives up on copies that keep differing.
SHM_READ_ATTEMPTS = 8


def capture_unlocked(files: LogFiles, cursor: Cursor) -> Capture | NeedsLock:
    """The commits of ``files.path`` after ``cursor``, read without any lock: the frames from the cursor up
    to the wal-index's ``mxFrame``, or :class:`NeedsLock` (nothing captured) when only :func:`capture`
    under the write lock can go on (a snapshot is due, or anything read inconsistently).

    Why no lock is needed: writers of a replicated root never checkpoint, so only a checkpoint run by
    :func:`capture_then_checkpoint` (after it captured everything) can let SQLite restart the log; until
    then frames 1 to ``mxFrame`` are committed and no writer writes over them (a writer appends after
    ``mxFrame``). A checkpoint that did not go through here (a writer opened before the root
    replicated, the ``sqlite3`` shell) can restart the log under this read; the restarted log carries new
    salts, so its frames fail the salt check against the cursor's generation, a torn frame fails the
    checksum chain, and the last frame must carry the checksum of the header read first: any of these is
    :class:`NeedsLock`, never a wrong frame. Only a cursor of the same log generation, or one ``closed``
    by the checkpoint that ended its generation, is continued.

    The caller either keeps a SQLite connection of the file open in this process meanwhile (its ``-shm`` and
    ``-wal`` then stay the files that SQLite uses) and does not close ``files`` before it (module docstring:
    the ``-shm`` trap), or holds no connection of the file at all, continues a cursor of an open log
    generation (its salts and checksum chain tie the frames to that log) and closes ``files`` after the call
    (the replicator's captures of tenants it keeps no connection of: a wal-index being rebuilt reads
    inconsistently, files replaced meanwhile yield fewer frames, never a wrong one)."""
    if not cursor.salt:
        return NeedsLock("no history yet: a snapshot")
    path = files.path
    shm_fd = files.shm()
    if shm_fd is None:
        return NeedsLock(f"{path}-shm is missing")
    try:
        shm = _read_shm(path, shm_fd, SHM_READ_ATTEMPTS)
        if shm.mx_frame == 0:  # no commit in the log (a restart not written to yet): the cursor stands
            return Capture([], None, cursor, shm.page_size)
        wal_fd = files.wal()
        if wal_fd is None:
            return NeedsLock(f"{path}-wal is missing")
        got = _continue(path, wal_fd, cursor, shm)
    except CaptureError as exc:
        return NeedsLock(str(exc))
    if isinstance(got, _Gap):
        return NeedsLock("the history does not continue in this log: a snapshot")
    return got


def log_end(files: LogFiles) -> tuple[bytes, int] | None:
    """(salts, ``mxFrame``) of the wal-index header read without a lock (its two copies agreeing), or None
    when it does not read consistently: how far the log goes, to judge what a locked capture would read."""
    shm_fd = files.shm()
    if shm_fd is None:
        return None
    try:
        shm = _read_shm(files.path, shm_fd, SHM_READ_ATTEMPTS)
    except CaptureError:
        return None
    return shm.salt, shm.mx_frame


#: At most this many uncaptured frames are left for the capture made under the write lock before a
#: checkpoint (verifying a frame takes ~60-170 µs here): with more, the checkpoint waits for a later round.
LOCKED_FRAMES = 256


def checkpoint_briefly_locked(lock: apsw.Connection, guard: apsw.Connection, checkpointer: apsw.Connection,
                              files: LogFiles, cursor: Cursor, stage: Callable[[Capture], None], *,
                              locked_frames: int = LOCKED_FRAMES, closed: Callable[[Cursor], None] | None = None,
                              refresh: Callable[[Capture], None] | None = None) -> tuple[Cursor, bool]:
    """A checkpoint of ``files.path`` that holds the write lock only for its last few frames. Returns (the
    cursor to store, whether the checkpoint under the lock ran; the cursor is ``closed`` when it copied
    every frame). ``lock``, ``guard`` and ``checkpointer`` are three connections of the file with no
    transaction open.

    1. Without the write lock: ``guard`` opens a read transaction, then a lock-free capture is staged and
       ``checkpointer`` copies into the database what it can. SQLite backfills no frame past an open
       reader's snapshot (a reader on read mark 0 lets it backfill none), and the capture, begun after that
       snapshot, reaches at least to it: every frame copied was captured, and no restart of the log can
       overwrite anything meanwhile (a restart waits for readers).
    2. When at most ``locked_frames`` frames were committed since that capture, the write lock is taken on
       ``lock`` (before ``guard`` lets go, so no writer can restart the log in between: that would make the
       next capture a snapshot), and :func:`capture_then_checkpoint`'s steps run under it: the rest
       captured and staged, a passive checkpoint. Otherwise (a writer outruns the capture) nothing more
       is done: the log stays, the next round tries again.

    3. When the checkpoint closed the log generation, ``closed`` (optional) gets the closed cursor as soon as
       the write lock is let go, to store it before anything else runs (a crash after it continues the next
       generation from its frame 1; before it, the next capture is a snapshot).
    4. ``refresh`` (optional): when the checkpoint closed the log generation, ``guard`` begins a read
       transaction before the write lock is let go. Every frame is in the database file then, so that
       transaction sees exactly the commit the cursor names, and writers go on meanwhile (the first restarts
       the log; SQLite backfills nothing past a reader on read mark 0, so the file stays as it is). The
       database is serialized in it and ``refresh`` gets a snapshot capture at the closed cursor (a
       refreshed snapshot, :mod:`shardlite.core.refresh`); a database that cannot be serialized gets none
       (the history is whole without it).

    ``apsw.BusyError`` when the write lock stays busy past ``lock``'s busy timeout: what step 1 staged
    stays staged (``stage`` stored it with its cursor); the rest of the checkpoint waits for a later call."""
    guard.execute("BEGIN")
    try:
        guard.execute("PRAGMA schema_version").fetchall()  # the read transaction (and its snapshot) begins
        got = capture_unlocked(files, cursor)
        if not isinstance(got, NeedsLock):
            if not got.empty:
                stage(got)
            cursor = got.cursor
            checkpointer.execute("PRAGMA schema_version").fetchall()
            checkpointer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
            end = log_end(files)
            if end is not None and end[0] == cursor.salt and end[1] - cursor.frame > locked_frames:
                return cursor, False
        lock.execute("BEGIN IMMEDIATE")
    finally:
        guard.execute("COMMIT")
    reading = False
    try:
        after = _locked_capture_and_checkpoint(lock, checkpointer, files, cursor, stage)
        if refresh is not None and after.closed:
            _begin_read(guard)  # its snapshot: the database at the closed cursor
            reading = True
    finally:
        lock.execute("ROLLBACK")
    if closed is not None and after.closed:
        try:
            closed(after)
        except BaseException:
            if reading:
                guard.execute("COMMIT")
            raise
    if reading:
        try:
            image = guard.serialize("main")
        except apsw.Error:
            image = None  # no refreshed snapshot this time: the history is whole without it
        finally:
            guard.execute("COMMIT")
        if image is not None and refresh is not None:
            refresh(Capture([], bytes(image), after, after.page_size))
    return after, True


def capture_then_checkpoint(lock: apsw.Connection, checkpointer: apsw.Connection, files: LogFiles,
                            cursor: Cursor, stage: Callable[[Capture], None]) -> Cursor:
    """Capture ``files.path``'s new commits, ``stage`` them, then run a passive checkpoint, all under the write
    lock taken on ``lock`` (``BEGIN IMMEDIATE``: SQLite's busy timeout of that connection applies; a
    timeout raises ``apsw.BusyError`` with nothing done). ``checkpointer`` is a second connection of the
    same file. Returns the cursor to store; when the checkpoint copied every frame it is ``closed``.

    ``stage`` must have made the capture durable when it returns: the checkpoint that follows may let the
    next writer overwrite those frames. When it raises, no checkpoint runs and the error propagates.
    To keep the lock short, capture lock-free first (:func:`capture_unlocked`) and stage that: this call
    then reads only the commits made since."""
    lock.execute("BEGIN IMMEDIATE")
    try:
        return _locked_capture_and_checkpoint(lock, checkpointer, files, cursor, stage)
    finally:
        lock.execute("ROLLBACK")


def _locked_capture_and_checkpoint(lock: apsw.Connection, checkpointer: apsw.Connection, files: LogFiles,
                                   cursor: Cursor, stage: Callable[[Capture], None]) -> Cursor:
    got = capture(lock, files, cursor)
    if not got.empty:
        stage(got)
    after = got.cursor
    # a connection that has not read the file yet has not opened its log and checkpoints nothing
    checkpointer.execute("PRAGMA schema_version").fetchall()
    log, copied = checkpointer.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    if log > 0 and copied == log and log == after.frame:
        after = after._replace(closed=True)
    return after


def image_at(captures: list[Capture]) -> bytearray:
    """The database image a history of captures (oldest first) ends at: the latest snapshot with every later
    capture's frames replayed onto it. Pure; :class:`CaptureError` when the history has no snapshot."""
    start = max((i for i, c in enumerate(captures) if c.snapshot is not None), default=-1)
    if start < 0:
        raise CaptureError("a history starts with a snapshot")
    image = bytearray(captures[start].snapshot or b"")
    for got in captures[start + 1:]:
        wf.replay(image, got.frames, got.page_size)
    return image


def commit_times(got: Capture, notes: list[tuple[int, int]], captured_ns: int,
                 after_ns: int = 0) -> list[tuple[int, int]]:
    """(frame, commit time) of each commit ``got`` ends: the time a writer noted for that frame count, else
    the capture's time (later than the commit: a point-in-time restore then counts it a little late).

    ``notes`` are (frames after a commit, its time); those at or before ``after_ns`` (the previous capture
    of this file, taken under the write lock) belong to commits captured then, possibly of an older log
    generation whose frame numbers come back, and are ignored."""
    noted: dict[int, int] = {}
    for frames, at in notes:
        if at > after_ns:
            noted[frames] = at
    if got.snapshot is not None:
        return [(got.cursor.frame, min(noted.get(got.cursor.frame, captured_ns), captured_ns))]
    return [(f.number, min(noted.get(f.number, captured_ns), captured_ns))
            for f in got.frames if f.header.commit_size]
