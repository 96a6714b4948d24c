"""The rebalance journal: plans and per-tenant move steps in the global DB (brief rule 12).

Tables (created by :mod:`shardlite.catalog`): ``_shardlite_rebalance`` holds one row per plan (state and a
JSON summary), ``_shardlite_moves`` one row per planned move (its step, its claim and its last error).

Steps are data (:data:`STEPS`): what each one means, whether the move is finished, whether the catalog
already points at the target (the commit point is passed). The forward path is
``pending -> copying -> fenced -> switched -> done``; ``failed`` and ``cancelled`` are moves that were
undone (tenant active at its source, unfenced, no partial copy left); ``skipped`` moves found their tenant
changed since the plan; ``completed`` is ``done`` with the retired source removed.

Claims. A rebalancer works on a move only while it holds the move's claim: ``owner`` names it and
``lease`` (a wall-clock time) says until when the claim holds. A live owner renews its leases (see
:mod:`shardlite.heartbeat`); a dead owner's lease lapses and another rebalancer may take the move over.
Every journal write of a step checks the claim in the same transaction (:class:`LostClaim` otherwise), and
forward steps also check that the plan is still being applied (:class:`PlanCancelled` otherwise).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import apsw

from .authorizer import INTERNAL_SQL as _I
from .errors import ConfigurationError, ShardliteError
from .globaldb import GlobalDB

__all__ = ["Step", "STEPS", "FINISHED", "MoveRow", "Journal", "LostClaim", "PlanCancelled", "MAX_LISTED"]


@dataclass(frozen=True, slots=True)
class Step:
    """One journaled step of a move."""

    name: str
    finished: bool    # nothing is left to do (apply, resume and cancel leave the move alone)
    committed: bool   # the catalog points at the target copy: the move can only go forward
    meaning: str


STEPS: dict[str, Step] = {s.name: s for s in (
    Step("pending", False, False, "planned; nothing done yet (the catalog is untouched)"),
    Step("copying", False, False, "a target generation is issued and the catalog says moving; the copy is "
                                  "made and verified, then the source is fenced"),
    Step("fenced", False, False, "the source carries the retired marker (frozen); the final copy, its link "
                                 "and the catalog flip are next"),
    Step("switched", False, True, "the catalog points at the target (the commit point)"),
    Step("done", True, True, "moved; the retired source stays until `rebalance complete`"),
    Step("failed", False, False, "an error stopped the move and it was undone; resume tries it again"),
    Step("skipped", True, False, "the tenant changed since the plan (dropped, restored, moved)"),
    Step("cancelled", True, False, "undone by cancel, or cancelled before it started"),
    Step("completed", True, True, "done, and the retired source removed"),
)}
FINISHED = tuple(name for name, step in STEPS.items() if step.finished)
#: Per-key lists kept in a plan's summary (left-out moves, rollbacks) stop growing past this many entries.
MAX_LISTED = 1000

_COLUMNS = ("plan_id, key, source, target, source_generation, target_generation, size, step, owner, lease, "
            "error, pause_ms")


@dataclass
class MoveRow:
    """One row of ``_shardlite_moves``."""

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

    @property
    def finished(self) -> bool:
        return STEPS[self.step].finished

    def held_by_other(self, owner: str, now: float) -> bool:
        """Claimed by another rebalancer whose lease has not lapsed."""
        return self.owner is not None and self.owner != owner and self.lease > now


class LostClaim(ShardliteError):
    """Another rebalancer took over a move whose lease ran out; this one stops working on it."""


class PlanCancelled(ShardliteError):
    """The move's plan was cancelled: its owner undoes it instead of going on."""


class Journal:
    """Reads and claim-checked writes of the journal tables. Thread-safe (the global DB is)."""

    def __init__(self, db: GlobalDB) -> None:
        self.db = db

    # -- reading ---------------------------------------------------------------------------------------

    def moves(self, plan_id: int) -> list[MoveRow]:
        rows = self.db.read(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? ORDER BY source, key",
                            (plan_id,))
        return [MoveRow(*row) for row in rows]

    def move(self, plan_id: int, key: str) -> MoveRow | None:
        rows = self.db.read(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? AND key = ?",
                            (plan_id, key))
        return MoveRow(*rows[0]) if rows else None

    def plan_state(self, plan_id: int) -> str:
        return str(self.db.read("SELECT state FROM _shardlite_rebalance WHERE id = ?", (plan_id,))[0][0])

    def plan_row(self, plan_id: int | None, states: tuple[str, ...]) -> tuple[int, str, str]:
        """``(id, state, fingerprint)`` of plan ``plan_id`` (or the newest) in one of ``states``."""
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

    def unfinished_plans(self, state: str) -> list[int]:
        """Plans in ``state`` that still have unfinished moves, newest first."""
        marks = ", ".join("?" for _ in FINISHED)
        rows = self.db.read(f"SELECT DISTINCT p.id FROM _shardlite_rebalance p JOIN _shardlite_moves m "
                            f"ON m.plan_id = p.id WHERE p.state = ? AND m.step NOT IN ({marks}) ORDER BY p.id DESC",
                            (state, *FINISHED))
        return [int(r[0]) for r in rows]

    def summary(self, plan_id: int) -> dict[str, Any]:
        row = self.db.read("SELECT summary FROM _shardlite_rebalance WHERE id = ?", (plan_id,))
        found: dict[str, Any] = json.loads(row[0][0]) if row else {}
        return found

    # -- plans -----------------------------------------------------------------------------------------

    def set_plan_state(self, plan_id: int, state: str, *, only_from: tuple[str, ...] = ()) -> None:
        where = "" if not only_from else f" AND state IN ({', '.join('?' for _ in only_from)})"
        with self.db.write() as conn:
            conn.execute(_I + f"UPDATE _shardlite_rebalance SET state = ? WHERE id = ?{where}",
                         (state, plan_id, *only_from))

    def note_rollback(self, plan_id: int, key: str, text: str) -> None:
        """Record in the plan's summary what was rolled back for ``key`` (the latest note per key)."""
        with self.db.write() as conn:
            rows: list[Any] = conn.execute("SELECT summary FROM _shardlite_rebalance WHERE id = ?",
                                           (plan_id,)).fetchall()
            summary = json.loads(rows[0][0])
            notes = summary.setdefault("rolled_back", {})
            if key in notes or len(notes) < MAX_LISTED:
                notes[key] = text
            else:
                summary["rolled_back_unlisted"] = summary.get("rolled_back_unlisted", 0) + 1
            conn.execute(_I + "UPDATE _shardlite_rebalance SET summary = ? WHERE id = ?",
                         (json.dumps(summary), plan_id))

    # -- claims ----------------------------------------------------------------------------------------

    def claim(self, plan_id: int, key: str, owner: str, lease: float) -> MoveRow | None:
        """Take the move unless another rebalancer holds a live lease on it or it is finished; the row as
        claimed, or None. A ``failed`` move is claimed back at ``pending`` (its error cleared): it was
        undone, so it starts again from the beginning."""
        now = time.time()
        marks = ", ".join("?" for _ in FINISHED)
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET owner = ?, lease = ?, updated = ?, "
                         "step = CASE step WHEN 'failed' THEN 'pending' ELSE step END, "
                         "error = CASE step WHEN 'failed' THEN NULL ELSE error END "
                         f"WHERE plan_id = ? AND key = ? AND step NOT IN ({marks}) "
                         "AND (owner IS NULL OR owner = ? OR lease < ?)",
                         (owner, now + lease, now, plan_id, key, *FINISHED, owner, now))
            if conn.changes() != 1:
                return None
            rows: list[Any] = conn.execute(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? AND key = ?",
                                           (plan_id, key)).fetchall()
        return MoveRow(*rows[0])

    def release(self, move: MoveRow, owner: str) -> None:
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET owner = NULL, lease = 0 WHERE plan_id = ? AND key = ? "
                         "AND owner = ?", (move.plan_id, move.key, owner))
        if move.owner == owner:
            move.owner, move.lease = None, 0.0

    def renew(self, moves: list[MoveRow], owner: str, lease: float) -> dict[str, str]:
        """Extend our leases on ``moves`` (one transaction). Returns ``{key: why}`` for the moves that must
        stop: ``"lost"`` (no longer ours) or ``"cancelled"`` (their plan was cancelled)."""
        now = time.time()
        stop: dict[str, str] = {}
        with self.db.write() as conn:
            for move in moves:
                conn.execute(_I + "UPDATE _shardlite_moves SET lease = ? WHERE plan_id = ? AND key = ? AND owner = ?",
                             (now + lease, move.plan_id, move.key, owner))
                if conn.changes() != 1:
                    stop[move.key] = "lost"
                    continue
                move.lease = now + lease
                state = conn.execute("SELECT state FROM _shardlite_rebalance WHERE id = ?",
                                     (move.plan_id,)).fetchall()
                if state[0][0] != "applying":
                    stop[move.key] = "cancelled"
        return stop

    @contextmanager
    def holding(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> Iterator[apsw.Connection]:
        """A global write transaction in which ``move`` is ours (its lease good for ``margin`` more seconds)
        and, when ``applying``, its plan is still being applied: actions that must not race a takeover or a
        cancel (linking the copy, the catalog flip) run inside it. Raises LostClaim or PlanCancelled."""
        with self.db.write() as conn:
            self._check(conn, move, owner, applying=applying, margin=margin)
            yield conn

    def check(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> None:
        """:meth:`holding` as a plain read (for checks inside another file's write lock)."""
        rows = self.db.read("SELECT m.owner, m.lease, p.state FROM _shardlite_moves m JOIN _shardlite_rebalance p "
                            "ON p.id = m.plan_id WHERE m.plan_id = ? AND m.key = ?", (move.plan_id, move.key))
        self._verdict(move, owner, rows, applying=applying, margin=margin)

    def _check(self, conn: apsw.Connection, move: MoveRow, owner: str, *, applying: bool, margin: float) -> None:
        rows = conn.execute("SELECT m.owner, m.lease, p.state FROM _shardlite_moves m JOIN _shardlite_rebalance p "
                            "ON p.id = m.plan_id WHERE m.plan_id = ? AND m.key = ?",
                            (move.plan_id, move.key)).fetchall()
        self._verdict(move, owner, rows, applying=applying, margin=margin)

    @staticmethod
    def _verdict(move: MoveRow, owner: str, rows: list[Any], *, applying: bool, margin: float) -> None:
        if not rows or rows[0][0] != owner or float(rows[0][1]) < time.time() + margin:
            raise LostClaim(f"another rebalancer took over the move of {move.key!r}")
        if applying and rows[0][2] != "applying":
            raise PlanCancelled(f"plan {move.plan_id} was cancelled while {move.key!r} was moving")

    def set_step(self, move: MoveRow, owner: str, step: str, *, applying: bool, **fields: Any) -> None:
        """Journal ``step`` (and ``fields``) for a move we hold; LostClaim or PlanCancelled (nothing written)
        when we no longer hold it or, with ``applying``, its plan is no longer being applied."""
        sets = "".join(f", {name} = ?" for name in fields)
        with self.db.write() as conn:
            self._check(conn, move, owner, applying=applying, margin=0.0)
            conn.execute(_I + f"UPDATE _shardlite_moves SET step = ?, updated = ?{sets} "
                         "WHERE plan_id = ? AND key = ? AND owner = ?",
                         (step, time.time(), *fields.values(), move.plan_id, move.key, owner))
        move.step = step
        for name, value in fields.items():
            setattr(move, name, value)

    def record_error(self, move: MoveRow, owner: str, error: str) -> None:
        """Keep ``error`` on a move we hold whose step stays as it is (an undo that could not finish)."""
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET error = ?, updated = ? WHERE plan_id = ? AND key = ? "
                         "AND owner = ?", (error, time.time(), move.plan_id, move.key, owner))
        move.error = error

    def cancel_unstarted(self, plan_id: int, owner: str) -> int:
        """Mark ``cancelled`` every move of the plan that has nothing to undo: ``pending`` (never started;
        the catalog is only touched once a move is at ``copying``) or ``failed`` (already undone), unless a
        live rebalancer holds it. Returns how many."""
        now = time.time()
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET step = 'cancelled', owner = NULL, lease = 0, updated = ? "
                         "WHERE plan_id = ? AND step IN ('pending', 'failed') "
                         "AND (owner IS NULL OR owner = ? OR lease < ?)", (now, plan_id, owner, now))
            return int(conn.changes())
