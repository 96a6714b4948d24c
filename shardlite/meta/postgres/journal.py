""":class:`PgJournal`: the :class:`~shardlite.meta.journal.MoveJournal` in ``shardlite.plans`` and
``shardlite.moves`` (and, for :meth:`PgJournal.flip_held`, ``shardlite.tenants``).

PostgreSQL at READ COMMITTED has no global writer to serialise on, so each compare-and-set is made atomic
by the server itself:

* ``create_plan`` and ``set_plan_state`` take one transaction-level advisory lock (:data:`LOCK_KEY`): the
  "no plan is applying" check and the insert cannot be split by a concurrent apply;
* the claim-checked methods (``claim``, ``set_step``, ``renew``, ``holding``, ``flip_held``,
  ``cancel_unstarted``) lock the move rows ``FOR UPDATE`` first (several: in ``(plan_id, key)`` order), then,
  where the plan's state matters, the plan row ``FOR SHARE``; only then do they read ``time.time()`` (a call
  that waited judges the lease after its wait) and write. A ``set_plan_state`` (an ``UPDATE`` of the plan
  row) therefore waits for a ``holding`` block, and so does anything locking the same move;
* ``note_rollback`` locks the plan row ``FOR UPDATE`` for its read-modify-write;
* single-row compare-and-sets whose condition reads no clock (``release``, ``record_error``,
  ``mark_completed``) are one conditional ``UPDATE`` (READ COMMITTED re-checks the condition after a wait).

Plan rows are locked after move rows and nowhere before them, so these locks form no cycle; a deadlock
(40P01) or serialisation failure (40001) that happens anyway (several moves locked against another
transaction's order) is retried inside the method (:func:`_retrying`), never surfaced.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import Connection

from ...core.movejournal import FINISHED, MAX_LISTED, LostClaim, MoveRow, PlanCancelled
from ...core.planning import Move
from ...errors import ConfigurationError, MetaConflict
from ...files.catalog import TenantRecord
from ..journal import MoveJournal, PlanRow, plain_plan, plain_text, step_fields, stored_error
from .connect import Pool
from .txn import ATTEMPTS, RETRYABLE, gave_up, in_transaction, pause

__all__ = ["PgJournal", "LOCK_KEY"]

#: The advisory lock ``create_plan`` and ``set_plan_state`` serialise on ("SHJRNL").
LOCK_KEY = 0x5348_4A52_4E4C

_COLUMNS = ("plan_id, key, source, target, source_generation, target_generation, size, step, owner, lease, "
            "error, pause_ms")
_PLAN = "SELECT id, created, state, fingerprint, summary FROM shardlite.plans WHERE root_id = %s"
_TENANT = "key, node, generation, epoch, state, incarnation, schema_version, created"
_UNFINISHED = ("SELECT DISTINCT p.id FROM shardlite.plans p JOIN shardlite.moves m ON m.plan_id = p.id "
               "WHERE p.root_id = %s AND p.state = %s AND m.step <> ALL(%s) ORDER BY p.id DESC")

T = TypeVar("T")
Conn = Connection[Any]


def _plan(row: Sequence[Any]) -> PlanRow:
    return PlanRow(int(row[0]), float(row[1]), str(row[2]), str(row[3]), json.loads(row[4]))


def _record(row: Sequence[Any]) -> TenantRecord:
    key, node, generation, epoch, state, incarnation, schema_version, created = row
    return TenantRecord(str(key), str(node), int(generation), int(epoch), str(state), str(incarnation),
                        int(schema_version), float(created))


class PgJournal:
    """The move journal of root ``root_id`` in the database behind ``pool``: its plans carry the root's id
    (schema version 6), so roots sharing a database plan, apply and cancel their rebalances independently
    and never see each other's plans (a plan id of another root is unknown here). Plan creation and state
    changes serialise on one advisory lock for the whole database (:data:`LOCK_KEY`)."""

    def __init__(self, pool: Pool, root_id: str) -> None:
        self.pool, self.root_id = pool, root_id

    def _unit(self, body: Callable[[Conn], T]) -> T:
        """``body`` in one transaction on a pooled connection, retried on a deadlock or serialisation
        failure (each attempt a fresh transaction)."""
        return in_transaction(self.pool, body)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement, no explicit transaction (one round trip)."""
        with self.pool.connection() as conn:
            return conn.execute(sql, params).fetchall()

    # -- reading plans ---------------------------------------------------------------------------------

    def plans(self, limit: int = 20) -> list[PlanRow]:
        return [_plan(r) for r in self._read(f"{_PLAN} ORDER BY id DESC LIMIT %s",
                                             (self.root_id, limit if limit >= 0 else None))]

    def latest_plan_id(self) -> int | None:
        rows = self._read("SELECT max(id) FROM shardlite.plans WHERE root_id = %s", (self.root_id,))
        return None if rows[0][0] is None else int(rows[0][0])

    def plan(self, plan_id: int) -> PlanRow | None:
        rows = self._read(f"{_PLAN} AND id = %s", (self.root_id, plan_id))
        return _plan(rows[0]) if rows else None

    def plan_state(self, plan_id: int) -> str | None:
        rows = self._read("SELECT state FROM shardlite.plans WHERE root_id = %s AND id = %s",
                          (self.root_id, plan_id))
        return str(rows[0][0]) if rows else None

    def plan_row(self, plan_id: int | None, states: Sequence[str]) -> tuple[int, str, str]:
        states = list(states)
        if plan_id is None:
            rows = self._read("SELECT id, state, fingerprint FROM shardlite.plans WHERE root_id = %s "
                              "AND state = ANY(%s) ORDER BY id DESC LIMIT 1", (self.root_id, states))
        else:
            rows = self._read("SELECT id, state, fingerprint FROM shardlite.plans WHERE root_id = %s AND id = %s "
                              "AND state = ANY(%s)", (self.root_id, plan_id, states))
        if not rows:
            wanted = " or ".join(states)
            raise ConfigurationError(f"no {wanted} rebalance plan{'' if plan_id is None else f' {plan_id}'} "
                                     "(`shardlite rebalance plan` makes one)")
        return int(rows[0][0]), str(rows[0][1]), str(rows[0][2])

    def unfinished_plans(self, state: str) -> list[int]:
        return [int(r[0]) for r in self._read(_UNFINISHED, (self.root_id, state, list(FINISHED)))]

    # -- reading moves ---------------------------------------------------------------------------------

    def moves(self, plan_id: int) -> list[MoveRow]:
        rows = self._read(f"SELECT {_COLUMNS} FROM shardlite.moves WHERE plan_id = %s ORDER BY source, key",
                          (plan_id,))
        return [MoveRow(*row) for row in rows]

    def move(self, plan_id: int, key: str) -> MoveRow | None:
        if "\0" in key:
            return None
        rows = self._read(f"SELECT {_COLUMNS} FROM shardlite.moves WHERE plan_id = %s AND key = %s",
                          (plan_id, key))
        return MoveRow(*rows[0]) if rows else None

    def lapsed_moves(self, key: str, now: float) -> list[int]:
        if "\0" in key:
            return []
        rows = self._read("SELECT plan_id FROM shardlite.moves WHERE key = %s AND step IN ('copying', 'fenced', "
                          "'switched') AND (owner IS NULL OR lease < %s) ORDER BY plan_id", (key, now))
        return [int(r[0]) for r in rows]

    # -- writing plans ---------------------------------------------------------------------------------

    def create_plan(self, fingerprint: str, summary: dict[str, Any], moves: Sequence[Move]) -> int:
        plain_plan(fingerprint, moves)
        text = json.dumps(summary)

        def body(conn: Conn) -> int:
            # Under the journal lock: no set_plan_state can start an apply between the check and the insert.
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            now = time.time()
            if conn.execute("SELECT 1 FROM shardlite.plans WHERE root_id = %s AND state = 'applying' LIMIT 1",
                            (self.root_id,)).fetchone():
                raise ConfigurationError("a rebalance is being applied: `shardlite rebalance resume` or `cancel` "
                                         "it first")
            unfinished = conn.execute(_UNFINISHED, (self.root_id, "cancelled", list(FINISHED))).fetchone()
            if unfinished:
                raise ConfigurationError(f"plan {unfinished[0]} was cancelled but some of its moves are not "
                                         "undone yet: run `shardlite rebalance cancel` again first")
            conn.execute("UPDATE shardlite.plans SET state = 'superseded' WHERE root_id = %s AND state = 'planned'",
                         (self.root_id,))
            row = conn.execute("INSERT INTO shardlite.plans(root_id, created, state, fingerprint, summary) "
                               "VALUES (%s, %s, 'planned', %s, %s) RETURNING id",
                               (self.root_id, now, fingerprint, text)).fetchone()
            assert row is not None
            plan_id = int(row[0])
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO shardlite.moves(plan_id, key, source, target, source_generation, "
                                "size, step, updated) VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s)",
                                [(plan_id, m.key, m.source, m.target, m.generation, m.size, now) for m in moves])
            return plan_id

        return self._unit(body)

    def set_plan_state(self, plan_id: int, state: str, *, only_from: Sequence[str] = ()) -> bool:
        only = list(only_from)
        where = " AND state = ANY(%s)" if only else ""

        def body(conn: Conn) -> bool:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            # The UPDATE waits for a holding block's FOR SHARE on the plan row, then re-checks the state.
            return conn.execute(f"UPDATE shardlite.plans SET state = %s WHERE root_id = %s AND id = %s{where} "
                                "RETURNING id", (state, self.root_id, plan_id, *([only] if only else []))
                                ).fetchone() is not None

        return self._unit(body)

    def note_rollback(self, plan_id: int, key: str, text: str) -> None:
        def body(conn: Conn) -> None:
            row = conn.execute("SELECT summary FROM shardlite.plans WHERE id = %s FOR UPDATE",
                               (plan_id,)).fetchone()
            if row is None:
                return
            summary = json.loads(row[0])
            notes = summary.setdefault("rolled_back", {})
            if key in notes or len(notes) < MAX_LISTED:
                notes[key] = text
            else:
                summary["rolled_back_unlisted"] = summary.get("rolled_back_unlisted", 0) + 1
            conn.execute("UPDATE shardlite.plans SET summary = %s WHERE id = %s", (json.dumps(summary), plan_id))

        self._unit(body)

    # -- claims ----------------------------------------------------------------------------------------

    def claim(self, plan_id: int, key: str, owner: str, lease: float) -> MoveRow | None:
        plain_text(owner, "owner")
        if "\0" in key:
            return None

        def body(conn: Conn) -> MoveRow | None:
            if not conn.execute("SELECT 1 FROM shardlite.moves WHERE plan_id = %s AND key = %s FOR UPDATE",
                                (plan_id, key)).fetchone():
                return None
            now = time.time()  # read once the row is ours: a claim that waited judges the lease now
            row = conn.execute("UPDATE shardlite.moves SET owner = %s, lease = %s, updated = %s, "
                               "step = CASE step WHEN 'failed' THEN 'pending' ELSE step END, "
                               "error = CASE step WHEN 'failed' THEN NULL ELSE error END "
                               "WHERE plan_id = %s AND key = %s AND step <> ALL(%s) "
                               f"AND (owner IS NULL OR owner = %s OR lease < %s) RETURNING {_COLUMNS}",
                               (owner, now + lease, now, plan_id, key, list(FINISHED), owner, now)).fetchone()
            return None if row is None else MoveRow(*row)

        return self._unit(body)

    def release(self, move: MoveRow, owner: str) -> None:
        plain_text(owner, "owner")
        with self.pool.connection() as conn:
            conn.execute("UPDATE shardlite.moves SET owner = NULL, lease = 0 WHERE plan_id = %s AND key = %s "
                         "AND owner = %s", (move.plan_id, move.key, owner))
        if move.owner == owner:
            move.owner, move.lease = None, 0.0

    def record_error(self, move: MoveRow, owner: str, error: str) -> None:
        plain_text(owner, "owner")
        error = stored_error(error) or ""
        with self.pool.connection() as conn:
            conn.execute("UPDATE shardlite.moves SET error = %s, updated = %s WHERE plan_id = %s AND key = %s "
                         "AND owner = %s", (error, time.time(), move.plan_id, move.key, owner))
        move.error = error

    def renew(self, moves: Sequence[MoveRow], owner: str, lease: float) -> dict[str, str]:
        plain_text(owner, "owner")
        if not moves:
            return {}
        wanted = sorted({(m.plan_id, m.key) for m in moves})

        def body(conn: Conn) -> tuple[float, set[tuple[int, str]], dict[int, str]]:
            # Every move row first, in one order, then the plan rows: the order every claim check keeps.
            held = conn.execute(
                "SELECT m.plan_id, m.key, m.owner FROM shardlite.moves m "
                "JOIN unnest(%s::bigint[], %s::text[]) AS w(plan_id, key) ON m.plan_id = w.plan_id "
                "AND m.key = w.key ORDER BY m.plan_id, m.key FOR UPDATE OF m",
                ([p for p, _ in wanted], [k for _, k in wanted])).fetchall()
            ours = {(int(p), str(k)) for p, k, o in held if o == owner}
            plan_ids = sorted({p for p, _ in ours})
            states = {int(i): str(s) for i, s in conn.execute(
                "SELECT id, state FROM shardlite.plans WHERE id = ANY(%s) ORDER BY id FOR SHARE",
                (plan_ids,)).fetchall()}
            now = time.time()
            if ours:
                conn.execute("UPDATE shardlite.moves m SET lease = %s "
                             "FROM unnest(%s::bigint[], %s::text[]) AS w(plan_id, key) "
                             "WHERE m.plan_id = w.plan_id AND m.key = w.key",
                             (now + lease, [p for p, _ in ours], [k for _, k in ours]))
            return now, ours, states

        now, ours, states = self._unit(body)
        stop: dict[str, str] = {}
        for move in moves:
            if (move.plan_id, move.key) not in ours:
                stop[move.key] = "lost"
                continue
            move.lease = now + lease
            if states.get(move.plan_id) != "applying":
                stop[move.key] = "cancelled"
        return stop

    def check(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> None:
        plain_text(owner, "owner")
        row = self._read("SELECT m.owner, m.lease, p.state FROM shardlite.moves m JOIN shardlite.plans p "
                         "ON p.id = m.plan_id WHERE m.plan_id = %s AND m.key = %s", (move.plan_id, move.key))
        _verdict(move, owner, row[0] if row else None, applying=applying, margin=margin)

    def set_step(self, move: MoveRow, owner: str, step: str, *, applying: bool, **fields: Any) -> None:
        fields = step_fields(step, owner, fields)
        sets = "".join(f", {name} = %s" for name in fields)  # names checked against STEP_FIELDS

        def body(conn: Conn) -> None:
            _locked_check(conn, move, owner, applying=applying, margin=0.0)
            conn.execute(f"UPDATE shardlite.moves SET step = %s, updated = %s{sets} "
                         "WHERE plan_id = %s AND key = %s AND owner = %s",
                         (step, time.time(), *fields.values(), move.plan_id, move.key, owner))

        self._unit(body)
        move.step = step
        for name, value in fields.items():
            setattr(move, name, value)

    @contextmanager
    def holding(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> Iterator[None]:
        # One transaction (and its connection) stays open for the block, with the move row FOR UPDATE and
        # the plan row FOR SHARE: a claim, step, renew, flip, cancel or holding of this move waits until then.
        plain_text(owner, "owner")
        for attempt in range(ATTEMPTS):
            entered = False
            try:
                with self.pool.connection() as conn, conn.transaction():
                    _locked_check(conn, move, owner, applying=applying, margin=margin)
                    entered = True
                    yield
                return
            except RETRYABLE as exc:
                if entered:
                    raise
                if attempt == ATTEMPTS - 1:
                    raise gave_up(exc) from None
            pause(attempt)

    def flip_held(self, move: MoveRow, owner: str, *, node: str, generation: int, from_generation: int,
                  incarnation: str | None = None) -> TenantRecord:
        plain_text(owner, "owner")
        if "\0" in node:  # names no node (as in PgTenants.flip)
            raise ConfigurationError(f"tenant {move.key!r} cannot be placed on node {node!r}: no such node")
        if incarnation is not None:
            plain_text(incarnation, "incarnation")

        def body(conn: Conn) -> TenantRecord:
            _locked_check(conn, move, owner, applying=True, margin=0.0)
            try:
                row = conn.execute(
                    "UPDATE shardlite.tenants SET node = %s, generation = %s, epoch = epoch + 1, state = 'active', "
                    "updated = %s, incarnation = coalesce(%s, incarnation) WHERE key = %s AND generation = %s "
                    f"AND state IN ('active', 'moving') RETURNING {_TENANT}",
                    (node, generation, time.time(), incarnation, move.key, from_generation)).fetchone()
            except psycopg.IntegrityError as exc:
                raise _flip_refused(exc, move.key, node, generation) from None
            if row is None:
                found = conn.execute("SELECT generation, state FROM shardlite.tenants WHERE key = %s",
                                     (move.key,)).fetchone()
                what = "no row" if found is None else f"generation {found[0]}, state {found[1]}"
                raise MetaConflict(f"tenant {move.key!r} changed meanwhile: expected generation {from_generation} "
                                   f"in state active or moving, found {what}; nothing was written")
            return _record(row)

        return self._unit(body)

    def cancel_unstarted(self, plan_id: int, owner: str) -> int:
        plain_text(owner, "owner")

        def body(conn: Conn) -> int:
            keys = [str(r[0]) for r in conn.execute(
                "SELECT key FROM shardlite.moves WHERE plan_id = %s AND step IN ('pending', 'failed') "
                "ORDER BY key FOR UPDATE", (plan_id,)).fetchall()]
            if not keys:
                return 0
            now = time.time()
            return len(conn.execute(
                "UPDATE shardlite.moves SET step = 'cancelled', owner = NULL, lease = 0, updated = %s "
                "WHERE plan_id = %s AND key = ANY(%s) AND step IN ('pending', 'failed') "
                "AND (owner IS NULL OR owner = %s OR lease < %s) RETURNING key",
                (now, plan_id, keys, owner, now)).fetchall())

        return self._unit(body)

    def mark_completed(self, plan_id: int, key: str) -> bool:
        if "\0" in key:
            return False
        with self.pool.connection() as conn:
            return conn.execute("UPDATE shardlite.moves SET step = 'completed', updated = %s WHERE plan_id = %s "
                                "AND key = %s AND step = 'done' RETURNING key",
                                (time.time(), plan_id, key)).fetchone() is not None


def _locked_check(conn: Conn, move: MoveRow, owner: str, *, applying: bool, margin: float) -> None:
    """The claim check inside a unit: the move row ``FOR UPDATE``, then its plan row ``FOR SHARE`` (the one
    lock order), then the clock."""
    found = conn.execute("SELECT owner, lease FROM shardlite.moves WHERE plan_id = %s AND key = %s FOR UPDATE",
                         (move.plan_id, move.key)).fetchone()
    state = conn.execute("SELECT state FROM shardlite.plans WHERE id = %s FOR SHARE", (move.plan_id,)).fetchone()
    row = None if found is None or state is None else (found[0], found[1], state[0])
    _verdict(move, owner, row, applying=applying, margin=margin)


def _verdict(move: MoveRow, owner: str, row: Sequence[Any] | None, *, applying: bool, margin: float) -> None:
    if row is None or row[0] != owner or float(row[1]) < time.time() + margin:
        raise LostClaim(f"another rebalancer took over the move of {move.key!r}")
    if applying and row[2] != "applying":
        raise PlanCancelled(f"plan {move.plan_id} was cancelled while {move.key!r} was moving")


def _flip_refused(exc: psycopg.IntegrityError, key: str, node: str, generation: int) -> Exception:
    """The contract's error for a constraint ``shardlite.tenants`` refused, by constraint name."""
    name = exc.diag.constraint_name
    if name == "tenants_node_fkey":
        return ConfigurationError(f"tenant {key!r} cannot be placed on node {node!r}: no such node")
    if name == "tenants_generation_key":
        return ValueError(f"tenant {key!r}: generation {generation} is already used; allocate one")
    return exc


def _conforms(journal: PgJournal) -> MoveJournal:
    return journal  # mypy checks here that PgJournal satisfies the MoveJournal contract
