"""Read-only fan-out over many tenants: ``router.map`` and ``shardlite query`` (brief §4 CLI).

* over 2,000 tenants on three nodes the fan-out totals equal the sum of per-tenant queries (and what the
  test wrote), every tenant answers exactly once, and the router's connection pool is left alone;
* a statement that writes (in any disguise: CTE, multi-statement text, schema change, pragma, VACUUM,
  ANALYZE, ...) is refused with ``StatementNotAllowed`` and nothing changes;
* tenants are read as they are: no migration on the way, tenants on an older schema version are reported
  in ``MapResult.outdated`` (their files keep their version);
* results stream: at most ``2 * parallel`` tenants are pulled ahead of the consumer;
* ``shardlite query --json`` prints one object ``{"key", "columns", "rows"}`` per tenant per line.

Files are inspected with APSW only (never the stdlib ``sqlite3``: brief §3).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import apsw
import pytest

import shardlite.cli
import shardlite.services.fanout
from shardlite import ConfigurationError, Router, StatementNotAllowed

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER NOT NULL)"]
SCHEMA_V2 = SCHEMA + ["CREATE TABLE extra(id INTEGER PRIMARY KEY, note TEXT)"]
TOTAL_SQL = "SELECT count(*) AS n, coalesce(sum(v), 0) AS s FROM t"
N_TENANTS = 2000

WRITES = [
    "INSERT INTO t(v) VALUES (1)",
    "UPDATE t SET v = v + 1",
    "DELETE FROM t",
    "REPLACE INTO t(id, v) VALUES (1, 5)",
    "WITH x(a) AS (SELECT 1) INSERT INTO t(v) SELECT a FROM x",
    "SELECT count(*) FROM t; DELETE FROM t",
    "CREATE TABLE intruder(a)",
    "CREATE TEMP TABLE scratch(a)",
    "DROP TABLE t",
    "CREATE INDEX t_v ON t(v)",
    "PRAGMA user_version = 7",
    "PRAGMA query_only = 0",
    "VACUUM",
    "ANALYZE",
    "REINDEX",
]


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = shardlite.cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def _user_version(path: str) -> int:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        version: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
        return int(version)
    finally:
        conn.close()


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """``make(name="data", **kwargs)``: a Router on ``tmp_path/name``; all closed at teardown."""
    made: list[Router] = []

    def factory(name: str = "data", **kwargs: Any) -> Router:
        router = Router(tmp_path / name, **kwargs)
        made.append(router)
        return router

    yield factory
    for router in reversed(made):
        router.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Router, dict[str, tuple[int, int]]]]:
    """2,000 tenants on three nodes; ``expected[key] = (rows, sum of v)``. Tests only read it."""
    root = tmp_path_factory.mktemp("fanout") / "data"
    router = Router(root, nodes=["n1", "n2", "n3"], schema=SCHEMA)
    expected: dict[str, tuple[int, int]] = {}
    for i in range(N_TENANTS):
        values = [(i * 7 + j * 13) % 101 for j in range(i % 5)]  # 0 to 4 rows, some tenants empty
        expected[f"org:{i:04d}"] = (len(values), sum(values))

    def create(i: int) -> None:
        with router.transaction(f"org:{i:04d}") as tx:
            for j in range(i % 5):
                tx.execute("INSERT INTO t(v) VALUES (?)", ((i * 7 + j * 13) % 101,))

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:  # a Router may be shared by threads
            for _ in pool.map(create, range(N_TENANTS)):
                pass
        yield router, expected
    finally:
        router.close()


# -- 2,000 tenants ---------------------------------------------------------------------------------------


def test_map_over_2000_tenants_equals_per_tenant_sums(big: tuple[Router, dict[str, tuple[int, int]]]) -> None:
    router, expected = big
    counts = router.status()["tenants_per_node"]
    assert sum(counts.values()) == N_TENANTS and all(counts[n] > 0 for n in ("n1", "n2", "n3"))

    # a writing statement over all of them is refused first, and changes nothing (checked by the totals)
    with pytest.raises(StatementNotAllowed):
        for _ in router.map("DELETE FROM t", parallel=8):
            pass

    open_before = router.stats()["open_connections"]
    result = router.map(TOTAL_SQL, parallel=8)
    seen: dict[str, tuple[int, int]] = {}
    for key, rows in result:
        assert key not in seen, f"{key} answered twice"
        assert len(rows) == 1
        seen[key] = (rows[0][0], rows[0][1])
    assert result.count == N_TENANTS
    assert result.errors == {} and result.outdated == {}
    assert result.columns == ["n", "s"]
    assert seen == expected
    # the fan-out opens its own short-lived connections: the router's pool is left alone
    assert router.stats()["open_connections"] == open_before

    # the same totals as summing one query per tenant
    per_tenant = [0, 0]
    for key in router.tenants():
        n, s = router.query(key, TOTAL_SQL)[0]
        per_tenant[0] += n
        per_tenant[1] += s
    fanout_total = [sum(n for n, _ in seen.values()), sum(s for _, s in seen.values())]
    assert fanout_total == per_tenant
    assert per_tenant == [sum(n for n, _ in expected.values()), sum(s for _, s in expected.values())]


@pytest.mark.parametrize("sql", WRITES)
def test_map_refuses_a_writing_statement(big: tuple[Router, dict[str, tuple[int, int]]], sql: str) -> None:
    router, expected = big
    with pytest.raises(StatementNotAllowed):
        for _ in router.map(sql, parallel=4):
            pass
    # nothing changed anywhere (spot-check the first tenants, which the refused statement reached first)
    keys = sorted(expected)[:20]
    got = {k: rows[0] for k, rows in router.map(TOTAL_SQL, keys=keys)}
    assert got == {k: expected[k] for k in keys}
    schema = router.map("SELECT name FROM sqlite_schema WHERE name IN ('intruder', 't_v')", keys=keys[:1])
    assert list(schema) == [(keys[0], [])]


def test_cli_query_all_json_over_2000_tenants(big: tuple[Router, dict[str, tuple[int, int]]],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    router, expected = big
    code, out, err = _cli(capsys, "query", "--all", TOTAL_SQL, "--json", "--root", router.root, "--parallel", "8")
    assert code == 0, err
    lines = _lines(out)
    assert len(lines) == N_TENANTS
    for obj in lines:
        assert set(obj) == {"key", "columns", "rows"}
        assert obj["columns"] == ["n", "s"]
    assert {obj["key"]: tuple(obj["rows"][0]) for obj in lines} == expected


def test_cli_query_refuses_a_write(big: tuple[Router, dict[str, tuple[int, int]]],
                                   capsys: pytest.CaptureFixture[str]) -> None:
    router, expected = big
    key = sorted(expected)[3]
    for argv in (["--all"], ["--key", key]):
        code, out, err = _cli(capsys, "query", *argv, "DELETE FROM t", "--json", "--root", router.root)
        assert code == 2
        assert "read-only" in err and "Traceback" not in err
        assert out == ""
    assert router.query(key, TOTAL_SQL) == [expected[key]]


# -- reading tenants as they are ---------------------------------------------------------------------------


def test_map_reads_tenants_as_they_are_and_reports_outdated(make: Callable[..., Router]) -> None:
    old = make(schema=SCHEMA)
    keys = [f"org:{i}" for i in range(6)]
    for i, key in enumerate(keys):
        with old.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES (?)", (i,))
    old.close()

    router = make(schema=SCHEMA_V2)
    upgraded = keys[:2]
    for key in upgraded:  # a write opens (and so migrates) these two
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO extra(note) VALUES ('new')")
    stale = keys[2:]
    paths = {key: str(router.locate(key).path) for key in keys}
    assert {k: _user_version(p) for k, p in paths.items()} == {**{k: 2 for k in upgraded}, **{k: 1 for k in stale}}

    result = router.map("SELECT count(*) FROM t")
    rows = dict(result)
    assert rows == {key: [(1,)] for key in keys}
    assert result.outdated == {key: 1 for key in stale}
    assert result.errors == {}

    # a statement that needs the new schema fails on the old tenants (reported), works on the new ones
    result = router.map("SELECT count(*) FROM extra")
    assert dict(result) == {key: [(1,)] for key in upgraded}
    assert set(result.errors) == set(stale)
    assert all("extra" in text for text in result.errors.values())

    # nothing was migrated on the way: files and catalog still say version 1
    assert {k: _user_version(paths[k]) for k in stale} == {k: 1 for k in stale}
    assert router.stats()["schema_versions"] == {1: len(stale), 2: len(upgraded)}
    assert all(router.locate(k).path == paths[k] for k in keys)


def test_cli_query_reports_tenants_on_an_older_schema(make: Callable[..., Router],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    old = make(schema=SCHEMA)
    for key in ("org:a", "org:b", "org:c"):
        with old.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES (1)")
    old.close()
    new = make(schema=SCHEMA_V2)
    with new.transaction("org:a") as tx:
        tx.execute("INSERT INTO t(v) VALUES (2)")
    new.close()

    code, out, err = _cli(capsys, "query", "--all", "SELECT count(*) FROM t", "--json", "--root", new.root)
    assert code == 0
    assert len(_lines(out)) == 3
    assert "org:b" in err and "org:c" in err and "schema version 1" in err
    assert "org:a" not in err


# -- streaming ---------------------------------------------------------------------------------------------


def test_map_streams_with_a_bounded_window(make: Callable[..., Router], monkeypatch: pytest.MonkeyPatch) -> None:
    router = make(schema=SCHEMA)
    keys = [f"org:{i:03d}" for i in range(60)]
    for key in keys:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES (1)")

    lock = threading.Lock()
    running = {"now": 0, "max": 0, "started": 0}
    real = shardlite.services.fanout._read_one

    def counting(*args: Any, **kwargs: Any) -> Any:
        with lock:
            running["now"] += 1
            running["started"] += 1
            running["max"] = max(running["max"], running["now"])
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                running["now"] -= 1

    monkeypatch.setattr(shardlite.services.fanout, "_read_one", counting)

    parallel = 3
    pulled = 0

    def key_source() -> Iterator[str]:
        nonlocal pulled
        for key in keys:
            pulled += 1
            yield key

    result = router.map("SELECT count(*) FROM t", keys=key_source(), parallel=parallel)
    assert pulled == 0 and running["started"] == 0  # lazy: nothing runs until iterated
    consumed = 0
    for _key, rows in result:
        consumed += 1
        assert rows == [(1,)]
        assert pulled <= consumed + 2 * parallel, (pulled, consumed)
        assert running["started"] <= consumed + 2 * parallel
    assert consumed == len(keys) == pulled
    assert 1 <= running["max"] <= parallel

    # stopping early never reads the rest
    pulled = 0
    running["started"] = 0
    result = router.map("SELECT count(*) FROM t", keys=key_source(), parallel=parallel)
    first = [next(result) for _ in range(5)]
    assert len(first) == 5
    assert pulled <= 5 + 2 * parallel
    del result


def test_map_with_keys_reports_missing_and_dropped_tenants(make: Callable[..., Router]) -> None:
    router = make(schema=SCHEMA)
    for key in ("org:a", "org:b", "org:c"):
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES (?)", (len(key),))
    router.drop("org:b")
    result = router.map("SELECT v FROM t WHERE v > ?", (0,), keys=["org:a", "org:b", "org:missing", "org:c"])
    assert list(result) == [("org:a", [(5,)]), ("org:c", [(5,)])]
    assert set(result.errors) == {"org:b", "org:missing"}
    assert not router.exists("org:missing")  # reading never creates

    named = router.map("SELECT v FROM t WHERE v = :v", {"v": 5}, keys=["org:a"])
    assert list(named) == [("org:a", [(5,)])]
    with pytest.raises(ConfigurationError):
        router.map("SELECT 1", parallel=0)


_CRASHING_WRITER = """
import os, sys
from shardlite import Router
router = Router(sys.argv[1], schema={schema!r})
for i in range(4):
    with router.transaction(f"org:{{i}}") as tx:
        tx.execute("INSERT INTO t(v) VALUES (3)")
os._exit(0)  # leave the committed frames in the WAL: no close, no checkpoint
"""


def test_map_does_not_checkpoint_or_touch_files(make: Callable[..., Router], tmp_path: Path) -> None:
    root = tmp_path / "data"
    script = tmp_path / "writer.py"
    script.write_text(_CRASHING_WRITER.format(schema=SCHEMA))
    done = subprocess.run([sys.executable, os.fspath(script), os.fspath(root)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    reader = make(schema=SCHEMA)
    keys = [f"org:{i}" for i in range(4)]
    paths = [str(reader.locate(k).path) for k in keys]

    def signature() -> dict[str, tuple[int, int, int, int]]:
        out = {}
        for p in paths:
            db, wal = os.stat(p), os.stat(p + "-wal")
            out[p] = (db.st_size, db.st_mtime_ns, wal.st_size, wal.st_mtime_ns)
        return out

    before = signature()
    assert all(wal_size > 0 for _, _, wal_size, _ in before.values())  # committed frames wait in the WAL
    assert sorted(reader.map("SELECT count(*) FROM t")) == [(k, [(1,)]) for k in keys]
    assert signature() == before  # read as they are: no checkpoint, no migration, no write
    assert reader.stats()["open_connections"] == 0


def test_cli_query_json_prints_one_object_per_tenant(make: Callable[..., Router],
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    router = make(schema=SCHEMA)
    for i in range(4):
        with router.transaction(f"org:{i}") as tx:
            for j in range(i):
                tx.execute("INSERT INTO t(v) VALUES (?)", (10 * i + j,))
    code, out, err = _cli(capsys, "query", "--all", "SELECT id, v FROM t WHERE v >= ? ORDER BY id",
                          "--params", "[20]", "--json", "--root", router.root)
    assert code == 0, err
    lines = _lines(out)
    assert [obj["key"] for obj in lines] == ["org:0", "org:1", "org:2", "org:3"]
    by_key = {obj["key"]: obj["rows"] for obj in lines}
    assert by_key == {"org:0": [], "org:1": [], "org:2": [[1, 20], [2, 21]], "org:3": [[1, 30], [2, 31], [3, 32]]}
    assert all(set(obj) == {"key", "columns", "rows"} for obj in lines)

    code, out, err = _cli(capsys, "query", "--key", "org:3", "SELECT count(*) AS n FROM t", "--json",
                          "--root", router.root)
    assert code == 0
    assert _lines(out) == [{"key": "org:3", "columns": ["n"], "rows": [[3]]}]

    code, out, err = _cli(capsys, "query", "--key", "org:404", "SELECT 1", "--json", "--root", router.root)
    assert code == 1 and out == ""
    assert "org:404" in err
    assert not router.exists("org:404")

    code, out, err = _cli(capsys, "query", "--all", "SELECT count(*) FROM t", "--root", router.root)
    assert code == 0 and "org:3" in out  # the table form


def test_cli_query_json_names_columns_even_for_tenants_without_rows(make: Callable[..., Router],
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    router = make(schema=SCHEMA)
    for i in range(3):
        with router.transaction(f"org:{i}") as tx:
            tx.execute("INSERT INTO t(v) VALUES (?)", (i,))
    code, out, _ = _cli(capsys, "query", "--all", "SELECT id, v FROM t WHERE v >= 1", "--json", "--root", router.root)
    assert code == 0
    lines = _lines(out)
    assert [obj["rows"] for obj in lines] == [[], [[1, 1]], [[1, 2]]]
    assert [obj["columns"] for obj in lines] == [["id", "v"]] * 3


#: fast on a tenant whose t.v is 1, endless (until interrupted) on one whose t.v is huge
COUNT_TO_V = ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < (SELECT max(v) FROM t)) "
              "SELECT count(*) FROM c")


def slow_tenants(make: Callable[..., Router]) -> Router:
    router = make(schema=SCHEMA, statement_timeout=None)  # only stopping the map can end the slow reads
    for key, v in (("org:fast", 1), ("org:slow1", 10**15), ("org:slow2", 10**15), ("org:slow3", 10**15)):
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES (?)", (v,))
    return router


def map_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("shardlite-map")]


def test_closing_a_map_early_interrupts_the_reads_in_flight(make: Callable[..., Router]) -> None:
    router = slow_tenants(make)
    result = router.map(COUNT_TO_V, keys=["org:fast", "org:slow1", "org:slow2", "org:slow3"], parallel=2)
    assert next(result) == ("org:fast", [(1,)])
    assert map_threads()  # two endless reads are running now
    result.close()  # without the interrupt this never returns (the suite's timeout fails the test)
    assert map_threads() == []
    with pytest.raises(StopIteration):
        next(result)


def test_ctrl_c_in_the_consumer_stops_the_map(make: Callable[..., Router]) -> None:
    """A real SIGINT while the consumer waits for an endless read (what `shardlite query` sees): the
    KeyboardInterrupt reaches the caller, and the reading threads are gone."""
    router = slow_tenants(make)
    main = threading.get_ident()

    def interrupt_once_reading() -> None:
        while not map_threads():
            time.sleep(0.001)
        signal.pthread_kill(main, signal.SIGINT)

    sender = threading.Thread(target=interrupt_once_reading)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            for _ in router.map(COUNT_TO_V, keys=["org:slow1", "org:slow2"], parallel=2):
                pass
    finally:
        sender.join()
    # A SIGINT landing outside next() leaves the map abandoned, not closed: its reads stop when it is collected
    # (as a `break` without close() would); and one landing inside ThreadPoolExecutor.submit, between a
    # worker's start and its registration, leaves that idle worker unjoined for a moment. Wait for both.
    deadline = time.monotonic() + 10
    while map_threads() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.005)
    assert map_threads() == []
