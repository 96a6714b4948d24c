"""What a relay's acknowledgement writes into a source's outbox, inside the source's write transaction
(:meth:`shardlite.services.relay.Relay._acknowledge` holds it), and the flag of a source it left events in
(:func:`move_flag`, after the commit)."""

from __future__ import annotations

import time

from ..core.outbox import RetryPolicy
from ..files.pool import Handle
from ..files.schema import REMEMBER_LAST_SEQ
from ..front.store import Store
from ..front.wakes import Wakes
from ..meta.pending import DeadLetter, DeadLetters, PendingWork
from .delivery import Claim
from .relay_health import PassStats

__all__ = ["settle_outbox", "move_flag"]


def settle_outbox(store: Store, handle: Handle, claim: Claim, policy: RetryPolicy, letters: DeadLetters, now: float,
                  next_due_at: float | None, stats: PassStats) -> float | None:
    """In the transaction of ``handle`` (the source's write connection): delete the events ``claim``
    delivered; give each failed one its next try (``policy``'s backoff), or, past its tries, move it to
    ``claim.dead``; delete the dead ones and record their letters in ``letters`` before the COMMIT (a crash
    never loses one; a source whose own statements fail records none). The last sequence number is
    remembered first, so numbers never come back. Returns ``next_due_at`` moved to the earliest retry."""
    delivered, failed, dead = claim.delivered, claim.failed, claim.dead
    if delivered or failed or dead:  # failed ones may turn dead (deleted) below
        store.internal(handle, REMEMBER_LAST_SEQ)
    if delivered:  # one cached statement per seq: no table-valued function a user table could shadow
        store.internal_many(handle, "DELETE FROM _shardlite_outbox WHERE seq = ?", [(seq,) for seq in delivered])
    for seq, (row, error) in failed.items():
        attempts = row.attempts + 1
        if policy.dead(attempts):
            dead[seq] = (row, error)
            continue
        retry_at = policy.next_at(now, attempts)
        store.internal(handle, "UPDATE _shardlite_outbox SET attempts = ?, next_at = ?, last_error = ? WHERE seq = ?",
                       (attempts, retry_at, error, seq))
        next_due_at = retry_at if next_due_at is None else min(next_due_at, retry_at)
        stats.retry_at(retry_at)
    for seq in dead:
        store.internal(handle, "DELETE FROM _shardlite_outbox WHERE seq = ?", (seq,))
    for seq, (row, error) in dead.items():
        letters.add(DeadLetter(claim.source, row.incarnation(handle.incarnation), seq, row.dest, row.topic, row.payload,
                               row.created, max(row.attempts + 1, 1), error.replace("\x00", "\ufffd"), time.time()))
    return next_due_at


def move_flag(pending: PendingWork, wakes: Wakes | None, parked: dict[str, int], source: str, marker: int | None,
              due: float, now: float) -> None:
    """After an acknowledgement of ``source`` that left events (not parked ahead): make its flag due at
    ``due`` unless it already is (one read, and a write only when the due time must move). ``parked`` is the
    relay's record of the versions it parked (a flag moved here is no longer parked by it); ``marker`` the
    version the file records."""
    if due <= now and marker is not None and parked.get(source) == marker and wakes is not None \
            and wakes.queued(source):
        # The flag this relay parked, with a wake-up of it queued here and not settled (this ack left
        # events): that wake-up un-parks it when written (HOLD_MAX at the latest) unless a later pass of
        # this relay settles it, and no other relay can take the source meanwhile (the lease). The read
        # below would find it parked and write nothing, or only bring that forward.
        return
    flag = pending.row(source)
    current = flag.due if flag is not None else None
    if current is None or (abs(current - due) > 1e-3 and not (current <= now and due <= now)):
        parked.pop(source, None)
        pending.set_due(source, due)
