""":class:`SqliteJournal`: the :class:`~shardlite.meta.journal.MoveJournal` in ``<root>/global.db``.

Tables ``_shardlite_rebalance`` and ``_shardlite_moves`` (created by :mod:`shardlite.files.catalog`). Every write
is one ``BEGIN IMMEDIATE`` on the global DB (:mod:`shardlite.files.globaldb`), which admits one writer at a time
for the whole file: that is what makes each read-check-write below atomic, and what keeps a
:meth:`~SqliteJournal.holding` block exclusive (its transaction stays open for the block).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import apsw

from ...core.movejournal import FINISHED, MAX_LISTED, LostClaim, MoveRow, PlanCancelled
from ...core.planning import Move
from ...errors import ConfigurationError
from ...files.authorizer import INTERNAL_SQL as _I
from ...files.catalog import TenantRecord
from ...files.globaldb import GlobalDB
from ..journal import MoveJournal, PlanRow, plain_plan, plain_text, step_fields, stored_error
from .tenants import SqliteTenants

__all__ = ["SqliteJournal"]

_COLUMNS = ("plan_id, key, source, target, source_generation, target_generation, size, step, owner, lease, "
            "error, pause_ms")
_PLAN = "SELECT id, created, state, fingerprint, summary FROM _shardlite_rebalance"
_CHECK = ("SELECT m.owner, m.lease, p.state FROM _shardlite_moves m JOIN _shardlite_rebalance p "
          "ON p.id = m.plan_id WHERE m.plan_id = ? AND m.key = ?")
_UNFINISHED = ("SELECT DISTINCT p.id FROM _shardlite_rebalance p JOIN _shardlite_moves m ON m.plan_id = p.id "
               f"WHERE p.state = ? AND m.step NOT IN ({', '.join('?' for _ in FINISHED)}) ORDER BY p.id DESC")


def _marks(values: Sequence[object]) -> str:
    return ", ".join("?" for _ in values)


def _plan(row: Sequence[Any]) -> PlanRow:
    return PlanRow(int(row[0]), float(row[1]), str(row[2]), str(row[3]), json.loads(row[4]))


class SqliteJournal:
    """The move journal in the global DB. ``tenants`` is the same global DB's tenant catalog (for
    :meth:`flip_held`, which joins the claim check and the flip in one transaction)."""

    def __init__(self, db: GlobalDB, tenants: SqliteTenants) -> None:
        self.db = db
        self._tenants = tenants

    # -- reading plans ---------------------------------------------------------------------------------

    def plans(self, limit: int = 20) -> list[PlanRow]:
        return [_plan(r) for r in self.db.read(f"{_PLAN} ORDER BY id DESC LIMIT ?", (limit,))]

    def latest_plan_id(self) -> int | None:
        rows = self.db.read("SELECT max(id) FROM _shardlite_rebalance")
        return None if rows[0][0] is None else int(rows[0][0])

    def plan(self, plan_id: int) -> PlanRow | None:
        rows = self.db.read(f"{_PLAN} WHERE id = ?", (plan_id,))
        return _plan(rows[0]) if rows else None

    def plan_state(self, plan_id: int) -> str | None:
        rows = self.db.read("SELECT state FROM _shardlite_rebalance WHERE id = ?", (plan_id,))
        return str(rows[0][0]) if rows else None

    def plan_row(self, plan_id: int | None, states: Sequence[str]) -> tuple[int, str, str]:
        states = tuple(states)
        if plan_id is None:
            rows = self.db.read(f"SELECT id, state, fingerprint FROM _shardlite_rebalance WHERE state IN "
                                f"({_marks(states)}) ORDER BY id DESC LIMIT 1", states)
        else:
            rows = self.db.read(f"SELECT id, state, fingerprint FROM _shardlite_rebalance WHERE id = ? AND state IN "
                                f"({_marks(states)})", (plan_id, *states))
        if not rows:
            wanted = " or ".join(states)
            raise ConfigurationError(f"no {wanted} rebalance plan{'' if plan_id is None else f' {plan_id}'} "
                                     "(`shardlite rebalance plan` makes one)")
        return int(rows[0][0]), str(rows[0][1]), str(rows[0][2])

    def unfinished_plans(self, state: str) -> list[int]:
        return [int(r[0]) for r in self.db.read(_UNFINISHED, (state, *FINISHED))]

    # -- reading moves ---------------------------------------------------------------------------------

    def moves(self, plan_id: int) -> list[MoveRow]:
        rows = self.db.read(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? ORDER BY source, key",
                            (plan_id,))
        return [MoveRow(*row) for row in rows]

    def move(self, plan_id: int, key: str) -> MoveRow | None:
        rows = self.db.read(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? AND key = ?",
                            (plan_id, key))
        return MoveRow(*rows[0]) if rows else None

    def lapsed_moves(self, key: str, now: float) -> list[int]:
        rows = self.db.read("SELECT plan_id FROM _shardlite_moves WHERE key = ? AND step IN ('copying', 'fenced', "
                            "'switched') AND (owner IS NULL OR lease < ?) ORDER BY plan_id", (key, now))
        return [int(r[0]) for r in rows]

    # -- writing plans ---------------------------------------------------------------------------------

    def create_plan(self, fingerprint: str, summary: dict[str, Any], moves: Sequence[Move]) -> int:
        plain_plan(fingerprint, moves)
        now = time.time()
        with self.db.write() as conn:
            # The refusals are checked inside the write (BEGIN IMMEDIATE): no apply can start in between.
            if conn.execute("SELECT 1 FROM _shardlite_rebalance WHERE state = 'applying' LIMIT 1").fetchall():
                raise ConfigurationError("a rebalance is being applied: `shardlite rebalance resume` or `cancel` "
                                         "it first")
            unfinished = conn.execute(_UNFINISHED, ("cancelled", *FINISHED)).fetchall()
            if unfinished:
                raise ConfigurationError(f"plan {unfinished[0][0]} was cancelled but some of its moves are not "
                                         "undone yet: run `shardlite rebalance cancel` again first")
            conn.execute(_I + "UPDATE _shardlite_rebalance SET state = 'superseded' WHERE state = 'planned'")
            conn.execute(_I + "INSERT INTO _shardlite_rebalance(created, state, fingerprint, summary) "
                         "VALUES (?, 'planned', ?, ?)", (now, fingerprint, json.dumps(summary)))
            plan_id = int(conn.last_insert_rowid())
            conn.executemany(_I + "INSERT INTO _shardlite_moves(plan_id, key, source, target, source_generation, "
                             "size, step, updated) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?)",
                             [(plan_id, m.key, m.source, m.target, m.generation, m.size, now) for m in moves])
        return plan_id

    def set_plan_state(self, plan_id: int, state: str, *, only_from: Sequence[str] = ()) -> bool:
        only_from = tuple(only_from)
        where = f" AND state IN ({_marks(only_from)})" if only_from else ""
        with self.db.write() as conn:
            conn.execute(_I + f"UPDATE _shardlite_rebalance SET state = ? WHERE id = ?{where}",
                         (state, plan_id, *only_from))
            return int(conn.changes()) == 1

    def note_rollback(self, plan_id: int, key: str, text: str) -> None:
        with self.db.write() as conn:
            rows: list[Any] = conn.execute("SELECT summary FROM _shardlite_rebalance WHERE id = ?",
                                           (plan_id,)).fetchall()
            if not rows:
                return
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
        plain_text(owner, "owner")
        with self.db.write() as conn:
            now = time.time()  # read once the write is ours: a claim that waited judges the lease now
            conn.execute(_I + "UPDATE _shardlite_moves SET owner = ?, lease = ?, updated = ?, "
                         "step = CASE step WHEN 'failed' THEN 'pending' ELSE step END, "
                         "error = CASE step WHEN 'failed' THEN NULL ELSE error END "
                         f"WHERE plan_id = ? AND key = ? AND step NOT IN ({_marks(FINISHED)}) "
                         "AND (owner IS NULL OR owner = ? OR lease < ?)",
                         (owner, now + lease, now, plan_id, key, *FINISHED, owner, now))
            if conn.changes() != 1:
                return None
            rows: list[Any] = conn.execute(f"SELECT {_COLUMNS} FROM _shardlite_moves WHERE plan_id = ? AND key = ?",
                                           (plan_id, key)).fetchall()
        return MoveRow(*rows[0])

    def release(self, move: MoveRow, owner: str) -> None:
        plain_text(owner, "owner")
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET owner = NULL, lease = 0 WHERE plan_id = ? AND key = ? "
                         "AND owner = ?", (move.plan_id, move.key, owner))
        if move.owner == owner:
            move.owner, move.lease = None, 0.0

    def record_error(self, move: MoveRow, owner: str, error: str) -> None:
        plain_text(owner, "owner")
        error = stored_error(error) or ""
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET error = ?, updated = ? WHERE plan_id = ? AND key = ? "
                         "AND owner = ?", (error, time.time(), move.plan_id, move.key, owner))
        move.error = error

    def renew(self, moves: Sequence[MoveRow], owner: str, lease: float) -> dict[str, str]:
        plain_text(owner, "owner")
        stop: dict[str, str] = {}
        with self.db.write() as conn:
            now = time.time()
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

    def check(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> None:
        plain_text(owner, "owner")
        _verdict(move, owner, self.db.read(_CHECK, (move.plan_id, move.key)), applying=applying, margin=margin)

    def set_step(self, move: MoveRow, owner: str, step: str, *, applying: bool, **fields: Any) -> None:
        fields = step_fields(step, owner, fields)
        sets = "".join(f", {name} = ?" for name in fields)
        with self.db.write() as conn:
            _check(conn, move, owner, applying=applying, margin=0.0)
            conn.execute(_I + f"UPDATE _shardlite_moves SET step = ?, updated = ?{sets} "
                         "WHERE plan_id = ? AND key = ? AND owner = ?",
                         (step, time.time(), *fields.values(), move.plan_id, move.key, owner))
        move.step = step
        for name, value in fields.items():
            setattr(move, name, value)

    @contextmanager
    def holding(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> Iterator[None]:
        # The write transaction stays open for the block: no other global writer (in any thread or
        # process) can commit meanwhile, so the checked claim and plan state hold until the block ends.
        plain_text(owner, "owner")
        with self.db.write() as conn:
            _check(conn, move, owner, applying=applying, margin=margin)
            yield

    def flip_held(self, move: MoveRow, owner: str, *, node: str, generation: int, from_generation: int,
                  incarnation: str | None = None) -> TenantRecord:
        plain_text(owner, "owner")
        with self.db.write() as conn:
            _check(conn, move, owner, applying=True, margin=0.0)
            # Nested in this write (a savepoint): the flip commits with the check or not at all. Active as well
            # as moving: a resume after an undo that crashed before journaling it finds the tenant active.
            return self._tenants.flip(move.key, from_generation=from_generation, node=node, generation=generation,
                                      expect_states=("active", "moving"), incarnation=incarnation)

    def cancel_unstarted(self, plan_id: int, owner: str) -> int:
        plain_text(owner, "owner")
        with self.db.write() as conn:
            now = time.time()
            conn.execute(_I + "UPDATE _shardlite_moves SET step = 'cancelled', owner = NULL, lease = 0, updated = ? "
                         "WHERE plan_id = ? AND step IN ('pending', 'failed') "
                         "AND (owner IS NULL OR owner = ? OR lease < ?)", (now, plan_id, owner, now))
            return int(conn.changes())

    def mark_completed(self, plan_id: int, key: str) -> bool:
        with self.db.write() as conn:
            conn.execute(_I + "UPDATE _shardlite_moves SET step = 'completed', updated = ? WHERE plan_id = ? "
                         "AND key = ? AND step = 'done'", (time.time(), plan_id, key))
            return int(conn.changes()) == 1


def _check(conn: apsw.Connection, move: MoveRow, owner: str, *, applying: bool, margin: float) -> None:
    _verdict(move, owner, conn.execute(_CHECK, (move.plan_id, move.key)).fetchall(), applying=applying,
             margin=margin)


def _verdict(move: MoveRow, owner: str, rows: Sequence[Any], *, applying: bool, margin: float) -> None:
    if not rows or rows[0][0] != owner or float(rows[0][1]) < time.time() + margin:
        raise LostClaim(f"another rebalancer took over the move of {move.key!r}")
    if applying and rows[0][2] != "applying":
        raise PlanCancelled(f"plan {move.plan_id} was cancelled while {move.key!r} was moving")


def _conforms(journal: SqliteJournal) -> MoveJournal:
    return journal  # mypy checks here that SqliteJournal satisfies the MoveJournal contract
