"""The relay's pending-work index and its dead letters: the contracts :class:`PendingWork` and
:class:`DeadLetters` (the SQLite backend: :mod:`shardlite.meta.sqlite.pending`).

**Pending work.** A tenant whose outbox may hold events has a *flag*: a row ``(key, version, due, since)``.
Relays find work by reading flags (never by opening every tenant file), so a missing flag strands events
while a spurious one costs a relay one look. The rules that keep it so (see :mod:`shardlite.services.relay`):

* whoever makes a tenant's empty outbox non-empty writes the flag *before* the tenant commit that does it
  (``tx.emit``, a restore or an import that keeps events, a dead-letter retry): :meth:`PendingWork.flag_many`
  is durable when it returns, and the caller must not commit the tenant when it raises;
* a relay reads the flag's ``version`` under the source tenant's write lock, in the transaction that
  leaves the outbox empty, and after that commit clears the flag only if the version is unchanged
  (:meth:`PendingWork.clear_many`): an emitter that flagged it meanwhile changed the version, so its flag
  survives.

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
        the earlier of its due time and now (``since`` is kept). Durable when it returns: the caller commits
        the tenant transaction that needs the flag only afterwards. On any failure nothing is written and
        the error propagates (:class:`~shardlite.MetaUnavailable` when the store cannot be reached); the
        caller must then roll the tenant transaction back. Hot: one write per emitting transaction that
        found its outbox empty (batched per thread)."""
        ...

    def due(self, now: float, limit: int) -> builtins.list[PendingRow]:
        """At most ``limit`` (>= 0) flags whose ``due <= now``, earliest due first (ties in key order). Warm:
        an idle relay polls it every ``poll_interval``."""
        ...

    def all(self) -> builtins.list[PendingRow]:
        """Every flag, in key order (code points)."""
        ...

    def row(self, key: str) -> PendingRow | None:
        """``key``'s flag, or None. The relay reads it under the source's write lock (module doc)."""
        ...

    def clear_many(self, pairs: Sequence[tuple[str, int]]) -> None:
        """For each ``(key, version)``: delete ``key``'s flag if its version is still ``version``; a flag
        that changed since (flagged again) or is gone is left as it is, silently (a lost compare-and-set is
        no error here: that flag belongs to a newer emitter). One atomic unit for all pairs."""
        ...

    def set_due(self, key: str, due: float) -> None:
        """Set ``key``'s due time to ``due`` (later or earlier), keeping its version; a key without a flag
        gets one (a fresh version, ``since`` now). Used by relays to postpone a source that waits for a
        retry or fails, and to bring one forward."""
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
