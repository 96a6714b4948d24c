"""AsyncRouter's relay task is woken by the commits that emitted (``AsyncRelay._notify``): a commit on the
event loop's thread sets the task's event directly, a commit on another thread through the loop's
thread-safe call; either way the source is passed over at once. Sequencing by bounded polling, no sleeps
as assertions."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path
from typing import Any

from shardlite import AsyncRouter
from shardlite.core.outbox import Event

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY, n INTEGER NOT NULL)"]


def record(tx: Any, event: Event) -> None:
    tx.execute("INSERT INTO applied(n) VALUES (?)", (event.payload["n"],))


async def applied(ar: AsyncRouter) -> list[int]:
    if not await ar.exists("dst:1"):
        return []
    return [n for (n,) in await ar.query("dst:1", "SELECT n FROM applied ORDER BY id")]


async def until(check: Any, what: str, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_commits_on_the_loop_wake_the_relay(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncRouter(os.fspath(tmp_path / "data"), schema=SCHEMA, relay=False) as ar:
            ar.handler("t")(record)
            relay = ar.relay
            relay.sync.poll_interval = 3600.0  # only a notification wakes the task (never the poll)
            relay.start()
            try:
                for n in (1, 2, 3):  # each commit runs on the loop's thread; the task waits between them
                    await until(lambda: _not_set(relay._event), "the task waiting")
                    async with ar.transaction("src:1") as tx:
                        await tx.emit("dst:1", "t", {"n": n})
                    await until(lambda n=n: _eq(applied(ar), list(range(1, n + 1))), f"event {n}")
            finally:
                await relay.stop()

    asyncio.run(main())


def test_a_notification_from_another_thread_alone_wakes_the_task(tmp_path: Path) -> None:
    async def main() -> None:
        async with AsyncRouter(os.fspath(tmp_path / "data"), schema=SCHEMA, relay=False) as ar:
            ar.handler("t")(record)
            relay = ar.relay
            relay.sync.poll_interval = 3600.0
            relay.start()
            try:
                # an emit that notifies nobody (the relay's listener removed for it), then a notification
                # from a thread: only that one can get the event delivered before the hour-long poll
                ar._store.emitter.unlisten(relay._notify)
                async with ar.transaction("src:1") as tx:
                    await tx.emit("dst:1", "t", {"n": 7})
                ar._store.emitter.listen(relay._notify)
                await until(lambda: _not_set(relay._event), "the task waiting")
                thread = threading.Thread(target=relay._notify, args=("src:1",))
                thread.start()
                thread.join()
                await until(lambda: _eq(applied(ar), [7]), "the event, woken from another thread")
            finally:
                await relay.stop()

    asyncio.run(main())


async def _eq(got: Any, want: list[int]) -> bool:
    return bool(await got == want)


async def _not_set(event: asyncio.Event | None) -> bool:
    return event is not None and not event.is_set()
