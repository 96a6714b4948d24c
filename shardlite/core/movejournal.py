"""The rebalance journal's rows and steps: plans and per-tenant move steps (rules: crashes lose nothing acknowledged).

The journal is stored by the metadata backend (``store.meta.journal``; its contract is
:class:`shardlite.meta.journal.MoveJournal`): one row per plan (state and a JSON summary), one row per
planned move (:class:`MoveRow`: its step, its claim and its last error). This module holds what does not
depend on the backend: the steps, the row type and the errors of a lost claim.

Steps are data (:data:`STEPS`): what each one means, whether the move is finished, whether the catalog
already points at the target (the commit point is passed). The forward path is
``pending -> copying -> fenced -> switched -> done``; ``failed`` and ``cancelled`` are moves that were
undone (tenant active at its source, unfenced, no partial copy left); ``skipped`` moves found their tenant
changed since the plan; ``completed`` is ``done`` with the retired source removed.

Claims. A rebalancer works on a move only while it holds the move's claim: ``owner`` names it and
``lease`` (a wall-clock time) says until when the claim holds. A live owner renews its leases (see
:mod:`shardlite.services.heartbeat`); a dead owner's lease lapses and another rebalancer may take the move over.
Every journal write of a step checks the claim in the same transaction (:class:`LostClaim` otherwise), and
forward steps also check that the plan is still being applied (:class:`PlanCancelled` otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MetaConflict

__all__ = ["Step", "STEPS", "FINISHED", "MoveRow", "LostClaim", "PlanCancelled", "MAX_LISTED"]


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


class LostClaim(MetaConflict):
    """Another rebalancer took over a move whose lease ran out; this one stops working on it. A lost
    compare-and-set on the move's claim: nothing of the call was written."""


class PlanCancelled(MetaConflict):
    """The move's plan was cancelled: its owner undoes it instead of going on. A lost compare-and-set on
    the plan's state: nothing of the call was written."""
