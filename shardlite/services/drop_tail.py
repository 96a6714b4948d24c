"""A dropped tenant's last commits: captured by the drop itself and staged with its drop record.

A plain drop on a replicated root deletes the tenant's file. Before this module, the commits its node's
replicator had not captured by then (its lag; everything since its last capture when it was down or behind)
were lost from the replica, so a one-tenant restore at a time before the drop (the way a drop is undone)
missed them. :func:`fence_and_stage` closes that hole (docs/replication.md, "Drops"):

1. **Fence, then read the log under the write lock.** On a connection of its own, ``BEGIN IMMEDIATE``, the
   identity checked, the retired marker written and committed; its WAL hook reports the frame count after
   that commit, SQLite's own ``mxFrame`` (``fence_mx``). Then ``BEGIN IMMEDIATE`` again: no frame can change
   while the log is read. Every later transaction of any process finds the marker and writes nothing. (A
   file fenced already, by a killed or outrun run of this drop, gets no frame from the fence: SQLite skips
   a write that changes nothing; its log then ends where its checksum chain does, see :func:`_tail`.)
2. **The tail**: the frames after the tenant's cursor, read from ``-wal`` and verified as the replicator's
   captures are (salts, the checksum chain continued from the cursor, or from the log header when the cursor
   is ``closed`` and this is the next generation), all the way to ``fence_mx``, whose frame must be a commit
   frame. The tail is those frames up to the commit before the fence's own: exactly the commits acknowledged
   before the drop, continuing the cursor. When the history cannot continue (no cursor of this file, a log
   generation gone by uncaptured, frames that do not verify), the tail is a **snapshot** instead
   (``serialize`` inside the held transaction), timed at the note of the log's last commit before the fence
   (else at the fence: a snapshot is never timed before a commit it holds).
3. **Stage the tail and the drop record in one transaction** of the node's staging
   (:meth:`~shardlite.files.staging.Staging.stage_drop`, ``synchronous=FULL``), only if the stored cursor is
   still the one the tail continues. The replicator's captures are staged under the same check, so the two
   never stage conflicting captures of one tenant: whichever stages second gets
   :class:`~shardlite.files.staging.StaleCursor`, and the drop reads the tail again from the new cursor.
4. A drop killed anywhere and run again: before the staging transaction nothing of the tail is staged and
   the rerun reads it again (the log still holds every frame: writers of a replicated root never
   checkpoint, and the replicator skips a tenant that is not live); after it, the record is there and the
   rerun stages nothing more. So the tail is staged once, before its drop record.

No descriptor of ``-shm`` or of the database file is opened (the "-shm trap", :mod:`shardlite.files.walcapture`:
the dropping process usually holds pool connections of the file): ``fence_mx`` comes from SQLite's WAL hook,
and ``-wal``, which carries no locks, is read with a descriptor of its own.

Commit times come from the writers' change notes (:mod:`shardlite.files.notesfile`), read from the offsets the
replicator stored (everything before them was captured; it keeps a ``dropping`` tenant marked, so it stores
none past its notes meanwhile): a point-in-time restore puts each commit at the time it was acknowledged. A
commit without a note is timed at the capture (later than the commit: never a restore point before it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import apsw

from ..core import walformat as wf
from ..errors import Busy, IdentityMismatch
from ..files import notesfile
from ..files import walcapture as wc
from ..files.catalog import TenantRecord
from ..files.copying import open_source
from ..files.rawio import pread_all
from ..files.staging import Staging, StaleCursor, Tail
from ..front.store import Store

__all__ = ["fence_and_stage", "ATTEMPTS", "NOTES_BYTES"]

#: Reads of the tail a drop takes at most when the replicator keeps staging the tenant meanwhile (each of its
#: captures was in flight before the drop began: it skips a tenant that is not live).
ATTEMPTS = 5
#: Bytes of change notes a drop reads at most for its commit times (a replicator down for long leaves a large
#: backlog; commits past this bound are timed at the capture).
NOTES_BYTES = 256 << 20


def fence_and_stage(store: Store, record: TenantRecord, path: str) -> None:
    """Fence ``record``'s file at ``path`` and stage its uncaptured commits and its drop record in its node's
    staging (module docstring). The caller has set the tenant ``dropping``. :class:`~shardlite.Busy` when the
    file or the staging stayed locked (the tenant stays ``dropping``: run the drop again)."""
    node_path = store.node_path(record.node)
    for _attempt in range(ATTEMPTS):
        try:
            staging = Staging(node_path)
            try:
                staging.conn.set_busy_timeout(max(5000, store.settings.busy_timeout_ms))
                if staging.drop_staged(record.key, record.incarnation):
                    return  # a run killed after its staging transaction: fenced, tail and record staged
                found = staging.cursor(record.key)
                same = found is not None and (found.incarnation, found.generation) == (record.incarnation,
                                                                                        record.generation)
                cursor = found.cursor if found is not None and same else wc.NO_CURSOR
                previous = found.captured_ns if found is not None and same else 0
                tail = _fence_and_read(store, record, path, cursor, previous, staging)
                try:
                    staging.stage_drop(record.key, record.incarnation, record.generation, time.time_ns(), tail)
                    return
                except StaleCursor:
                    continue  # the replicator staged a capture meanwhile: read the tail from its cursor
            finally:
                staging.close()
        except apsw.BusyError as exc:
            raise Busy(f"tenant {record.key!r}: the replication staging of node {record.node!r} stayed locked "
                       f"({exc}); the tenant is left 'dropping': run the drop again") from None
    raise Busy(f"tenant {record.key!r}: its replicator kept staging captures during the drop ({ATTEMPTS} "
               "attempts); the tenant is fenced and left 'dropping': run the drop again")


def _fence_and_read(store: Store, record: TenantRecord, path: str, cursor: wc.Cursor, previous: int,
                    staging: Staging) -> Tail | None:
    """Steps 1 and 2 of the module docstring; None when the file is gone (nothing left to fence or read)."""
    if not os.path.exists(path):
        return None
    note = store.note_hook(record.node, record.key)
    after_commit: list[int] = []

    def hook(conn: apsw.Connection, dbname: str, frames: int) -> int:
        after_commit.append(frames)  # SQLite's mxFrame right after the fence's commit
        return note(conn, dbname, frames) if note is not None else apsw.SQLITE_OK

    conn = open_source(path, busy_timeout_ms=store.settings.busy_timeout_ms)
    try:
        conn.set_wal_hook(hook)  # the fence is a commit like any other: noted
        fenced_ns = _locked(conn, record, path, fence=True)
        _locked(conn, record, path, fence=False)  # the write lock again: the log stays as the fence left it
        try:
            fence_mx = after_commit[-1] if after_commit else None
            got = _tail(path, cursor, fence_mx)
            last = None
            if got is None:  # the history does not continue here: the file as of the fence
                last = _last_commit(path, fence_mx)
                image = conn.serialize("main")
                if image is None:
                    raise wc.CaptureError(f"{path} could not be serialized")
                size = int.from_bytes(image[16:18], "big") if len(image) >= 100 else 0
                size = 65536 if size == 1 else size
                got = wc.Capture([], bytes(image), wc.Cursor(b"", 0, 0, (0, 0), size), size)
            captured = time.time_ns()
        finally:
            conn.execute("ROLLBACK")
    finally:
        conn.close()
    if got.empty:
        return Tail(got, [], captured, cursor)
    notes = _notes_of(store.node_path(record.node), record.key, staging)
    if got.snapshot is not None:  # timed at the note of the last commit before the fence, else at the fence
        noted = [t for frames, t in notes if frames == last and previous < t < fenced_ns]
        return Tail(got, [(0, max(noted, default=fenced_ns))], captured, cursor)
    return Tail(got, wc.commit_times(got, notes, captured, previous), captured, cursor)


def _locked(conn: apsw.Connection, record: TenantRecord, path: str, *, fence: bool) -> int:
    """``BEGIN IMMEDIATE`` on ``conn`` and the identity check; with ``fence``, the retired marker written and
    committed (returns the time just before the marker was written), else the transaction left open."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except apsw.BusyError as exc:
        raise Busy(f"tenant {record.key!r}: {path} stayed locked past the busy timeout ({exc}); nothing was "
                   "changed: run the drop again") from None
    try:
        stored = conn.execute("SELECT key, incarnation FROM _shardlite_meta WHERE id = 1").fetchall()
        if stored != [(record.key, record.incarnation)]:
            raise IdentityMismatch(f"{path} does not hold incarnation {record.incarnation} of {record.key!r}: "
                                   "refusing to fence it")
        began = time.time_ns()
        if fence:
            conn.execute("UPDATE _shardlite_meta SET retired = 'dropped' WHERE id = 1")
            conn.execute("COMMIT")
        return began
    except BaseException:
        if not conn.get_autocommit():
            conn.execute("ROLLBACK")
        raise


def _tail(path: str, cursor: wc.Cursor, fence_mx: int | None) -> wc.Capture | None:
    """The committed frames after ``cursor`` up to the commit before the fence's (whose commit frame is
    ``fence_mx``), read from ``-wal`` and verified through ``fence_mx``; None when the history cannot continue
    from ``cursor`` in this log or the frames do not verify (then a snapshot stands for the tail).

    ``fence_mx`` None: the fence wrote no frame (the file was fenced already, by a run of this drop that was
    killed or that the replicator outran: SQLite skips a write that changes nothing). No transaction has
    written since that fence (each finds the marker first), so the log ends at the last commit its checksum
    chain reaches, and the tail is every commit after the cursor, that fence included (restores clear the
    marker)."""
    def after_cursor(header: wf.WalHeader) -> tuple[int, tuple[int, int]] | None:
        if cursor.salt and header.salt == cursor.salt:
            return cursor.frame + 1, cursor.checksum
        if wc.follows_closed(cursor, header):
            return 1, header.checksum
        return None  # no cursor of this file, or a log generation went by uncaptured

    got = _committed_before_fence(path, after_cursor, fence_mx)
    if got is None:
        return None
    header, tail = got
    if not tail:
        return wc.Capture([], None, cursor, header.page_size)
    last = tail[-1]
    after = wc.Cursor(header.salt, header.checkpoint_seq, last.number, last.header.checksum, header.page_size)
    return wc.Capture(tail, None, after, header.page_size)


def _last_commit(path: str, fence_mx: int | None) -> int | None:
    """The frame of the log's last commit before the fence's (from frame 1 of its generation), for a snapshot's
    time; None when there is none or the log does not verify."""
    got = _committed_before_fence(path, lambda header: (1, header.checksum), fence_mx)
    return got[1][-1].number if got is not None and got[1] else None


def _committed_before_fence(path: str, start: Callable[[wf.WalHeader], tuple[int, tuple[int, int]] | None],
                            fence_mx: int | None) -> tuple[wf.WalHeader, list[wf.Frame]] | None:
    """The log's header and its committed frames from ``start(header)`` (first frame, checksum seed) up to the
    commit before the fence's (:func:`_tail`), verified; None when ``start`` says the history does not
    continue in this log, or the frames do not verify through ``fence_mx``."""
    try:
        fd = os.open(path + "-wal", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)  # -wal carries no locks
    except FileNotFoundError:
        return None
    try:
        try:
            header = wf.parse_wal_header(pread_all(fd, wf.WAL_HEADER_SIZE, 0))
        except wf.WalFormatError:
            return None
        began = start(header)
        if began is None:
            return None
        first, seed = began
        at = wf.frame_offset(first, header.page_size)
        end = os.fstat(fd).st_size if fence_mx is None else wf.frame_offset(fence_mx + 1, header.page_size)
        body = pread_all(fd, max(0, end - at), at)
    finally:
        os.close(fd)
    frames = list(wf.read_frames(body, first, header.page_size, header.salt))
    good = wf.verify_chain(header, frames, seed)
    if fence_mx is None:
        return header, wf.committed(frames[:good])
    count = fence_mx - first + 1
    if count < 1 or len(frames) != count or good != count or not frames[-1].header.commit_size:
        return None
    return header, wf.committed(frames[:-1])  # the fence's frames are the last commit's


def _notes_of(node_path: str, key: str, staging: Staging) -> list[tuple[int, int]]:
    """(frames after the commit, its time) of ``key``'s commits noted since the replicator's stored offsets."""
    offsets = staging.notes_offsets()
    found: list[tuple[int, int]] = []
    budget = NOTES_BYTES
    for name in notesfile.list_notes(node_path):
        at = offsets.get(name, 0)
        while budget > 0:
            got = notesfile.read_notes(node_path, name, at, max_bytes=min(notesfile.READ_BYTES, budget))
            found.extend((note.frames, note.time_ns) for note in got.notes if note.key == key)
            if got.bad or got.offset <= at:
                break
            budget -= got.offset - at
            at = got.offset
    return found
