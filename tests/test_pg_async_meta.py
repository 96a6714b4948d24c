"""The async front end on PostgreSQL metadata: a read that is a round trip to PostgreSQL never runs on the
event loop (a stalled server stalls that call, not the loop), and a warm session still resolves inline from
the cache. The server is frozen with SIGSTOP (every process of it), a real stall, then thawed."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from helpers_pg import separate_server

from shardlite import AsyncRouter
from shardlite.testing.postgres import PgServer, server_processes


@contextmanager
def frozen(server: PgServer, at_most: float = 15.0) -> Iterator[None]:
    """The server stopped for the block, and thawed by a timer after ``at_most`` seconds whatever happens
    (a call that blocks the loop must fail the test, not hang it)."""
    pids = server_processes(server.datadir)

    def thaw() -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(at_most, thaw)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        thaw()


async def _ticks_while(pending: asyncio.Future[object], ticks_wanted: int, timeout: float) -> int:
    """Count loop ticks (1 ms sleeps) while ``pending`` is not done, up to ``ticks_wanted``."""
    ticks = 0
    deadline = time.monotonic() + timeout
    while not pending.done() and ticks < ticks_wanted and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
        ticks += 1
    return ticks


def test_cold_reads_leave_the_loop_free_while_the_server_stalls(root: str) -> None:
    with separate_server() as server:
        async def main() -> None:
            async with AsyncRouter(root, meta=server.dsn()) as router:
                account = await router.accounts.register("a@example.com", password="pw-123456")
                token = await router.sessions.create(account)
                with frozen(server):
                    cold = asyncio.ensure_future(router.sessions.resolve(token))
                    located = asyncio.ensure_future(router.exists("u:nobody"))
                    both = asyncio.ensure_future(asyncio.gather(cold, located))
                    ticks = await _ticks_while(both, 50, timeout=60)
                    assert ticks == 50 and not both.done()  # the loop ran on while both waited on the server
                session, found = await asyncio.wait_for(both, 60)
                assert session is not None and session.account_id == account and found is False
                assert router.sessions.sync._local(token)  # warm now: the next resolve is a memory read
                assert (await router.sessions.resolve(token)) == session
        asyncio.run(main())
