"""The relay's pending-work index and its dead letters: the contracts :class:`PendingWork` and
:class:`DeadLetters` (the SQLite backend: :mod:`shardlite.meta.sqlite.pending`).

**Pending work.** A tenant whose outbox may hold events has a *flag*: a row ``(key, version, due, since)``.
Relays find work by reading flags (never by opening every tenant file), so a missing flag strands events
while a spurious one costs a relay one look. The rules that keep it so (see :mod:`shardlite.services.relay`):

* whoever makes a tenant's empty outbox non-empty writes the flag *before* the tenant commit that does it
  (``tx.emit``, a restore or an import that keeps events, a dead-letter retry): :meth:`PendingWork.flag_many`
  is durable when it returns, and the caller must not commit the tenant when it raises;
* a relay reads the flag's ``version`` under the source tenant's write lock, in the transaction that
  leaves the outbox empty, and *parks* the flag if the version is unchanged (:meth:`PendingWork.park`): a
  parked flag is kept but is not due, so relays stop looking at it. An emitter that flagged it meanwhile
  changed the version, so its flag stays due;
* *parking ahead*: a relay holding the source's lease may instead park the flag (:meth:`PendingWork.park_many`,
  one call for many sources) just *before* the transaction that empties the outbox, with the version the
  file's marker names; when that transaction then finds events left (an emitter committed after the relay
  read the outbox: it saw the outbox non-empty, so it neither flagged nor woke), or fails, the relay makes the
  flag due again afterwards (:meth:`PendingWork.set_due`, :meth:`PendingWork.wake_many`). A relay killed
  between leaves events under a parked flag: the sweep below wakes it;
* a parked flag is made due again by a *wake-up* (:meth:`PendingWork.wake_many`), which need not be
  durable: the tenant file records the version it parked (``_shardlite_relay.parked_version``, written
  only after the park succeeded), and an emitter that finds its outbox empty and that marker set knows a
  flag exists without asking, so it commits first and wakes the flag afterwards. A lost wake-up (the
  writer killed after its commit, a store that crashed before it wrote the wake-up) leaves events under a
  parked flag: relays sweep the parked flags (:meth:`PendingWork.parked`) every few seconds and wake the
  ones whose outbox holds events;
* a flag parked and idle for long is expired: the relay clears the tenant's marker first (in a tenant
  commit, under its write lock, with the outbox empty), then the flag (:meth:`PendingWork.clear_many`, only
  if the version is unchanged). A crash between leaves a parked flag without a marker: harmless.

For that compare-and-set to be sound a version is a token that is never handed out twice for one key, even
after the key's row was deleted and written again (a relay holding an old version must never delete a
newer flag that happens to carry the same number).

**Dead letters.** An event a handler kept failing on (or whose destination can never be created or was
dropped) leaves its source's outbox and becomes a dead letter, identified by the event's identity
``(source, incarnation, seq)``. ``shardlite relay dead`` lists them and ``shardlite relay retry`` re-emits them
as new events (exactly once: see :func:`shardlite.services.relay_ops.retry_dead`).

Common rules (every backend): each method is one atomic unit (all of it or nothing is written); reads
return committed data; keys are canonical tenant keys; text never contains NUL (U+0000, which PostgreSQL
cannot store: :class:`ValueError` and nothing written); times are the callers' wall clocks
(``time.time()``), so due times compare with the ``now`` a relay passes; a store that cannot be reached
raises :class:`~shardlite.MetaUnavailable` (nothing of that call was written; retryable), a closed one
:class:`~shardlite.ConfigurationError`. Several threads and processes may call every method at once.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

__all__ = ["PendingRow", "PendingWork", "DeadLetter", "DeadLetters"]


class PendingRow(NamedTuple):
    """One pending-work flag."""

    key: str
    #: the compare-and-set token of :meth:`PendingWork.clear_many`: changes on every flag, never reused
    version: int
    #: when a relay should look at the tenant next (a relay's ``now`` at or past it: due)
    due: float
    #: when the row was written first (the flag's age)
    since: float
    #: when the flag was parked (:meth:`PendingWork.park`), None while it is not parked; a parked flag is
    #: never due, whatever ``due`` says
    parked: float | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event that will not be delivered by itself, with why. ``(source, incarnation, seq)`` is the
    event's identity (the incarnation that emitted it and its number there); ``payload`` is its JSON text;
    ``attempts`` the handler calls made; ``error`` the last error's text; ``died`` when it was dead-lettered."""

    source: str
    incarnation: str
    seq: int
    dest: str
    topic: str
    payload: str
    created: float
    attempts: int
    error: str
    died: float


class PendingWork(Protocol):
    """The relay's pending-work index (see the module doc for its rules)."""

    def flag_many(self, keys: Sequence[str]) -> None:
        """Flag every key in ``keys`` as one atomic unit: a key without a flag gets one (a fresh version,
        ``due`` and ``since`` now); a flagged key gets a new version (its old one plus 1) and ``due`` becomes
        the earlier of its due time and now (``since`` is kept); a parked flag is un-parked (due now).
        Durable when it returns: the caller commits the tenant transaction that needs the flag only
        afterwards. On any failure nothing is written and
        the error propagates (:class:`~shardlite.MetaUnavailable` when the store cannot be reached); the
        caller must then roll the tenant transaction back. Hot: one write per emitting transaction that
        found its outbox empty (batched per thread)."""
        ...

    def due(self, now: float, limit: int) -> builtins.list[PendingRow]:
        """At most ``limit`` (>= 0) flags that are not parked and whose ``due <= now``, earliest due first
        (ties in key order). Never a parked flag. Warm: an idle relay polls it every ``poll_interval``."""
        ...

    def all(self) -> builtins.list[PendingRow]:
        """Every flag, parked ones included (``parked`` set), in key order (code points)."""
        ...

    def row(self, key: str) -> PendingRow | None:
        """``key``'s flag, or None. The relay reads it under the source's write lock (module doc)."""
        ...

    def clear_many(self, pairs: Sequence[tuple[str, int]]) -> None:
        """For each ``(key, version)``: delete ``key``'s flag (parked or not) if its version is still
        ``version``; a flag that changed since (flagged again) or is gone is left as it is, silently (a lost
        compare-and-set is no error here: that flag belongs to a newer emitter). One atomic unit for all
        pairs. Durable when it returns."""
        ...

    def set_due(self, key: str, due: float) -> None:
        """Set ``key``'s due time to ``due`` (later or earlier), keeping its version; a key without a flag
        gets one (a fresh version, ``since`` now); a parked flag is un-parked. Used by relays to postpone a
        source that waits for a retry or fails, and to bring one forward."""
        ...

    def park(self, key: str, version: int) -> bool:
        """Compare-and-set: when ``key``'s flag has version ``version`` (parked or not), it becomes parked
        (not due: :meth:`due` never returns it; ``parked`` now, or kept when it was parked with that version
        already; version, ``due`` and ``since`` kept) and True is returned; False, nothing written, when
        the flag is gone or its version moved. May be non-durable (PostgreSQL: ``synchronous_commit =
        off``): a park lost in a crash of the store leaves the flag due, which costs a relay one look.
        Relays call it under the source's write lock, with the outbox empty, before they record the version
        in the tenant file (module doc)."""
        ...

    def park_many(self, pairs: Sequence[tuple[str, int]]) -> builtins.list[str]:
        """:meth:`park` for each ``(key, version)`` in one atomic unit (and one round trip): returns the keys
        whose flag had that version and is now parked, in the order given; the others are left as they are.
        May be non-durable like :meth:`park`. Relays call it for the sources a pass is about to leave empty,
        just before their acknowledging transactions, and make due again each one whose transaction left
        events or failed (module doc: parking ahead)."""
        ...

    def wake_many(self, pairs: Sequence[tuple[str, int]]) -> builtins.list[tuple[str, int]]:
        """For each ``(key, version)``: a parked flag with that version becomes due now (un-parked; version
        and ``since`` kept); a flag with that version that is not parked is left as it is. Returns the
        pairs for which no flag with that version exists (gone, or flagged again since: the caller writes a
        flag for those with :meth:`flag_many`), in the order given. Best effort, one atomic unit, and may be
        non-durable (PostgreSQL: ``synchronous_commit = off``): a wake-up lost in a crash of the store leaves
        the flag parked, which the relays' sweep of parked flags repairs (module doc). Called off the
        emitters' threads, batched."""
        ...

    def parked(self, limit: int, idle_before: float, after: str = "") -> builtins.list[PendingRow]:
        """At most ``limit`` (>= 0) parked flags whose ``parked`` time is at or before ``idle_before`` and
        whose key sorts after ``after`` (code points: pass the last key of a page to get the next), in key
        order. The relays' sweep: lost wake-ups and the expiry of flags parked long ago."""
        ...


class DeadLetters(Protocol):
    """The dead-letter table (see the module doc)."""

    def add(self, letter: DeadLetter) -> bool:
        """Record ``letter``; idempotent on ``(source, incarnation, seq)``: when a letter with that identity
        exists, nothing changes (the first one is kept whole) and it returns False; True when it was
        added. The relay adds a letter before the source's commit that deletes the event (a crash between
        redelivers it, and the add is then a no-op)."""
        ...

    def list(self, limit: int = 1000) -> builtins.list[DeadLetter]:
        """At most ``limit`` (>= 0) letters, oldest first: ordered by ``died``, then ``source`` (code
        points), ``seq`` and ``incarnation``."""
        ...

    def count(self) -> int:
        """How many letters there are."""
        ...

    def delete(self, source: str, incarnation: str, seq: int) -> bool:
        """Delete the letter with that identity; True if it existed (False: nothing was there, no error)."""
        ...
