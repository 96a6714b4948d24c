"""The sync Router API (brief §4): transactions, savepoints, queries, locate, nodes, drop, lifecycle, run/Busy."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import apsw
import pytest

from shardlite import (
    Busy,
    ConfigurationError,
    InvalidKey,
    Location,
    Router,
    ShardliteError,
    StatementNotAllowed,
    Transaction,
    TransactionClosed,
    UnknownTenant,
)

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]


@pytest.fixture
def router(make_router: Any) -> Router:
    return make_router(schema=SCHEMA)  # type: ignore[no-any-return]


def rows(router: Router, key: str = "user:1") -> list[tuple[Any, ...]]:
    return router.query(key, "SELECT id, v FROM t ORDER BY id")


def files_under(root: str) -> set[str]:
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        out |= {os.path.join(dirpath, n) for n in dirnames + filenames}
    return out


# -- transactions ------------------------------------------------------------------------------------------------


def test_commit_on_success(router: Router) -> None:
    with router.transaction("user:1") as tx:
        assert isinstance(tx, Transaction)
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'a')")
        tx.execute("INSERT INTO t(id, v) VALUES (?, ?)", (2, "b"))
        tx.execute("INSERT INTO t(id, v) VALUES (:id, :v)", {"id": 3, "v": "c"})
    assert rows(router) == [(1, "a"), (2, "b"), (3, "c")]


def test_rollback_on_exception(router: Router) -> None:
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'kept')")
    with pytest.raises(ValueError, match="boom"):
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO t(id, v) VALUES (2, 'lost')")
            tx.execute("UPDATE t SET v = 'changed' WHERE id = 1")
            raise ValueError("boom")
    assert rows(router) == [(1, "kept")]


def test_callers_sql_error_surfaces_as_apsw_error_and_rolls_back(router: Router) -> None:
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'a')")
    with pytest.raises(apsw.ConstraintError):
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO t(id, v) VALUES (2, 'lost')")
            tx.execute("INSERT INTO t(id, v) VALUES (1, 'duplicate')")
    with pytest.raises(apsw.SQLError):
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO t(id, v) VALUES (3, 'lost too')")
            tx.execute("SELEC nonsense")
    assert rows(router) == [(1, "a")]
    # an error that the body catches does not abort the transaction
    with router.transaction("user:1") as tx:
        with pytest.raises(apsw.ConstraintError):
            tx.execute("INSERT INTO t(id, v) VALUES (1, 'dup')")
        tx.execute("INSERT INTO t(id, v) VALUES (4, 'after caught error')")
    assert rows(router) == [(1, "a"), (4, "after caught error")]


def test_cursor_lastrowid_and_changes(router: Router) -> None:
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(v) VALUES ('a')")
        first = tx.lastrowid
        tx.execute("INSERT INTO t(v) VALUES ('b')")
        assert tx.lastrowid == first + 1
        assert tx.changes == 1
        tx.executemany("INSERT INTO t(v) VALUES (?)", [("c",), ("d",)])
        tx.execute("UPDATE t SET v = upper(v)")
        assert tx.changes == 4
        cur = tx.execute("SELECT v FROM t ORDER BY id")
        assert cur.fetchone() == ("A",)
        assert cur.fetchall() == [("B",), ("C",), ("D",)]
        assert list(tx.execute("SELECT count(*) FROM t")) == [(4,)]
        assert tx.execute("SELECT v FROM t WHERE id = -1").fetchone() is None


def test_transaction_object_refuses_statements_outside_its_block_and_a_second_entry(router: Router) -> None:
    scope = router.transaction("user:1")
    with pytest.raises(TransactionClosed):
        scope.execute("INSERT INTO t(v) VALUES ('before')")  # not entered yet
    with scope as tx:
        assert isinstance(tx, Transaction)
        tx.execute("INSERT INTO t(v) VALUES ('inside')")
    with pytest.raises(TransactionClosed):
        tx.execute("INSERT INTO t(v) VALUES ('after')")
    with pytest.raises(ShardliteError, match="only once"), scope:
        pass
    assert rows(router) == [(1, "inside")]


def test_nested_transaction_is_a_savepoint(router: Router) -> None:
    with router.transaction("user:1") as outer:
        outer.execute("INSERT INTO t(id, v) VALUES (1, 'outer')")
        with pytest.raises(RuntimeError):
            with router.transaction("user:1") as inner:
                inner.execute("INSERT INTO t(id, v) VALUES (2, 'inner, rolled back')")
                inner.execute("UPDATE t SET v = 'clobbered' WHERE id = 1")
                raise RuntimeError("inner fails")
        # only the inner part was undone; the outer transaction goes on
        assert outer.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [(1, "outer")]
        with router.transaction("user:1") as inner2:
            inner2.execute("INSERT INTO t(id, v) VALUES (3, 'inner kept')")
            with router.transaction("user:1") as deepest:
                deepest.execute("INSERT INTO t(id, v) VALUES (4, 'deepest kept')")
        with pytest.raises(apsw.ConstraintError):
            with router.transaction("user:1") as inner3:
                inner3.execute("INSERT INTO t(id, v) VALUES (5, 'rolled back')")
                inner3.execute("INSERT INTO t(id, v) VALUES (1, 'duplicate')")
        outer.execute("INSERT INTO t(id, v) VALUES (6, 'outer again')")
    assert rows(router) == [(1, "outer"), (3, "inner kept"), (4, "deepest kept"), (6, "outer again")]


def test_outer_failure_rolls_back_committed_savepoints(router: Router) -> None:
    with pytest.raises(KeyError):
        with router.transaction("user:1") as outer:
            outer.execute("INSERT INTO t(id, v) VALUES (1, 'outer')")
            with router.transaction("user:1") as inner:
                inner.execute("INSERT INTO t(id, v) VALUES (2, 'inner')")
            raise KeyError("outer fails after the savepoint was released")
    assert rows(router) == []


def test_transaction_unusable_after_the_block(router: Router) -> None:
    with router.transaction("user:1") as tx:
        with router.transaction("user:1") as inner:
            inner.execute("INSERT INTO t(id, v) VALUES (1, 'x')")
        with pytest.raises(TransactionClosed):
            inner.execute("INSERT INTO t(id, v) VALUES (2, 'escaped savepoint')")
        tx.execute("INSERT INTO t(id, v) VALUES (3, 'y')")
    for call in (lambda: tx.execute("INSERT INTO t(id, v) VALUES (4, 'autocommit?')"),
                 lambda: tx.executemany("INSERT INTO t(v) VALUES (?)", [("z",)]),
                 lambda: tx.emit("user:2", "topic", {"a": 1}),
                 lambda: tx.execute("SELECT 1")):
        with pytest.raises(TransactionClosed):
            call()
    with pytest.raises(ValueError):
        with router.transaction("user:1") as failed:
            raise ValueError
    with pytest.raises(TransactionClosed):
        failed.execute("INSERT INTO t(id, v) VALUES (5, 'after rollback')")
    assert issubclass(TransactionClosed, ShardliteError)
    assert rows(router) == [(1, "x"), (3, "y")]


def test_transactions_on_two_keys_are_independent(router: Router) -> None:
    with router.transaction("user:1") as a:
        a.execute("INSERT INTO t(id, v) VALUES (1, 'a')")
        with pytest.raises(ZeroDivisionError):
            with router.transaction("user:2") as b:
                b.execute("INSERT INTO t(id, v) VALUES (1, 'b')")
                1 / 0  # noqa: B018
    assert rows(router, "user:1") == [(1, "a")]
    assert rows(router, "user:2") == []  # created (first write transaction), but its body rolled back


# -- queries ---------------------------------------------------------------------------------------------------


def test_query_returns_a_list_of_tuples(router: Router) -> None:
    with router.transaction("user:1") as tx:
        tx.executemany("INSERT INTO t(id, v) VALUES (?, ?)", [(1, "a"), (2, "b")])
    out = router.query("user:1", "SELECT id, v FROM t WHERE id >= ? ORDER BY id", (1,))
    assert type(out) is list and all(type(r) is tuple for r in out)
    assert out == [(1, "a"), (2, "b")]
    assert router.query("user:1", "SELECT v FROM t WHERE id = :id", {"id": 2}) == [("b",)]
    assert router.query("user:1", "SELECT v FROM t WHERE id = 99") == []


def test_query_sees_only_committed_data(router: Router) -> None:
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'committed')")
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (2, 'pending')")
        assert rows(router) == [(1, "committed")]
        assert tx.execute("SELECT count(*) FROM t").fetchall() == [(2,)]
    assert rows(router) == [(1, "committed"), (2, "pending")]


def test_query_on_missing_tenant_creates_nothing(router: Router, root: str) -> None:
    with router.transaction("user:1"):
        pass
    before_files = files_under(root)
    before_tenants = list(router.tenants())
    with pytest.raises(UnknownTenant):
        router.query("user:404", "SELECT 1")
    with pytest.raises(UnknownTenant):
        router.query("user:404", "SELECT * FROM t")
    assert issubclass(UnknownTenant, LookupError) and issubclass(UnknownTenant, ShardliteError)
    assert router.exists("user:404") is False
    assert list(router.tenants()) == before_tenants == ["user:1"]
    assert files_under(root) == before_files
    assert router.locate("user:404").state == "absent"


@pytest.mark.parametrize("key", ["", "a\x00b", "user:\u202e1", "x" * 4096, b"user:1", 7, None])
def test_invalid_key_raises_and_creates_nothing(router: Router, root: str, key: Any) -> None:
    with router.transaction("user:1"):
        pass
    before_files = files_under(root)
    with pytest.raises(InvalidKey):
        with router.transaction(key):
            pass
    with pytest.raises(InvalidKey):
        router.query(key, "SELECT 1")
    with pytest.raises(InvalidKey):
        router.locate(key)
    with pytest.raises(InvalidKey):
        router.run(key, lambda tx: None)
    with pytest.raises(InvalidKey):
        router.drop(key)
    assert files_under(root) == before_files
    assert list(router.tenants()) == ["user:1"]


@pytest.mark.parametrize("sql", [
    "INSERT INTO t(id, v) VALUES (9, 'sneaky')",
    "UPDATE t SET v = 'sneaky'",
    "DELETE FROM t",
    "REPLACE INTO t(id, v) VALUES (1, 'sneaky')",
    "CREATE TABLE extra(x)",
    "DROP TABLE t",
    "CREATE INDEX t_v ON t(v)",
    "SELECT 1; DELETE FROM t",
    "WITH x AS (SELECT 1) DELETE FROM t",
])
def test_query_refuses_writes(router: Router, sql: str) -> None:
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'a')")
    schema = router.query("user:1", "SELECT name, sql FROM sqlite_master ORDER BY name")
    with pytest.raises(StatementNotAllowed):
        router.query("user:1", sql)
    assert rows(router) == [(1, "a")]
    assert router.query("user:1", "SELECT name, sql FROM sqlite_master ORDER BY name") == schema
    with router.transaction("user:1") as tx:  # the tenant still takes writes normally
        tx.execute("INSERT INTO t(id, v) VALUES (2, 'b')")
    assert rows(router) == [(1, "a"), (2, "b")]


# -- locate, exists, tenants --------------------------------------------------------------------------------------


def test_locate_absent_and_present(make_router: Any, root: str) -> None:
    router = make_router(nodes=["n1", "n2", "n3"], schema=SCHEMA)
    before = files_under(root)
    loc = router.locate("user:new")
    assert isinstance(loc, Location)
    assert loc.state == "absent" and loc.path is None and loc.node in {"n1", "n2", "n3"}
    assert files_under(root) == before, "locate must never create anything"
    assert router.exists("user:new") is False
    with router.transaction("user:new") as tx:
        tx.execute("INSERT INTO t(v) VALUES ('x')")
    found = router.locate("user:new")
    assert found.state == "active"
    assert found.node == loc.node, "a new tenant goes where the ring proposed"
    assert found.path is not None and os.path.isfile(found.path)
    assert os.path.dirname(os.path.dirname(found.path)) == os.path.join(root, found.node)
    assert found.epoch >= 1
    assert router.exists("user:new") is True


def test_tenants_lists_live_keys_in_order(router: Router) -> None:
    assert list(router.tenants()) == []
    for key in ("user:b", "user:a", "org:z"):
        with router.transaction(key):
            pass
    assert list(router.tenants()) == ["org:z", "user:a", "user:b"]
    router.drop("user:a")
    assert list(router.tenants()) == ["org:z", "user:b"]


# -- nodes -------------------------------------------------------------------------------------------------------


def test_nodes_disagreeing_with_existing_root(make_router: Any, root: str) -> None:
    make_router(nodes=["n1", "n2"]).close()
    with pytest.raises(ConfigurationError, match="shardlite nodes add"):
        Router(root, nodes=["n1", "n2", "n3"])
    with pytest.raises(ConfigurationError, match="shardlite nodes"):
        Router(root, nodes=["n1"])
    with pytest.raises(ConfigurationError, match="shardlite nodes"):
        Router(root, nodes=["a", "b"])
    same = make_router(nodes=["n2", "n1"])  # same set, other order: fine
    assert [n["name"] for n in same.status()["nodes"]] == ["n1", "n2"]
    same.close()
    catalog_owned = make_router()  # no nodes=: the catalog's list is used
    assert [n["name"] for n in catalog_owned.status()["nodes"]] == ["n1", "n2"]


def test_default_root_has_one_node(router: Router, root: str) -> None:
    assert [n["name"] for n in router.status()["nodes"]] == ["n1"]
    assert os.path.isdir(os.path.join(root, "n1"))


@pytest.mark.parametrize("nodes", [[], ["n1", "n1"], ["../evil"], ["a/b"], [""], [".hidden"]])
def test_bad_node_lists_are_refused(root: str, nodes: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        Router(root, nodes=nodes)
    assert not os.path.exists(root), "a refused configuration must not create the data root"
    assert not os.path.exists(os.path.join(os.path.dirname(root), "evil"))


def test_create_false_refuses_a_missing_root(root: str) -> None:
    with pytest.raises(ConfigurationError):
        Router(root, create=False)
    assert not os.path.exists(root)


# -- drop and generations -------------------------------------------------------------------------------------


def test_drop_then_recreate_uses_a_new_generation_and_path(make_router: Any, root: str) -> None:
    router = make_router(schema=SCHEMA)
    paths: list[str] = []
    generations: list[int] = []
    for life in range(3):
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO t(v) VALUES (?)", (f"life {life}",))
        loc = router.locate("user:1")
        assert loc.path is not None and os.path.isfile(loc.path)
        assert rows(router) == [(1, f"life {life}")], "a re-created tenant starts empty"
        paths.append(loc.path)
        generations.append(loc.generation)
        router.drop("user:1")
        assert not router.exists("user:1")
        assert router.locate("user:1").state == "absent"
        for suffix in ("", "-wal", "-shm"):
            assert not os.path.exists(loc.path + suffix)
        with pytest.raises(UnknownTenant):
            router.query("user:1", "SELECT 1")
    assert len(set(paths)) == 3 and generations == sorted(set(generations))
    with pytest.raises(UnknownTenant):
        router.drop("user:1")
    with pytest.raises(UnknownTenant):
        router.drop("user:never")
    router.close()
    # a new process (router) keeps counting: no old path is ever reused
    again = make_router(schema=SCHEMA)
    with again.transaction("user:1"):
        pass
    loc = again.locate("user:1")
    assert loc.path not in paths and loc.generation > max(generations)


def test_generations_are_unique_across_tenants(router: Router) -> None:
    gens = []
    for i in range(20):
        with router.transaction(f"user:{i}"):
            pass
        gens.append(router.locate(f"user:{i}").generation)
    assert len(set(gens)) == 20


# -- lifecycle ---------------------------------------------------------------------------------------------------


def _make_and_forget(root: str) -> None:
    r = Router(root)
    with r.transaction("user:1"):
        pass


def test_unclosed_router_emits_resource_warning(root: str) -> None:
    with pytest.warns(ResourceWarning, match="never closed"):
        _make_and_forget(root)
        gc.collect()


def test_closed_router_does_not_warn(root: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = Router(root)
        r.close()
        r.close()  # idempotent
        del r
        with Router(root) as r2:
            with r2.transaction("user:1"):
                pass
        assert r2.closed
        del r2
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_closed_router_refuses_work(router: Router) -> None:
    with router.transaction("user:1"):
        pass
    router.close()
    assert router.closed
    with pytest.raises(ShardliteError):
        with router.transaction("user:1"):
            pass
    with pytest.raises(ShardliteError):
        router.query("user:1", "SELECT 1")


# -- run() and Busy ---------------------------------------------------------------------------------------------


def test_run_returns_fns_result(router: Router) -> None:
    def fn(tx: Transaction) -> int:
        tx.execute("INSERT INTO t(v) VALUES ('via run')")
        return tx.lastrowid

    assert router.run("user:1", fn) == 1
    assert rows(router) == [(1, "via run")]
    with pytest.raises(ValueError):
        router.run("user:1", lambda tx: (tx.execute("INSERT INTO t(v) VALUES ('lost')"), int("x")))
    assert rows(router) == [(1, "via run")]


def test_run_retries_the_whole_transaction_on_busy(router: Router) -> None:
    calls = []

    def flaky(tx: Transaction) -> str:
        calls.append(1)
        tx.execute("INSERT INTO t(v) VALUES (?)", (f"attempt {len(calls)}",))
        if len(calls) < 3:
            raise Busy("simulated")
        return "done"

    assert router.run("user:1", flaky) == "done"
    assert len(calls) == 3
    assert rows(router) == [(1, "attempt 3")], "failed attempts must have been rolled back whole"


def test_run_nested_in_a_transaction_uses_the_outer_one(router: Router) -> None:
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'outer')")
        assert router.run("user:1", lambda inner: inner.execute("SELECT count(*) FROM t").fetchall()) == [(1,)]


_LOCKER = textwrap.dedent(
    """
    import sys, apsw
    conn = apsw.Connection(sys.argv[1])
    conn.setbusytimeout(10000)
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO t(v) VALUES ('from the locker')")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("ROLLBACK")
    conn.close()
    print("released", flush=True)
    """
)


@pytest.fixture
def busy_router(make_router: Any) -> Router:
    r = make_router(schema=SCHEMA, busy_timeout_ms=50)
    with r.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(id, v) VALUES (1, 'before')")
    return r  # type: ignore[no-any-return]


@pytest.fixture
def locker(busy_router: Router) -> Iterator[subprocess.Popen[str]]:
    """A subprocess holding BEGIN IMMEDIATE (through APSW) on user:1's file until told to roll back."""
    path = busy_router.locate("user:1").path
    with subprocess.Popen([sys.executable, "-c", _LOCKER, str(path)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        try:
            line = proc.stdout.readline()
            assert line.strip() == "locked", proc.stderr.read()
            yield proc
        finally:
            if proc.poll() is None:
                try:
                    proc.stdin.write("\n")
                    proc.stdin.flush()
                except BrokenPipeError:
                    pass
                proc.wait(timeout=30)


def _release(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "released"
    assert proc.wait(timeout=30) == 0


def test_busy_when_another_process_holds_the_write_lock(busy_router: Router, locker: Any) -> None:
    ran = []
    with pytest.raises(Busy):
        with busy_router.transaction("user:1") as tx:
            ran.append(tx)
    assert not ran, "the body must not run when BEGIN IMMEDIATE could not get the lock"
    with pytest.raises(Busy):
        busy_router.run("user:1", lambda tx: ran.append(tx), timeout=0.2)
    assert not ran
    # reads are not blocked by a writer (WAL)
    assert rows(busy_router) == [(1, "before")]
    _release(locker)

    def after(tx: Transaction) -> str:
        tx.execute("INSERT INTO t(v) VALUES ('after')")
        return "ok"

    assert busy_router.run("user:1", after) == "ok"
    assert rows(busy_router) == [(1, "before"), (2, "after")]
    with busy_router.transaction("user:1") as tx:
        tx.execute("INSERT INTO t(v) VALUES ('plain')")
    assert len(rows(busy_router)) == 3


def test_a_writer_waits_out_a_lock_within_its_busy_timeout(busy_router: Router, locker: Any,
                                                          make_router: Any) -> None:
    """The busy handler itself (no run() retries): a writer with a long timeout blocks in BEGIN IMMEDIATE
    while another process holds the lock, and goes on as soon as it is released."""
    patient = make_router(schema=SCHEMA, busy_timeout_ms=60_000)
    entered = threading.Event()
    result: list[Any] = []

    def write() -> None:
        entered.set()
        try:
            with patient.transaction("user:1") as tx:
                tx.execute("INSERT INTO t(v) VALUES ('patient')")
            result.append("committed")
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result.append(exc)

    worker = threading.Thread(target=write)
    worker.start()
    assert entered.wait(timeout=60)
    assert result == []  # still waiting for the lock (it cannot have committed while the locker holds it)
    _release(locker)
    worker.join(timeout=60)
    assert result == ["committed"]
    assert rows(busy_router) == [(1, "before"), (2, "patient")]


def test_busy_delay_schedule_starts_short_and_adds_up_to_the_timeout() -> None:
    from shardlite.files.engine import busy_delay

    for limit in (0.0001, 0.003, 0.05, 1.0, 5.0):
        delays = []
        while (delay := busy_delay(len(delays), limit)) is not None:
            delays.append(delay)
            assert len(delays) < 10_000
        assert delays[0] <= 0.0001
        assert all(0 < d <= 0.01 for d in delays)
        assert sum(delays) == pytest.approx(limit)
        assert delays[:-1] == sorted(delays[:-1])  # never shorter than the one before (the last is clipped)


def test_run_waits_out_a_lock_by_retrying(busy_router: Router, locker: Any) -> None:
    store = busy_router._store
    busy_seen = threading.Event()
    original_begin = store.begin

    def spying_begin(handle: Any, wait_ms: int | None = None) -> bool:
        try:
            return original_begin(handle, wait_ms)
        except Busy:
            busy_seen.set()
            raise

    store.begin = spying_begin  # type: ignore[method-assign]
    calls: list[int] = []
    result: list[Any] = []

    def fn(tx: Transaction) -> str:
        calls.append(1)
        tx.execute("INSERT INTO t(v) VALUES ('eventually')")
        return "committed"

    worker = threading.Thread(target=lambda: result.append(busy_router.run("user:1", fn, timeout=60)))
    worker.start()
    try:
        assert busy_seen.wait(timeout=60), "run() never hit the held lock"
    finally:
        _release(locker)
        worker.join(timeout=60)
    assert result == ["committed"]
    assert calls == [1], "fn only runs once BEGIN IMMEDIATE succeeded"
    assert rows(busy_router) == [(1, "before"), (2, "eventually")]


def test_busy_is_a_shardlite_error() -> None:
    assert issubclass(Busy, ShardliteError)
