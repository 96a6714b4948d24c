"""Online tenant moves between nodes: plan, apply, resume, cancel, complete (brief rules 2, 7, 8, 12).

Every plan and every tenant's step is journaled in the global DB (``_shardlite_rebalance``,
``_shardlite_moves``), so a rebalancer killed at any point resumes (or cancels) to a state with exactly one
active copy of each tenant and no untracked file. Moves are claimed in the journal with a lease: two
rebalancers never move the same tenant twice.

One move, while application processes keep writing (steps as journaled):

``pending``
    The tenant must still be where the plan found it (same node and generation), else it is ``skipped``.
    A new generation is issued for the target and the catalog marks the tenant ``moving``.
``copying``
    Copy through the backup API from a pinned snapshot of the source, then verify the copy fully:
    ``integrity_check``, per-table row counts and the content digest equal to the snapshot's.
``fenced``
    Inside the source's own write lock, write the retired marker into the source file. From its commit on,
    every writer (in any process) finds it right after ``BEGIN IMMEDIATE`` and waits for the catalog to
    point elsewhere; the source is frozen. Then copy again (one backup step: a consistent snapshot), check
    cheaply that the copy's page image equals the source's, clear the marker in the copy, fsync the copy
    and its directory, and link it into place.
``switched``
    The catalog flips to the target node and generation (compare-and-set on the old generation): the
    commit point. Stale writers re-resolve and retry at the new home; the write pause they saw is
    recorded (``pause_ms``).
``done``
    The retired source file stays (its name is never reused) until ``rebalance complete``.

Resume redoes an interrupted step from its start (each is idempotent); cancel undoes unfinished moves
(removes partial copies, lifts the fence while the catalog still points at the source).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from .authorizer import INTERNAL_SQL as _I
from .copying import (
    backup_into,
    integrity_ok,
    open_source,
    open_trusted,
    page_digest,
    read_snapshot,
    remove_db_files,
    row_counts,
)
from .engine import ensure_private_dir, fsync_dir, fsync_path
from .errors import ConfigurationError, ShardliteError
from .placement import tenant_relpath
from .planning import Placement, Plan, fingerprint, plan_moves
from .store import Store

__all__ = ["Rebalancer", "MoveRow", "MoveFailed", "LostClaim", "STEPS"]

STEPS = ("pending", "copying", "fenced", "switched", "done")
_FINISHED = ("done", "skipped", "cancelled", "completed")
_COLUMNS = ("plan_id, key, source, target, source_generation, target_generation, size, step, owner, lease, "
            "error, pause_ms")


@dataclass
class MoveRow:
    plan_id: int
    key: str
    source: str
    target: str
    source_generation: int
    target_generation: int | None
    size: int
    step: str
    owner: str | None
    lease: float
    error: str | None
    pause_ms: float | None


class MoveFailed(ShardliteError):
    """A copy did not verify; the move stays at its step and can be resumed or cancelled."""


class LostClaim(ShardliteError):
    """Another rebalancer took over a move whose lease ran out; this one stops working on it."""


class Rebalancer:
    """Plans and runs tenant moves for one data root. ``fault(step)`` is a test hook called after each
    journaled step ("copying", "copied", "fenced", "linked", "switched")."""

    def __init__(self, store: Store, *, lease: float = 300.0) -> None:
        self.store = store
        self.db = store.globaldb
        self.lease = lease
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.fault: Callable[[str], None] | None = None

    # -- journal ----------------------------------------------------------------------------------------

    def _moves(self, plan_id: int) -> list[MoveRow]:
        rows = self.db.read(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? ORDER BY source, key",
                            (plan_id,))
        return [MoveRow(*row) for row in rows]

    def _set_step(self, move: MoveRow, step: str, **fields: Any) -> None:
        """Journal ``step`` (renewing our lease); :class:`LostClaim` if another rebalancer took the move."""
        sets = "".join(f", {name} = ?" for name in fields)
        now = time.time()
        with self.db.write() as conn:
            conn.execute(_I + f"UPDATE _shardlite_moves SET step = ?, updated = ?, lease = ?{sets} "
                         "WHERE plan_id = ? AND key = ? AND owner = ?",
                         (step, now, now + self.lease, *fields.values(), move.plan_id, move.key, self.owner))
            if conn.changes() != 1:
                raise LostClaim(f"another rebalancer took over the move of {move.key!r}")
        move.step = step
        for name, value in fields.items():
            setattr(move, name, value)
        if self.fault is not None:
            self.fault(step)

    def _renew(self, move: MoveRow) -> None:
        """Check we still own ``move`` (and extend the lease) right before an irreversible action."""
        self._set_step(move, move.step)

    def _claim(self, move: MoveRow) -> MoveRow | None:
        """Take ``move`` unless a live rebalancer holds it; the journal's current row, or None."""
        now = time.time()
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET owner = ?, lease = ? WHERE plan_id = ? AND key = ? "
                         "AND (owner IS NULL OR owner = ? OR lease < ?)",
                         (self.owner, now + self.lease, move.plan_id, move.key, self.owner, now))
            if conn.changes() != 1:
                return None
            row: list[Any] = conn.execute(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? AND key = ?",
                               (move.plan_id, move.key)).fetchall()
        return MoveRow(*row[0])

    def _release(self, move: MoveRow) -> None:
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET owner = NULL, lease = 0 WHERE plan_id = ? AND key = ? "
                         "AND owner = ?", (move.plan_id, move.key, self.owner))

    def plans(self) -> list[dict[str, Any]]:
        rows = self.db.read("SELECT id, created, state, summary FROM _shardlite_rebalance ORDER BY id DESC LIMIT 20")
        return [{"id": r[0], "created": r[1], "state": r[2], **json.loads(r[3])} for r in rows]

    def _plan_row(self, plan_id: int | None, states: tuple[str, ...]) -> tuple[int, str, str]:
        marks = ", ".join("?" for _ in states)
        if plan_id is None:
            rows = self.db.read(f"SELECT id, state, fingerprint FROM _shardlite_rebalance WHERE state IN ({marks}) "
                                "ORDER BY id DESC LIMIT 1", states)
        else:
            rows = self.db.read(f"SELECT id, state, fingerprint FROM _shardlite_rebalance WHERE id = ? AND state IN "
                                f"({marks})", (plan_id, *states))
        if not rows:
            wanted = " or ".join(states)
            raise ConfigurationError(f"no {wanted} rebalance plan{'' if plan_id is None else f' {plan_id}'} "
                                     "(`shardlite rebalance plan` makes one)")
        return int(rows[0][0]), str(rows[0][1]), str(rows[0][2])

    # -- planning ---------------------------------------------------------------------------------------

    def _placements(self) -> list[Placement]:
        store = self.store
        result = []
        for record in store.catalog.iter_tenants():
            path = store.path_of(record)
            size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
            result.append(Placement(record.key, record.node, record.generation, size))
        return result

    def compute(self) -> Plan:
        """The plan for the catalog as it is now (nothing recorded)."""
        nodes = self.store.catalog.nodes()
        weights = {n.name: n.weight for n in nodes if n.state == "active"}
        if not weights:
            raise ConfigurationError("no active node to move tenants to")
        return plan_moves(self._placements(), weights, [n.name for n in nodes if n.state == "draining"])

    def _current_fingerprint(self, plan_id: int) -> str:
        """The plan's fingerprint recomputed from the catalog as it is now (see planning.fingerprint)."""
        catalog = self.store.catalog
        nodes = catalog.nodes()
        placements = []
        for move in self._moves(plan_id):
            record = catalog.lookup(move.key)
            if record is not None and record.state in ("active", "moving"):
                placements.append(Placement(record.key, record.node, record.generation))
        return fingerprint({n.name: n.weight for n in nodes if n.state == "active"},
                           [n.name for n in nodes if n.state == "draining"], placements)

    def plan(self) -> tuple[int, Plan]:
        """Compute and record a plan (older unapplied plans are superseded)."""
        if self.db.read("SELECT 1 FROM _shardlite_rebalance WHERE state = 'applying'"):
            raise ConfigurationError("a rebalance is being applied: `shardlite rebalance resume` or `cancel` it first")
        plan = self.compute()
        summary = {"moves": len(plan.moves), "bytes": plan.bytes, "before": plan.before, "after": plan.after}
        now = time.time()
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_rebalance SET state = 'superseded' WHERE state = 'planned'")
            conn.execute(_I + "INSERT INTO _shardlite_rebalance(created, state, fingerprint, summary) "
                         "VALUES (?, 'planned', ?, ?)", (now, plan.fingerprint, json.dumps(summary)))
            plan_id = int(conn.last_insert_rowid())
            conn.executemany(_I + "INSERT INTO _shardlite_moves(plan_id, key, source, target, source_generation, "
                             "size, step, updated) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                             [(plan_id, m.key, m.source, m.target, m.generation, m.size, now) for m in plan.moves])
        return plan_id, plan

    # -- applying ---------------------------------------------------------------------------------------

    def apply(self, plan_id: int | None = None, *, parallel: int = 1, pause_ms: float = 0.0,
              progress: Callable[[MoveRow], None] | None = None) -> dict[str, Any]:
        """Apply the latest planned plan (refused when the catalog changed since: the plan is stale)."""
        plan_id, _state, fp = self._plan_row(plan_id, ("planned",))
        if self._current_fingerprint(plan_id) != fp:
            raise ConfigurationError("the plan is stale: the catalog changed since it was made; run "
                                     "`shardlite rebalance plan` again")
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_rebalance SET state = 'applying' WHERE id = ?", (plan_id,))
        return self._run(plan_id, parallel=parallel, pause_ms=pause_ms, progress=progress)

    def resume(self, plan_id: int | None = None, *, parallel: int = 1, pause_ms: float = 0.0,
               progress: Callable[[MoveRow], None] | None = None) -> dict[str, Any]:
        """Continue an interrupted apply from each move's journaled step."""
        plan_id, _, _ = self._plan_row(plan_id, ("applying",))
        return self._run(plan_id, parallel=parallel, pause_ms=pause_ms, progress=progress)

    def _run(self, plan_id: int, *, parallel: int, pause_ms: float,
             progress: Callable[[MoveRow], None] | None) -> dict[str, Any]:
        todo = [m for m in self._moves(plan_id) if m.step not in _FINISHED]

        def one(planned: MoveRow) -> None:
            if self._plan_state(plan_id) != "applying":
                return  # cancelled meanwhile: take no new move
            move = self._claim(planned)
            if move is None or move.step in _FINISHED:
                return  # another rebalancer owns it, or finished it meanwhile
            try:
                self.move(move)
            except Exception as exc:  # noqa: BLE001 - recorded in the journal; the others go on
                with self.db.write() as conn:
                    conn.execute(_I + "UPDATE _shardlite_moves SET error = ? WHERE plan_id = ? AND key = ?",
                                 (f"{type(exc).__name__}: {exc}", move.plan_id, move.key))
                move.error = f"{type(exc).__name__}: {exc}"
            if progress is not None:
                progress(move)
            if pause_ms > 0:
                time.sleep(pause_ms / 1000)

        while True:
            with ThreadPoolExecutor(max_workers=max(1, parallel)) as executor:
                list(executor.map(one, todo))
            todo = self._await_foreign_leases(plan_id)
            if not todo or self._plan_state(plan_id) != "applying":
                break
        moves = self._moves(plan_id)
        if all(m.step in _FINISHED for m in moves):
            with self.db.write() as conn:
                conn.execute(_I + "UPDATE _shardlite_rebalance SET state = 'done' WHERE id = ? AND state = 'applying'",
                             (plan_id,))
        return self.status(plan_id)

    def _await_foreign_leases(self, plan_id: int, until: float = float("inf")) -> list[MoveRow]:
        """Unfinished moves held by other rebalancers: wait until the first lease runs out (a live owner
        renews it at every step; a dead one's lapses) and return them to be tried again. Returns [] when
        no held lease lapses before ``until`` (a wall-clock time)."""
        held = [m for m in self._moves(plan_id)
                if m.step not in _FINISHED and m.owner not in (None, self.owner) and m.lease > time.time()]
        if not held or min(m.lease for m in held) > until:
            return []
        time.sleep(min(max(0.0, min(m.lease for m in held) - time.time()) + 0.01, 1.0))
        return held

    def _plan_state(self, plan_id: int) -> str:
        return str(self.db.read("SELECT state FROM _shardlite_rebalance WHERE id = ?", (plan_id,))[0][0])

    def _paths(self, move: MoveRow) -> tuple[str, str]:
        store = self.store
        source = os.path.join(store.node_path(move.source), tenant_relpath(move.key, move.source_generation))
        assert move.target_generation is not None
        target = os.path.join(store.node_path(move.target), tenant_relpath(move.key, move.target_generation))
        return source, target

    def move(self, move: MoveRow) -> None:
        """Run one move from its journaled step to ``done``."""
        catalog = self.store.catalog
        if move.step == "pending":
            record = catalog.lookup(move.key)
            if (record is None or record.state not in ("active", "moving") or record.node != move.source
                    or record.generation != move.source_generation):
                self._set_step(move, "skipped", error="stale: the tenant changed since the plan")
                return
            generation = catalog.allocate_generation(move.key, move.target, "move")
            if record.state == "active":
                catalog.set_state(move.key, "moving", expect_generation=move.source_generation)
            self._set_step(move, "copying", target_generation=generation)
        fenced_at: float | None = None
        if move.step == "copying":
            self._copy_and_verify(move)
            fenced_at = time.monotonic()
            self._fence(move)
            self._set_step(move, "fenced")
        if move.step == "fenced":
            record = catalog.lookup(move.key)
            assert move.target_generation is not None
            if record is None or record.generation != move.target_generation:
                # Not flipped yet (a resume may find the flip done: then the copy is live, never redo it).
                self._final_copy(move)
                self._renew(move)
                catalog.flip(move.key, from_generation=move.source_generation, node=move.target,
                             generation=move.target_generation)
            self.store.forget(move.key)
            pause = None if fenced_at is None else (time.monotonic() - fenced_at) * 1000
            self._set_step(move, "switched", pause_ms=pause)
        if move.step == "switched":
            self._set_step(move, "done")
            self._release(move)

    def _copy_and_verify(self, move: MoveRow) -> None:
        source_path, target_path = self._paths(move)
        temp = target_path + ".moving"
        remove_db_files(temp)
        ensure_private_dir(os.path.dirname(temp))
        source = open_source(source_path)
        try:
            dest = open_trusted(temp, create=True)
            dest.execute("PRAGMA synchronous=OFF")  # a scratch file: fsynced explicitly before it is linked
            try:
                with read_snapshot(source):
                    expected = row_counts(source), page_digest(source)
                    backup_into(dest, source)
                if not integrity_ok(dest) or (row_counts(dest), page_digest(dest)) != expected:
                    raise MoveFailed(f"the copy of {move.key!r} does not match its source snapshot")
            finally:
                dest.close()
        finally:
            source.close()
        if self.fault is not None:
            self.fault("copied")

    def _fence(self, move: MoveRow) -> None:
        source_path, _ = self._paths(move)
        conn = open_source(source_path, busy_timeout_ms=self.store.settings.busy_timeout_ms)
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                key = conn.execute("SELECT key FROM _shardlite_meta WHERE id = 1").fetchall()[0][0]
                if key != move.key:
                    raise MoveFailed(f"{source_path} holds {key!r}, not {move.key!r}")
                conn.execute("UPDATE _shardlite_meta SET retired = ? WHERE id = 1",
                             (f"moved:{move.target}:{move.target_generation}",))
                conn.execute("COMMIT")
            except BaseException:
                if not conn.get_autocommit():
                    conn.execute("ROLLBACK")
                raise
        finally:
            conn.close()

    def _final_copy(self, move: MoveRow) -> None:
        """Under the fence: copy the frozen source, check it cheaply, unmark the copy, fsync, link."""
        source_path, target_path = self._paths(move)
        temp = target_path + ".moving"
        remove_db_files(temp)
        source = open_source(source_path)
        try:
            dest = open_trusted(temp, create=True)
            dest.execute("PRAGMA synchronous=OFF")  # a scratch file: fsynced explicitly before it is linked
            try:
                with read_snapshot(source):
                    backup_into(dest, source)
                    if page_digest(dest) != page_digest(source):
                        raise MoveFailed(f"the final copy of {move.key!r} differs from its fenced source")
                dest.execute("UPDATE _shardlite_meta SET retired = NULL WHERE id = 1")
                dest.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                dest.close()
        finally:
            source.close()
        fsync_path(temp)  # the content is durable before any name points at it
        if os.path.exists(target_path):
            remove_db_files(target_path)  # a link from an attempt that died before the flip
        os.link(temp, target_path)
        os.unlink(temp)
        fsync_dir(os.path.dirname(target_path))  # one directory sync makes the link (and the unlink) durable
        if self.fault is not None:
            self.fault("linked")

    # -- cancel, complete, status ------------------------------------------------------------------------

    def cancel(self, plan_id: int | None = None, *, wait: float = 15.0) -> dict[str, Any]:
        """Stop a planned or applying plan and undo its unfinished moves; finished ones stay (``complete``
        removes their retired copies). A move another live rebalancer is working on is left to it: it
        finishes that move and takes no other. Moves held by a rebalancer that died are undone once its
        lease lapses, if that happens within ``wait`` seconds (``cancel`` again later otherwise)."""
        plan_id, _, _ = self._plan_row(plan_id, ("applying", "planned"))
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_rebalance SET state = 'cancelled' WHERE id = ?", (plan_id,))
        catalog = self.store.catalog
        deadline = time.time() + wait
        todo = self._moves(plan_id)
        while todo:
            for planned in todo:
                self._cancel_one(planned, catalog)
            todo = self._await_foreign_leases(plan_id, until=deadline)
        return self.status(plan_id)

    def _cancel_one(self, planned: MoveRow, catalog: Any) -> None:
        """Undo one unfinished move (unless another live rebalancer holds it)."""
        if planned.step in _FINISHED:
            return
        move = self._claim(planned)
        if move is None or move.step in _FINISHED:
            return
        if move.step == "switched":  # past the commit point: it is done, only the journal lagged
            self._set_step(move, "done")
            self._release(move)
            return
        if move.target_generation is not None:
            source_path, target_path = self._paths(move)
            remove_db_files(target_path + ".moving")
            record = catalog.lookup(move.key)
            if record is not None and record.generation == move.source_generation:
                remove_db_files(target_path)
                self._unfence(source_path)
                if record.state == "moving":
                    catalog.set_state(move.key, "active", expect_generation=move.source_generation)
        self._set_step(move, "cancelled")
        self._release(move)

    def _unfence(self, source_path: str) -> None:
        if not os.path.exists(source_path):
            return
        conn = open_trusted(source_path, busy_timeout_ms=self.store.settings.busy_timeout_ms)
        try:
            conn.execute("UPDATE _shardlite_meta SET retired = NULL WHERE id = 1 AND retired LIKE 'moved:%'")
        finally:
            conn.close()

    def complete(self, plan_id: int | None = None) -> dict[str, Any]:
        """Delete the retired source files of finished moves; remove drained nodes left empty."""
        plan_id, _, _ = self._plan_row(plan_id, ("done", "cancelled"))
        removed = 0
        for move in self._moves(plan_id):
            if move.step != "done":
                continue  # a finished move is final: no claim needed to drop its retired copy
            source_path, _ = self._paths(move)
            if os.path.exists(source_path):
                removed += 1
            remove_db_files(source_path)
            with self.db.write() as conn:
                conn.execute(_I + "UPDATE _shardlite_moves SET step = 'completed', updated = ? WHERE plan_id = ? "
                             "AND key = ? AND step = 'done'", (time.time(), plan_id, move.key))
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_rebalance SET state = 'completed' WHERE id = ?", (plan_id,))
        counts = self.store.catalog.count_tenants()
        for node in self.store.catalog.nodes():
            if node.state == "draining" and counts.get(node.name, 0) == 0:
                self.store.catalog.delete_node(node.name)
        self.store._refresh_nodes()
        return self.status(plan_id) | {"retired_files_removed": removed}

    def status(self, plan_id: int | None = None) -> dict[str, Any]:
        if plan_id is None:
            rows = self.db.read("SELECT id FROM _shardlite_rebalance ORDER BY id DESC LIMIT 1")
            if not rows:
                return {"plan": None}
            plan_id = int(rows[0][0])
        row = self.db.read("SELECT state, summary, created FROM _shardlite_rebalance WHERE id = ?", (plan_id,))[0]
        moves = self._moves(plan_id)
        steps: dict[str, int] = {}
        for move in moves:
            steps[move.step] = steps.get(move.step, 0) + 1
        pauses = sorted(m.pause_ms for m in moves if m.pause_ms is not None)
        return {
            "plan": plan_id, "state": row[0], "created": row[2], **json.loads(row[1]), "steps": steps,
            "errors": {m.key: m.error for m in moves if m.error},
            "pause_ms": {"p50": _percentile(pauses, 50), "p99": _percentile(pauses, 99),
                         "max": pauses[-1] if pauses else None},
        }


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]

