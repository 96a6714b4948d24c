"""WAL checkpoints away from the committing thread (used by :class:`~shardlite.AsyncRouter`).

SQLite's autocheckpoint runs inside the ``COMMIT`` that makes the WAL reach 1,000 frames: it copies the
log into the database file and, even at ``synchronous=NORMAL``, fsyncs both. Under ``AsyncRouter`` that
commit runs on the event loop, so every tenant on the loop stalled for milliseconds (6.5 ms measured here)
once per thousand pages written, and the checkpoint was about a tenth of a group-committed write's cost.

With a :class:`Checkpointer`, a tenant's write connection has no autocheckpoint; a WAL hook
(:class:`WalWatch`) notes the log's size after each commit, and once ``DUE_FRAMES`` frames were added
since the last checkpoint, the store's commit hands a ``PASSIVE`` checkpoint to a worker thread. The
worker uses a connection of its own (opened for it, identity-checked like any tenant connection,
``query_only``), so it runs while the loop keeps writing to the same tenant: a passive checkpoint never
blocks writers or readers and never waits for them.

What a passive checkpoint cannot do is restart the log while writes keep arriving (SQLite restarts the
WAL at a write that finds every frame copied). The worker therefore runs a few rounds while frames keep
arriving, so a burst of writes ends with the whole log copied and the next write restarts it. Under
sustained writes the log is bounded the way SQLite bounds it, by a checkpoint between two of the tenant's
transactions once the log holds ``INLINE_FRAMES`` frames (what autocheckpoint would have done, a quarter
as often), after which the next write restarts the log. Where that checkpoint runs depends on who
committed: a worker thread (the sync paths, ``synchronous=FULL`` commits) runs it at once, on the
committing connection; the event loop's thread (:attr:`Checkpointer.defer_thread`) never does (13-18 ms
measured, a stall of every tenant on the loop): it marks the log ``restart_due`` and the router runs
:meth:`Checkpointer.restart` on a worker before that tenant's next batch begins, so only that tenant's
writers wait for it. A restart that could not copy everything (a reader in another process holds an old
snapshot) is tried again only after ``RETRY_FRAMES`` more frames, so a long reader does not make every
batch wait for a worker. Checkpoints of one file never overlap (SQLite would refuse the second with
SQLITE_BUSY and the log would grow past the bound): :attr:`WalWatch.lock` serialises them. A checkpoint
that fails (a file moved, dropped or busy) is skipped: the next commit asks again. Crash safety is
SQLite's: a checkpoint only copies committed frames, and a crash during one is recovered on open.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import apsw

from ..errors import ShardliteError

if TYPE_CHECKING:
    from .pool import Handle

__all__ = ["Checkpointer", "WalWatch", "DUE_FRAMES", "INLINE_FRAMES", "RETRY_FRAMES", "decide"]

#: Frames added since the last checkpoint after which one is due (SQLite's default autocheckpoint).
DUE_FRAMES = 1000
#: A log this long is checkpointed by its committer, so that the next write restarts it.
INLINE_FRAMES = 4 * DUE_FRAMES
#: Frames added after a restart attempt that left the log unrestarted before the next attempt.
RETRY_FRAMES = DUE_FRAMES // 4
#: Passive checkpoints a worker runs in a row while frames keep arriving: once one copies the whole log,
#: the tenant's next write restarts it (a burst of writes ends with the log caught up, not restarted only
#: at INLINE_FRAMES).
CHASE_ROUNDS = 4

Submit = Callable[..., Any]
Opener = Callable[["Handle"], "apsw.Connection"]


class WalWatch:
    """A connection's WAL hook: the log's size after each commit, and what checkpoints have copied.

    Installing it (``conn.set_wal_hook``) replaces SQLite's autocheckpoint on that connection.
    Fields are written from the committing thread and the checkpointing worker; each write is a single
    attribute store, and a stale value only moves a checkpoint earlier or later."""

    __slots__ = ("frames", "copied", "pending", "restart_due", "restart_from", "lock")

    def __init__(self) -> None:
        self.frames = 0  #: frames in the log after this connection's last commit
        self.copied = 0  #: frames the last checkpoint copied (0 after the log restarted)
        self.pending = False  #: a worker checkpoint was handed out and has not finished
        #: the log reached INLINE_FRAMES under the loop's commits: checkpoint before the next transaction
        self.restart_due = False
        self.restart_from = 0  #: frames in the log at the last restart attempt (0 after the log restarted)
        #: held for each checkpoint of this file run through the watch: SQLite answers a checkpoint that
        #: finds another one running with SQLITE_BUSY at once, so one due to restart the log waits for the
        #: worker's round instead of being skipped while the log keeps growing
        self.lock = threading.Lock()

    def __call__(self, conn: apsw.Connection, dbname: str, frames: int) -> int:
        if frames < self.copied or frames < self.restart_from:
            self.copied = self.restart_from = 0  # the log restarted
        self.frames = frames
        return apsw.SQLITE_OK


def decide(frames: int, copied: int, pending: bool) -> str | None:
    """What a commit that left ``frames`` in the log should do: ``"inline"`` (checkpoint now, on the
    committing connection), ``"worker"`` (hand one to a worker) or None (nothing yet)."""
    if frames >= INLINE_FRAMES:
        return "inline"
    if not pending and frames - copied >= DUE_FRAMES:
        return "worker"
    return None


class Checkpointer:
    """Schedules checkpoints of write connections that carry a :class:`WalWatch`.

    ``submit(fn, *args)`` runs ``fn(*args)`` on a worker thread (an executor's ``submit``); ``open_for``
    opens a connection of its own on a handle's file (identity-checked, ``query_only``), raising
    ``apsw.Error`` or :class:`~shardlite.ShardliteError` when the file is gone or not the handle's."""

    def __init__(self, submit: Submit, open_for: Opener) -> None:
        self._submit = submit
        self._open_for = open_for
        self._lock = threading.Lock()
        #: the thread that must never checkpoint inline (the event loop's; 0: none): it sets
        #: ``restart_due`` instead, and its router calls :meth:`restart` on a worker before the next batch
        self.defer_thread = 0
        self.worker_runs = 0  #: checkpoint rounds run on workers (for tests and metrics)
        self.restart_runs = 0  #: checkpoints due to restart the log, wherever they ran

    def watch(self, conn: apsw.Connection) -> WalWatch:
        """Install a :class:`WalWatch` on ``conn`` (a tenant's write connection) and return it."""
        watch = WalWatch()
        conn.set_wal_hook(watch)
        return watch

    def after_commit(self, handle: Handle, watch: WalWatch) -> None:
        """Called by the store right after ``handle`` committed, by the thread that holds it."""
        action = decide(watch.frames, watch.copied, watch.pending)
        if action == "worker":
            watch.pending = True
            try:
                self._submit(self._run, handle, watch)
                return
            except RuntimeError:  # the executor is shutting down: the committer does it
                watch.pending = False
                action = "inline"
        if action == "inline":
            if threading.get_ident() == self.defer_thread:
                if watch.frames >= watch.restart_from + RETRY_FRAMES:
                    watch.restart_due = True  # the router calls restart() before this tenant's next batch
                return
            with self._lock:
                self.restart_runs += 1
            with watch.lock:  # a worker's round in flight: at most one checkpoint's wait
                handle.calls = 0  # the checkpoint statement has a clock of its own (see Handle.progress)
                _checkpoint(handle.conn, watch)

    def restart(self, handle: Handle, watch: WalWatch) -> None:
        """On a worker, while no transaction of the loop's is open on ``handle``'s tenant: copy the whole
        log (``restart_due``), so that the tenant's next write restarts it."""
        try:
            watch.restart_from = watch.frames
            with self._lock:
                self.restart_runs += 1
            self._on_own_connection(handle, watch, rounds=1)
        finally:
            watch.restart_due = False

    def _run(self, handle: Handle, watch: WalWatch) -> None:
        try:
            self._on_own_connection(handle, watch, rounds=CHASE_ROUNDS)
        finally:
            watch.pending = False

    def _on_own_connection(self, handle: Handle, watch: WalWatch, rounds: int) -> None:
        """Up to ``rounds`` passive checkpoints of ``handle``'s file on a connection of the worker's own,
        stopping once one caught up with the committer's last commit (frames committed meanwhile are
        copied by the next round)."""
        try:
            conn = self._open_for(handle)
        except (apsw.Error, ShardliteError):
            return  # moved, dropped or replaced meanwhile: nothing of ours to checkpoint
        try:
            for _ in range(rounds):
                with watch.lock:
                    _log, copied = _checkpoint(conn, watch)
                with self._lock:
                    self.worker_runs += 1
                if copied < 0 or copied >= watch.frames:
                    break  # failed, or caught up
        finally:
            conn.close()


def _checkpoint(conn: apsw.Connection, watch: WalWatch) -> tuple[int, int]:
    """A passive checkpoint on ``conn``: (frames in the log, frames copied), recorded in ``watch``, or
    (-1, -1) when it failed. Busy (another checkpoint running) and I/O errors leave the log as it is: the
    next commit asks again."""
    try:
        log, copied = conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
    except apsw.Error:
        return -1, -1
    if copied > 0:
        watch.copied = copied
    return log, copied
