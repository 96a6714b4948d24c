"""Transactional outbox and relay, in process (brief §4 tx.emit / router.handler / relay lifetime, rule 9,
§7 "Finding pending outbox work"), plus the pure rules of ``shardlite.core.outbox`` and the ``relay`` CLI.

The multi-process crash tests (SIGKILL, two relays at once) are in ``test_relay_crash.py``; the built-in
activity feed is in ``test_feed.py``.

Every handler here makes its effect *countable*: it inserts one row per application into ``applied`` in the
destination, a table with no UNIQUE constraint, so a duplicate effect shows as a second row, and the
AUTOINCREMENT id gives the order in which the destination applied the events.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows

import shardlite.cli
from shardlite import (
    Busy,
    ConfigurationError,
    InvalidKey,
    MetaUnavailable,
    PayloadTooLarge,
    Router,
    StorageError,
    TransactionClosed,
    UnknownTenant,
)
from shardlite.core.outbox import Event, OutboxRow, RetryPolicy, encode_payload, next_due, plan
from shardlite.services.relay import ACK_WAIT_MS

SCHEMA = [
    "CREATE TABLE applied(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, dest TEXT NOT NULL, "
    "topic TEXT NOT NULL, n INTEGER NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL, pid INTEGER NOT NULL)",
    "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)",
]
FAST = RetryPolicy(max_attempts=3, backoff_base=0.001, backoff_cap=0.01)
DEADLINE = 20.0  # generous bound for polling loops; never a timing assertion


def record(tx: Any, event: Event) -> None:
    """The countable effect: one row per application."""
    tx.execute("INSERT INTO applied(source, dest, topic, n, seq, event_id, pid) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (event.source, event.dest, event.topic, event.payload["n"], event.seq, event.id, os.getpid()))


def applied(router: Router, dest: str, source: str | None = None) -> list[int]:
    """The ``n`` of every application in ``dest`` (optionally from one source), in the order applied."""
    if not router.exists(dest):
        return []
    if source is None:
        return [n for (n,) in router.query(dest, "SELECT n FROM applied ORDER BY id")]
    return [n for (n,) in router.query(dest, "SELECT n FROM applied WHERE source = ? ORDER BY id", (source,))]


def outbox(router: Router, key: str) -> list[tuple[Any, ...]]:
    return internal_rows(router, key, "SELECT seq, dest, topic, payload, attempts FROM _shardlite_outbox ORDER BY seq")


def global_db(root: str) -> apsw.Connection:
    return apsw.Connection(os.path.join(root, "global.db"))


def pending_rows(root: str) -> list[tuple[Any, ...]]:
    """The flags that are due (a drained source's flag stays, parked: see flag_rows)."""
    conn = global_db(root)
    try:
        return list(conn.execute("SELECT key, version FROM _shardlite_pending WHERE parked IS NULL ORDER BY key"))
    finally:
        conn.close()


def flag_rows(root: str) -> list[tuple[Any, ...]]:
    """Every flag, parked ones included: ``(key, version, parked)``."""
    conn = global_db(root)
    try:
        return list(conn.execute("SELECT key, version, parked FROM _shardlite_pending ORDER BY key"))
    finally:
        conn.close()


def emit(router: Router, source: str, dest: str, n: int, topic: str = "t", **extra: Any) -> None:
    with router.transaction(source) as tx:
        tx.emit(dest, topic, {"n": n, **extra})


def wait_for(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not predicate():
        if time.monotonic() > end:
            pytest.fail(f"gave up waiting ({deadline:.0f} s) for {what}")
        time.sleep(0.01)


@pytest.fixture
def root(tmp_path: Path) -> str:
    return os.fspath(tmp_path / "data")


@pytest.fixture
def make(root: str) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def factory(**kwargs: Any) -> Router:
        kwargs.setdefault("schema", SCHEMA)
        router = Router(root, **kwargs)
        made.append(router)
        return router

    yield factory
    for router in reversed(made):
        router.close()


@pytest.fixture
def router(make: Callable[..., Router]) -> Router:
    r = make(retry=FAST)
    r.handler("t")(record)
    return r


# -- pure rules (no files) ----------------------------------------------------------------------------------


def _row(seq: int, dest: str, topic: str = "t", next_at: float = 0.0, attempts: int = 0) -> OutboxRow:
    return OutboxRow(seq, dest, topic, json.dumps({"n": seq}), 0.0, attempts, next_at)


def test_plan_keeps_order_per_destination_and_holds_back_only_the_blocked_pair() -> None:
    handlers = {"t": record}
    rows = [_row(1, "a"), _row(2, "b", next_at=100.0), _row(3, "a"), _row(4, "b"), _row(5, "c", topic="x"),
            _row(6, "c"), _row(7, "d")]
    result = plan(rows, handlers, now=10.0)
    assert {d: [r.seq for r in rs] for d, rs in result.deliver.items()} == {"a": [1, 3], "d": [7]}
    assert result.waiting == 3  # seq 2 (retry delay), seq 4 (behind it), seq 6 (behind the unhandled seq 5)
    assert [r.seq for r in result.unhandled] == [5]
    assert result.next_due == 100.0


def test_retry_policy_backs_off_exponentially_with_a_cap_and_dies_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3, backoff_base=1.0, backoff_cap=3.0)
    assert [policy.next_at(0.0, a) for a in (1, 2, 3, 4)] == [1.0, 2.0, 3.0, 3.0]
    assert [policy.dead(a) for a in (1, 2, 3)] == [False, False, True]


def test_next_due_is_now_when_something_is_not_known_to_wait() -> None:
    assert next_due(5.0, remaining=3, held=2, retry_due=50.0, unhandled=False, recheck=1.0) == 5.0
    assert next_due(5.0, remaining=2, held=2, retry_due=50.0, unhandled=True, recheck=1.0) == 6.0
    assert next_due(5.0, remaining=2, held=2, retry_due=5.5, unhandled=True, recheck=1.0) == 5.5


def test_encode_payload_counts_utf8_bytes_and_refuses_what_json_cannot_carry() -> None:
    assert encode_payload({"a": [1, "x"]}, 100) == '{"a":[1,"x"]}'
    text = encode_payload("é" * 4, 10)  # '"éééé"' is 10 bytes in UTF-8, 6 characters
    assert text == '"éééé"'
    with pytest.raises(PayloadTooLarge):
        encode_payload("é" * 5, 10)
    with pytest.raises(TypeError):
        encode_payload({"o": object()}, 1000)
    with pytest.raises(ValueError):
        encode_payload({"x": math.nan}, 1000)


# -- emit ----------------------------------------------------------------------------------------------------


def test_emit_commits_with_the_write_and_the_handler_sees_the_event(router: Router) -> None:
    seen: list[Event] = []

    @router.handler("hello")
    def on_hello(tx: Any, event: Event) -> None:
        seen.append(event)
        record(tx, event)

    with router.transaction("user:alice") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('sent')")
        tx.emit("user:bob", "hello", {"n": 7, "text": "hi ☃"})
    assert [s for (s, *_r) in outbox(router, "user:alice")] == [1]
    stats = router.relay.drain(timeout=30)
    assert stats.delivered == 1
    (event,) = seen
    assert (event.source, event.dest, event.topic, event.payload, event.seq) == (
        "user:alice", "user:bob", "hello", {"n": 7, "text": "hi ☃"}, 1)
    assert event.id.startswith("user:alice/") and event.id.endswith("/1")
    assert applied(router, "user:bob") == [7]
    assert outbox(router, "user:alice") == []
    assert pending_rows(router.root) == []  # the relay cleared the flag once the outbox was empty


def test_emit_many_is_one_event_per_destination_in_order_with_the_payload_encoded_once(router: Router) -> None:
    with router.transaction("room:1") as tx:
        tx.emit("user:zed", "t", {"n": 0})
        tx.emit_many(["user:bob", "user:carol", "user:bob"], "t", {"n": 1, "text": "to all"})
        tx.emit_many([], "t", {"n": 99})  # nothing to send: no event
    rows = outbox(router, "room:1")
    assert [(seq, dest) for seq, dest, *_ in rows] == [(1, "user:zed"), (2, "user:bob"), (3, "user:carol"),
                                                      (4, "user:bob")]
    assert len({payload for *_, payload, _ in rows[1:]}) == 1
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [1, 1] and applied(router, "user:carol") == [1]
    assert applied(router, "user:zed") == [0]


def test_emit_many_with_one_invalid_destination_emits_nothing(router: Router) -> None:
    with router.transaction("room:1") as tx:
        with pytest.raises(InvalidKey):
            tx.emit_many(["user:bob", "", "user:carol"], "t", {"n": 1})
        with pytest.raises(TypeError):
            tx.emit_many("user:bob", "t", {"n": 1})  # one key, not a list of keys
        with pytest.raises(PayloadTooLarge):
            tx.emit_many(["user:bob"], "t", {"text": "x" * (1 << 20)})
    assert outbox(router, "room:1") == []
    with router.transaction("room:1") as tx:  # the refusals left the transaction usable
        tx.emit_many(["user:bob", "user:carol"], "t", {"n": 2})
    assert [dest for _, dest, *_ in outbox(router, "room:1")] == ["user:bob", "user:carol"]


def test_emit_many_rolled_back_with_its_transaction_emits_nothing(router: Router) -> None:
    with pytest.raises(RuntimeError):
        with router.transaction("room:1") as tx:
            tx.emit_many(["user:bob", "user:carol"], "t", {"n": 1})
            raise RuntimeError("abort")
    assert router.exists("room:1") and outbox(router, "room:1") == []
    assert [k for k, _ in pending_rows(router.root)] in ([], ["room:1"])  # at most a spurious flag, never a lost one


def test_nothing_is_emitted_when_the_transaction_rolls_back(router: Router) -> None:
    with router.transaction("user:alice") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('kept')")
    with pytest.raises(RuntimeError):
        with router.transaction("user:alice") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('lost')")
            tx.emit("user:bob", "t", {"n": 1})
            raise RuntimeError("abort")
    assert outbox(router, "user:alice") == []
    assert router.query("user:alice", "SELECT body FROM notes") == [("kept",)]
    assert router.relay.status()["pending"] == 0
    stats = router.relay.drain(timeout=30)
    assert stats.delivered == 0
    assert not router.exists("user:bob")  # the destination was never created
    assert pending_rows(router.root) == []  # a spurious flag costs one look, then it is gone


def test_emit_in_a_savepoint_that_rolls_back_is_not_emitted(router: Router) -> None:
    with router.transaction("user:alice") as tx:
        tx.emit("user:bob", "t", {"n": 1})
        with pytest.raises(RuntimeError):
            with router.transaction("user:alice") as inner:
                inner.emit("user:bob", "t", {"n": 2})
                raise RuntimeError("inner abort")
        tx.emit("user:bob", "t", {"n": 3})
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [1, 3]


def test_payload_too_large_is_refused_and_stores_nothing(make: Callable[..., Router]) -> None:
    router = make(max_payload=100)
    router.handler("t")(record)
    with router.transaction("user:alice") as tx:  # create the tenant first (creation writes the catalog)
        pass
    conn = global_db(router.root)
    try:
        before = conn.execute("PRAGMA data_version").fetchall()
        with router.transaction("user:alice") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('still committed')")
            with pytest.raises(PayloadTooLarge):
                tx.emit("user:bob", "t", {"n": 1, "blob": "x" * 200})
        assert conn.execute("PRAGMA data_version").fetchall() == before  # not even a pending flag
    finally:
        conn.close()
    assert router.query("user:alice", "SELECT body FROM notes") == [("still committed",)]
    assert outbox(router, "user:alice") == []
    assert pending_rows(router.root) == []
    # at the limit is fine: {"n":1,"blob":"..."} with a blob that makes exactly 100 bytes
    blob = "x" * (100 - len('{"n":1,"blob":""}'))
    emit(router, "user:alice", "user:bob", 1, blob=blob)
    with pytest.raises(PayloadTooLarge):
        emit(router, "user:alice", "user:bob", 2, blob=blob + "x")
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [1]


@pytest.mark.parametrize("payload, error", [({"o": object()}, TypeError), ({"s": {1, 2}}, TypeError),
                                            ({"x": math.inf}, ValueError), (b"bytes", TypeError)])
def test_non_json_payload_raises_and_stores_nothing(router: Router, payload: Any, error: type) -> None:
    with router.transaction("user:alice") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('ok')")
        with pytest.raises(error):
            tx.emit("user:bob", "t", payload)
    assert outbox(router, "user:alice") == []
    assert router.query("user:alice", "SELECT count(*) FROM notes") == [(1,)]


def test_emit_validates_destination_and_topic_and_needs_an_open_transaction(router: Router) -> None:
    with router.transaction("user:alice") as tx:
        with pytest.raises(InvalidKey):
            tx.emit("", "t", {"n": 1})
        with pytest.raises(ValueError):
            tx.emit("user:bob", "", {"n": 1})
        with pytest.raises(ValueError):
            tx.emit("user:bob", "x" * 201, {"n": 1})
    with pytest.raises(TransactionClosed):
        tx.emit("user:bob", "t", {"n": 1})
    assert outbox(router, "user:alice") == []


def test_checked_destinations_and_topics_are_remembered_without_hiding_errors(
        make: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    import shardlite.front.transaction as transaction_mod

    monkeypatch.setattr(transaction_mod, "_KNOWN_MAX", 3)
    router = make(schema={"user": SCHEMA, "room": SCHEMA})
    emitter = router._store.emitter
    for i in range(5):  # bounded: the remembered set is emptied when full, never grows past the bound
        emit(router, "user:alice", f"user:b{i}", i)
        assert len(emitter.known_dests) <= 3 and len(emitter.known_topics) <= 3
    assert emitter.known_dests.get("user:b4") == "user:b4"
    with router.transaction("user:alice") as tx:
        for _ in range(2):  # refused every time: a failed check is never remembered
            with pytest.raises(ConfigurationError):
                tx.emit("org:nope", "t", {"n": 1})
            with pytest.raises(ValueError):
                tx.emit("user:b4", "", {"n": 1})
        tx.emit("user:bo\u0301b", "t", {"n": 9})
        tx.emit("user:bo\u0301b", "t", {"n": 10})  # remembered: still its canonical key
    assert [row[1] for row in outbox(router, "user:alice")][-2:] == ["user:b\u00f3b", "user:b\u00f3b"]
    assert "org:nope" not in emitter.known_dests


def test_destination_key_is_canonicalised(router: Router) -> None:
    emit(router, "user:alice", "user:bo\u0301b", 1)  # decomposed: NFC gives "user:bób"
    router.relay.drain(timeout=30)
    assert applied(router, "user:b\u00f3b") == [1]


# -- delivery: order, exactly once, retries, dead letters ---------------------------------------------------


def test_many_events_keep_order_per_pair_across_small_batches(router: Router) -> None:
    router.relay.batch = 7
    for i in range(40):
        with router.transaction(f"src:{i % 3}") as tx:
            tx.emit("dst:a", "t", {"n": i})
            tx.emit("dst:b", "t", {"n": i})
    router.relay.drain(timeout=30)
    for dest in ("dst:a", "dst:b"):
        for s in range(3):
            assert applied(router, dest, f"src:{s}") == [i for i in range(40) if i % 3 == s]
        assert len(applied(router, dest)) == 40


def test_a_crash_between_the_destination_commit_and_the_acknowledgement_has_no_duplicate_effect(
        router: Router) -> None:
    # In-process stand-in for the kill in test_relay_crash.py: the pass dies after the destinations
    # committed and before the source acknowledged.
    for i in range(5):
        emit(router, "user:alice", "user:bob", i)
        emit(router, "user:alice", "user:carol", i)

    def crash(step: str) -> None:
        if step == "delivered":
            raise KeyboardInterrupt("simulated crash")

    router.relay.fault = crash
    with pytest.raises(KeyboardInterrupt):
        router.relay.run_once()
    assert applied(router, "user:bob") == list(range(5))
    assert len(outbox(router, "user:alice")) == 10  # nothing acknowledged
    router.relay.fault = None
    stats = router.relay.drain(timeout=30)
    assert stats.delivered == 10  # acknowledged now, without running the handlers again
    assert applied(router, "user:bob") == list(range(5))
    assert applied(router, "user:carol") == list(range(5))
    assert outbox(router, "user:alice") == []
    emit(router, "user:alice", "user:bob", 5)  # the inbox mark does not swallow later events
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == list(range(6))


def test_numbers_never_come_back_when_the_highest_event_is_delivered_before_a_lower_one(router: Router) -> None:
    """Delivery is per destination, so the outbox's highest event can go while a lower one waits for its
    retry; a plain rowid would then hand the delivered number out again and the destination's inbox
    mark would swallow the new event as a duplicate."""
    calls: list[int] = []

    @router.handler("p")
    def flaky(tx: Any, event: Event) -> None:
        calls.append(event.payload["n"])
        if event.payload["n"] == 0 and event.attempts == 0:
            raise RuntimeError("first attempt fails")
        record(tx, event)

    emit(router, "user:alice", "user:bob", 0, topic="p")    # seq 1: fails once, waits for its retry
    emit(router, "user:alice", "user:carol", 1, topic="p")  # seq 2: delivered and deleted at once
    first = router.relay.run_once()
    assert first.failed == 1 and applied(router, "user:carol") == [1]
    assert [row[0] for row in outbox(router, "user:alice")] == [1]  # only the lower event is left
    emit(router, "user:alice", "user:carol", 2, topic="p")
    assert [row[0] for row in outbox(router, "user:alice")] == [1, 3]  # 2 is never handed out again
    router.relay.drain(timeout=30)
    assert applied(router, "user:carol") == [1, 2] and applied(router, "user:bob") == [0]
    emit(router, "user:alice", "user:carol", 3, topic="p")  # drained: numbering still goes on
    assert [row[0] for row in outbox(router, "user:alice")] == [4]


def test_poison_event_is_dead_lettered_after_n_attempts_and_later_events_on_the_pair_go_on(
        router: Router) -> None:
    attempts: list[int] = []

    @router.handler("p")
    def poison(tx: Any, event: Event) -> None:
        record(tx, event)  # partial effect: must be rolled back with the failing handler
        if event.payload.get("poison"):
            attempts.append(event.attempts)
            raise RuntimeError(f"cannot handle {event.payload['n']}")

    emit(router, "user:alice", "user:bob", 0, topic="p")
    emit(router, "user:alice", "user:bob", 1, topic="p", poison=True)
    emit(router, "user:alice", "user:bob", 2, topic="p")
    emit(router, "user:alice", "user:carol", 0, topic="p")

    first = router.relay.run_once()
    assert first.failed == 1 and first.dead == 0
    # while the poison event waits for its retry, the one behind it on the same pair waits too...
    assert applied(router, "user:bob") == [0]
    # ...but other pairs of the same source do not
    assert applied(router, "user:carol") == [0]

    router.relay.drain(timeout=30)
    assert attempts == [0, 1, 2]  # three attempts (max_attempts=3), each saw its attempt count
    assert applied(router, "user:bob") == [0, 2]  # documented policy: later events go on
    assert outbox(router, "user:alice") == []
    (letter,) = router._store.meta.dead_letters.list()
    assert (letter.source, letter.dest, letter.topic, letter.seq, letter.attempts) == (
        "user:alice", "user:bob", "p", 2, 3)
    assert json.loads(letter.payload) == {"n": 1, "poison": True}
    assert "RuntimeError: cannot handle 1" in letter.error
    status = router.relay.status()
    assert status["dead_letters"] == 1 and status["pending"] == 0

    # `relay retry` re-emits the dead letter as a NEW event (new seq), applied after the ones that went on
    emit(router, "user:alice", "user:bob", 3, topic="p")
    router.relay.drain(timeout=30)
    assert router.relay.retry_dead() == 1
    assert router._store.meta.dead_letters.list() == []
    (row,) = outbox(router, "user:alice")
    assert row[0] == 6 and row[1] == "user:bob"  # seqs 1..5 were used; never reused
    router.handler("p")(record)  # the bug is fixed
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [0, 2, 3, 1]
    seqs = router.query("user:bob", "SELECT seq FROM applied ORDER BY id")
    assert [s for (s,) in seqs] == [1, 3, 5, 6]
    assert router.relay.status()["dead_letters"] == 0


def test_failing_handler_stops_its_destination_for_the_pass_but_keeps_what_it_applied(router: Router) -> None:
    fail = {"on": True}

    @router.handler("f")
    def flaky(tx: Any, event: Event) -> None:
        record(tx, event)
        if event.payload["n"] == 2 and fail["on"]:
            fail["on"] = False
            raise RuntimeError("transient")

    for i in range(5):
        emit(router, "user:alice", "user:bob", i, topic="f")
    stats = router.relay.run_once()
    assert stats.delivered == 2 and stats.failed == 1
    assert applied(router, "user:bob") == [0, 1]
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [0, 1, 2, 3, 4]
    assert router._store.meta.dead_letters.list() == []


def test_events_for_a_dropped_destination_are_dead_letters_and_never_recreate_it(router: Router) -> None:
    with router.transaction("user:gone") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('x')")
    router.drop("user:gone")
    assert not router.exists("user:gone")
    emit(router, "user:alice", "user:gone", 0)
    emit(router, "user:alice", "user:gone", 1)
    emit(router, "user:alice", "user:bob", 0)
    stats = router.relay.drain(timeout=30)
    assert stats.dead == 2
    assert not router.exists("user:gone")
    assert router.locate("user:gone").path is None
    assert applied(router, "user:bob") == [0]
    letters = router._store.meta.dead_letters.list()
    assert sorted(d.seq for d in letters) == [1, 2]
    assert all(d.dest == "user:gone" and "dropped" in d.error for d in letters)
    assert outbox(router, "user:alice") == []
    # retrying does not bring it back either
    assert router.relay.retry_dead() == 2
    router.relay.drain(timeout=30)
    assert not router.exists("user:gone")
    assert len(router._store.meta.dead_letters.list()) == 2


def test_emit_to_a_destination_without_a_schema_is_refused(make: Callable[..., Router]) -> None:
    router = make(schema={"user": SCHEMA}, retry=FAST)
    router.handler("t")(record)
    with router.transaction("user:alice") as tx:
        with pytest.raises(ConfigurationError):
            tx.emit("nope:x", "t", {"n": 0})
        tx.emit("user:bob", "t", {"n": 1})
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [1]
    assert not router.exists("nope:x")


def test_an_event_for_a_destination_the_relay_cannot_create_does_not_wedge_the_relay(
        make: Callable[..., Router]) -> None:
    # the emitting process knows the "nope" prefix, the relaying process does not
    emitter = make(schema={"user": SCHEMA, "nope": SCHEMA})
    emit(emitter, "user:alice", "nope:x", 0)
    emit(emitter, "user:alice", "user:bob", 1)  # same source, later: goes on
    emit(emitter, "user:carol", "user:bob", 2)  # another source
    relay = make(schema={"user": SCHEMA}, retry=FAST)
    relay.handler("t")(record)
    relay.relay.drain(timeout=30)
    assert applied(relay, "user:bob", "user:alice") == [1]
    assert applied(relay, "user:bob", "user:carol") == [2]
    assert not relay.exists("nope:x")
    assert [(d.source, d.dest) for d in relay._store.meta.dead_letters.list()] == [("user:alice", "nope:x")]
    assert relay.relay.status()["pending"] == 0


def test_retry_of_dead_letters_is_not_blocked_by_one_from_a_dropped_source(router: Router) -> None:
    @router.handler("p")
    def poison(tx: Any, event: Event) -> None:
        raise RuntimeError("boom")

    emit(router, "user:a", "user:bob", 0, topic="p")
    router.relay.drain(timeout=30)  # user:a's letter dies first, so it is listed first
    emit(router, "user:z", "user:bob", 1, topic="p")
    router.relay.drain(timeout=30)
    assert [d.source for d in router._store.meta.dead_letters.list()] == ["user:a", "user:z"]
    router.drop("user:a")
    try:
        router.relay.retry_dead()
    except UnknownTenant:
        pass
    assert "user:z" not in [d.source for d in router._store.meta.dead_letters.list()]
    assert not router.exists("user:a")


def test_unhandled_topic_stays_pending_is_reported_and_drain_returns(make: Callable[..., Router]) -> None:
    router = make(retry=FAST)
    router.handler("t")(record)
    router.relay.unhandled_recheck = 0.05
    emit(router, "user:alice", "user:bob", 0, topic="later")
    emit(router, "user:alice", "user:bob", 1, topic="later")
    emit(router, "user:alice", "user:carol", 2)  # another pair goes on
    stats = router.relay.drain(timeout=30)  # returns once only unhandled events are left
    assert stats.unhandled >= 1 and "later" in stats.unhandled_topics
    assert applied(router, "user:carol") == [2]
    assert not router.exists("user:bob")
    status = router.relay.status()
    assert status["unhandled_topics"] == ["later"]
    assert status["pending"] == 2 and status["topics"] == {"later": 2}
    assert [r[2] for r in outbox(router, "user:alice")] == ["later", "later"]
    assert router._store.meta.dead_letters.list() == []  # never dead-lettered for want of a handler

    # a process that has the handler delivers them, in order
    router.handler("later")(record)
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [0, 1]
    assert router.relay.status()["pending"] == 0


def test_an_event_behind_an_unhandled_one_waits_with_it(make: Callable[..., Router]) -> None:
    router = make(retry=FAST)
    router.handler("t")(record)
    router.relay.unhandled_recheck = 0.05
    emit(router, "user:alice", "user:bob", 0, topic="later")
    emit(router, "user:alice", "user:bob", 1)  # handled, but order per pair keeps it behind seq 1
    router.relay.run_once()
    router.relay.run_once()
    assert applied(router, "user:bob") == []
    assert router.relay.status()["unhandled_topics"] == ["later"]
    router.handler("later")(record)
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [0, 1]


def test_drain_returns_when_events_wait_only_behind_unhandled_ones(make: Callable[..., Router]) -> None:
    router = make(retry=FAST)
    router.handler("t")(record)
    emit(router, "user:alice", "user:bob", 0, topic="later")
    emit(router, "user:alice", "user:bob", 1)
    passes = 0
    run_once = router.relay.run_once

    def counting(**kwargs: Any) -> Any:
        nonlocal passes
        passes += 1
        return run_once(**kwargs)

    router.relay.run_once = counting  # type: ignore[method-assign]
    stats = router.relay.drain(timeout=2)
    assert stats.unhandled_topics == {"later"}
    assert passes <= 3, f"drain kept polling ({passes} passes) although nothing deliverable was pending"


def test_a_handler_may_emit(router: Router) -> None:
    @router.handler("fanout")
    def fanout(tx: Any, event: Event) -> None:
        record(tx, event)
        for dest in event.payload["to"]:
            tx.emit(dest, "t", {"n": event.payload["n"]})

    emit(router, "org:acme", "user:bob", 1, topic="fanout", to=["user:carol", "user:dave"])
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [1]
    assert router.query("user:carol", "SELECT source, n FROM applied") == [("user:bob", 1)]
    assert router.query("user:dave", "SELECT source, n FROM applied") == [("user:bob", 1)]


def test_a_recreated_source_is_a_new_incarnation_and_its_events_are_applied(router: Router) -> None:
    for i in range(3):
        emit(router, "user:src", "user:dst", i)
    router.relay.drain(timeout=30)
    assert applied(router, "user:dst") == [0, 1, 2]
    router.drop("user:src")
    for i in range(3, 5):
        emit(router, "user:src", "user:dst", i)  # the first write re-creates the tenant
    assert [r[0] for r in outbox(router, "user:src")] == [1, 2]  # seqs restart in the new file
    router.relay.drain(timeout=30)
    assert applied(router, "user:dst") == [0, 1, 2, 3, 4]
    ids = [e for (e,) in router.query("user:dst", "SELECT event_id FROM applied ORDER BY id")]
    old_inc, new_inc = ids[0].split("/")[1], ids[3].split("/")[1]
    assert old_inc != new_inc and ids[3].endswith("/1")
    marks = internal_rows(router, "user:dst",
                          "SELECT source, incarnation, last_seq FROM _shardlite_inbox ORDER BY last_seq")
    assert sorted(marks) == sorted([("user:src", old_inc, 3), ("user:src", new_inc, 2)])


# -- finding pending work: the global DB --------------------------------------------------------------------


def test_the_global_db_is_written_only_on_transitions(router: Router) -> None:
    emit(router, "user:alice", "user:bob", 0)  # outbox empty -> non-empty: flag written
    (flag,) = pending_rows(router.root)
    conn = global_db(router.root)
    try:
        before = conn.execute("PRAGMA data_version").fetchall()
        for i in range(1, 51):
            emit(router, "user:alice", "user:bob", i)  # outbox already non-empty: no global write
        with router.transaction("user:alice") as tx:
            for i in range(51, 55):
                tx.emit("user:carol", "t", {"n": i})
        assert conn.execute("PRAGMA data_version").fetchall() == before
        assert pending_rows(router.root) == [flag]
        emit(router, "user:zed", "user:bob", 0)  # control: a new source with an empty outbox flags itself
        assert conn.execute("PRAGMA data_version").fetchall() != before
    finally:
        conn.close()
    assert [k for k, _ in pending_rows(router.root)] == ["user:alice", "user:zed"]
    router.relay.drain(timeout=30)
    assert len(applied(router, "user:bob")) == 52
    assert pending_rows(router.root) == []


@pytest.mark.parametrize("step", ["claimed", "delivered", "acknowledged"])
def test_an_event_emitted_during_a_relay_pass_is_not_stranded(router: Router, step: str) -> None:
    # §7: the flag must survive an emit that lands in the middle of a pass, in particular right after the
    # acknowledgement emptied the outbox and before the relay drops the flag.
    emit(router, "user:alice", "user:bob", 0)
    fired: list[str] = []

    def emit_now(at: str) -> None:
        if at == step and not fired:
            fired.append(at)
            emit(router, "user:alice", "user:bob", 1)

    router.relay.fault = emit_now
    router.relay.run_once()
    assert fired == [step]
    router.relay.fault = None
    assert flag_rows(router.root) != []  # the late event is still flagged (due, or parked and woken later)...
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [0, 1]  # ...so it is delivered
    assert pending_rows(router.root) == []


def claims(router: Router, key: str) -> tuple[Any, ...]:
    return tuple(internal_rows(router, key, "SELECT claimed_by, claimed_until FROM _shardlite_relay")[0])


def test_a_relay_keeps_its_lease_between_passes_and_gives_it_up_on_stop_and_after_drain(
        make: Callable[..., Router]) -> None:
    # acknowledgements keep the lease (the next pass reads instead of re-claiming); stop() and the end of
    # drain() release it, so another relay can take the source at once instead of after the lease
    first = make(retry=FAST)
    first.handler("t")(record)
    emit(first, "user:alice", "user:bob", 0)
    first.relay.run_once()
    claimed_by, claimed_until = claims(first, "user:alice")
    assert claimed_by == first.relay.id and claimed_until > time.time()
    emit(first, "user:alice", "user:bob", 1)
    first.relay.run_once()  # delivered through the lease it holds
    assert applied(first, "user:bob") == [0, 1] and claims(first, "user:alice")[0] == first.relay.id
    first.relay.stop()
    assert claims(first, "user:alice") == (None, 0)

    emit(first, "user:alice", "user:bob", 2)
    first.relay.drain(timeout=30)
    assert claims(first, "user:alice") == (None, 0)

    first.relay.run_once()  # nothing to do, but the source is not held either
    emit(first, "user:alice", "user:bob", 3)
    first.relay.run_once()
    second = make(retry=FAST)
    second.handler("t")(record)
    emit(second, "user:alice", "user:bob", 4)
    assert second.relay.run_once().skipped == 1  # the first relay still holds it
    first.relay.stop()
    # the second relay looks again within claimed_recheck, long before the 10 s lease would have ended
    deadline = time.monotonic() + 8.0
    while not second.relay.run_once().delivered:
        assert time.monotonic() < deadline, "the released source was not taken over before the lease's end"
        time.sleep(0.01)
    assert applied(first, "user:bob") == [0, 1, 2, 3, 4]


def test_in_process_relay_is_woken_by_a_commit(make: Callable[..., Router]) -> None:
    router = make(relay=True)
    router.handler("t")(record)
    assert router.relay.running
    for i in range(20):
        emit(router, f"user:{i % 2}", "user:bob", i)
    wait_for(lambda: len(applied(router, "user:bob")) == 20, "20 events applied by the relay thread")
    assert applied(router, "user:bob", "user:0") == list(range(0, 20, 2))
    router.close()
    assert not router.relay.running


_EMITTER = """
import sys
from shardlite import Router
root, count = sys.argv[1], int(sys.argv[2])
schema = {schema!r}
with Router(root, schema=schema) as router:
    for i in range(count):
        with router.transaction(f"src:{{i % 3}}") as tx:
            tx.emit("user:sink", "t", {{"n": i}})
"""


def test_no_event_is_stranded_when_another_process_emits_while_the_relay_runs(
        make: Callable[..., Router], tmp_path: Path) -> None:
    router = make(relay=True)  # the root exists before the emitter starts
    router.handler("t")(record)
    script = tmp_path / "emitter.py"
    script.write_text(_EMITTER.format(schema=SCHEMA))
    count = 1000
    proc = subprocess.run([sys.executable, os.fspath(script), router.root, str(count)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: len(applied(router, "user:sink")) == count, f"{count} events from another process")
    for s in range(3):
        assert applied(router, "user:sink", f"src:{s}") == [i for i in range(count) if i % 3 == s]
    wait_for(lambda: pending_rows(router.root) == [], "the pending flags to be cleared")
    assert router.relay.status()["pending"] == 0


# -- the relay CLI ------------------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[Any]]:
    code = shardlite.cli.main(list(argv))
    out = capsys.readouterr().out
    return code, [json.loads(line) for line in out.splitlines() if line.strip()]


def test_cli_relay_status_dead_and_retry_json(router: Router, capsys: pytest.CaptureFixture[str]) -> None:
    @router.handler("p")
    def poison(tx: Any, event: Event) -> None:
        raise RuntimeError("boom")

    emit(router, "user:alice", "user:bob", 0, topic="p")
    emit(router, "user:alice", "user:bob", 1)
    emit(router, "user:alice", "user:carol", 2, topic="nobody")
    code, (status,) = _cli(capsys, "relay", "status", "--root", router.root, "--json")
    assert code == 0
    assert status["pending"] == 3 and status["dead_letters"] == 0
    assert status["topics"] == {"nobody": 1, "p": 1, "t": 1}
    assert status["nodes"]["n1"]["pending"] == 3

    router.relay.unhandled_recheck = 0.05
    router.relay.drain(timeout=30)
    code, letters = _cli(capsys, "relay", "dead", "--root", router.root, "--json")
    assert code == 0
    assert [(d["source"], d["seq"], d["dest"], d["topic"], d["attempts"]) for d in letters] == [
        ("user:alice", 1, "user:bob", "p", 3)]
    assert "boom" in letters[0]["error"]
    code, (status,) = _cli(capsys, "relay", "status", "--root", router.root, "--json")
    assert status["pending"] == 1 and status["dead_letters"] == 1 and status["topics"] == {"nobody": 1}

    code, (result,) = _cli(capsys, "relay", "retry", "--root", router.root, "--json", "--source", "user:alice",
                           "--seq", "1")
    assert code == 0 and result == {"requeued": 1}
    code, letters = _cli(capsys, "relay", "dead", "--root", router.root, "--json")
    assert letters == []
    code, (status,) = _cli(capsys, "relay", "status", "--root", router.root, "--json")
    assert status["pending"] == 2 and status["topics"] == {"nobody": 1, "p": 1}
    code, (result,) = _cli(capsys, "relay", "retry", "--root", router.root, "--json")
    assert result == {"requeued": 0}


_APP = """
import os
from shardlite import Router
from shardlite.core.outbox import RetryPolicy

ROOT = {root!r}
SCHEMA = {schema!r}
STARTED = []


def record(tx, event):
    tx.execute("INSERT INTO applied(source, dest, topic, n, seq, event_id, pid) VALUES (?, ?, ?, ?, ?, ?, ?)",
               (event.source, event.dest, event.topic, event.payload["n"], event.seq, event.id, os.getpid()))


def make():
    router = Router(ROOT, schema=SCHEMA, retry=RetryPolicy(max_attempts=3, backoff_base=0.001))
    router.handler("t")(record)
    return router


app = make  # importing this module starts nothing
"""


def test_cli_relay_run_once_drains_and_exits_zero(router: Router, tmp_path: Path) -> None:
    for i in range(25):
        emit(router, f"src:{i % 2}", "user:bob", i)
    emit(router, "src:0", "user:carol", 99, topic="nobody")
    (tmp_path / "relayapp_once.py").write_text(_APP.format(root=router.root, schema=SCHEMA))
    exe = Path(sys.executable).with_name("shardlite")
    proc = subprocess.run([os.fspath(exe), "relay", "run", "--app", "relayapp_once:app", "--once", "--json"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["delivered"] == 25 and report["dead"] == 0
    assert report["unhandled_topics"] == ["nobody"]
    assert applied(router, "user:bob", "src:0") == list(range(0, 25, 2))
    assert applied(router, "user:bob", "src:1") == list(range(1, 25, 2))
    pids = {p for (p,) in router.query("user:bob", "SELECT DISTINCT pid FROM applied")}
    assert len(pids) == 1 and os.getpid() not in pids  # applied by the subprocess
    assert router.relay.status()["pending"] == 1  # the unhandled one stays

    # --root that disagrees with the app's root is refused
    other = tmp_path / "other"
    bad = subprocess.run([os.fspath(exe), "relay", "run", "--app", "relayapp_once:app", "--once",
                          "--root", os.fspath(other)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "does not match" in bad.stderr


def test_cli_relay_run_with_a_bad_app_spec_exits_two(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert shardlite.cli.main(["relay", "run", "--app", "no_colon_here", "--once"]) == 2
    assert "module:attr" in capsys.readouterr().err


def test_dead_letter_retry_for_an_unknown_dead_letter_is_zero(router: Router) -> None:
    assert router.relay.retry_dead(source="user:nobody") == 0
    with pytest.raises(UnknownTenant):
        router.feed("user:nobody")


def test_a_source_locked_by_the_app_is_acknowledged_by_a_later_pass(router: Router) -> None:
    """A pass does not wait out an application transaction holding the source: the delivery stands, the
    acknowledgement is left to a later pass (which redelivers: a no-op), and nothing is lost or doubled.
    A busy acknowledgement never counts as a failed attempt."""
    for n in range(3):
        emit(router, "user:alice", "user:bob", n)
    holder = apsw.Connection(router.locate("user:alice").path)  # another connection: the app's writer
    holder.setbusytimeout(5000)

    def lock_source(at: str) -> None:
        if at == "delivered":
            holder.execute("BEGIN IMMEDIATE")

    store = router._store
    plain_begin = store.begin
    waits: list[int | None] = []

    def spying_begin(handle: Any, wait_ms: int | None = None) -> bool:
        if handle.key == "user:alice" and holder.in_transaction:
            waits.append(wait_ms)
        return plain_begin(handle, wait_ms)

    store.begin = spying_begin  # type: ignore[method-assign]
    router.relay.fault = lock_source
    stats = router.relay.run_once()
    router.relay.fault = None
    store.begin = plain_begin  # type: ignore[method-assign]
    assert waits == [0, ACK_WAIT_MS]  # never the router's busy timeout (5 s) while the app holds the source
    assert applied(router, "user:bob") == [0, 1, 2]  # delivered
    assert stats.delivered == 0 and stats.failed == 0  # ... not acknowledged, and not a failure
    holder.execute("ROLLBACK")
    holder.close()
    assert [row[4] for row in outbox(router, "user:alice")] == [0, 0, 0]  # still there, no attempt counted
    assert pending_rows(router.root) != []  # and still flagged
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [0, 1, 2]  # exactly once
    assert outbox(router, "user:alice") == [] and pending_rows(router.root) == []


# -- pending-work flags written in batches ------------------------------------------------------------------------


def test_emitter_writes_queued_flags_together_and_each_before_its_commit() -> None:
    from shardlite.front.transaction import Emitter

    writes: list[list[str]] = []
    fail = [False]

    def flag_many(keys: list[str]) -> None:
        if fail[0]:
            raise OSError("global DB unavailable")
        writes.append(keys)

    em = Emitter(flag_many)
    em.flag("a")
    em.flag("b")
    em.flush("a")  # a's commit: writes a, and b with it
    assert writes == [["a", "b"]]
    em.flush("b")  # b's commit: written since it was queued, nothing to do
    assert writes == [["a", "b"]]
    em.flag("b")  # a new transaction of b queues it again: its commit must write again
    em.flush("b")
    assert writes == [["a", "b"], ["b"]]
    em.flush("c", queued_here=False)  # queued in another thread: always written here
    assert writes[-1] == ["c"]
    fail[0] = True
    em.flag("d")
    with pytest.raises(OSError):
        em.flush("d")  # the commit must not go ahead: the flag stays queued
    fail[0] = False
    em.flush("e", queued_here=False)
    assert writes[-1] == ["d", "e"]


def _metadata_read_only(router: Router, on: bool) -> None:
    """Make the root's global DB refuse writes (SQLITE_READONLY on its writer), or accept them again."""
    router._store.meta.globaldb.writer.execute(f"PRAGMA query_only = {int(on)}")


def test_a_commit_whose_flag_cannot_be_written_commits_nothing(router: Router) -> None:
    """The metadata refuses the pending flag: the emitting transaction fails with MetaUnavailable (not a
    storage error of the tenant), nothing of it commits (no event, no business row), and once the metadata
    is back the same write goes through and is delivered."""
    with router.transaction("user:alice") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('before')")
    _metadata_read_only(router, True)
    with pytest.raises(MetaUnavailable, match="global.db") as caught:
        with router.transaction("user:alice") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('lost')")
            tx.emit("user:bob", "t", {"n": 1})
    assert not isinstance(caught.value, (StorageError, ConfigurationError, Busy))
    assert outbox(router, "user:alice") == [] and pending_rows(router.root) == []
    assert router.query("user:alice", "SELECT body FROM notes") == [("before",)]
    with router.transaction("user:alice") as tx:  # a transaction that needs no flag still commits
        tx.execute("INSERT INTO notes(body) VALUES ('no event')")
    _metadata_read_only(router, False)
    emit(router, "user:alice", "user:bob", 2)
    router.relay.drain(timeout=30)
    assert applied(router, "user:bob") == [2]
    assert pending_rows(router.root) == []


def test_an_async_emit_whose_flag_cannot_be_written_raises_meta_unavailable_and_commits_nothing(root: str) -> None:
    import asyncio

    from shardlite import AsyncRouter

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            ar.handler("t")(record)
            async with ar.transaction("user:alice") as tx:
                await tx.execute("INSERT INTO notes(body) VALUES ('before')")
            writer = ar._store.meta.globaldb.writer
            writer.execute("PRAGMA query_only = 1")
            try:
                with pytest.raises(MetaUnavailable):
                    async with ar.transaction("user:alice") as tx:
                        await tx.execute("INSERT INTO notes(body) VALUES ('lost')")
                        await tx.emit("user:bob", "t", {"n": 1})
            finally:
                writer.execute("PRAGMA query_only = 0")
            assert await ar.query("user:alice", "SELECT body FROM notes") == [("before",)]
            async with ar.transaction("user:alice") as tx:
                await tx.emit("user:bob", "t", {"n": 2})
            await ar.relay.drain(timeout=30)
            assert await ar.query("user:bob", "SELECT n FROM applied") == [(2,)]

    asyncio.run(main())
    assert pending_rows(root) == []


def test_concurrent_async_transactions_share_flag_writes_and_strand_nothing(root: str) -> None:
    import asyncio

    from shardlite import AsyncRouter

    writes: list[list[str]] = []

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            ar.handler("t")(record)
            plain = ar._store.emitter._flag_many

            def counting(keys: list[str]) -> None:
                writes.append(keys)
                plain(keys)

            ar._store.emitter._flag_many = counting  # type: ignore[method-assign]

            async def send(i: int) -> None:
                async with ar.transaction(f"user:s{i}") as tx:
                    await tx.emit("user:sink", "t", {"n": i})

            await asyncio.gather(*(send(i) for i in range(40)))
            assert sum(len(keys) for keys in writes) >= 40  # every source flagged...
            assert len(writes) < 40  # ...in fewer global writes than transactions
            await ar.relay.drain(timeout=30)
            assert sorted(n for (n,) in await ar.query("user:sink", "SELECT n FROM applied")) == list(range(40))

    asyncio.run(main())
    assert pending_rows(root) == []
