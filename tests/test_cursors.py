"""``tx.execute`` returns cursors that behave like new ones (sync and async).

Tenant transactions run a statement on the handle's spare cursor when nothing else holds it (see
``_TxCore._execute``). These tests pin what the caller must never be able to tell: a cursor the caller
still holds keeps its rows whatever runs next, and state the caller put on a cursor (tracers, converters,
closing it) never reaches another statement, in the same transaction or a later one.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import apsw
import pytest

from shardlite import AsyncRouter, Router

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]
K = "user:cursors"
ROWS = [(1, "a"), (2, "b"), (3, "c")]


@pytest.fixture
def router(make_router: Callable[..., Router]) -> Router:
    r = make_router(schema=SCHEMA)
    with r.transaction(K) as tx:
        tx.executemany("INSERT INTO t VALUES (?, ?)", ROWS)
    return r


def test_a_held_cursor_keeps_its_rows_while_later_statements_run(router: Router) -> None:
    with router.transaction(K) as tx:
        first = tx.execute("SELECT id, v FROM t ORDER BY id")
        assert first.fetchone() == (1, "a")
        second = tx.execute("SELECT v FROM t WHERE id = ?", (3,))
        tx.execute("INSERT INTO t VALUES (4, 'd')")
        assert second is not first
        assert second.fetchall() == [("c",)]
        assert first.fetchall() == [(2, "b"), (3, "c"), (4, "d")]  # resumed where it was, not reset


def test_a_cursor_held_after_its_transaction_is_not_reused_by_the_next(router: Router) -> None:
    with router.transaction(K) as tx:
        kept = tx.execute("SELECT id FROM t ORDER BY id")
        assert kept.fetchone() == (1,)
    with router.transaction(K) as tx:
        other = tx.execute("SELECT 'x'")
        assert other is not kept
        assert other.fetchall() == [("x",)]


def test_dropped_cursors_keep_no_caller_state(router: Router) -> None:
    seen: list[Any] = []

    def tracer(cursor: apsw.Cursor, row: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(row)
        return ("traced",)

    def exec_tracer(cursor: apsw.Cursor, sql: str, bindings: Any) -> bool:
        seen.append(sql)
        return True

    def convert(cursor: apsw.Cursor, num: int, value: Any) -> Any:
        return "converted"

    with router.transaction(K) as tx:
        cur = tx.execute("SELECT v FROM t WHERE id = 1")
        cur.row_trace = tracer
        assert cur.fetchall() == [("traced",)]
        del cur
        gc.collect()
        assert tx.execute("SELECT v FROM t WHERE id = 2").fetchall() == [("b",)]
        cur = tx.execute("SELECT 1")
        cur.exec_trace = exec_tracer
        cur.fetchall()
        del cur
        assert tx.execute("SELECT v FROM t WHERE id = 3").fetchall() == [("c",)]
        cur = tx.execute("SELECT 1")
        cur.convert_binding = convert
        del cur
        with pytest.raises(TypeError):  # no converter: an object SQLite cannot bind is refused
            tx.execute("SELECT ?", (object(),))
        tx.execute("SELECT 1").close()
        assert tx.execute("SELECT count(*) FROM t").fetchall() == [(3,)]
    with router.transaction(K) as tx:
        assert tx.execute("SELECT v FROM t ORDER BY id").fetchall() == [("a",), ("b",), ("c",)]
    assert seen == [("a",)]  # each tracer saw only its own statement


def test_async_members_of_a_batch_never_share_a_held_cursor(router: Router) -> None:
    root = router.root
    router.close()

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            held: dict[int, apsw.Cursor] = {}
            started = asyncio.Event()

            async def member(i: int) -> list[tuple[Any, ...]]:
                async with ar.transaction(K) as tx:
                    held[i] = await tx.execute("SELECT id FROM t WHERE id <= ? ORDER BY id", (i,))
                    assert held[i].fetchone() == (1,)
                    started.set()
                    await asyncio.sleep(0)  # let the other members run their statements meanwhile
                    await tx.execute("INSERT INTO t(v) VALUES (?)", (f"m{i}",))
                    return list(held[i])

            results = await asyncio.gather(*(member(i) for i in (1, 2, 3)))
            assert started.is_set()
            assert results == [[], [(2,)], [(2,), (3,)]]
            assert len({id(c) for c in held.values()}) == 3
            assert await ar.query(K, "SELECT count(*) FROM t WHERE v LIKE 'm%'") == [(3,)]

    asyncio.run(main())


def test_async_dropped_cursors_keep_no_caller_state(router: Router) -> None:
    """The async twin of the test above (``AsyncTransaction.execute`` has its own copy of the path)."""
    root = router.root
    router.close()
    seen: list[Any] = []

    def tracer(cursor: apsw.Cursor, row: tuple[Any, ...]) -> tuple[Any, ...]:
        seen.append(row)
        return ("traced",)

    async def main() -> None:
        async with AsyncRouter(root, schema=SCHEMA) as ar:
            async with ar.transaction(K) as tx:
                cur = await tx.execute("SELECT v FROM t WHERE id = 1")
                cur.row_trace = tracer
                assert cur.fetchall() == [("traced",)]
                del cur
                assert (await tx.execute("SELECT v FROM t WHERE id = 2")).fetchall() == [("b",)]
                cur = await tx.execute("SELECT 1")
                cur.exec_trace = lambda *a: seen.append("exec") or True
                del cur
                assert (await tx.execute("SELECT v FROM t WHERE id = 3")).fetchall() == [("c",)]
                cur = await tx.execute("SELECT 1")
                cur.convert_binding = lambda *a: "converted"
                del cur
                with pytest.raises(TypeError):
                    await tx.execute("SELECT ?", (object(),))
                (await tx.execute("SELECT 1")).close()
                held = await tx.execute("SELECT id FROM t ORDER BY id")
                assert held.fetchone() == (1,)
                assert (await tx.execute("SELECT count(*) FROM t")).fetchall() == [(3,)]
                assert held.fetchall() == [(2,), (3,)]

    asyncio.run(main())
    assert seen == [("a",)]
