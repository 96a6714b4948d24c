"""One tenant move, step by step, and its undo (rules: files are private; copies go through SQLite and are fsynced
before anything routes to them; a move fences the source inside its own write lock).

The steps as journaled (see :mod:`shardlite.core.movejournal`), while application processes keep writing:

``pending``
    The tenant must still be where the plan found it (same node and generation), else it is ``skipped``.
    The target node must have room for it (:class:`NodeFull` otherwise). A new generation is issued for
    the target.
``copying``
    The catalog marks the tenant ``moving``. Copy through the backup API from a pinned snapshot of the
    source, then verify the copy fully: ``integrity_check``, per-table row counts and the content digest
    equal to the snapshot's. Then, inside the source's own write lock, write the retired marker into the
    source file: from its commit on every writer (in any process) finds it right after ``BEGIN
    IMMEDIATE`` and waits for the catalog to point elsewhere; the source is frozen.
``fenced``
    Copy again (a consistent snapshot of the frozen source), check cheaply that the copy's page image
    equals the source's, clear the marker in the copy, fsync it, link it into place, fsync the directory,
    and flip the catalog to the target (compare-and-set on the old generation): the commit point.
``switched``
    Stale writers re-resolve and retry at the new home; the write pause they saw is recorded.
``done``
    The retired source file stays (its name is never reused) until ``rebalance complete``.

Every step can be redone from its start. Each copy is written under a temporary name of its own
(``<target>.moving-<owner>``), so two rebalancers never write one file. The actions that must not race a
takeover or a cancel run while the move's claim is checked: linking the copy inside a block that keeps the
checked claim locked (:meth:`MoveJournal.holding`), the flip atomically with the check
(:meth:`MoveJournal.flip_held`), fencing and unfencing inside the source's write
lock after checking it. A rebalancer taking over a move at ``fenced`` writes the fence again before its
final copy, so a fence lifted by an undo that died before journaling is never copied past. A rebalancer
that finds it lost the claim right after writing a fence lifts that fence again if the new owner undid the
move (:meth:`Mover.lift_orphaned_fence`): the undo could not see a fence committed after it looked.

:meth:`Mover.undo` puts an unfinished move back: partial copies removed, the fence lifted, the catalog
state back to ``active``; a move past its commit point is finished instead.
"""

from __future__ import annotations

import errno
import glob
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import apsw

from ..core.movejournal import STEPS, MoveRow
from ..core.placement import tenant_relpath
from ..core.planning import DEFAULT_RESERVE, space_needed
from ..errors import MoveFailed, NodeFull
from ..files.copying import (
    integrity_ok,
    open_source,
    open_trusted,
    page_digest,
    read_snapshot,
    remove_db_files,
    row_counts,
    write_locked,
)
from ..files.engine import ensure_private_dir, free_bytes, fsync_dir, fsync_path
from ..front.store import Store
from ..meta.journal import MoveJournal
from .heartbeat import Claim

__all__ = ["Mover", "MoveFailed", "NodeFull", "COPY_PAGES"]

#: Pages copied per backup step; between steps the copy checks whether it must stop (cancel, takeover).
COPY_PAGES = 4096
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class Mover:
    """Runs the steps of moves this rebalancer has claimed, and undoes them. ``fault(step)`` is a test
    hook called after each journaled step ("copying", "fenced", "switched", "done") and after the
    verified copy ("copied") and the link of the final copy ("linked")."""

    def __init__(self, store: Store, journal: MoveJournal, owner: str) -> None:
        self.store = store
        self.tenants = store.meta.tenants
        self.journal = journal
        self.owner = owner
        self.token = owner.rsplit(":", 1)[-1]
        self.reserve = DEFAULT_RESERVE
        self.fault: Callable[[str], None] | None = None

    # -- going forward ----------------------------------------------------------------------------------

    def run(self, claim: Claim) -> None:
        """Take a claimed move from its journaled step to ``done`` (or ``skipped``). Raises LostClaim or
        PlanCancelled when it must stop, any other exception when it failed (the caller undoes it)."""
        handlers = {"pending": self._start, "copying": self._copy_and_fence, "fenced": self._switch,
                    "switched": self._close}
        fenced_at: list[float] = []  # set when this call wrote the fence: the pause is measured from it
        self._sweep(claim.move, keep=self.temp_of(claim.move) if claim.move.target_generation else None)
        while not STEPS[claim.move.step].finished:
            claim.check()
            try:
                handlers[claim.move.step](claim, fenced_at)
            except apsw.InterruptError:
                claim.check()  # interrupted because the move must stop: say why
                raise

    def _journal(self, claim: Claim, step: str, **fields: object) -> None:
        self.journal.set_step(claim.move, self.owner, step, applying=not STEPS[step].committed, **fields)
        self._hook(step)

    def _hook(self, step: str) -> None:
        if self.fault is not None:
            self.fault(step)

    def _start(self, claim: Claim, _fenced_at: list[float]) -> None:
        move = claim.move
        record = self.tenants.lookup(move.key)
        if (record is None or record.state not in ("active", "moving") or record.node != move.source
                or record.generation != move.source_generation):
            self._journal(claim, "skipped", error="stale: the tenant changed since the plan")
            return
        self._check_space(move)
        generation = self.tenants.allocate_generation(move.key, move.target, "move")
        self._journal(claim, "copying", target_generation=generation)

    def _copy_and_fence(self, claim: Claim, fenced_at: list[float]) -> None:
        move = claim.move
        record = self.tenants.lookup(move.key)
        if record is None or record.generation != move.source_generation:
            raise MoveFailed(f"tenant {move.key!r} is no longer at generation {move.source_generation}")
        if record.state == "active":
            # F3: only from active, so a drop decided meanwhile (active -> dropping) and this cannot both win
            self.tenants.set_state(move.key, "moving", expect_generation=move.source_generation,
                                   expect_states=("active",))
        self._copy_and_verify(claim)
        fenced_at.append(time.monotonic())
        self._fence(claim)
        self._journal(claim, "fenced")

    def _switch(self, claim: Claim, fenced_at: list[float]) -> None:
        move = claim.move
        record = self.tenants.lookup(move.key)
        if record is None or record.generation != move.target_generation:
            # Not flipped yet (a resume may find the flip done: then the copy is live, never redo it).
            if not fenced_at:
                self._fence(claim)  # taken over: an undo may have lifted the fence before journaling it
            self._final_copy(claim)
            assert move.target_generation is not None
            self.journal.flip_held(move, self.owner, node=move.target, generation=move.target_generation,
                                   from_generation=move.source_generation)
        self.store.forget(move.key)
        self.store.note_new_file(move.key, move.target)  # the new file's history starts within one round
        pause = (time.monotonic() - fenced_at[0]) * 1000 if fenced_at else None
        self._journal(claim, "switched", pause_ms=pause)

    def _close(self, claim: Claim, _fenced_at: list[float]) -> None:
        self._journal(claim, "done")

    # -- files -----------------------------------------------------------------------------------------

    def paths(self, move: MoveRow) -> tuple[str, str]:
        """``(source file, target file)`` of a move that has its target generation."""
        store = self.store
        source = os.path.join(store.node_path(move.source), tenant_relpath(move.key, move.source_generation))
        assert move.target_generation is not None
        target = os.path.join(store.node_path(move.target), tenant_relpath(move.key, move.target_generation))
        return source, target

    def temp_of(self, move: MoveRow) -> str:
        """This rebalancer's own temporary name for the move's copy."""
        return self.paths(move)[1] + f".moving-{self.token}"

    def _check_space(self, move: MoveRow) -> None:
        source = os.path.join(self.store.node_path(move.source), tenant_relpath(move.key, move.source_generation))
        size = sum(os.path.getsize(source + s) for s in ("", "-wal") if os.path.exists(source + s))
        directory = self.store.node_path(move.target)
        free = free_bytes(directory)
        need = space_needed(size)
        if need + self.reserve > free:
            raise NodeFull(f"node {move.target!r} has no room for tenant {move.key!r} ({source}, {size} bytes): "
                           f"the copy needs {need} bytes in {directory} and {self.reserve} more are kept in "
                           f"reserve, but only {free} are free")

    @contextmanager
    def _space(self, move: MoveRow, node: str, path: str) -> Iterator[None]:
        """Turn SQLite's "disk full" and ENOSPC into :class:`NodeFull` naming the tenant, node and file."""
        try:
            yield
        except apsw.FullError as exc:
            raise self._full(move, node, path, exc) from exc
        except OSError as exc:
            if exc.errno not in _FULL_ERRNOS:
                raise
            raise self._full(move, node, path, exc) from exc

    def _full(self, move: MoveRow, node: str, path: str, exc: BaseException) -> NodeFull:
        directory = self.store.node_path(node)
        try:
            free = f"{free_bytes(directory)} bytes free now"
        except OSError:
            free = "free space unknown"
        return NodeFull(f"node {node!r} is full: no space left for tenant {move.key!r} ({move.size} bytes when "
                        f"planned) writing {path} ({free} in {directory}; {type(exc).__name__})")

    def _backup(self, dest: apsw.Connection, source: apsw.Connection, claim: Claim) -> None:
        """Copy ``source`` (its read snapshot pinned by the caller, so the steps form one consistent copy
        that never restarts) into ``dest`` in chunks, stopping between them when the move must stop."""
        with dest.backup("main", source, "main") as backup:
            while not backup.step(COPY_PAGES):
                claim.check()

    def _copy_and_verify(self, claim: Claim) -> None:
        move = claim.move
        source_path, _ = self.paths(move)
        temp = self.temp_of(move)
        with self._space(move, move.target, temp):
            remove_db_files(temp)
            ensure_private_dir(os.path.dirname(temp))
            source = open_source(source_path)
            try:
                source.set_progress_handler(claim.interrupt, 10_000)
                dest = open_trusted(temp, create=True)
                try:
                    dest.set_progress_handler(claim.interrupt, 10_000)
                    dest.execute("PRAGMA synchronous=OFF")  # a scratch file: fsynced explicitly before linking
                    with read_snapshot(source):
                        expected = row_counts(source), page_digest(source)
                        self._backup(dest, source, claim)
                    if not integrity_ok(dest) or (row_counts(dest), page_digest(dest)) != expected:
                        raise MoveFailed(f"the copy of {move.key!r} ({temp}) does not match its source snapshot")
                finally:
                    dest.close()
            finally:
                source.close()
        self._hook("copied")

    def _fence(self, claim: Claim) -> None:
        """Write the retired marker into the source inside its own write lock, once the claim is checked
        under that lock (an undo lifting the fence takes the same lock)."""
        move = claim.move
        source_path, _ = self.paths(move)
        def busy(exc: apsw.BusyError) -> MoveFailed:
            return MoveFailed(f"could not fence tenant {move.key!r}: {source_path} stayed locked by a writer past "
                              "the busy timeout")

        with self._space(move, move.source, source_path), \
                write_locked(source_path, busy_timeout_ms=self.store.settings.busy_timeout_ms, busy=busy,
                             wal_hook=self.store.note_hook(move.source, move.key)) as conn:
            key = conn.execute("SELECT key FROM _shardlite_meta WHERE id = 1").fetchall()[0][0]
            if key != move.key:
                raise MoveFailed(f"{source_path} holds {key!r}, not {move.key!r}")
            self.journal.check(move, self.owner, applying=True)
            conn.execute("UPDATE _shardlite_meta SET retired = ? WHERE id = 1", (self._marker(move),))
        claim.wrote_fence = True

    @staticmethod
    def _marker(move: MoveRow) -> str:
        return f"moved:{move.target}:{move.target_generation}"

    def _final_copy(self, claim: Claim) -> None:
        """Under the fence: copy the frozen source, check it cheaply, unmark the copy, fsync, link."""
        move = claim.move
        source_path, target_path = self.paths(move)
        temp = self.temp_of(move)
        with self._space(move, move.target, temp):
            remove_db_files(temp)
            source = open_source(source_path)
            try:
                dest = open_trusted(temp, create=True)
                try:
                    dest.set_progress_handler(claim.interrupt, 10_000)
                    dest.execute("PRAGMA synchronous=OFF")  # a scratch file: fsynced explicitly before linking
                    with read_snapshot(source):
                        self._backup(dest, source, claim)
                        if page_digest(dest) != page_digest(source):
                            raise MoveFailed(f"the final copy of {move.key!r} differs from its fenced source")
                    dest.execute("UPDATE _shardlite_meta SET retired = NULL WHERE id = 1")
                    dest.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                finally:
                    dest.close()
            finally:
                source.close()
            fsync_path(temp)  # the content is durable before any name points at it
            with self.journal.holding(move, self.owner, applying=True):  # no flip or undo races the link
                if os.path.exists(target_path):
                    remove_db_files(target_path)  # a link from an attempt that died before the flip
                os.link(temp, target_path)
            remove_db_files(temp)
            fsync_dir(os.path.dirname(target_path))  # one directory sync makes the link (and the unlink) durable
        self._hook("linked")

    def _sweep(self, move: MoveRow, keep: str | None = None) -> bool:
        """Remove the temporary copies of ``move`` (a previous owner's too: the move is ours now), except
        ``keep``. True when there were any."""
        if move.target_generation is None:
            return False
        _, target_path = self.paths(move)
        found = False
        for path in glob.glob(glob.escape(target_path) + ".moving*"):
            if keep is not None and (path == keep or path.startswith(keep + "-")):
                continue
            if os.path.isfile(path):
                os.unlink(path)
                found = True
        return found

    def drop_own_copy(self, move: MoveRow) -> None:
        """Remove this rebalancer's temporary copy of ``move`` (after it lost the claim)."""
        if move.target_generation is not None:
            remove_db_files(self.temp_of(move))

    # -- going back ------------------------------------------------------------------------------------

    def undo(self, claim: Claim) -> list[str] | None:
        """Put a claimed, unfinished move back: every partial copy of it removed (any owner's), the target
        file removed while nothing routes to it, the fence lifted, the catalog state back to ``active``.
        Returns what was rolled back, or None when the move had passed its commit point (then it is
        journaled ``done`` instead). Raises LostClaim when the claim is lost meanwhile."""
        move = claim.move
        record = self.tenants.lookup(move.key)
        if (move.target_generation is not None and record is not None
                and record.generation == move.target_generation):
            self.journal.set_step(move, self.owner, "done", applying=False)
            return None
        actions: list[str] = []
        if move.target_generation is not None:
            _, target_path = self.paths(move)
            if self._sweep(move):
                actions.append("partial copy removed")
            with self.journal.holding(move, self.owner, applying=False):  # no flip can race this
                if os.path.exists(target_path):
                    remove_db_files(target_path)
                    actions.append("unrouted target copy removed")
            if self._unfence(claim):
                actions.append("fence lifted")
        record = self.tenants.lookup(move.key)
        if record is not None and record.generation == move.source_generation and record.state == "moving":
            self.tenants.set_state(move.key, "active", expect_generation=move.source_generation,
                                   expect_states=("moving",))
            actions.append("catalog state back to active")
        self.store.forget(move.key)
        return actions

    def _unfence(self, claim: Claim, *, own_claim: bool = True) -> bool:
        """Lift this move's fence from its source, inside the source's write lock, only while the catalog
        still routes to the source (and, with ``own_claim``, while the claim holds). True when a fence was
        lifted. The lock is taken only when the fence is there: an application transaction may hold it
        for as long as its busy timeout when there is nothing to lift."""
        move = claim.move
        source_path, _ = self.paths(move)
        if not os.path.exists(source_path) or self._read_marker(source_path) != self._marker(move):
            return False
        def busy(exc: apsw.BusyError) -> MoveFailed:
            return MoveFailed(f"could not lift the fence of tenant {move.key!r}: {source_path} stayed locked past "
                              "the busy timeout")

        with write_locked(source_path, busy_timeout_ms=self.store.settings.busy_timeout_ms, busy=busy,
                          wal_hook=self.store.note_hook(move.source, move.key)) as conn:
            rows = conn.execute("SELECT retired FROM _shardlite_meta WHERE id = 1").fetchall()
            if not rows or rows[0][0] != self._marker(move):
                return False  # rolled back: nothing to lift
            if own_claim:
                self.journal.check(move, self.owner, applying=False)
            record = self.tenants.lookup(move.key)
            if record is None or record.generation != move.source_generation:
                raise MoveFailed(f"tenant {move.key!r} is no longer routed to {source_path}: its fence stays")
            conn.execute("UPDATE _shardlite_meta SET retired = NULL WHERE id = 1")
        return True

    @staticmethod
    def _read_marker(path: str) -> str | None:
        conn = open_source(path)
        try:
            rows = conn.execute("SELECT retired FROM _shardlite_meta WHERE id = 1").fetchall()
            return None if not rows or rows[0][0] is None else str(rows[0][0])
        finally:
            conn.close()

    def lift_orphaned_fence(self, claim: Claim, wait: float) -> bool:
        """After losing the claim: lift the fence this rebalancer wrote if the move's new owner undid the
        move rather than going on with it (it could not see a fence committed after it looked). Waits up
        to ``wait`` seconds for the journal to say which. True when a fence was lifted."""
        move = claim.move
        if not claim.wrote_fence:
            return False
        deadline = time.monotonic() + wait
        while True:
            row = self.journal.move(move.plan_id, move.key)
            same = row is not None and row.target_generation == move.target_generation
            if same and row is not None and row.step in ("fenced", "switched", "done", "completed"):
                return False  # the new owner goes on with this very move: the fence is its own now
            if not same or row is None or row.step in ("failed", "cancelled", "pending", "skipped"):
                return self._unfence(claim, own_claim=False)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
