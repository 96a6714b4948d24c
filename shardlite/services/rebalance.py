"""Online tenant moves between nodes: plan, apply, resume, cancel, complete (rules: stable routing, the same key maps
to the same node in every process; copies go through SQLite and are fsynced before anything routes to them; a move
fences the source inside its own write lock; crashes lose nothing acknowledged; failures stay in their tenant and
waits are bounded).

Every plan and every tenant's step is journaled in the metadata store (``store.meta.journal``), so a
rebalancer killed at any point resumes (or cancels) to a state with exactly one active copy of each tenant
and no untracked file. One move's steps and its undo are in :mod:`shardlite.services.mover`.

Claims are short leases (``lease``, 10 s by default) that a heartbeat thread renews while the rebalancer
works (:mod:`shardlite.services.heartbeat`): two rebalancers never move the same tenant at once, a copy that takes
longer than the lease keeps its claim, and the moves of a rebalancer that died are taken over once its
lease lapses, within seconds.

Failures are confined: a move that fails for any reason (its copy did not verify, its target node is full,
its source stayed locked) is undone at once (partial copies removed, fence lifted, catalog state back to
``active``), journaled ``failed`` with its error, and its claim released; the other moves go on, and
``resume`` tries the failed ones again.

``cancel`` leaves no tenant fenced or moving: it undoes every unfinished move it can claim, waits (bounded)
for live rebalancers to undo the moves they hold (they notice the cancel at their next step or heartbeat)
and takes over the moves of dead ones once their lease lapses. It can be run again on a cancelled plan
that still has moves to undo. Moves past their commit point are finished instead: they are done.

``apply``, ``resume`` and ``cancel`` say what they wait for through ``notice`` (which tenant, which owner,
until when), and what failed or was rolled back.
"""

from __future__ import annotations

import os
import secrets
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..core.movejournal import MAX_LISTED, STEPS, LostClaim, MoveRow, PlanCancelled
from ..core.planning import Placement, Plan, fingerprint, plan_moves
from ..errors import ConfigurationError
from ..files.copying import remove_db_files
from ..files.engine import free_bytes
from ..front.store import Store
from .heartbeat import Claim, Heartbeat
from .mover import MoveFailed, Mover, NodeFull

__all__ = ["Rebalancer", "MoveRow", "MoveFailed", "NodeFull", "LostClaim", "Notice", "STEPS", "DEFAULT_LEASE"]

#: Seconds a claim on a move holds without renewal (a live rebalancer renews it every third of that).
DEFAULT_LEASE = 10.0
_POLL = 0.2  # seconds between looks at moves other rebalancers hold
_CANCELLABLE = ("applying", "planned", "cancelled")


@dataclass(frozen=True, slots=True)
class Notice:
    """Something a long-running rebalance command reports as it happens (``str()`` is one line).

    ``kind``: ``"waiting"`` (a move another rebalancer holds), ``"taking over"`` (a dead owner's move),
    ``"failed"`` / ``"cancelled"`` (a move undone, and what was rolled back), ``"undo failed"``, ``"lost"``,
    ``"gave up"`` (cancel stopped waiting for a move it could not undo yet).
    """

    kind: str
    key: str
    text: str
    owner: str | None = None
    until: float | None = None

    def __str__(self) -> str:
        return self.text


NoticeFn = Callable[[Notice], None]


def _clock(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at)) + f" (in {max(0.0, at - time.time()):.1f} s)"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class _Waits:
    """Reports each (move, owner) a command waits for once."""

    def __init__(self, notice: NoticeFn | None, why: str) -> None:
        self.notice = notice
        self.why = why
        self.seen: set[tuple[str, str | None]] = set()

    def report(self, held: list[MoveRow]) -> None:
        for move in held:
            if self.notice is None or (move.key, move.owner) in self.seen:
                continue
            self.seen.add((move.key, move.owner))
            self.notice(Notice("waiting", move.key, f"waiting for {move.key} (step {move.step}): held by "
                               f"{move.owner}, lease until {_clock(move.lease)}; {self.why}",
                               move.owner, move.lease))


class Rebalancer:
    """Plans and runs tenant moves for one data root.

    ``lease``: seconds a claim holds without renewal (renewed every ``lease / 3`` while working).
    ``reserve``: bytes a target node keeps free after the moves planned onto it.
    ``fault(step)``: a test hook called after each journaled step (see :class:`~shardlite.services.mover.Mover`).
    """

    def __init__(self, store: Store, *, lease: float = DEFAULT_LEASE) -> None:
        self.store = store
        self.lease = lease
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.journal = store.meta.journal
        self.mover = Mover(store, self.journal, self.owner)

    @property
    def fault(self) -> Callable[[str], None] | None:
        return self.mover.fault

    @fault.setter
    def fault(self, hook: Callable[[str], None] | None) -> None:
        self.mover.fault = hook

    @property
    def reserve(self) -> int:
        return self.mover.reserve

    @reserve.setter
    def reserve(self, value: int) -> None:
        self.mover.reserve = value

    def _heartbeat(self) -> Heartbeat:
        return Heartbeat(self.journal, self.owner, lambda: self.lease)

    # -- planning ---------------------------------------------------------------------------------------

    def plans(self) -> list[dict[str, Any]]:
        return [{"id": p.id, "created": p.created, "state": p.state, **p.summary} for p in self.journal.plans(20)]

    def _placements(self) -> list[Placement]:
        store = self.store
        result = []
        for record in store.meta.tenants.iter_tenants():
            path = store.path_of(record)
            size = sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s))
            result.append(Placement(record.key, record.node, record.generation, size))
        return result

    def compute(self) -> Plan:
        """The plan for the catalog as it is now (nothing recorded). Moves that do not fit on their
        target node's file system (``os.statvfs``, ``reserve`` kept free) are left out, with the reason."""
        nodes = self.store.meta.nodes.list()
        weights = {n.name: n.weight for n in nodes if n.state == "active"}
        if not weights:
            raise ConfigurationError("no active node to move tenants to")
        free: dict[str, int] = {}
        volumes: dict[str, int] = {}
        for node in nodes:
            if node.state == "active":
                try:
                    free[node.name] = free_bytes(node.path)
                    volumes[node.name] = os.stat(node.path).st_dev
                except OSError:
                    pass  # unknown: not limited here; a move onto it fails with a clear error
        return plan_moves(self._placements(), weights, [n.name for n in nodes if n.state == "draining"],
                          free=free, volumes=volumes, reserve=self.reserve)

    def _current_fingerprint(self, plan_id: int) -> str:
        """The plan's fingerprint recomputed from the catalog as it is now (see planning.fingerprint)."""
        meta = self.store.meta
        nodes = meta.nodes.list()
        placements = []
        for move in self.journal.moves(plan_id):
            record = meta.tenants.lookup(move.key)
            if record is not None and record.state in ("active", "moving"):
                placements.append(Placement(record.key, record.node, record.generation))
        return fingerprint({n.name: n.weight for n in nodes if n.state == "active"},
                           [n.name for n in nodes if n.state == "draining"], placements)

    def plan(self) -> tuple[int, Plan]:
        """Compute and record a plan (older unapplied plans are superseded). Refused while a plan is being
        applied or a cancelled one still has moves to undo (:meth:`MoveJournal.create_plan` checks both in
        the transaction that records the plan, so no apply can start in between)."""
        plan = self.compute()
        left_out = [{"key": o.move.key, "from": o.move.source, "to": o.move.target, "bytes": o.move.size,
                     "reason": o.reason} for o in plan.left_out[:MAX_LISTED]]
        summary = {"moves": len(plan.moves), "bytes": plan.bytes, "before": plan.before, "after": plan.after,
                   "left_out": left_out, "left_out_count": len(plan.left_out)}
        return self.journal.create_plan(plan.fingerprint, summary, plan.moves), plan

    # -- applying ---------------------------------------------------------------------------------------

    def apply(self, plan_id: int | None = None, *, parallel: int = 1, pause_ms: float = 0.0,
              progress: Callable[[MoveRow], None] | None = None,
              notice: NoticeFn | None = None) -> dict[str, Any]:
        """Apply the latest planned plan (refused when the catalog changed since: the plan is stale).

        Returns the plan's status: ``done`` when every move finished; still ``applying`` when some
        failed (undone, with their error: ``resume`` tries them again). ``progress(move)`` is called
        after each move this call worked on; ``notice`` gets what it waits for and what it undid."""
        plan_id, _state, fp = self.journal.plan_row(plan_id, ("planned",))
        if self._current_fingerprint(plan_id) != fp:
            raise ConfigurationError("the plan is stale: the catalog changed since it was made; run "
                                     "`shardlite rebalance plan` again")
        if not self.journal.set_plan_state(plan_id, "applying", only_from=("planned",)):
            now = self.journal.plan_state(plan_id)
            if now != "applying":  # applying already: another rebalancer started it; work alongside it
                raise ConfigurationError(f"plan {plan_id} is {now} now, no longer planned: run `shardlite "
                                         "rebalance plan` again")
        return self._run(plan_id, parallel=parallel, pause_ms=pause_ms, progress=progress, notice=notice)

    def resume(self, plan_id: int | None = None, *, parallel: int = 1, pause_ms: float = 0.0,
               progress: Callable[[MoveRow], None] | None = None,
               notice: NoticeFn | None = None) -> dict[str, Any]:
        """Continue an applying plan: each unfinished move from its journaled step, failed moves from the
        start. Moves a live rebalancer holds are left to it (this call waits for them to finish); a dead
        one's moves are taken over once its lease lapses."""
        try:
            plan_id, _, _ = self.journal.plan_row(plan_id, ("applying",))
        except ConfigurationError:
            cancelled = self.journal.unfinished_plans("cancelled")
            if cancelled:
                raise ConfigurationError(f"plan {cancelled[0]} was cancelled and some of its moves are not undone "
                                         "yet: `shardlite rebalance cancel` undoes them") from None
            raise
        return self._run(plan_id, parallel=parallel, pause_ms=pause_ms, progress=progress, notice=notice)

    def _run(self, plan_id: int, *, parallel: int, pause_ms: float,
             progress: Callable[[MoveRow], None] | None, notice: NoticeFn | None) -> dict[str, Any]:
        tried: set[str] = set()  # each move is attempted once per call; a failed one waits for the next resume
        waits = _Waits(notice, "a live rebalancer renews its lease while it works; a dead one's move is "
                               "taken over when the lease lapses")

        def one(planned: MoveRow) -> None:
            if self.journal.plan_state(plan_id) != "applying":
                return  # cancelled meanwhile: take no new move
            move = self._attempt(planned, heartbeat, notice)
            if move is None:
                return  # another rebalancer holds it, or finished it meanwhile
            tried.add(move.key)
            if progress is not None:
                progress(move)
            if pause_ms > 0:
                time.sleep(pause_ms / 1000)

        with self._heartbeat() as heartbeat:
            while self.journal.plan_state(plan_id) == "applying":
                now = time.time()
                left = [m for m in self.journal.moves(plan_id) if not m.finished and m.key not in tried]
                free = [m for m in left if not m.held_by_other(self.owner, now)]
                if free:
                    with ThreadPoolExecutor(max_workers=max(1, parallel)) as executor:
                        list(executor.map(one, free))
                    continue
                if not left:
                    break
                waits.report(left)
                time.sleep(min(_POLL, max(0.0, min(m.lease for m in left) - now) + 0.01))
        if all(m.finished for m in self.journal.moves(plan_id)):
            # A lost CAS here means the plan was cancelled (or finished by another rebalancer) meanwhile:
            # the status returned below says which.
            self.journal.set_plan_state(plan_id, "done", only_from=("applying",))
        return self.status(plan_id)

    def _attempt(self, planned: MoveRow, heartbeat: Heartbeat, notice: NoticeFn | None) -> MoveRow | None:
        """Claim one move and run it to its end; a failure is undone and journaled ``failed``."""
        move = self.journal.claim(planned.plan_id, planned.key, self.owner, self.lease)
        if move is None:
            return None
        if notice is not None and planned.owner not in (None, self.owner):
            notice(Notice("taking over", move.key, f"taking over {move.key} at step {move.step} from "
                          f"{planned.owner} (its lease ran out)", planned.owner, planned.lease))
        claim = heartbeat.hold(move)
        try:
            try:
                self.move(claim)
            except LostClaim as exc:
                self.mover.drop_own_copy(move)
                self._lift_orphaned_fence(claim)
                if notice is not None:
                    notice(Notice("lost", move.key, f"{move.key}: {exc}; left to the new owner"))
            except PlanCancelled:
                self._settle(claim, "cancelled", None, notice)
            except Exception as exc:  # noqa: BLE001 - any failure is undone and journaled; the others go on
                self._settle(claim, "failed", _describe(exc), notice)
        finally:
            self._let_go(claim, heartbeat)
        return move

    def move(self, claim: Claim) -> None:
        """Run one claimed move to its end (what the worker threads call; see Mover.run for what it raises)."""
        self.mover.run(claim)

    def _lift_orphaned_fence(self, claim: Claim) -> None:
        try:
            self.mover.lift_orphaned_fence(claim, wait=self.lease)
        except Exception:  # noqa: BLE001 - best effort: the new owner's undo or a later cancel lifts it
            pass

    def _let_go(self, claim: Claim, heartbeat: Heartbeat) -> None:
        heartbeat.drop(claim)
        try:
            self.journal.release(claim.move, self.owner)
        except Exception:  # noqa: BLE001 - a busy global DB: the lease lapses within seconds anyway
            pass

    def _settle(self, claim: Claim, step: str, error: str | None, notice: NoticeFn | None) -> None:
        """Undo a claimed move and journal it as ``step`` (``failed`` with ``error``, or ``cancelled``)."""
        move = claim.move
        try:
            actions = self.mover.undo(claim)
        except LostClaim:
            self.mover.drop_own_copy(move)
            self._lift_orphaned_fence(claim)
            return
        except Exception as exc:  # noqa: BLE001 - recorded; resume or cancel tries the undo again
            text = f"{error}; undo failed: {_describe(exc)}" if error else f"undo failed: {_describe(exc)}"
            try:
                self.journal.record_error(move, self.owner, text)
            except Exception:  # noqa: BLE001 - the move stays at its step: resume or cancel sees it
                pass
            if notice is not None:
                notice(Notice("undo failed", move.key, f"{move.key}: {text}"))
            return
        if actions is None:
            return  # past its commit point: finished (done) instead
        fields: dict[str, object] = {} if error is None else {"error": error}
        try:
            self.journal.set_step(move, self.owner, step, applying=False, **fields)
        except LostClaim:
            return
        if actions:
            self.journal.note_rollback(move.plan_id, move.key, ", ".join(actions))
        if notice is not None:
            what = ", ".join(actions) or "nothing to roll back"
            notice(Notice(step, move.key, f"{move.key}: {error or 'cancelled'}; rolled back: {what}"))

    def rescue(self, key: str) -> bool:
        """Settle an unfinished move of ``key`` whose rebalancer stopped renewing its claim (its lease
        lapsed): undo it, journaled ``failed`` ("abandoned"; ``resume`` moves it again), or finish it if it
        had passed its commit point. For a process that finds the tenant frozen and cannot wait for an
        operator's ``resume`` or ``cancel``. True when a move was settled."""
        settled = False
        for plan_id in self.journal.lapsed_moves(key, time.time()):
            move = self.journal.claim(plan_id, key, self.owner, self.lease)
            if move is None:
                continue
            cancelled = self.journal.plan_state(move.plan_id) == "cancelled"
            with self._heartbeat() as heartbeat:
                claim = heartbeat.hold(move)
                try:
                    self._settle(claim, "cancelled" if cancelled else "failed",
                                 None if cancelled else "abandoned: its rebalancer stopped renewing its claim", None)
                finally:
                    self._let_go(claim, heartbeat)
            settled = True
        return settled

    # -- cancel, complete, status ------------------------------------------------------------------------

    def cancel(self, plan_id: int | None = None, *, wait: float | None = None,
               notice: NoticeFn | None = None) -> dict[str, Any]:
        """Stop a planned or applying plan and undo its unfinished moves; finished ones stay (``complete``
        removes their retired copies). Also runs again on a cancelled plan with moves left to undo.

        Moves no live rebalancer holds are undone here. A live rebalancer holding one notices the cancel
        at its next step or heartbeat and undoes it itself; a dead one's moves are undone here once its
        lease lapses. This call waits for both up to ``wait`` seconds (default: the larger of 30 s and
        three leases), reporting what it waits for through ``notice``; the returned status lists under
        ``held`` any move still held when it gave up (``cancel`` again later)."""
        plan_id = self._cancellable(plan_id)
        if not self.journal.set_plan_state(plan_id, "cancelled", only_from=_CANCELLABLE):
            raise ConfigurationError(f"plan {plan_id} is {self.journal.plan_state(plan_id)} now: nothing to cancel")
        deadline = time.monotonic() + (max(30.0, 3 * self.lease) if wait is None else wait)
        waits = _Waits(notice, "its owner undoes it when it notices the cancel; if the owner is dead it is "
                               "undone here when the lease lapses")
        with self._heartbeat() as heartbeat:
            while True:
                self.journal.cancel_unstarted(plan_id, self.owner)
                now = time.time()
                left = [m for m in self.journal.moves(plan_id) if not m.finished]
                free = [m for m in left if not m.held_by_other(self.owner, now)]
                for planned in free:
                    move = self.journal.claim(planned.plan_id, planned.key, self.owner, self.lease)
                    if move is not None:
                        claim = heartbeat.hold(move)
                        try:
                            self._settle(claim, "cancelled", None, notice)
                        finally:
                            self._let_go(claim, heartbeat)
                left = [m for m in self.journal.moves(plan_id) if not m.finished]
                if not left:
                    break
                if time.monotonic() >= deadline:
                    for move in left:
                        if notice is not None:
                            notice(Notice("gave up", move.key, f"not undone yet: {move.key} (step {move.step}): "
                                          f"held by {move.owner}, lease until {_clock(move.lease)}; run "
                                          "`shardlite rebalance cancel` again", move.owner, move.lease))
                    break
                waits.report([m for m in left if m.held_by_other(self.owner, time.time())])
                time.sleep(_POLL)
        return self.status(plan_id)

    def _cancellable(self, plan_id: int | None) -> int:
        if plan_id is not None:
            return self.journal.plan_row(plan_id, _CANCELLABLE)[0]
        found = self.journal.unfinished_plans("cancelled")[:1]
        try:
            found.append(self.journal.plan_row(None, ("applying", "planned"))[0])
        except ConfigurationError:
            pass
        if not found:
            raise ConfigurationError("no applying or planned rebalance plan, and no cancelled one with moves left "
                                     "to undo (`shardlite rebalance plan` makes one)")
        return max(found)

    def complete(self, plan_id: int | None = None) -> dict[str, Any]:
        """Delete the retired source files of finished moves; remove drained nodes left empty."""
        plan_id, _, _ = self.journal.plan_row(plan_id, ("done", "cancelled"))
        removed = 0
        for move in self.journal.moves(plan_id):
            if move.step != "done":
                continue  # a finished move is final: no claim needed to drop its retired copy
            source_path, _ = self.mover.paths(move)
            if os.path.exists(source_path):
                removed += 1
            remove_db_files(source_path)
            self.journal.mark_completed(plan_id, move.key)  # False: another `complete` got there first
        if not self.journal.set_plan_state(plan_id, "completed", only_from=("done", "cancelled")):
            raise ConfigurationError(f"plan {plan_id} is {self.journal.plan_state(plan_id)} now: not completed")
        counts = self.store.meta.tenants.count_by_node()
        for node in self.store.meta.nodes.list():
            if node.state == "draining" and counts.get(node.name, 0) == 0:
                self.store.meta.nodes.remove(node.name)  # F1: its tombstones move to a remaining node
        self.store._refresh_nodes()
        return self.status(plan_id) | {"retired_files_removed": removed}

    def status(self, plan_id: int | None = None) -> dict[str, Any]:
        """The plan's state and summary, moves per step, and per key: ``errors`` (unfinished or skipped
        moves with their error; ``failed`` ones were undone), ``rolled_back`` (what an undo did),
        ``held`` (unfinished moves a rebalancer holds: owner, step, lease end), ``left_out`` (moves the
        plan left out, with the reason)."""
        if plan_id is None:
            plan_id = self.journal.latest_plan_id()
            if plan_id is None:
                return {"plan": None}
        plan = self.journal.plan(plan_id)
        if plan is None:
            raise ConfigurationError(f"no rebalance plan {plan_id}")
        summary = plan.summary
        moves = self.journal.moves(plan_id)
        now = time.time()
        steps: dict[str, int] = {}
        for move in moves:
            steps[move.step] = steps.get(move.step, 0) + 1
        pauses = sorted(m.pause_ms for m in moves if m.pause_ms is not None)
        return {
            "plan": plan_id, "state": plan.state, "created": plan.created,
            "moves": summary.get("moves", len(moves)), "bytes": summary.get("bytes", 0),
            "before": summary.get("before", {}), "after": summary.get("after", {}),
            "left_out": summary.get("left_out", []), "left_out_count": summary.get("left_out_count", 0),
            "steps": steps,
            "errors": {m.key: m.error for m in moves if m.error and m.step not in ("done", "completed", "cancelled")},
            "failed": {m.key: m.error for m in moves if m.step == "failed"},
            "rolled_back": summary.get("rolled_back", {}),
            "held": {m.key: {"owner": m.owner, "step": m.step, "until": m.lease} for m in moves
                     if not m.finished and m.owner is not None and m.lease > now},
            "pause_ms": {"p50": _percentile(pauses, 50), "p99": _percentile(pauses, 99),
                         "max": pauses[-1] if pauses else None},
        }


def _percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    index = min(len(values) - 1, max(0, round(pct / 100 * (len(values) - 1))))
    return values[index]
