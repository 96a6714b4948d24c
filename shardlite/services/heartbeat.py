"""Claims on moves and the heartbeat that keeps them (rule: failures stay in their tenant and waits are bounded:
every claim is a short lease that a
live owner renews and a dead owner loses within seconds).

A rebalancer holds a :class:`Claim` for every move it is working on. While it holds any, a
:class:`Heartbeat` thread renews their leases in the journal every ``lease / 3`` seconds, so a copy that
takes far longer than the lease (a multi-GB tenant) never loses its claim; when the process dies, the
renewals stop and another rebalancer takes its moves over once the lease lapses.

A renewal also tells the worker when to stop: the move was taken over (its lease lapsed after all, e.g.
the process was stopped for longer than the lease) or its plan was cancelled. The worker finds out at its
next step (:meth:`Claim.check`), or sooner inside long SQLite work (:meth:`Claim.interrupt` as a progress
handler, and between the chunks of a copy).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..core.movejournal import LostClaim, MoveRow, PlanCancelled
from ..meta.journal import MoveJournal

__all__ = ["Claim", "Heartbeat"]


class Claim:
    """A move this rebalancer holds. ``stop`` is set (to ``"lost"`` or ``"cancelled"``) when it must stop."""

    def __init__(self, move: MoveRow) -> None:
        self.move = move
        self.stop: str | None = None
        self.wrote_fence = False  # this rebalancer wrote the move's fence while holding the claim

    def check(self) -> None:
        """Raise LostClaim or PlanCancelled if the heartbeat found that the move must stop."""
        if self.stop == "lost":
            raise LostClaim(f"another rebalancer took over the move of {self.move.key!r}")
        if self.stop == "cancelled":
            raise PlanCancelled(f"plan {self.move.plan_id} was cancelled while {self.move.key!r} was moving")

    def interrupt(self) -> bool:
        """A SQLite progress handler: True (interrupt the statement) once the move must stop."""
        return self.stop is not None


class Heartbeat:
    """Renews the leases of the claims it holds on a daemon thread while it is entered (``with``).

    ``lease`` is read at every beat (a callable, so that the rebalancer's setting can change between runs).
    A beat that fails (the global DB stayed busy) is retried at the next one: the interval leaves two
    more tries before a lease lapses.
    """

    def __init__(self, journal: MoveJournal, owner: str, lease: Callable[[], float]) -> None:
        self.journal = journal
        self.owner = owner
        self.lease = lease
        self._claims: dict[tuple[int, str], Claim] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self.beats = 0

    def __enter__(self) -> Heartbeat:
        self._stopped.clear()
        self._thread = threading.Thread(target=self._run, name=f"shardlite-heartbeat-{self.owner}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def hold(self, move: MoveRow) -> Claim:
        claim = Claim(move)
        with self._lock:
            self._claims[(move.plan_id, move.key)] = claim
        return claim

    def drop(self, claim: Claim) -> None:
        with self._lock:
            self._claims.pop((claim.move.plan_id, claim.move.key), None)

    def beat(self) -> None:
        """Renew every held lease now; flag the claims that must stop."""
        with self._lock:
            claims = list(self._claims.values())
        if not claims:
            return
        stop = self.journal.renew([c.move for c in claims], self.owner, self.lease())
        self.beats += 1
        for claim in claims:
            why = stop.get(claim.move.key)
            if why is not None and claim.stop != "lost":
                claim.stop = why

    def _run(self) -> None:
        while not self._stopped.wait(max(0.01, self.lease() / 3)):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a busy global DB: the next beat tries again
                continue
