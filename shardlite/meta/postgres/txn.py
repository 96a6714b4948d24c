"""One transaction of a contract method, retried whole when PostgreSQL aborted it for a deadlock (40P01) or a
serialization failure (40001): such an abort wrote nothing, and the caller must never see it.

Other failures pass through: the contract method translates constraint violations (by constraint name), and
:class:`~.connect.Pool` has already made "server unreachable" a :class:`~shardlite.MetaUnavailable`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any, TypeVar

from psycopg import Connection, errors

from .connect import Pool

__all__ = ["ATTEMPTS", "in_transaction", "statement", "has_nul", "violated"]

T = TypeVar("T")

#: Attempts of one transaction before a deadlock or serialization failure is let through (each attempt
#: after a loss waits a short random pause, growing, so two losers do not collide again in step).
ATTEMPTS = 8

_RETRIED = (errors.DeadlockDetected, errors.SerializationFailure)


def in_transaction(pool: Pool, body: Callable[[Connection[Any]], T]) -> T:
    """``body(conn)`` inside one transaction on a pooled connection, committed when it returns, rolled back
    when it raises; run again (a fresh transaction) after a deadlock or a serialization failure."""
    return _retried(pool, body, True)


def statement(pool: Pool, body: Callable[[Connection[Any]], T]) -> T:
    """``body(conn)`` on a pooled (autocommit) connection with no transaction of its own: for a method that
    is one statement (its own implicit transaction), retried like :func:`in_transaction`."""
    return _retried(pool, body, False)


def _retried(pool: Pool, body: Callable[[Connection[Any]], T], transaction: bool) -> T:
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with pool.connection() as conn:
                if not transaction:
                    return body(conn)
                with conn.transaction():
                    return body(conn)
        except _RETRIED:
            if attempt == ATTEMPTS:
                raise
            time.sleep(random.uniform(0.002, 0.01) * attempt)
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def violated(exc: BaseException) -> str:
    """The name of the constraint ``exc`` (a psycopg integrity error) reports, or '' when it names none."""
    diag = getattr(exc, "diag", None)
    name = getattr(diag, "constraint_name", None) if diag is not None else None
    return name or ""


def has_nul(*texts: str) -> bool:
    """True when any of ``texts`` holds U+0000, which PostgreSQL's text refuses (so no row can hold it)."""
    return any("\0" in text for text in texts)
