"""The contract of the move journal: :class:`MoveJournal` (``meta.journal``).

The journal is what makes rebalancing crash-safe (rules: crashes lose nothing acknowledged; failures stay in their
tenant and waits are bounded): one row per plan (its state and
a JSON summary) and one row per planned move (its step, its claim and its last error). Its rows and their
meaning (:class:`~shardlite.core.movejournal.MoveRow`, the steps in :data:`~shardlite.core.movejournal.STEPS`,
:data:`~shardlite.core.movejournal.FINISHED`) are backend-free and live in :mod:`shardlite.core.movejournal`; this
module says what every backend guarantees about storing them.

Rules every backend keeps:

* **Atomicity.** Each method is one atomic unit (one transaction) unless its docstring says otherwise.
  Reads return committed data. A method that raises wrote nothing.
* **Claims.** A rebalancer works on a move only while it holds the move's claim: ``owner`` names it and
  ``lease`` (a wall-clock time, seconds since the epoch) says until when it holds. Times are the client's
  ``time.time()``, read by the implementation once the unit holds its locks, after any wait (never the
  server's clock: the mover compares leases with its own clock). So a :meth:`MoveJournal.claim` that waited
  for a :meth:`MoveJournal.holding` block judges the lease as it is when the block ended. A claim is *live*
  for ``owner`` when the row's owner is ``owner`` and its lease is not before now (plus the ``margin`` asked
  for).
* **Compare-and-set losers.** :class:`~shardlite.core.movejournal.LostClaim` (the claim is not ours, or lapsed)
  and :class:`~shardlite.core.movejournal.PlanCancelled` (the plan is no longer being applied) are
  :class:`~shardlite.MetaConflict`: nothing was written. Methods whose CAS loss is routine say so and
  return ``None``, ``False`` or a count instead.
* **Order.** Moves are listed by ``(source, key)`` and keys compare by Unicode code point (PostgreSQL:
  ``COLLATE "C"``), never by a locale.
* **Text.** No stored text holds U+0000 (PostgreSQL cannot store it): an ``owner``, a ``fingerprint`` or a
  planned move's key or node holding one is refused with :class:`ValueError` before anything is written (by
  every backend alike); an error text (:meth:`MoveJournal.record_error`, ``set_step(..., error=...)``) is a
  diagnostic, so it is stored, and set on the ``move`` passed in, with each NUL replaced by U+FFFD
  (:func:`stored_error`). Keys never hold one (:mod:`shardlite.core.keys` refuses it), so a read or a claim
  asking for such a key finds nothing.
* **Plan ids** are positive, strictly increasing and never reused (PostgreSQL: an identity column).
* At most one plan is ``applying`` or ``planned`` at a time, and a ``planned`` one exists only while no
  plan is ``applying``: :meth:`MoveJournal.create_plan` and :meth:`MoveJournal.set_plan_state` keep this
  between concurrent callers (PostgreSQL: both take one transaction-level lock on the journal).

For a PostgreSQL implementer (READ COMMITTED, psycopg 3): the plan and move ids/keys are ``bigint`` and
``text COLLATE "C"``; :meth:`MoveJournal.create_plan` and :meth:`MoveJournal.set_plan_state` take one
``pg_advisory_xact_lock`` (else a concurrent apply can start between the "applying" check and the insert);
the claim-checked methods lock the move row ``FOR UPDATE`` first, then the plan row ``FOR SHARE``, then read
the clock and write (one lock order everywhere; a deadlock or serialisation failure is retried inside the
method, never surfaced as a conflict); :meth:`MoveJournal.holding` keeps that transaction (and its
connection) open for the block; :meth:`MoveJournal.flip_held` adds the tenant ``UPDATE ... WHERE
generation = %s RETURNING`` to it; :meth:`MoveJournal.note_rollback` locks the plan row ``FOR UPDATE``.

Plan states: ``planned`` -> ``applying`` -> ``done`` -> ``completed``; ``planned`` -> ``superseded`` (a newer
plan was made); ``planned`` or ``applying`` -> ``cancelled`` -> ``completed``.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..core.movejournal import STEPS, MoveRow
from ..core.planning import Move

if TYPE_CHECKING:  # catalog imports accounts, which imports this package: a type-only import breaks the cycle
    from ..files.catalog import TenantRecord

__all__ = ["MoveJournal", "PlanRow", "PLAN_STATES", "STEP_FIELDS", "plain_plan", "plain_text", "step_fields",
           "stored_error"]

#: Every state a plan can be in.
PLAN_STATES = ("planned", "applying", "done", "cancelled", "completed", "superseded")
#: The move fields :meth:`MoveJournal.set_step` may set along with the step.
STEP_FIELDS = ("target_generation", "error", "pause_ms")


def plain_text(value: str, what: str) -> str:
    """``value`` if it holds no NUL (U+0000); else :class:`ValueError` naming ``what`` (see "Text")."""
    if "\0" in value:
        raise ValueError(f"the {what} contains U+0000 (NUL), which cannot be stored")
    return value


def stored_error(text: str | None) -> str | None:
    """An error text as every backend stores it: each NUL replaced by U+FFFD (see "Text")."""
    return None if text is None else text.replace("\0", "\ufffd")


def step_fields(step: str, owner: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The checked arguments of :meth:`~shardlite.meta.journal.MoveJournal.set_step` (every backend's):
    ``fields`` with the error text as stored; :class:`ValueError` for an unknown step or field, or a NUL in
    ``owner``."""
    plain_text(owner, "owner")
    if step not in STEPS:
        raise ValueError(f"unknown move step {step!r}")
    unknown = sorted(set(fields) - set(STEP_FIELDS))
    if unknown:
        raise ValueError(f"set_step cannot set {', '.join(unknown)} (only {', '.join(STEP_FIELDS)})")
    if fields.get("error") is not None:
        fields = fields | {"error": stored_error(fields["error"])}
    return fields


def plain_plan(fingerprint: str, moves: Sequence[Move]) -> None:
    """:class:`ValueError` when the plan's text holds a NUL (see "Text")."""
    plain_text(fingerprint, "plan fingerprint")
    for move in moves:
        plain_text(move.key, "planned key")
        plain_text(move.source, "planned source node")
        plain_text(move.target, "planned target node")


@dataclass(frozen=True, slots=True)
class PlanRow:
    """One plan: ``created`` is a ``time.time()``; ``summary`` the JSON object given to ``create_plan``
    (plus the ``rolled_back`` notes)."""

    id: int
    created: float
    state: str
    fingerprint: str
    summary: dict[str, Any] = field(hash=False, compare=False)


class MoveJournal(Protocol):
    """Plans and claim-checked move steps. Thread-safe, and safe between processes sharing the store."""

    # -- reading plans ---------------------------------------------------------------------------------

    def plans(self, limit: int = 20) -> list[PlanRow]:
        """The newest ``limit`` plans, newest (highest id) first."""
        ...

    def latest_plan_id(self) -> int | None:
        """The highest plan id, whatever its state; None when no plan was ever made."""
        ...

    def plan(self, plan_id: int) -> PlanRow | None:
        """Plan ``plan_id``, or None when there is none."""
        ...

    def plan_state(self, plan_id: int) -> str | None:
        """Plan ``plan_id``'s state (cheaper than :meth:`plan`: no summary), or None when there is none."""
        ...

    def plan_row(self, plan_id: int | None, states: Sequence[str]) -> tuple[int, str, str]:
        """``(id, state, fingerprint)`` of plan ``plan_id``, or of the newest plan when ``plan_id`` is None,
        among the plans in one of ``states``. Raises :class:`~shardlite.ConfigurationError` ("no ...
        rebalance plan") when there is none."""
        ...

    def unfinished_plans(self, state: str) -> list[int]:
        """Ids of the plans in ``state`` that have at least one move whose step is not finished
        (:data:`~shardlite.core.movejournal.FINISHED`), newest first."""
        ...

    # -- reading moves ---------------------------------------------------------------------------------

    def moves(self, plan_id: int) -> list[MoveRow]:
        """Every move of the plan (none for an unknown plan), ordered by ``(source, key)`` in code points."""
        ...

    def move(self, plan_id: int, key: str) -> MoveRow | None:
        """The move of ``key`` in the plan, or None."""
        ...

    def lapsed_moves(self, key: str, now: float) -> list[int]:
        """Ids of the plans holding a move of ``key`` past its start and before its end (step ``copying``,
        ``fenced`` or ``switched``) that nobody holds: unowned, or its lease before ``now``. Ascending."""
        ...

    # -- writing plans ---------------------------------------------------------------------------------

    def create_plan(self, fingerprint: str, summary: dict[str, Any], moves: Sequence[Move]) -> int:
        """Record a new ``planned`` plan with its moves (each ``pending``, unowned, lease 0) and return its
        id; every older ``planned`` plan becomes ``superseded``. One atomic unit.

        Refused with :class:`~shardlite.ConfigurationError` (nothing written) when, inside that unit, a plan
        is ``applying``, or a ``cancelled`` plan still has unfinished moves: the check and the insert cannot
        be separated by a concurrent :meth:`set_plan_state` or :meth:`create_plan`."""
        ...

    def set_plan_state(self, plan_id: int, state: str, *, only_from: Sequence[str] = ()) -> bool:
        """Set the plan's state, compare-and-set on its current state being one of ``only_from`` (any
        state when empty). True when it changed; False when the plan is missing or the CAS lost (nothing
        written). Callers check the result."""
        ...

    def note_rollback(self, plan_id: int, key: str, text: str) -> None:
        """Record in the plan's summary what an undo rolled back for ``key`` (``summary["rolled_back"][key]``,
        the latest note per key; past :data:`~shardlite.core.movejournal.MAX_LISTED` keys only
        ``summary["rolled_back_unlisted"]`` counts them). An atomic read-modify-write: concurrent notes
        on one plan are all kept. A missing plan: nothing happens."""
        ...

    # -- claims ----------------------------------------------------------------------------------------

    def claim(self, plan_id: int, key: str, owner: str, lease: float) -> MoveRow | None:
        """Take the move for ``owner`` until now + ``lease`` seconds, compare-and-set on: the move is not
        finished, and it is unowned, already ``owner``'s, or its lease is before now. A ``failed`` move is
        claimed back at ``pending`` with its error cleared. Returns the row as claimed; None (nothing
        written) when the CAS lost or there is no such move. Of concurrent claimers exactly one wins."""
        ...

    def release(self, move: MoveRow, owner: str) -> None:
        """Give up the claim (owner None, lease 0) if ``owner`` holds it; silent otherwise. Updates
        ``move`` in place when it was ``owner``'s."""
        ...

    def record_error(self, move: MoveRow, owner: str, error: str) -> None:
        """Keep ``error`` on the move (its step unchanged) if ``owner`` holds it (even lapsed); silent
        otherwise. Sets ``move.error``."""
        ...

    def renew(self, moves: Sequence[MoveRow], owner: str, lease: float) -> dict[str, str]:
        """Extend ``owner``'s leases on ``moves`` to now + ``lease`` (one atomic unit for all of them),
        wherever ``owner`` still holds the move, even lapsed.
        Returns ``{key: why}`` for the moves that must stop: ``"lost"`` (another owner, or unowned: that
        lease is not extended) or ``"cancelled"`` (extended, but the plan is no longer ``applying``).
        Updates ``move.lease`` in place for the extended ones."""
        ...

    def check(self, move: MoveRow, owner: str, *, applying: bool, margin: float = 0.0) -> None:
        """Raise :class:`~shardlite.core.movejournal.LostClaim` unless ``owner`` holds the move with its lease
        good for ``margin`` more seconds, then, with ``applying``,
        :class:`~shardlite.core.movejournal.PlanCancelled` unless its plan is ``applying``. A plain read (it
        runs inside a tenant file's write lock)."""
        ...

    def set_step(self, move: MoveRow, owner: str, step: str, *, applying: bool, **fields: Any) -> None:
        """Journal ``step`` (one of :data:`~shardlite.core.movejournal.STEPS`) and ``fields`` (names from
        :data:`STEP_FIELDS`; else :class:`ValueError`) for a move ``owner`` holds: the :meth:`check` (margin
        0) and the update are one atomic unit (PostgreSQL: the move row ``FOR UPDATE``, the plan row
        ``FOR SHARE``), so a cancel or takeover cannot commit between them. Raises LostClaim or
        PlanCancelled with nothing written. Updates ``move`` in place."""
        ...

    def holding(self, move: MoveRow, owner: str, *, applying: bool,
                margin: float = 0.0) -> AbstractContextManager[None]:
        """A block during which the move is ``owner``'s (and, with ``applying``, its plan applying), for
        file actions that must not race a takeover or a cancel (linking a copy, removing a target). The
        :meth:`check` runs on entry (LostClaim or PlanCancelled, the block not run) and its result is kept
        locked until the block ends: a concurrent :meth:`claim`, :meth:`set_step`, :meth:`renew`,
        :meth:`flip_held`, :meth:`cancel_unstarted`, ``set_plan_state(..., "cancelled")`` or ``holding``
        on this move, from any thread or process, waits until then (SQLite: the global write transaction
        is held; PostgreSQL: one transaction with the rows locked). The block must be short and must not
        call the metadata store itself."""
        ...

    def flip_held(self, move: MoveRow, owner: str, *, node: str, generation: int, from_generation: int,
                  incarnation: str | None = None) -> TenantRecord:
        """The commit point of a move: the :meth:`check` (``applying``) and the catalog flip of
        ``move.key`` to ``node``/``generation`` in ONE atomic unit. The flip is a compare-and-set on the
        tenant's generation being ``from_generation`` and its state ``active`` or ``moving`` (a resume after
        an undo that crashed before journaling it finds the tenant active again): it makes it ``active`` at the new
        generation, ``epoch`` + 1, and takes ``incarnation`` when given. Returns the tenant as flipped.
        Raises LostClaim, PlanCancelled, or :class:`~shardlite.MetaConflict` when the generation moved
        on; nothing written in all three cases."""
        ...

    def cancel_unstarted(self, plan_id: int, owner: str) -> int:
        """Mark ``cancelled`` (unowned, lease 0) every move of the plan at ``pending`` or ``failed`` that
        is unowned, ``owner``'s, or lapsed: they have nothing to undo. Returns how many."""
        ...

    def mark_completed(self, plan_id: int, key: str) -> bool:
        """``done`` -> ``completed`` for the move (its retired source is removed): compare-and-set on the
        step being ``done``; True when it changed, False otherwise (idempotent: a re-run is False)."""
        ...
