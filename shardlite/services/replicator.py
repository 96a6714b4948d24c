"""A node's replicator: captures its tenants' commits, stages them, and uploads them in packs.

One :class:`NodeReplicator` per node, in a process of its own (``shardlite replicate run``; see
docs/replication.md). Each round:

1. **Capture** every tenant marked changed (:meth:`NodeReplicator.mark`, fed by the writers' change notes,
   and every tenant of the node without a cursor, found by :meth:`NodeReplicator.reconcile`): its new
   commits are read from its WAL without any lock (:func:`~shardlite.files.walcapture.capture_unlocked`)
   and staged with their commit times (:mod:`shardlite.files.staging`), so a writer never waits for a
   capture. The tenant's write lock is taken only for a snapshot (a first capture, a gap), for a log that
   did not read consistently without it, and for a checkpoint: a log that holds ``DUE_FRAMES`` frames or
   more is checkpointed by :func:`~shardlite.files.walcapture.checkpoint_briefly_locked`: what was
   captured is copied under a short read transaction, then the lock is held only to capture and stage the
   last few commits and finish the checkpoint (with too many, it waits for a later round); a checkpoint that
   closes the log of a tenant whose frames outgrew its last snapshot adds a new one
   (:mod:`shardlite.core.refresh`), read after the lock is let go. Writers of a
   replicated root never checkpoint, so nothing is checkpointed away before it is captured, and no frame
   up to the log's last commit changes under a lock-free read. A tenant whose lock is busy stays marked
   for the next round; a tenant that fails (damaged file, moved away) is reported and skipped: one tenant
   never stops the others.
2. **Upload** what is staged as one pack per round (:mod:`shardlite.services.pack_upload`): the staged rows
   are dropped only after the upload succeeded; a target that cannot be reached leaves everything staged for
   the next round.

Connections: the replicator keeps a bounded set of tenant connections open between rounds, each with the
:class:`~shardlite.files.walcapture.LogFiles` of its file, and always closes a connection before that
file's descriptors (closing a ``-shm`` descriptor while a connection of the file is open would drop the
connection's locks). A tenant it keeps no connection of, whose cursor continues an open log generation, is
captured lock-free without opening one (:meth:`NodeReplicator._capture_bare`); a connection is opened for
snapshots, for what a lock-free read could not take, for a closed cursor and for checkpoints.

Each round's wall time is split by phase in :attr:`RoundStats.phases` (catalog lookup, cursor read,
connection open, identity read, lock-free read, staging, locked capture, checkpoint; the upload's staged
read, encoding, PUT and bookkeeping).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import apsw

from ..core import refresh
from ..errors import ShardliteError
from ..files import walcapture as wc
from ..files.catalog import TenantRecord
from ..files.checkpoints import DUE_FRAMES
from ..files.engine import harden, open_connection, set_busy_timeout
from ..files.engine import track as track_connection  # fork safety: a forked child never closes it
from ..files.staging import Staging, StaleCursor
from ..front.store import Store
from ..replica.target import ReplicaTarget
from .pack_upload import PackUploader, pack_name

__all__ = ["NodeReplicator", "RoundStats", "pack_name"]  # pack_name: services/pack_upload.py

log = logging.getLogger("shardlite.replicate")

#: Tenant connections kept open between rounds (each with its log descriptors; ~180 KB of memory and 5 fds
#: each). Captures of the others open none (``NodeReplicator._capture_bare``), so a few cover the tenants
#: whose checkpoints and snapshots need one; 256 of them held ~47 MB at 100,000 tenants.
KEEP_OPEN = 32
#: Page cache of each kept tenant connection (KiB): a capture reads the identity row and, for a snapshot, the
#: whole file once; ``KEEP_OPEN`` caches of the default 512 KiB could hold 128 MiB.
CACHE_KIB = 64
#: How long a capture waits for a tenant's write lock before leaving it for the next round.
LOCK_WAIT_MS = 200
#: Tenants whose database file and log hold at least this many bytes get a snapshot read after the write lock is
#: let go (:func:`~shardlite.files.walcapture.capture_locked`'s ``reader``); a smaller one is copied under the
#: lock (opening that reader costs about what copying a MiB does).
UNLOCKED_SNAPSHOT_BYTES = 1024 * 1024


def _file_bytes(path: str) -> int:
    """The bytes of a tenant's database file and log (a replicated root's writers never checkpoint: its data
    may be in either)."""
    total = 0
    for name in (path, path + "-wal"):
        try:
            total += os.stat(name).st_size
        except OSError:
            pass
    return total


#: Checkpoints deferred in a row after which the next one takes the write lock whatever a writer committed since
#: its lock-free capture.
DEFER_LIMIT = 5


def locked_allowance(deferrals: int) -> int:
    """How many frames committed since a checkpoint's lock-free capture it still takes the write lock for, after
    ``deferrals`` checkpoints of the tenant deferred in a row: ``LOCKED_FRAMES``, doubled at each deferral, and no
    bound after :data:`DEFER_LIMIT`. A writer that never pauses would otherwise defer every checkpoint and its log
    would grow without end; this way it waits, now and then, for the capture of what it committed meanwhile."""
    if deferrals >= DEFER_LIMIT:
        return 1 << 62
    return wc.LOCKED_FRAMES << deferrals


@dataclass
class RoundStats:
    captured: int = 0  #: tenants with something new staged
    snapshots: int = 0
    locked: int = 0  #: tenants captured under the write lock (snapshots, a lock-free read that did not verify)
    checkpoints: int = 0
    refreshed: int = 0  #: snapshots taken after a checkpoint for tenants whose frames outgrew their last one
    busy: int = 0  #: tenants left for the next round (lock busy)
    deferred: int = 0  #: checkpoints left for a later round (a writer committed faster than the capture)
    failed: int = 0
    left: int = 0  #: tenants not reached within the round's capture budget (captured by the next round)
    uploaded_packs: int = 0
    uploaded_bytes: int = 0
    upload_error: str | None = None
    #: the upload waited for an erase (it held the node's erase lock): ``upload_error`` says so
    upload_blocked: bool = False
    errors: dict[str, str] = field(default_factory=dict)
    #: seconds of wall time per phase of the round (``capture.*`` per step of the captures, ``upload.*``),
    #: for finding where a slow round went (``replicate run`` logs them for a round longer than its interval)
    phases: dict[str, float] = field(default_factory=dict)

    def timed(self, phase: str, since: float) -> float:
        """Add ``perf_counter() - since`` to ``phase``; returns the new ``perf_counter()``."""
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + (now - since)
        return now


class _Open:
    __slots__ = ("conn", "files", "path")

    def __init__(self, conn: apsw.Connection, files: wc.LogFiles, path: str) -> None:
        self.conn, self.files, self.path = conn, files, path

    def close(self) -> None:
        self.conn.close()  # the connection first: then the -shm descriptor holds no lock of ours
        self.files.close()


class NodeReplicator:
    """Replicates the tenants of node ``node`` of ``store``'s root to ``target`` (module docstring)."""

    def __init__(self, store: Store, node: str, target: ReplicaTarget, *,
                 clock: Callable[[], int] = time.time_ns) -> None:
        self.store, self.node, self.target, self.clock = store, node, target, clock
        self.staging_node_path = store.node_path(node)
        self.staging = Staging(self.staging_node_path)
        self._open: OrderedDict[str, _Open] = OrderedDict()
        #: tenants to capture, with the (frames, commit time) notes read for them since their last capture
        self._marked: dict[str, list[tuple[int, int]]] = {}
        #: tenants of the last round kept marked only because their drop is under way (``_capture``)
        self.dropping: set[str] = set()
        #: uploads what is staged, one pack per round (:mod:`shardlite.services.pack_upload`)
        self.uploader = PackUploader(node, target, self.staging, self.staging_node_path, clock)
        #: checkpoints deferred in a row per tenant (a writer outran the capture): each one widens the next
        #: checkpoint's locked part (:func:`locked_allowance`)
        self._deferrals: dict[str, int] = {}
        #: reads the writers' notes written since the last read and marks their tenants (set by the replication
        #: service); a capture holding commits without a note calls it before it times them (:class:`_Staged`)
        self.read_notes: Callable[[], None] | None = None
        #: when a tenant's snapshot is refreshed (:func:`shardlite.core.refresh.snapshot_due`'s bounds, and
        #: :func:`~shardlite.core.refresh.aged_snapshot_due`'s age in ns)
        self.refresh_ratio, self.refresh_floor = refresh.REFRESH_RATIO, refresh.REFRESH_FLOOR
        self.refresh_age = refresh.REFRESH_AGE_NS

    def close(self) -> None:
        while self._open:
            _key, opened = self._open.popitem()
            opened.close()
        self.staging.close()

    # -- what to capture -------------------------------------------------------------------------------

    def mark(self, key: str, commits: Iterable[tuple[int, int]] = ()) -> None:
        """Capture ``key`` in the next round; ``commits``: (frames after the commit, commit time in ns)."""
        self._marked.setdefault(key, []).extend(commits)

    def marked(self) -> list[str]:
        """The tenants marked for the next round."""
        return list(self._marked)

    def reconcile(self, live: dict[str, str] | None = None) -> int:
        """Mark every live tenant of this node that has no cursor, or a cursor of another file (a new
        generation or incarnation); forget cursors of tenants no longer here. Returns how many it marked.
        ``live``, when given, receives the file path of every live tenant of this node whose cursor is of its
        file (one pass over the catalog serves the caller too; paths, not records: at 100,000 tenants a pass
        holds them all at once)."""
        marked, after = self.reconcile_slice("", None, live)
        assert after is None
        return marked

    def reconcile_slice(self, after: str, limit: int | None, live: dict[str, str] | None = None) -> tuple[
            int, str | None]:
        """:meth:`reconcile` for the catalog's tenants whose keys sort after ``after``, at most ``limit`` of them
        (None: all): returns how many it marked and the key to continue after, or None when the catalog is
        done. Cursors are compared (and forgotten) in the same key range, so slices in turn make one pass."""
        here: set[str] = set()
        seen: list[tuple[str, str, int, str]] = []
        last: str | None = None
        count = 0
        for record in self.store.meta.tenants.iter_tenants(after=after, batch=min(limit or 1000, 1000)):
            count += 1
            last = record.key
            if record.node == self.node:
                here.add(record.key)
                seen.append((record.key, record.incarnation, record.generation, self.store.path_of(record)))
            if limit is not None and count >= limit:
                break
        done = limit is None or count < limit
        cursors = self.staging.identities(after, None if done else last)
        marked = 0
        for key, incarnation, generation, path in seen:
            if cursors.get(key) != (incarnation, generation):
                self.mark(key)
                marked += 1
            elif live is not None:
                live[key] = path
        for key in cursors.keys() - here:
            self._close(key)
            self.staging.forget(key)
        return marked, None if done else last

    # -- one round -------------------------------------------------------------------------------------

    def run_round(self, *, upload: bool = True, budget: float | None = None) -> RoundStats:
        """Capture what is marked, then upload what is staged (module docstring). ``upload=False`` only
        captures and stages (the upload waits for a later call). ``budget``: seconds of captures, after which
        the tenants not reached yet stay marked for the next call and what was staged is uploaded: a long
        pass (a first pass over a large node) ships as it goes instead of after its last capture."""
        stats = RoundStats()
        self._capture_marked(stats, budget)
        if upload:
            self.uploader.upload(stats)
        return stats

    def _capture_marked(self, stats: RoundStats, budget: float | None) -> None:
        marked, self._marked = self._marked, {}
        self.dropping = set()
        deadline = None if budget is None else time.perf_counter() + budget
        items = iter(marked.items())
        started = False
        for key, commits in items:
            if deadline is not None and started and time.perf_counter() >= deadline:
                # the tenants not reached stay marked first, in their order (copied at C speed: a first pass
                # leaves ~100,000 of them at each tick), then those this round re-marked (busy, failed)
                rest = {key: commits}
                rest.update(items)
                stats.left = len(rest)
                for again, notes in self._marked.items():
                    rest.setdefault(again, []).extend(notes)
                self._marked = rest
                break
            started = True
            try:
                self._capture(key, commits, stats)
            except StaleCursor:
                # a drop staged this tenant's last commits meanwhile (or moved its cursor): the next round finds
                # it dropped, or continues from the cursor the drop left
                self._close(key)
                self.mark(key, commits)
            except apsw.BusyError:
                stats.busy += 1
                self.mark(key, commits)
            except (apsw.Error, ShardliteError, wc.CaptureError, OSError) as exc:
                stats.failed += 1
                stats.errors[key] = f"{type(exc).__name__}: {exc}"
                log.warning("replicate: tenant %r on node %r: %s (left for the next round)", key, self.node, exc)
                self._close(key)
                self.mark(key, commits)

    def _connection(self, key: str, path: str) -> _Open:
        opened = self._open.get(key)
        if opened is not None and opened.path == path:
            self._open.move_to_end(key)
            return opened
        self._close(key)
        opened = _Open(_tenant_connection(path), wc.LogFiles(path), path)
        self._open[key] = opened
        while len(self._open) > KEEP_OPEN:
            _old, evicted = self._open.popitem(last=False)
            evicted.close()
        return opened

    def _close(self, key: str) -> None:
        self._deferrals.pop(key, None)
        opened = self._open.pop(key, None)
        if opened is not None:
            opened.close()

    @staticmethod
    def _check_identity(opened: _Open, key: str, record: TenantRecord) -> None:
        # a read of its own (no lock, no reader left open); it also opens the connection's log, so -shm and
        # -wal stay the files SQLite uses while the capture reads them without a lock
        stored = opened.conn.execute("SELECT key, incarnation FROM _shardlite_meta WHERE id = 1").fetchall()
        if stored != [(key, record.incarnation)]:
            raise ShardliteError(f"the file of {key!r} holds {stored!r}, not the catalog's tenant")

    def _capture_bare(self, path: str, cursor: wc.Cursor, state: _Staged) -> bool:
        """The lock-free capture of a tenant this replicator holds no connection of, continuing ``cursor`` (a
        log generation it captured before, not closed), without opening one: True when it was staged, False
        when only the connection's path can go on (nothing staged). At 5,000 tenants and more, most noted
        tenants are not among the ``KEEP_OPEN`` connections, and opening and closing one cost more than the
        rest of the capture.

        Why no connection is needed here: the captured frames must continue the cursor's log generation (its
        random salts and the checksum chain from its last frame, :func:`~shardlite.files.walcapture.
        capture_unlocked`), so they can only come from that tenant's log, which writers never checkpoint (the
        file's identity was checked by the capture that started the generation); a closed cursor (the next
        generation, whose salts are new) takes the connection's path. ``-shm`` and ``-wal`` are opened for
        this capture and closed after it: this process holds no SQLite connection of the file then, so the
        close drops no lock of its own (walcapture's ``-shm`` trap); a wal-index being rebuilt by a process
        opening the file reads inconsistently (``NeedsLock``), and one read while its files were replaced
        yields at most fewer frames, never a wrong one (the rest comes with the next capture)."""
        with wc.LogFiles(path) as files:
            got = wc.capture_unlocked(files, cursor)
        if isinstance(got, wc.NeedsLock):
            return False
        state.stage(got)
        return True

    def _capture(self, key: str, commits: list[tuple[int, int]], stats: RoundStats) -> None:
        t = time.perf_counter()
        record = self.store.meta.tenants.lookup(key)
        t = stats.timed("capture.lookup", t)
        if record is not None and record.node == self.node and record.state == "dropping":
            # the drop captures its last commits itself (services/drop_tail.py) and times them from the notes
            # after the offsets this replicator stored; kept marked, the tenant holds those offsets back (they
            # are stored only when nothing is marked) until the drop is through
            self._close(key)
            self.mark(key, commits)
            self.dropping.add(key)
            return
        if record is None or record.node != self.node or record.state not in ("active", "moving"):
            self._close(key)
            return  # dropped or moved away: the node that holds it now captures it
        path = self.store.path_of(record)
        found = self.staging.cursor(key)
        t = stats.timed("capture.cursor", t)
        same_file = found is not None and (found.incarnation, found.generation) == (
            record.incarnation, record.generation)
        cursor = found.cursor if found is not None and same_file else wc.NO_CURSOR
        state = _Staged(self, key, record, commits, stats,
                        found.last_commit_ns if found is not None and same_file else 0,
                        found.captured_ns if found is not None and same_file else 0, cursor)
        opened = self._open.get(key)
        if opened is not None and opened.path != path:
            self._close(key)
            opened = None
        if opened is None and cursor.salt and not cursor.closed and self._capture_bare(path, cursor, state):
            t = stats.timed("capture.bare", t)
        else:
            opened = self._connection(key, path)
            t = stats.timed("capture.open", t)
            self._check_identity(opened, key, record)
            t = stats.timed("capture.identity", t)
            # writers of a replicated root never checkpoint: the frames up to the log's last commit stay put
            # until this replicator's own checkpoint, so they are read and staged without the write lock
            got = wc.capture_unlocked(opened.files, cursor)
            t = stats.timed("capture.read", t)
            if isinstance(got, wc.NeedsLock):  # a snapshot is due, or the log did not read consistently
                stats.locked += 1
                # a large file's snapshot is read after the write lock is let go, by a reader whose transaction
                # began under it; a small one's copy costs less than opening that reader
                reader = _tenant_connection(path) if _file_bytes(path) >= UNLOCKED_SNAPSHOT_BYTES else None
                try:
                    state.stage(wc.capture_locked(opened.conn, opened.files, cursor, reader=reader, clock=self.clock))
                finally:
                    if reader is not None:
                        reader.close()
                t = stats.timed("capture.locked", t)
            else:
                state.stage(got)
                t = stats.timed("capture.stage", t)
        # a closed cursor: a checkpoint copied its whole log into the database file, and no writer has restarted
        # the log since (a write would have moved the cursor to the next generation): nothing to checkpoint
        if state.cursor.frame >= DUE_FRAMES and not state.cursor.closed:
            self._checkpoint(key, record, self._identified(key, path, record, opened), state, stats, t)
        elif found is not None and same_file and 0 < found.snapshot_ns <= self.clock() - self.refresh_age:
            self._refresh_aged(key, path, record, state, stats)

    def _log_end(self, key: str, path: str) -> tuple[bytes, int] | None:
        """:func:`~shardlite.files.walcapture.log_end` of the tenant's file, without a lock: through the
        descriptors of the connection this replicator keeps of it, else through descriptors opened and closed
        for the read (this process then holds no connection of the file, so the close drops no lock of its own:
        walcapture's ``-shm`` trap, as in :meth:`_capture_bare`)."""
        opened = self._open.get(key)
        if opened is not None and opened.path == path:
            return wc.log_end(opened.files)
        with wc.LogFiles(path) as files:
            return wc.log_end(files)

    def _identified(self, key: str, path: str, record: TenantRecord, opened: _Open | None) -> _Open:
        """``opened``, or a connection of the tenant's file opened now and its identity checked."""
        if opened is None:
            opened = self._connection(key, path)
            self._check_identity(opened, key, record)
        return opened

    def _checkpoint(self, key: str, record: TenantRecord, opened: _Open, state: _Staged, stats: RoundStats,
                    t: float) -> None:
        """Checkpoint the tenant's log, briefly locked, with a refreshed snapshot when one is due by the ratio
        bound (:mod:`shardlite.core.refresh`)."""
        # most of the log is copied under a reader's snapshot, without the lock; the write lock is held
        # only from the capture of the last commits through the checkpoint that may end the log's
        # generation: nothing is checkpointed away before it is captured
        guard = open_connection(opened.path, self.store.settings)
        checkpointer = open_connection(opened.path, self.store.settings)
        stored = self.staging.cursor(key)
        due = stored is not None and (stored.incarnation, stored.generation) == (
            record.incarnation, record.generation) and state.last_commit > 0 and refresh.snapshot_due(
            stored.frame_bytes, stored.image_bytes, ratio=self.refresh_ratio, floor=self.refresh_floor)
        deferrals = self._deferrals.get(key, 0)
        try:
            _after, done = wc.checkpoint_briefly_locked(opened.conn, guard, checkpointer, opened.files,
                                                        state.cursor, state.stage, closed=state.closed,
                                                        refresh=state.refresh if due else None,
                                                        locked_frames=locked_allowance(deferrals))
        finally:
            checkpointer.close()
            guard.close()
        if done:
            self._deferrals.pop(key, None)
        else:
            self._deferrals[key] = deferrals + 1
        stats.checkpoints += done
        stats.deferred += not done
        stats.timed("capture.checkpoint", t)

    def _refresh_aged(self, key: str, path: str, record: TenantRecord, state: _Staged, stats: RoundStats) -> None:
        """A refreshed snapshot at the cursor this capture reached, when one is due by age
        (:func:`shardlite.core.refresh.aged_snapshot_due`, judged on the counts stored after this capture)."""
        stored = self.staging.cursor(key)
        if stored is None or (stored.incarnation, stored.generation) != (record.incarnation, record.generation) \
                or stored.cursor != state.cursor or state.last_commit <= 0:
            return
        # a staging file written before the snapshot's size was counted: the file's size stands for it, so a
        # large tenant is not copied whole a day after an upgrade for a few frames
        image = stored.image_bytes or _file_bytes(path)
        if not refresh.aged_snapshot_due(self.clock(), stored.snapshot_ns, stored.frame_bytes, image,
                                         age_ns=self.refresh_age):
            return
        t = time.perf_counter()
        if self._log_end(key, path) not in (None, (state.cursor.salt, state.cursor.frame)):
            return  # a writer committed since the capture: no lock taken for a snapshot that cannot be had
        opened = self._identified(key, path, record, self._open.get(key))
        reader = _tenant_connection(path)
        try:
            got = wc.snapshot_at_cursor(opened.conn, reader, opened.files, state.cursor)
        finally:
            reader.close()
        if got is not None:  # None: a writer committed since the capture; a later one tries again
            state.refresh(got)
        stats.timed("capture.refresh", t)


def _tenant_connection(path: str) -> apsw.Connection:
    """The replicator's own connection of a tenant file: an existing file only, no checkpoint on close (the
    rule: nothing is checkpointed away before it is captured), defensive, no extensions, no ATTACH, the
    capture's lock wait. It reads the identity row, takes the write lock for locked captures and snapshots
    (``serialize``), and holds it around checkpoints (run on connections of their own); it never writes.
    Lighter than :func:`~shardlite.files.engine.open_connection` (no journal-mode check, no pragmas: it
    never changes a tenant file's settings), which halves the cost of opening one: at 5,000 tenants
    under writes most captures open a connection (``KEEP_OPEN`` holds a fraction of the node)."""
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW
                           | apsw.SQLITE_OPEN_EXRESCODE)
    try:
        set_busy_timeout(conn, LOCK_WAIT_MS)
        harden(conn)
        conn.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
    except BaseException:
        conn.close()
        raise
    track_connection(conn)
    return conn


class _Staged:
    """The captures of one tenant in one round, staged as they come (a lock-free one, then possibly the
    one taken under the lock right before a checkpoint), each with its commits' times."""

    __slots__ = ("rep", "key", "record", "commits", "stats", "last_commit", "previous", "cursor", "counted")

    def __init__(self, rep: NodeReplicator, key: str, record: TenantRecord, commits: list[tuple[int, int]],
                 stats: RoundStats, last_commit: int, previous: int, cursor: wc.Cursor) -> None:
        self.rep, self.key, self.record, self.commits, self.stats = rep, key, record, commits, stats
        self.last_commit, self.previous = last_commit, previous
        self.cursor = cursor  #: the stored cursor the next capture continues (checked when it is staged)
        self.counted = False  #: this tenant is counted in ``stats.captured``

    def stage(self, got: wc.Capture) -> None:
        """Stage ``got`` (durable when this returns) unless it is empty; its cursor becomes the current one.
        :class:`~shardlite.files.staging.StaleCursor` (nothing staged) when a drop staged the tenant's last
        commits since its cursor was read (files/staging.py: two processes may capture one tenant)."""
        if got.empty:
            self.cursor = got.cursor
            return
        # taken after the capture read the log (or, for a snapshot read after the write lock, while it was held):
        # every commit it holds was made before this time, and none it lacks
        now = got.taken_ns or self.rep.clock()
        times = wc.commit_times(got, self.commits, now, self.previous)
        if self.rep.read_notes is not None and any(at == now for _frame, at in times):
            # commits made after this tick read the notes: read the notes again (a commit's note is written as
            # it commits), or they would be timed at this capture, late, and their notes ignored afterwards
            self.rep.read_notes()
            self.commits = [*self.commits, *self.rep._marked.get(self.key, ())]
            times = wc.commit_times(got, self.commits, now, self.previous)
        self.rep.staging.stage(self.key, self.record.incarnation, self.record.generation, got, times, now,
                               expect=self.cursor)
        self.cursor = got.cursor
        if not self.counted:
            self.stats.captured += 1
            self.counted = True
        self.stats.snapshots += got.snapshot is not None
        self.last_commit, self.previous = times[-1][1], now

    def closed(self, cursor: wc.Cursor) -> None:
        """Store ``cursor``, closed by a checkpoint that copied the whole log (nothing new to stage)."""
        self.rep.staging.set_cursor(self.key, self.record.incarnation, self.record.generation, cursor,
                                    self.last_commit)
        self.cursor = cursor

    def refresh(self, got: wc.Capture) -> None:
        """Stage ``got``, a refreshed snapshot at the log position the last staged capture ended
        (:mod:`shardlite.core.refresh`), timed as that capture's last commit. Skipped when another process
        staged a capture of the tenant meanwhile (the history is whole without it).

        Its capture time is that of the capture it follows (taken before the write lock was let go), not the
        clock now: writers commit while the image is read, and the next capture ignores notes at or before
        the stored capture time, so a later one would time those commits late."""
        captured = self.previous or self.rep.clock()
        try:
            self.rep.staging.stage(self.key, self.record.incarnation, self.record.generation, got,
                                   [(got.cursor.frame, self.last_commit)], captured, expect=self.cursor)
        except StaleCursor:
            return
        self.cursor = got.cursor
        self.stats.refreshed += 1
