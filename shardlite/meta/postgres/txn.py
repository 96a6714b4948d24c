"""Units of work of the contract methods, retried whole when PostgreSQL aborted them to resolve a conflict
between transactions: a deadlock (``40P01``) or a serialization failure (``40001``) rolled the unit back so
another could go on, so it wrote nothing and running it again is correct. The caller never sees such an
abort: after :data:`ATTEMPTS` losses in a row the unit gives up with :class:`~shardlite.MetaUnavailable`
(retryable, nothing written).

Other failures pass through: the contract method translates constraint violations (by constraint name:
:func:`constraint_of`), and :class:`~.connect.Pool` has already made "server unreachable" a
:class:`~shardlite.MetaUnavailable`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from psycopg import Connection, errors

from ...errors import MetaUnavailable
from .connect import Pool

__all__ = ["ATTEMPTS", "RETRYABLE", "retrying", "in_transaction", "statement", "pause", "gave_up",
           "constraint_of", "has_nul"]

T = TypeVar("T")

#: Attempts of one unit before the last abort becomes MetaUnavailable (each needs another unit to win, so a
#: streak this long is not bad luck but a livelock worth seeing).
ATTEMPTS = 12

#: What makes a unit run again.
RETRYABLE = (errors.DeadlockDetected, errors.SerializationFailure)


def pause(attempt: int) -> None:
    """A short random pause before try ``attempt + 1``, growing, so two losers do not collide again in step."""
    time.sleep(random.uniform(0.002, 0.02) * (attempt + 1))


def gave_up(exc: BaseException) -> MetaUnavailable:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return MetaUnavailable(f"the metadata store kept aborting this update to resolve conflicts with others "
                           f"({type(exc).__name__}: {first}); nothing was written: retry")


def retrying(unit: Callable[[], T]) -> T:
    """``unit()``, run again after a deadlock or serialization failure. Each run must be a whole unit (its
    own pooled connection and transaction), so a retry starts clean."""
    for attempt in range(ATTEMPTS):
        try:
            return unit()
        except RETRYABLE as exc:
            if attempt == ATTEMPTS - 1:
                raise gave_up(exc) from None
        pause(attempt)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def in_transaction(pool: Pool, body: Callable[[Connection[Any]], T]) -> T:
    """``body(conn)`` inside one transaction on a pooled connection, committed when it returns, rolled back
    when it raises; run again (a fresh transaction) after a deadlock or a serialization failure."""
    def unit() -> T:
        with pool.connection() as conn, conn.transaction():
            return body(conn)
    return retrying(unit)


def statement(pool: Pool, body: Callable[[Connection[Any]], T]) -> T:
    """``body(conn)`` on a pooled (autocommit) connection with no transaction of its own: for a method that
    is one statement (its own implicit transaction), retried like :func:`in_transaction`."""
    def unit() -> T:
        with pool.connection() as conn:
            return body(conn)
    return retrying(unit)


def constraint_of(exc: BaseException) -> str:
    """The name of the constraint ``exc`` (a psycopg integrity error) reports, or '' when it names none."""
    diag = getattr(exc, "diag", None)
    name = getattr(diag, "constraint_name", None) if diag is not None else None
    return str(name) if name else ""


def has_nul(*texts: str) -> bool:
    """True when any of ``texts`` holds U+0000, which PostgreSQL's text refuses (so no row can hold it)."""
    return any("\0" in text for text in texts)
