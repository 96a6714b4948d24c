"""Shared pieces of the outbox relay tests (tests/test_parked_flags.py, tests/test_held_wakes.py,
tests/test_park_ahead.py): one destination table, a handler that records what it applied, a source's
parked-flag marker, a spy on the pending-work index, and waits that poll with a deadline (no timing
assertions)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from helpers_routers import internal_rows

from shardlite import Router, UnknownTenant
from shardlite.core.outbox import Event

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY, source TEXT NOT NULL, n INTEGER NOT NULL)"]
DEADLINE = 30.0


def record(tx: Any, event: Event) -> None:
    """A handler: the event's source and ``n`` into ``applied``."""
    tx.execute("INSERT INTO applied(source, n) VALUES (?, ?)", (event.source, event.payload["n"]))


def applied(router: Router, dest: str = "dst:1") -> list[int]:
    """The ``n`` of every event applied at ``dest``, in order (none before the first delivery creates it)."""
    try:
        return [n for (n,) in router.query(dest, "SELECT n FROM applied ORDER BY id")]
    except UnknownTenant:
        return []


def marker(router: Router, key: str) -> int | None:
    """The flag version ``key``'s file recorded when its relay parked the flag (None: no marker)."""
    (row,) = internal_rows(router, key, "SELECT parked_version FROM _shardlite_relay WHERE id = 1")
    return None if row[0] is None else int(row[0])


def spy_pending(router: Router, names: tuple[str, ...]) -> list[str]:
    """Record, in order, every call of the pending-work index methods ``names`` made through ``router``."""
    pending = router._store.meta.pending
    calls: list[str] = []
    for name in names:
        real = getattr(pending, name)

        def spy(*args: Any, _name: str = name, _real: Any = real) -> Any:
            calls.append(_name)
            return _real(*args)

        setattr(pending, name, spy)
    return calls


def emit(router: Router, n: int, source: str = "src:1", dest: str = "dst:1", topic: str = "t") -> None:
    """One transaction on ``source`` emitting ``{"n": n}`` to ``dest``."""
    with router.transaction(source) as tx:
        tx.emit(dest, topic, {"n": n})


def wait_for(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``check`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
