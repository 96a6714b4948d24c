"""Retrying whole transactions: the one policy of ``Router.run`` and ``AsyncRouter.run``. Pure: no I/O.

A transaction that failed with a retryable error (:class:`~shardlite.Busy`: a lock held past the busy
timeout; :class:`~shardlite.TenantMoving`: a move past ``move_wait``) committed nothing, so running it again
is safe. The pause before each try doubles from :data:`FIRST` up to :data:`CAP`, scaled by a random factor
in [0.5, 1.5) so that processes which failed together do not retry in lockstep, and never runs past the
caller's deadline: once the next pause would, the last error is the answer.
"""

from __future__ import annotations

import random
from typing import Final

from ..errors import Busy, TenantMoving

__all__ = ["RETRYABLE", "Backoff", "FIRST", "CAP"]

#: Errors after which a whole transaction is tried again.
RETRYABLE: Final = (Busy, TenantMoving)
FIRST: Final = 0.002
CAP: Final = 0.5


class Backoff:
    """The pauses between tries of one ``run()``, bounded by ``deadline`` (a ``time.monotonic()``-style
    time, compared with the ``now`` the caller passes)."""

    __slots__ = ("deadline", "_next", "_random")

    def __init__(self, deadline: float, *, rng: random.Random | None = None) -> None:
        self.deadline = deadline
        self._next = FIRST
        self._random = rng or random

    def pause(self, now: float) -> float | None:
        """Seconds to wait before the next try, or None when that try would start past the deadline."""
        delay = self._next * (0.5 + self._random.random())
        if now + delay > self.deadline:
            return None
        self._next = min(self._next * 2, CAP)
        return delay
