"""The built-in activity feed (``router.use_feed``, ``router.feed``) and the relay under ``AsyncRouter``."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardlite import AsyncRouter, Router, UnknownTenant
from shardlite.core.outbox import Event
from shardlite.front.feed import FeedItem

SCHEMA = ["CREATE TABLE messages(id INTEGER PRIMARY KEY, author TEXT, body TEXT)",
          "CREATE TABLE applied(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, n INTEGER NOT NULL)"]
DEADLINE = 20.0  # generous bound for polling loops; never a timing assertion


def record(tx: Any, event: Event) -> None:
    tx.execute("INSERT INTO applied(source, n) VALUES (?, ?)", (event.source, event.payload["n"]))


@pytest.fixture
def root(tmp_path: Path) -> str:
    return os.fspath(tmp_path / "data")


@pytest.fixture
def router(root: str) -> Iterator[Router]:
    r = Router(root, schema=SCHEMA)
    r.use_feed("message", "like")
    yield r
    r.close()


def send(router: Router, source: str, dest: str, n: int, topic: str = "message") -> None:
    with router.transaction(source) as tx:
        tx.execute("INSERT INTO messages(author, body) VALUES (?, ?)", (source, f"m{n}"))
        tx.emit(dest, topic, {"n": n, "text": f"m{n}"})


def test_feed_is_newest_first_and_pages_back_without_overlap(router: Router) -> None:
    for n in range(7):
        send(router, "dm:alice:bob", "user:bob", n, topic="message" if n % 2 == 0 else "like")
    before = time.time()
    router.relay.drain(timeout=30)
    first = router.feed("user:bob", limit=2)
    assert [item.payload["n"] for item in first] == [6, 5]
    item = first[0]
    assert (item.source, item.topic, item.payload) == ("dm:alice:bob", "message", {"n": 6, "text": "m6"})
    assert first[1].topic == "like"
    assert item.event_id.startswith("dm:alice:bob/") and item.event_id.endswith("/7")
    assert item.at <= before  # when the source emitted it, not when the relay delivered it
    assert isinstance(item, FeedItem) and item._fields == ("id", "source", "topic", "payload", "event_id", "at")
    with pytest.raises(AttributeError):  # a snapshot: immutable
        item.topic = "other"  # type: ignore[misc]
    pages = [first]
    while pages[-1] and len(pages) < 10:  # bounded: a cursor that never moves must fail, not hang
        pages.append(router.feed("user:bob", limit=2, before=pages[-1][-1].id))
    ns = [it.payload["n"] for page in pages for it in page]
    assert ns == [6, 5, 4, 3, 2, 1, 0]
    assert [len(p) for p in pages] == [2, 2, 2, 1, 0]
    ids = [it.id for page in pages for it in page]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 7
    assert [it.payload["n"] for it in router.feed("user:bob")] == ns  # the default limit covers all
    assert router.feed("user:bob", limit=0) == []
    assert router.feed("user:bob", before=ids[-1]) == []


def test_feed_from_several_sources_pages_cover_everything_once_in_order_per_source(router: Router) -> None:
    sources = ["dm:alice:bob", "dm:bob:carol", "org:acme"]
    for n in range(20):
        send(router, sources[n % 3], "user:bob", n)
    router.relay.drain(timeout=30)
    seen: list[Any] = []
    page = router.feed("user:bob", limit=3)
    while page:
        assert len(seen) < 40, "paging does not end"
        assert all(it.id < seen[-1].id for it in page) if seen else True
        seen.extend(page)
        page = router.feed("user:bob", limit=3, before=page[-1].id)
    assert sorted(it.payload["n"] for it in seen) == list(range(20))  # none missing, none twice
    for s, source in enumerate(sources):  # newest first within each source
        assert [it.payload["n"] for it in seen if it.source == source] == list(range(20))[s::3][::-1]


def test_feed_of_a_tenant_that_does_not_exist_raises(router: Router) -> None:
    with pytest.raises(UnknownTenant):
        router.feed("user:nobody")
    assert not router.exists("user:nobody")


def test_feed_is_only_written_by_the_relay_and_only_for_feed_topics(router: Router) -> None:
    router.handler("other")(record)
    send(router, "user:alice", "user:bob", 1)
    send(router, "user:alice", "user:bob", 2, topic="other")
    assert not router.exists("user:bob")  # nothing happens before the relay runs
    router.relay.drain(timeout=30)
    assert [it.payload["n"] for it in router.feed("user:bob")] == [1]
    assert router.query("user:bob", "SELECT n FROM applied") == [(2,)]


def test_feed_entries_are_exactly_once_after_a_crash_before_the_acknowledgement(router: Router) -> None:
    for n in range(4):
        send(router, "user:alice", "user:bob", n)

    def crash(step: str) -> None:
        if step == "delivered":
            raise KeyboardInterrupt("simulated crash between the feed's commit and the acknowledgement")

    router.relay.fault = crash
    with pytest.raises(KeyboardInterrupt):
        router.relay.run_once()
    assert len(router.feed("user:bob")) == 4
    router.relay.fault = None
    router.relay.drain(timeout=30)
    assert [it.payload["n"] for it in router.feed("user:bob")] == [3, 2, 1, 0]


def test_feed_with_the_relay_running_for_the_routers_lifetime(root: str) -> None:
    with Router(root, schema=SCHEMA, relay=True) as router:
        router.use_feed("message")
        for n in range(10):
            send(router, f"dm:alice:u{n % 2}", "user:alice", n)
        end = time.monotonic() + DEADLINE
        while not (router.exists("user:alice") and len(router.feed("user:alice")) == 10):
            assert time.monotonic() < end, "the relay did not deliver 10 feed events in time"
            time.sleep(0.01)
        feed = router.feed("user:alice")
        for s in range(2):
            assert [it.payload["n"] for it in feed if it.source == f"dm:alice:u{s}"] == list(range(s, 10, 2))[::-1]


# -- AsyncRouter --------------------------------------------------------------------------------------------


async def _wait_feed(ar: AsyncRouter, key: str, count: int) -> list[Any]:
    end = time.monotonic() + DEADLINE
    while True:
        try:
            items = await ar.feed(key)
        except UnknownTenant:
            items = []
        if len(items) >= count:
            return items
        assert time.monotonic() < end, f"{key}: {len(items)} of {count} feed events after {DEADLINE} s"
        await asyncio.sleep(0.01)


def test_async_router_relay_task_delivers(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            ar.use_feed("message")
            ar.handler("count")(record)
            ar.relay.start()
            assert ar.relay.running
            for n in range(12):
                async with ar.transaction(f"dm:alice:u{n % 3}") as tx:
                    await tx.execute("INSERT INTO messages(author, body) VALUES (?, ?)", ("alice", f"m{n}"))
                    await tx.emit("user:alice", "message", {"n": n})
                    await tx.emit("user:carol", "count", {"n": n})
            items = await _wait_feed(ar, "user:alice", 12)
            for s in range(3):  # newest first, in order per source
                assert [it.payload["n"] for it in items if it.source == f"dm:alice:u{s}"] == list(range(s, 12, 3))[::-1]
            page = await ar.feed("user:alice", limit=5, before=items[4].id)
            assert [it.id for it in page] == [it.id for it in items[5:10]]
            end = time.monotonic() + DEADLINE
            while len(rows := await _applied(ar)) < 12:
                assert time.monotonic() < end
                await asyncio.sleep(0.01)
            for s in range(3):
                assert [n for src, n in rows if src == f"dm:alice:u{s}"] == list(range(s, 12, 3))
            await ar.relay.stop()
            assert not ar.relay.running
            status = await ar.relay.status()
            assert status["pending"] == 0 and status["running"] is False

    asyncio.run(main())


async def _applied(ar: AsyncRouter) -> list[tuple[Any, ...]]:
    try:
        return await ar.query("user:carol", "SELECT source, n FROM applied ORDER BY id")
    except UnknownTenant:
        return []


def test_async_router_relay_true_and_explicit_drain(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA, relay=True) as ar:
            ar.use_feed("message")
            assert ar.relay.running
            async with ar.transaction("dm:a:b") as tx:
                await tx.emit("user:b", "message", {"n": 1})
            items = await _wait_feed(ar, "user:b", 1)
            assert items[0].source == "dm:a:b"
        assert not ar.relay.running
        async with AsyncRouter(root, schema=SCHEMA) as ar:  # relay not started: drain on demand
            ar.use_feed("message")
            async with ar.transaction("dm:a:b") as tx:
                await tx.emit("user:b", "message", {"n": 2})
            stats = await ar.relay.drain(timeout=30)
            assert stats.delivered == 1
            assert [it.payload["n"] for it in await ar.feed("user:b")] == [2, 1]

    asyncio.run(main())


def test_async_emit_rolled_back_with_its_transaction(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            ar.use_feed("message")
            with pytest.raises(RuntimeError):
                async with ar.transaction("dm:a:b") as tx:
                    await tx.emit("user:b", "message", {"n": 1})
                    raise RuntimeError("abort")
            async with ar.transaction("dm:a:b") as tx:
                await tx.emit("user:b", "message", {"n": 2})
            await ar.relay.drain(timeout=30)
            assert [it.payload["n"] for it in await ar.feed("user:b")] == [2]

    asyncio.run(main())


def test_async_relay_stop_returns_even_when_a_wake_up_arrives_with_it(root: str) -> None:
    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            ar.relay.sync.poll_interval = 30.0  # the task sits in its wait for a wake-up
            ar.relay.start()
            for _ in range(50):
                await asyncio.sleep(0.01)  # let it finish its first pass and start waiting
            ar.relay._event.set()  # type: ignore[union-attr]  # a wake-up, as a commit that emitted sends...
            try:  # ...arriving together with stop()
                await asyncio.wait_for(asyncio.shield(ar.relay.stop()), 2.0)
            except TimeoutError:
                pytest.fail("AsyncRelay.stop() did not return")
            # (asyncio.run cancels the surviving task at exit, so the test itself never hangs)

    asyncio.run(main())


def test_feed_payloads_of_every_json_shape_read_back_as_emitted(router: Router) -> None:
    # the reader decodes a page's payloads in one go: values whose text holds commas, brackets, quotes,
    # big integers, non-ASCII or nothing but a scalar must still come back one per entry, unchanged
    payloads: list[Any] = [
        {"text": "a, b], [c", "q": "\"}{"}, [1, [2, [3]]], "just text, with a comma", 12345678901234567890123,
        -0.5, None, True, {"emoji": "🙂 ünïcode", "nested": {"list": []}}, [], {}, "", 0,
    ]
    with router.transaction("dm:alice:bob") as tx:
        for payload in payloads:
            tx.emit("user:bob", "message", payload)
    router.relay.drain(timeout=30)
    items = router.feed("user:bob", limit=100)
    assert [item.payload for item in reversed(items)] == payloads
    assert [type(item.payload) for item in reversed(items)] == [type(p) for p in payloads]
    page = router.feed("user:bob", limit=3, before=items[4].id)
    assert [item.payload for item in page] == [it.payload for it in items[5:8]]
