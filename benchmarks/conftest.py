"""Fixtures of the pytest-benchmark suite (``.venv/bin/python -m pytest benchmarks -q --benchmark-only``).

Not part of ``make test`` (pyproject's ``testpaths`` is ``tests/``) and without any timing assertion: the
figures are for reading and comparing. ``benchmarks/compare.py`` (``make bench``) measures the same rows
side by side in one interleaved run and prints the ratios against the targets.

Everything is session-scoped (built once, closed at the end, so no ResourceWarning). The stdlib ``sqlite3``
and ``aiosqlite`` baselines run in a worker process on their own file (``sqlite3_worker.py``): this process
only ever loads APSW's SQLite.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import apsw
import pytest
import workloads as w

from shardlite import AsyncRouter, Router


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return os.fspath(tmp_path_factory.mktemp("shardlite-bench"))


@pytest.fixture(scope="session")
def params() -> list[tuple[int]]:
    return w.point_params()


@pytest.fixture(scope="session")
def router(bench_dir: str) -> Iterator[Router]:
    r = w.make_router(os.path.join(bench_dir, "sync"))
    yield r
    r.close()


def _direct(bench_dir: str, synchronous: str) -> Iterator[apsw.Connection]:
    conn = w.open_direct(os.path.join(bench_dir, f"direct-{synchronous.lower()}.db"), synchronous)
    yield conn
    conn.close()


@pytest.fixture(scope="session")
def direct(bench_dir: str) -> Iterator[apsw.Connection]:
    """One open APSW connection on its own file: WAL, synchronous=NORMAL."""
    yield from _direct(bench_dir, "NORMAL")


@pytest.fixture(scope="session")
def direct_full(bench_dir: str) -> Iterator[apsw.Connection]:
    """The same at synchronous=FULL."""
    yield from _direct(bench_dir, "FULL")


@pytest.fixture(scope="session")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    ev = asyncio.new_event_loop()
    yield ev
    ev.close()


def _async_router(bench_dir: str, loop: asyncio.AbstractEventLoop, synchronous: str) -> Iterator[AsyncRouter]:
    ar = w.make_async_router(os.path.join(bench_dir, f"async-{synchronous.lower()}"), loop,
                             synchronous=synchronous)
    yield ar
    loop.run_until_complete(ar.aclose())


@pytest.fixture(scope="session")
def async_router(bench_dir: str, loop: asyncio.AbstractEventLoop) -> Iterator[AsyncRouter]:
    yield from _async_router(bench_dir, loop, "NORMAL")


@pytest.fixture(scope="session")
def async_router_full(bench_dir: str, loop: asyncio.AbstractEventLoop) -> Iterator[AsyncRouter]:
    yield from _async_router(bench_dir, loop, "FULL")


def _remote(bench_dir: str, mode: str, name: str) -> Iterator[w.RemoteSide]:
    os.makedirs(os.path.join(bench_dir, "stdlib"), exist_ok=True)
    remote = w.RemoteSide(mode, os.path.join(bench_dir, "stdlib", f"{name}.db"))
    yield remote
    remote.close()


@pytest.fixture(scope="session")
def stdlib_worker(bench_dir: str) -> Iterator[w.RemoteSide]:
    """stdlib sqlite3 point reads, in a worker process on its own file."""
    yield from _remote(bench_dir, "sqlite3-read", "stdlib")


@pytest.fixture(scope="session")
def aiosqlite_worker(bench_dir: str) -> Iterator[w.RemoteSide]:
    """aiosqlite point reads from 64 tasks sharing one connection, in a worker process on its own file."""
    yield from _remote(bench_dir, "aiosqlite-read", "aiosqlite")


@pytest.fixture
def shardlite_creator(bench_dir: str, request: pytest.FixtureRequest) -> Iterator[w.ShardliteCreator]:
    creator = w.ShardliteCreator(os.path.join(bench_dir, f"create-{request.node.name}"))
    yield creator
    creator.close()


@pytest.fixture
def by_hand_creator(bench_dir: str, request: pytest.FixtureRequest) -> Iterator[w.ByHandCreator]:
    creator = w.ByHandCreator(os.path.join(bench_dir, f"by-hand-{request.node.name}"))
    yield creator
    creator.close()


@pytest.fixture
def by_hand_schema_first_creator(bench_dir: str, request: pytest.FixtureRequest) -> Iterator[w.ByHandCreator]:
    creator = w.ByHandCreator(os.path.join(bench_dir, f"by-hand-{request.node.name}"), schema_first=True)
    yield creator
    creator.close()
