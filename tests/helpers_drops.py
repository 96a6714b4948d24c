"""Shared pieces of the drop tests (tests/test_replica_drops.py, tests/test_replica_drops_tail.py): their one
table, the fixture that keeps the replica's metadata older than every drop, and a write and reads of that table.

Import the fixture under its own name (``from helpers_drops import snapshots_stay_old as snapshots_stay_old``):
it is autouse, so it holds for every test of the importing module."""

from __future__ import annotations

import time

import pytest

import shardlite
from shardlite.services import replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


@pytest.fixture(autouse=True)
def snapshots_stay_old(monkeypatch: pytest.MonkeyPatch) -> None:
    """One metadata snapshot per replication process (its first round) and no delta: every drop below comes after
    the metadata the replica holds, so only the drop records can tell a restore of it."""
    monkeypatch.setattr(replication, "META_EVERY", 3600.0)
    monkeypatch.setattr(replication, "META_DELTA_EVERY", 3600.0)


def write(router: shardlite.Router, key: str, body: str) -> int:
    """One write transaction of ``body`` into ``key``'s notes; returns the time it was acknowledged (ns)."""
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))
    return time.time_ns()


def rows(router: shardlite.Router, key: str) -> list[tuple[object, ...]]:
    """``key``'s notes as (id, body) rows, in id order."""
    return [tuple(r) for r in router.query(key, "SELECT id, body FROM notes ORDER BY id")]


def bodies(router: shardlite.Router, key: str) -> list[str]:
    """``key``'s note bodies, in id order."""
    return [str(body) for _id, body in rows(router, key)]
