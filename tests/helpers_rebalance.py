"""Helpers for the rebalance recovery tests (``test_rebalance_recovery.py``, the kill -9 tests in
``test_rebalance_procs.py``): populate tenants, read the journal and the catalog directly (read-only APSW,
independent of the router under test), check files and the state a tenant is left in; and the move of the
replica tests (``test_replica_drops.py``, ``test_erase.py``): a node added, the plan applied.

Nothing here sleeps to make a point: :func:`wait_for` polls a condition with a generous deadline.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from typing import Any

import apsw
from helpers_meta import meta_rows

from shardlite import Router, TenantMoving
from shardlite.core.placement import tenant_relpath

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
          "CREATE TABLE w(id INTEGER PRIMARY KEY, writer TEXT, seq INTEGER)"]
DEADLINE = 90.0  # generous bound for waiting loops; never a timing assertion


def populate(router: Router, count: int, *, prefix: str = "user", rows: int = 1) -> list[str]:
    keys = [f"{prefix}:{i}" for i in range(count)]
    for key in keys:
        with router.transaction(key) as tx:
            for j in range(rows):
                tx.execute("INSERT INTO t(v) VALUES (?)", (f"{key}/{j}",))
    return keys


def move_to_a_new_node(router: Router, keys: list[str], node: str = "n2") -> list[str]:
    """Adds ``node`` (under the root), plans and applies a rebalance; returns the keys of ``keys`` it moved onto
    ``node`` (at least one, or the test fails)."""
    router.nodes.add(node)
    router.rebalance.plan()
    router.rebalance.apply()
    moved = [key for key in keys if (record := router._store.meta.tenants.lookup(key)) is not None
             and record.node == node]
    assert moved, "the ring moved nothing to the new node"
    return moved


def contents(router: Router) -> dict[str, list[tuple[Any, ...]]]:
    return {key: router.query(key, "SELECT id, v FROM t ORDER BY id") for key in router.tenants()}


def ro(path: str) -> apsw.Connection:
    return apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_NOFOLLOW)


def gread(root: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the metadata of ``root`` directly, in global.db's schema, whichever backend keeps it
    (:func:`helpers_meta.meta_rows`: global.db through read-only APSW, or a PostgreSQL export)."""
    return meta_rows(root, sql, params)


def journal(root: str, plan_id: int) -> list[dict[str, Any]]:
    names = ("key", "source", "target", "source_generation", "target_generation", "step", "error", "owner", "lease")
    rows = gread(root, f"SELECT {', '.join(names)} FROM _shardlite_moves WHERE plan_id = ? ORDER BY source, key",
                 (plan_id,))
    return [dict(zip(names, row, strict=True)) for row in rows]


def catalog_states(root: str) -> dict[str, tuple[str, str, int]]:
    """``{key: (state, node, generation)}`` of every tenant in the catalog."""
    rows = gread(root, "SELECT key, state, node, generation FROM _shardlite_tenants")
    return {str(k): (str(s), str(n), int(g)) for k, s, n, g in rows}


def file_info(path: str) -> tuple[bool, str | None, str | None]:
    """``(integrity ok, stored key, retired marker)`` of a tenant file, read-only."""
    conn = ro(path)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        key, retired = conn.execute("SELECT key, retired FROM _shardlite_meta WHERE id = 1").fetchall()[0]
        return ok, key, retired
    finally:
        conn.close()


def node_path(router: Router, name: str) -> str:
    return next(n.path for n in router.nodes.list() if n.name == name)


def source_path(router: Router, move: dict[str, Any]) -> str:
    return os.path.join(node_path(router, move["source"]), tenant_relpath(move["key"], move["source_generation"]))


def tenant_files(root: str) -> tuple[set[str], set[str]]:
    """``(*.db files, every other file)`` under the node directories (the global DB excluded)."""
    dbs, others = set(), set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if dirpath == root and name.startswith(("global.db", "app_global.db", "meta.json")):
                continue
            (dbs if name.endswith(".db") else others).add(os.path.join(dirpath, name))
    return dbs, others


def retired_sources(router: Router, plan_id: int) -> set[str]:
    return {source_path(router, m) for m in journal(router.root, plan_id) if m["step"] == "done"}


def assert_no_orphans(router: Router, retired: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """The *.db files are exactly the live tenants plus ``retired``; other files are only their WAL/SHM
    (no partial copy left anywhere); live files are intact and unfenced."""
    dbs, others = tenant_files(router.root)
    live = {str(router.locate(k).path) for k in router.tenants()}
    assert dbs == live | retired, {"unexpected": dbs - live - retired, "missing": (live | retired) - dbs}
    companions = {p + s for p in dbs for s in ("-wal", "-shm")}
    assert others <= companions, others - companions
    for path in live:
        ok, _key, marker = file_info(path)
        assert ok and marker is None, (path, marker)


def move_generations(root: str) -> dict[str, int]:
    return dict(gread(root, "SELECT key, count(*) FROM _shardlite_generations WHERE purpose = 'move' GROUP BY key"))


def assert_reachable_now(root: str, keys: list[str], tag: str) -> None:
    """Every key is active in the catalog, unfenced, and readable and writable *at once*: a router with
    ``move_wait=0`` raises TenantMoving instead of waiting for a fenced or moving tenant."""
    states = catalog_states(root)
    with Router(root, move_wait=0) as impatient:
        for key in keys:
            assert states[key][0] == "active", (key, states[key])
            path = impatient.locate(key).path
            assert path is not None and file_info(path)[2] is None, (key, file_info(str(path)))
            try:
                impatient.query(key, "SELECT count(*) FROM t")
                with impatient.transaction(key) as tx:
                    tx.execute("INSERT INTO t(v) VALUES (?)", (tag,))
            except TenantMoving as exc:  # pragma: no cover - the failure this helper exists to report
                raise AssertionError(f"{key} is not reachable right away: {exc}") from exc


def faulting(step: str, exc: type[BaseException] = RuntimeError) -> Callable[[str], None]:
    def fault(name: str) -> None:
        if name == step:
            raise exc(f"injected at {step}")
    return fault


def wait_for(what: str, check: Callable[[], bool], *, procs: tuple[subprocess.Popen[str], ...] = (),
             deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                _out, err = proc.communicate()
                raise AssertionError(f"a helper process exited ({proc.returncode}) while waiting for {what}: "
                                     f"{err[-2000:]}")
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)
