"""A destination that cannot be written because of the *metadata* (unreachable, read-only, closed, or any
passing condition) is retried later, never dead-lettered; only a destination this process can never create
(its key prefix has no schema here) sends its events to the dead letters (brief rules 9 and 15)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from shardlite import ConfigurationError, MetaUnavailable, Router
from shardlite.core.outbox import Event, RetryPolicy
from shardlite.services.delivery import DONE, UNAVAILABLE, Claim

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY, topic TEXT NOT NULL, n INTEGER NOT NULL)"]
FAST = RetryPolicy(max_attempts=2, backoff_base=0.001, backoff_cap=0.01)


def record(tx: Any, event: Event) -> None:
    tx.execute("INSERT INTO applied(topic, n) VALUES (?, ?)", (event.topic, event.payload["n"]))


def fan_out(tx: Any, event: Event) -> None:
    record(tx, event)
    tx.emit("user:other", "u", {"n": event.payload["n"]})  # the destination's first event: needs a flag


@pytest.fixture
def router(root: str) -> Iterator[Router]:
    with Router(root, schema={"user": SCHEMA}, retry=FAST) as router:
        router.handler("t")(record)
        router.handler("f")(fan_out)
        router.handler("u")(record)
        yield router


def _claim(router: Router, source: str) -> Claim:
    return router.relay._claim(source, time.time())


def test_a_closed_metadata_store_defers_a_new_destination_and_only_a_missing_schema_is_dead(
        router: Router) -> None:
    with router.transaction("user:alice") as tx:
        tx.emit("user:new", "t", {"n": 1})
    emitter = Router(router.root, schema={"user": SCHEMA, "nope": SCHEMA})
    with emitter.transaction("user:carol") as tx:
        tx.emit("nope:x", "t", {"n": 2})  # a prefix the relaying router has no schema for
    emitter.close()
    deliverer = router.relay._deliverer
    alice, carol = _claim(router, "user:alice"), _claim(router, "user:carol")
    router._store.meta.close()  # the metadata goes away: creating user:new needs it
    try:
        outcome = deliverer.deliver("user:new", [(alice, alice.work.deliver["user:new"])])
        assert outcome.state == UNAVAILABLE and isinstance(outcome.exc, ConfigurationError)
        assert alice.dead == {} and alice.failed == {} and alice.delivered == []
        outcome = deliverer.deliver("nope:x", [(carol, carol.work.deliver["nope:x"])])
        assert outcome.state == DONE and list(carol.dead) == [1]
        assert "cannot be created" in carol.dead[1][1] and "no schema" in carol.dead[1][1].lower()
    finally:
        router._store.meta.open(create=False)
    router.relay.drain(timeout=30)
    assert router.query("user:new", "SELECT topic, n FROM applied") == [("t", 1)]
    assert [(d.source, d.dest) for d in router._store.meta.dead_letters.list()] == [("user:carol", "nope:x")]


def test_a_destination_whose_commit_cannot_write_its_pending_flag_is_deferred_not_failed(router: Router) -> None:
    """A handler that emits needs the destination's pending-work flag before its commit; the metadata
    refuses writes (read-only): MetaUnavailable, so the events wait with no attempt counted, and are
    delivered once the metadata is back."""
    with router.transaction("user:new") as tx:  # exists already: only the flag needs the metadata
        tx.execute("INSERT INTO applied(topic, n) VALUES ('setup', 0)")
    with router.transaction("user:alice") as tx:
        tx.emit("user:new", "f", {"n": 1})
    claim = _claim(router, "user:alice")
    writer = router._store.meta.globaldb.writer
    writer.execute("PRAGMA query_only = 1")
    try:
        for _ in range(FAST.max_attempts + 1):  # more tries than attempts allowed: none is counted
            outcome = router.relay._deliverer.deliver("user:new", [(claim, claim.work.deliver["user:new"])])
            assert outcome.state == UNAVAILABLE and isinstance(outcome.exc, MetaUnavailable)
            assert claim.failed == {} and claim.dead == {} and claim.delivered == []
    finally:
        writer.execute("PRAGMA query_only = 0")
    assert router.query("user:new", "SELECT topic FROM applied") == [("setup",)]  # nothing of it committed
    router.relay.drain(timeout=30)
    assert router.query("user:new", "SELECT topic, n FROM applied") == [("setup", 0), ("f", 1)]
    assert router.query("user:other", "SELECT topic, n FROM applied") == [("u", 1)]
    assert router._store.meta.dead_letters.list() == []
