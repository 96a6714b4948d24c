"""A dropped tenant's last commits: captured by the drop itself and staged with its drop record.

A plain drop on a replicated root deletes the tenant's file. Without this module, the commits its node's
replicator had not captured by then (its lag; everything since its last capture when it was down or behind)
were lost from the replica, so a one-tenant restore at a time before the drop (the way a drop is undone)
missed them. :func:`fence_and_stage` closes that hole (docs/replication.md, "Drops"):

1. **Capture, then fence, under one write lock.** ``BEGIN IMMEDIATE`` on a connection of the file of its own;
   the identity checked; the commits after the tenant's cursor captured exactly as the replicator captures
   them (:func:`~shardlite.files.walcapture.capture`: frames continuing the cursor's salts and checksum chain,
   or a snapshot when there is no cursor of this file or the history cannot continue); then the retired
   marker written and committed in the same transaction. No commit can fall between the capture and the
   fence, and every later transaction of any process finds the marker.
2. **Stage the tail and the drop record in one transaction** of the node's staging
   (:meth:`~shardlite.files.staging.Staging.stage_drop`, ``synchronous=FULL``), only if the stored cursor is
   still the one the capture continued. The replicator's captures are staged under the same check, so the
   two never stage conflicting captures of one tenant: whichever stages second gets
   :class:`~shardlite.files.staging.StaleCursor`, and the drop captures again (its fence is already there).
3. A drop killed anywhere and run again: before the staging transaction nothing of the tail is staged and
   the rerun captures again (the log still holds every frame: writers of a replicated root never
   checkpoint, and the replicator skips a tenant that is not live); after it, the record is there and the
   rerun stages nothing more. So the tail is staged once, before its drop record.

Commit times come from the writers' change notes (:mod:`shardlite.files.notesfile`), read from the offsets the
replicator stored (everything before them was captured): a point-in-time restore puts each commit at the time
it was acknowledged. A commit without a note gets the capture's time (later than the commit: never a restore
point before it happened).

The ``-shm`` trap (:mod:`shardlite.files.walcapture`): the capture reads ``-shm`` with a descriptor of its own,
so it runs only when this process has no other SQLite connection of the file: the drop closes its pool's
handles of the tenant first. When one stays open (a thread of this process holds it), no descriptor of
``-shm`` is opened: the tail is a snapshot (``serialize`` inside the held transaction), timed at the capture.
Descriptors whose file gained a connection of this process meanwhile are kept open (:data:`_LINGERING`) until
a later drop finds the file without one.
"""

from __future__ import annotations

import os
import time

import apsw

from ..errors import Busy, IdentityMismatch
from ..files import notesfile
from ..files import walcapture as wc
from ..files.catalog import TenantRecord
from ..files.copying import open_source
from ..files.engine import tracked_of
from ..files.staging import Staging, StaleCursor, Tail
from ..front.store import Store

__all__ = ["fence_and_stage", "ATTEMPTS", "NOTES_BYTES"]

#: Captures a drop takes at most when the replicator keeps staging the tenant meanwhile (each of its captures
#: was in flight before the drop began: it skips a tenant that is not live).
ATTEMPTS = 5
#: Bytes of change notes a drop reads at most for its commit times (a replicator down for long leaves a large
#: backlog; commits past this bound are timed at the capture).
NOTES_BYTES = 256 << 20
#: Log descriptors kept open because a connection of their file appeared in this process during the capture.
_LINGERING: list[wc.LogFiles] = []


def fence_and_stage(store: Store, record: TenantRecord, path: str) -> None:
    """Fence ``record``'s file at ``path`` and stage its uncaptured commits and its drop record in its node's
    staging (module docstring). The caller has set the tenant ``dropping`` and closed this process's pool
    handles of it. :class:`~shardlite.Busy` when the file or the staging stayed locked (the tenant stays
    ``dropping``: run the drop again)."""
    _close_lingering()
    node_path = store.node_path(record.node)
    busy_ms = max(5000, store.settings.busy_timeout_ms)
    for _attempt in range(ATTEMPTS):
        try:
            staging = Staging(node_path)
            try:
                staging.conn.set_busy_timeout(busy_ms)
                if staging.drop_staged(record.key, record.incarnation):
                    return  # a run killed after its staging transaction: fenced, tail and record staged
                found = staging.cursor(record.key)
                same = found is not None and (found.incarnation, found.generation) == (record.incarnation,
                                                                                        record.generation)
                cursor = found.cursor if found is not None and same else wc.NO_CURSOR
                previous = found.captured_ns if found is not None and same else 0
                tail = _capture_and_fence(store, record, path, cursor, previous, staging)
                try:
                    staging.stage_drop(record.key, record.incarnation, record.generation, time.time_ns(), tail)
                    return
                except StaleCursor:
                    continue  # the replicator staged a capture meanwhile: capture from its cursor
            finally:
                staging.close()
        except apsw.BusyError as exc:
            raise Busy(f"tenant {record.key!r}: the replication staging of node {record.node!r} stayed locked "
                       f"({exc}); the tenant is left 'dropping': run the drop again") from None
    raise Busy(f"tenant {record.key!r}: its replicator kept staging captures during the drop ({ATTEMPTS} "
               "attempts); the tenant is fenced and left 'dropping': run the drop again")


def _capture_and_fence(store: Store, record: TenantRecord, path: str, cursor: wc.Cursor, previous: int,
                       staging: Staging) -> Tail | None:
    """Step 1 of the module docstring; None when the file is gone (nothing left to capture or fence)."""
    if not os.path.exists(path):
        return None
    conn = open_source(path, busy_timeout_ms=store.settings.busy_timeout_ms)
    hook = store.note_hook(record.node, record.key)
    if hook is not None:
        conn.set_wal_hook(hook)  # the fence is a commit like any other: noted
    files = wc.LogFiles(path) if tracked_of(path) == 0 else None
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except apsw.BusyError as exc:
            raise Busy(f"tenant {record.key!r}: {path} stayed locked past the busy timeout ({exc}); nothing "
                       "was changed: run the drop again") from None
        try:
            stored = conn.execute("SELECT key, incarnation FROM _shardlite_meta WHERE id = 1").fetchall()
            if stored != [(record.key, record.incarnation)]:
                raise IdentityMismatch(f"{path} does not hold incarnation {record.incarnation} of "
                                       f"{record.key!r}: refusing to fence it")
            got = None
            if files is not None:
                try:
                    got = wc.capture(conn, files, cursor)
                except wc.CaptureError:
                    got = None  # the log did not read as SQLite wrote it: the snapshot stands for it
            snapshot_only = got is None
            if got is None:
                got = _snapshot(conn)
            captured = time.time_ns()  # after the capture read the log: every commit in it is older
            conn.execute("UPDATE _shardlite_meta SET retired = 'dropped' WHERE id = 1")
            conn.execute("COMMIT")
        except BaseException:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()  # the connection first: then the -shm descriptor holds no lock of ours
        if files is not None:
            if tracked_of(path):
                _LINGERING.append(files)  # closing it now would drop that connection's locks
            else:
                files.close()
    notes = [] if snapshot_only or got.empty else _notes_of(store.node_path(record.node), record.key, staging)
    return Tail(got, wc.commit_times(got, notes, captured, previous) if not got.empty else [], captured, cursor)


def _snapshot(conn: apsw.Connection) -> wc.Capture:
    """The database at its last commit, read inside ``conn``'s held transaction without any descriptor of its
    own; no log position (a history ends with it: the drop follows)."""
    image = conn.serialize("main")
    if image is None:
        raise wc.CaptureError("the database could not be serialized")
    size = int.from_bytes(image[16:18], "big") if len(image) >= 100 else 0
    size = 65536 if size == 1 else size
    return wc.Capture([], bytes(image), wc.Cursor(b"", 0, 0, (0, 0), size), size)


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


def _close_lingering() -> None:
    for files in list(_LINGERING):
        if tracked_of(files.path) == 0:
            _LINGERING.remove(files)
            files.close()
