"""Retry of whole units of work that PostgreSQL aborted to resolve a conflict between transactions.

A deadlock (``40P01``) or a serialization failure (``40001``) means: the server rolled this unit back so
another could go on; running it again is correct and is what every contract method does, a few times with a
short random pause, rather than surfacing an error the caller could do nothing about. Everything else passes
through untouched (constraint violations for the method to translate, :class:`~shardlite.MetaUnavailable`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import psycopg

__all__ = ["RETRYABLE", "ATTEMPTS", "retrying", "constraint_of"]

T = TypeVar("T")

#: SQLSTATEs that mean "run the unit again": serialization_failure, deadlock_detected.
RETRYABLE = frozenset({"40001", "40P01"})
#: Attempts in all before the last failure propagates (each conflict needs another unit to win, so a streak
#: this long is not bad luck but a livelock worth seeing).
ATTEMPTS = 8


def retrying(unit: Callable[[], T]) -> T:
    """``unit()``, run again after a deadlock or serialization failure (each run is a whole transaction:
    ``unit`` takes its own pooled connection and opens its own transaction, so a retry starts clean)."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return unit()
        except psycopg.Error as exc:
            if exc.sqlstate not in RETRYABLE or attempt == ATTEMPTS:
                raise
        time.sleep(random.uniform(0.002, 0.02) * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def constraint_of(exc: psycopg.Error) -> str | None:
    """The name of the constraint ``exc`` violated (from the server's error fields), or None."""
    diag = getattr(exc, "diag", None)
    name = getattr(diag, "constraint_name", None) if diag is not None else None
    return str(name) if name else None
