"""Online rebalancing in one process (brief rules 2, 6, 7, 8, 12; §4 CLI; §7 "Moves").

Nodes (add, drain, remove, list, counts), plans (recorded, stale, superseded), apply/resume/cancel/complete,
what a cached router sees across a move, outbox events travelling with their tenant, private files, paths
never reused, bad input that must change nothing, and the ``shardlite nodes``/``shardlite rebalance`` CLI.
Multi-process, SIGSTOP and SIGKILL tests are in ``test_rebalance_procs.py``.

Failures, undo, cancel and leases are in ``test_rebalance_recovery.py``; the process-kill versions are in
the ``_procs`` file. Files are inspected only through APSW, read-only.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers_meta import meta_rows
from helpers_rebalance import contents, ro
from helpers_rebalance import populate as _populate

from shardlite import ConfigurationError, Router, TenantMoving, UnknownTenant
from shardlite.cli import main as cli_main
from shardlite.core.placement import tenant_relpath
from shardlite.core.ring import Ring

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]


def populate(router: Router, count: int, *, prefix: str = "user", rows: int = 2) -> list[str]:
    """helpers_rebalance.populate with two rows per tenant unless told."""
    return _populate(router, count, prefix=prefix, rows=rows)


# -- helpers ------------------------------------------------------------------------------------------------------


@pytest.fixture
def router(make_router: Any) -> Router:
    return make_router(nodes=["n1", "n2"], schema=SCHEMA)  # type: ignore[no-any-return]








def gread(router: Router, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the metadata directly in global.db's schema (read-only APSW on global.db, or an export of the
    PostgreSQL metadata: :func:`helpers_meta.meta_rows`), independent of the router's own connections."""
    return meta_rows(router.root, sql, params)


def file_info(path: str) -> tuple[bool, str | None, str | None]:
    """``(integrity ok, stored key, retired marker)`` of a tenant file, read-only."""
    conn = ro(path)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        key, retired = conn.execute("SELECT key, retired FROM _shardlite_meta WHERE id = 1").fetchall()[0]
        return ok, key, retired
    finally:
        conn.close()


def image_digest(path: str) -> bytes:
    """The whole database image (WAL included) as SQLite serializes it, read-only."""
    conn = ro(path)
    try:
        return bytes(conn.serialize("main") or b"")
    finally:
        conn.close()


def tenant_files(root: str) -> tuple[set[str], set[str]]:
    """``(*.db files, every other file)`` under the node directories (the global DB excluded)."""
    dbs, others = set(), set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            if dirpath == root and name.startswith(("global.db", "app_global.db", "meta.json")):
                continue
            (dbs if name.endswith(".db") else others).add(path)
    return dbs, others


def live_paths(router: Router) -> set[str]:
    return {str(router.locate(k).path) for k in router.tenants()}


def journal(router: Router, plan_id: int) -> list[dict[str, Any]]:
    names = ("key", "source", "target", "source_generation", "target_generation", "step", "error")
    rows = gread(router, f"SELECT {', '.join(names)} FROM _shardlite_moves WHERE plan_id = ? ORDER BY key",
                 (plan_id,))
    return [dict(zip(names, row, strict=True)) for row in rows]


def node_path(router: Router, name: str) -> str:
    return next(n.path for n in router.nodes.list() if n.name == name)


def retired_sources(router: Router, plan_id: int) -> set[str]:
    return {os.path.join(node_path(router, m["source"]), tenant_relpath(m["key"], m["source_generation"]))
            for m in journal(router, plan_id) if m["step"] == "done"}


def assert_no_orphans(router: Router, *, retired: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    """The *.db files are exactly the live tenants plus ``retired``; other files are only their WAL/SHM."""
    dbs, others = tenant_files(router.root)
    live = live_paths(router)
    assert dbs == live | retired, {"unexpected": dbs - live - retired, "missing": (live | retired) - dbs}
    companions = {p + s for p in dbs for s in ("-wal", "-shm")}
    assert others <= companions, others - companions
    for path in live:
        ok, _key, marker = file_info(path)
        assert ok and marker is None, (path, marker)
    for path in retired:
        ok, _key, marker = file_info(path)
        assert ok and marker is not None and marker.startswith("moved:"), (path, marker)


def move_generations(router: Router) -> dict[str, int]:
    return dict(gread(router, "SELECT key, count(*) FROM _shardlite_generations WHERE purpose = 'move' GROUP BY key"))


def snapshot(router: Router) -> dict[str, Any]:
    """Everything a refused operation must leave as it was."""
    dirs, dbs = [], []
    for dirpath, dirnames, names in os.walk(router.root):
        dirs += [os.path.join(dirpath, d) for d in dirnames]
        dbs += [os.path.join(dirpath, n) for n in names if n.endswith(".db")]
    return {
        "nodes": [(n.name, n.path, n.weight, n.state) for n in router.nodes.list()],
        "tenants": gread(router, "SELECT key, node, generation, epoch, state FROM _shardlite_tenants ORDER BY key"),
        "generations": gread(router, "SELECT count(*) FROM _shardlite_generations"),
        "plans": gread(router, "SELECT id, state, fingerprint FROM _shardlite_rebalance ORDER BY id"),
        "moves": gread(router, "SELECT plan_id, key, step, target_generation FROM _shardlite_moves "
                               "ORDER BY plan_id, key"),
        "dirs": sorted(dirs),
        "dbs": sorted(dbs),
        "proposals": {f"new:{i}": router.locate(f"new:{i}").node for i in range(50)},
    }


def faulting(step: str, exc: type[BaseException] = RuntimeError) -> Callable[[str], None]:
    def fault(name: str) -> None:
        if name == step:
            raise exc(f"injected at {step}")
    return fault


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def umask0() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


# -- nodes --------------------------------------------------------------------------------------------------------


def test_nodes_list_counts_and_add(router: Router) -> None:
    keys = populate(router, 20, rows=1)
    listed = router.nodes.list()
    assert [(n.name, n.weight, n.state) for n in listed] == [("n1", 1, "active"), ("n2", 1, "active")]
    assert all(os.path.isabs(n.path) and os.path.isdir(n.path) for n in listed)
    counts = {c["name"]: c["tenants"] for c in router.nodes.counts()}
    assert sum(counts.values()) == len(keys) and set(counts) == {"n1", "n2"}

    node = router.nodes.add("n3", weight=2)
    assert (node.name, node.weight, node.state) == ("n3", 2, "active")
    assert node.path == os.path.join(router.root, "n3") and mode(node.path) == 0o700
    # adding a node moves nothing by itself: the catalog still decides, the ring only proposes
    assert {c["name"]: c["tenants"] for c in router.nodes.counts()} == counts | {"n3": 0}
    assert all(router.locate(k).node in ("n1", "n2") for k in keys)
    ring = Ring({"n1": 1, "n2": 1, "n3": 2})
    assert all(router.locate(f"fresh:{i}").node == ring.node_for(f"fresh:{i}") for i in range(50))


def test_node_with_an_explicit_path_outside_the_root(router: Router, tmp_path: Any) -> None:
    populate(router, 30, rows=1)
    elsewhere = os.fspath(tmp_path / "disk2" / "shard")
    node = router.nodes.add("far", path=elsewhere)
    assert node.path == elsewhere and mode(elsewhere) == 0o700
    _, plan = router.rebalance.plan()
    assert plan.moves and {m.target for m in plan.moves} == {"far"}
    router.rebalance.apply()
    for m in plan.moves:
        assert str(router.locate(m.key).path).startswith(elsewhere + os.sep)
        assert router.query(m.key, "SELECT count(*) FROM t") == [(1,)]


# -- the happy path ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_adding_a_node_to_three_moves_about_a_quarter_all_onto_it(make_router: Any) -> None:
    router = make_router(nodes=["n1", "n2", "n3"], schema=SCHEMA)
    keys = populate(router, 120, rows=1)
    before = contents(router)
    homes = {k: router.locate(k).node for k in keys}
    router.nodes.add("n4")
    plan_id, plan = router.rebalance.plan()
    assert {m.target for m in plan.moves} == {"n4"}
    assert 0.15 <= len(plan.moves) / len(keys) <= 0.35, len(plan.moves)
    assert plan.after["n4"][0] == len(plan.moves) and plan.before["n4"] == (0, 0)
    status = router.rebalance.apply(plan_id, parallel=3)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)} and not status["errors"]
    assert status["pause_ms"]["p50"] is not None
    moved = {m.key for m in plan.moves}
    for key in keys:
        loc = router.locate(key)
        assert loc.state == "active"
        assert loc.node == ("n4" if key in moved else homes[key])
    assert {c["name"]: c["tenants"] for c in router.nodes.counts()}["n4"] == len(moved)
    assert contents(router) == before
    assert move_generations(router) == {k: 1 for k in moved}
    assert_no_orphans(router, retired=retired_sources(router, plan_id))
    done = router.rebalance.complete(plan_id)
    assert done["state"] == "completed" and done["retired_files_removed"] == len(moved)
    assert_no_orphans(router)
    # and nothing left to do
    assert router.rebalance.plan()[1].moves == []


def test_moved_tenant_keeps_data_incarnation_and_outbox_identity(router: Router) -> None:
    keys = populate(router, 30)
    incarnations = dict(gread(router, "SELECT key, incarnation FROM _shardlite_tenants"))
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    router.rebalance.apply(plan_id)
    for m in plan.moves:
        loc = router.locate(m.key)
        ok, key, marker = file_info(str(loc.path))
        assert (ok, key, marker) == (True, m.key, None)
        assert loc.generation > m.generation and loc.epoch >= 2
    assert dict(gread(router, "SELECT key, incarnation FROM _shardlite_tenants")) == incarnations
    for key in keys:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('after')")
        assert router.query(key, "SELECT v FROM t ORDER BY id")[-1] == ("after",)


def test_drain_moves_exactly_that_nodes_tenants_and_complete_removes_it(make_router: Any) -> None:
    router = make_router(nodes=["n1", "n2", "n3"], schema=SCHEMA)
    populate(router, 60, rows=1)
    before = contents(router)
    on_n2 = {k for k in router.tenants() if router.locate(k).node == "n2"}
    assert on_n2
    node = router.nodes.drain("n2")
    assert node.state == "draining"
    assert all(router.locate(f"fresh:{i}").node != "n2" for i in range(100))  # no new tenant lands there
    with pytest.raises(ConfigurationError, match="holds tenants|still holds"):
        router.nodes.remove("n2")
    plan_id, plan = router.rebalance.plan()
    assert {m.key for m in plan.moves} == on_n2
    assert all(m.source == "n2" and m.target in ("n1", "n3") for m in plan.moves)
    router.rebalance.apply(plan_id)
    assert {router.locate(k).node for k in on_n2} <= {"n1", "n3"}
    result = router.rebalance.complete(plan_id)
    assert result["retired_files_removed"] == len(on_n2)
    assert [n.name for n in router.nodes.list()] == ["n1", "n3"]  # drained and empty: gone
    assert contents(router) == before
    assert_no_orphans(router)


def test_parallel_apply_and_throttle(router: Router) -> None:
    populate(router, 40, rows=1)
    router.nodes.add("n3")
    router.nodes.add("n4")
    plan_id, plan = router.rebalance.plan()
    seen: list[str] = []
    lock = threading.Lock()

    def progress(move: Any) -> None:
        with lock:
            seen.append(move.key)

    status = router.rebalance.apply(plan_id, parallel=4, pause_ms=1, progress=progress)
    assert status["steps"] == {"done": len(plan.moves)}
    assert sorted(seen) == sorted(m.key for m in plan.moves)
    assert move_generations(router) == {m.key: 1 for m in plan.moves}


# -- writers and readers holding old locations (in process; the multi-process versions are in _procs) -------------


@pytest.mark.usefixtures("any_meta")
def test_a_router_with_cached_locations_follows_the_move(router: Router, make_router: Any) -> None:
    keys = populate(router, 30, rows=1)
    other = make_router(schema=SCHEMA)  # a second "process": its own handles and cached records
    for key in keys:  # warm both write and read handles on the old files
        with other.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('before')")
        assert other.query(key, "SELECT count(*) FROM t") == [(2,)]
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    router.rebalance.apply(plan_id)
    retired = {m.key: os.path.join(node_path(router, m.source), tenant_relpath(m.key, m.generation))
               for m in plan.moves}
    frozen = {k: image_digest(p) for k, p in retired.items()}
    for key in keys:
        with other.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('after')")
        # the stale reader sees the write made at the new home (never the retired copy)
        assert other.query(key, "SELECT v FROM t ORDER BY id") == [(f"{key}/0",), ("before",), ("after",)]
        assert router.query(key, "SELECT v FROM t ORDER BY id") == [(f"{key}/0",), ("before",), ("after",)]
    for key, path in retired.items():
        assert image_digest(path) == frozen[key], f"the retired copy of {key} changed after its fence"
        conn = ro(path)
        try:
            assert conn.execute("SELECT count(*) FROM t WHERE v = 'after'").fetchall() == [(0,)]
        finally:
            conn.close()


def test_a_write_between_the_verified_copy_and_the_fence_is_carried_over(router: Router) -> None:
    populate(router, 20, rows=1)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    written: list[str] = []

    def fault(step: str) -> None:
        if step == "copied":  # the verified copy exists; the source is not fenced yet
            (key,) = [m["key"] for m in journal(router, plan_id) if m["step"] == "copying"]
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO t(v) VALUES ('late')")
            written.append(key)

    router.rebalance.fault = fault
    router.rebalance.apply(plan_id)
    assert sorted(written) == sorted(m.key for m in plan.moves)
    for key in written:
        assert router.locate(key).node == "n3"
        assert router.query(key, "SELECT v FROM t ORDER BY id")[-1] == ("late",)


@pytest.mark.parametrize("step", ["fenced", "linked"])
@pytest.mark.usefixtures("any_meta")
def test_a_write_while_fenced_waits_and_never_lands_in_the_source(router: Router, make_router: Any,
                                                                  step: str) -> None:
    populate(router, 20, rows=1)
    impatient = make_router(schema=SCHEMA, move_wait=0.2)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    outcomes: dict[str, str] = {}

    def fault(name: str) -> None:
        if name == step and len(outcomes) < 3:
            (key,) = [m["key"] for m in journal(router, plan_id) if m["step"] == "fenced"]
            try:
                with impatient.transaction(key) as tx:
                    tx.execute("INSERT INTO t(v) VALUES ('while fenced')")
                outcomes[key] = "committed"
            except TenantMoving:
                outcomes[key] = "TenantMoving"

    router.rebalance.fault = fault
    router.rebalance.apply(plan_id)
    assert outcomes and set(outcomes.values()) == {"TenantMoving"}
    for key in outcomes:
        m = next(m for m in plan.moves if m.key == key)
        source = os.path.join(node_path(router, m.source), tenant_relpath(key, m.generation))
        for path in (source, str(router.locate(key).path)):
            conn = ro(path)
            try:
                assert conn.execute("SELECT count(*) FROM t WHERE v = 'while fenced'").fetchall() == [(0,)]
            finally:
                conn.close()
        with impatient.transaction(key) as tx:  # after the switch the same router writes at the new home
            tx.execute("INSERT INTO t(v) VALUES ('after')")
        assert router.query(key, "SELECT v FROM t ORDER BY id")[-1] == ("after",)


def test_a_tenant_dropped_while_the_plan_runs_is_skipped_not_resurrected(router: Router) -> None:
    populate(router, 30, rows=1)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    assert len(plan.moves) >= 3
    victim = plan.moves[-1].key
    dropped: list[str] = []

    def fault(step: str) -> None:
        if step == "done" and not dropped:
            router.drop(victim)
            dropped.append(victim)

    router.rebalance.fault = fault
    status = router.rebalance.apply(plan_id)
    assert status["state"] == "done"
    rows = {m["key"]: m for m in journal(router, plan_id)}
    assert rows[victim]["step"] == "skipped" and "stale" in (rows[victim]["error"] or "")
    assert not router.exists(victim)
    with pytest.raises(UnknownTenant):
        router.query(victim, "SELECT 1")
    router.rebalance.complete(plan_id)
    assert_no_orphans(router)


# -- outbox events travel with the tenant -----------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_pending_outbox_events_travel_with_the_tenant_and_the_relay_keeps_going(make_router: Any) -> None:
    router = make_router(nodes=["n1", "n2"], schema=SCHEMA)

    @router.handler("note")
    def on_note(tx: Any, event: Any) -> None:
        tx.execute("INSERT INTO t(v) VALUES (?)", (f"{event.source}#{event.seq}#{event.payload['n']}",))

    sources = [f"user:{i}" for i in range(24)]
    dests = [f"inbox:{i}" for i in range(12)]
    for dest in dests:  # the destinations exist, so that some of them move too
        with router.transaction(dest) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('init')")
    emitted: list[str] = []
    counter = 0

    def emit_some(rounds: int) -> None:
        nonlocal counter
        for _ in range(rounds):
            for i, source in enumerate(sources):
                counter += 1
                with router.transaction(source) as tx:
                    tx.execute("INSERT INTO t(v) VALUES ('emit')")
                    tx.emit(dests[(i + counter) % len(dests)], "note", {"n": counter})
                emitted.append(f"{source}#{counter}")

    emit_some(3)  # pending: nothing relayed yet, the events sit in the source files
    assert len(router.relay.status()["nodes"]) == 2 and router.relay.status()["pending"] == len(emitted)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    moved = {m.key for m in plan.moves}
    assert moved & set(sources) and moved & set(dests), "the plan must move some sources and destinations"

    # the relay runs while more events are emitted and the tenants move
    router.relay.start()
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_emitting() -> None:
        try:
            while not stop.is_set():
                emit_some(1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=keep_emitting)
    thread.start()
    try:
        status = router.rebalance.apply(plan_id)
    finally:
        stop.set()
        thread.join(60)
    assert not errors and status["steps"] == {"done": len(plan.moves)}
    router.relay.stop()
    router.relay.drain(timeout=60)
    assert router.relay.status()["pending"] == 0 and router.relay.status()["dead_letters"] == 0
    applied: list[str] = []
    for dest in dests:
        for (v,) in router.query(dest, "SELECT v FROM t WHERE v != 'init' ORDER BY id"):
            source, seq, n = v.split("#")
            applied.append(f"{source}#{n}")
    assert sorted(applied) == sorted(emitted)  # every event applied exactly once
    assert len(set(applied)) == len(applied)
    for key in moved:
        assert router.locate(key).node == "n3"


# -- cancel (failures, undo, leases and cancel with live rebalancers: test_rebalance_recovery.py; SIGKILL in _procs)


def test_cancel_a_planned_plan_changes_nothing_but_its_state(router: Router) -> None:
    populate(router, 20, rows=1)
    router.nodes.add("n3")
    plan_id, _ = router.rebalance.plan()
    before = snapshot(router)
    assert router.rebalance.cancel(plan_id)["state"] == "cancelled"
    after = snapshot(router)
    assert after["plans"][-1][1] == "cancelled"
    assert {k: v for k, v in after.items() if k not in ("plans", "moves")} == \
           {k: v for k, v in before.items() if k not in ("plans", "moves")}
    with pytest.raises(ConfigurationError):
        router.rebalance.apply(plan_id)


def test_retired_sources_of_finished_moves_can_be_removed_after_a_cancel(router: Router) -> None:
    populate(router, 30, rows=1)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    copies = [0]

    def fault(step: str) -> None:
        if step == "copied":
            copies[0] += 1
            if copies[0] > 2:
                raise RuntimeError("stop after two moves")

    router.rebalance.fault = fault
    router.rebalance.apply(plan_id)
    router.rebalance.fault = None
    router.rebalance.cancel(plan_id)
    assert sum(1 for m in journal(router, plan_id) if m["step"] == "done") == 2
    try:
        router.rebalance.complete(plan_id)
    except ConfigurationError:
        pass
    assert_no_orphans(router)  # the two retired sources are still on disk, and no command removes them


# -- several rebalancers ----------------------------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_two_rebalancers_in_one_process_never_move_a_tenant_twice(router: Router, make_router: Any) -> None:
    populate(router, 40, rows=1)
    second = make_router()
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    results: list[Any] = []

    def resume_when_applying() -> None:
        for _ in range(10_000):
            state = gread(router, "SELECT state FROM _shardlite_rebalance WHERE id = ?", (plan_id,))[0][0]
            if state != "planned":
                break
        try:
            results.append(second.rebalance.resume(plan_id, parallel=2))
        except ConfigurationError as exc:  # the first one finished before we looked
            results.append(exc)

    thread = threading.Thread(target=resume_when_applying)
    thread.start()
    router.rebalance.apply(plan_id, parallel=2)
    thread.join(60)
    status = router.rebalance.status(plan_id)
    assert status["steps"] == {"done": len(plan.moves)}
    assert move_generations(router) == {m.key: 1 for m in plan.moves}
    assert_no_orphans(router, retired=retired_sources(router, plan_id))


@pytest.mark.usefixtures("any_meta")
def test_a_rebalancer_with_a_stale_journal_does_not_undo_finished_moves(router: Router, make_router: Any) -> None:
    populate(router, 30, rows=1)
    first = router.rebalance
    first.lease = 0.2
    second = make_router().rebalance
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    assert len(plan.moves) >= 2
    fired: list[bool] = []

    def meanwhile(step: str) -> None:
        # after the second rebalancer's first move, the first one runs the rest of the plan and stops;
        # its leases then expire (it is gone), and the second one goes on with its own list of moves
        if step == "done" and not fired:
            fired.append(True)
            first.resume(plan_id)
            while True:
                (lease,) = gread(router, "SELECT max(lease) FROM _shardlite_moves WHERE plan_id = ? AND owner = ?",
                                 (plan_id, first.owner))[0]
                if lease is None or lease < time.time():  # released, or lapsed
                    break

    second.fault = meanwhile
    second.apply(plan_id)
    assert [m["step"] for m in journal(router, plan_id)] == ["done"] * len(plan.moves)
    router.rebalance.complete(plan_id)
    assert_no_orphans(router)


# -- private files, paths never reused -------------------------------------------------------------------------


def test_files_0600_and_dirs_0700_after_moves(make_router: Any, umask0: None) -> None:
    router = make_router(nodes=["n1", "n2"], schema=SCHEMA)
    populate(router, 30)
    router.nodes.add("n3")
    plan_id, _ = router.rebalance.plan()
    router.rebalance.apply(plan_id)
    for key in router.tenants():  # open the moved files (WAL and SHM appear) before looking
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('x')")

    def check() -> None:
        seen = 0
        for dirpath, _dirnames, names in os.walk(router.root):
            assert mode(dirpath) == 0o700, (dirpath, oct(mode(dirpath)))
            for name in names:
                path = os.path.join(dirpath, name)
                assert mode(path) == 0o600, (path, oct(mode(path)))
                seen += 1
        assert seen

    check()
    router.rebalance.complete(plan_id)
    check()
    assert mode(os.path.join(router.root, "n3")) == 0o700


def test_old_paths_are_never_reused(router: Router) -> None:
    keys = populate(router, 30, rows=1)
    history: dict[str, list[tuple[int, str]]] = {k: [(router.locate(k).generation, str(router.locate(k).path))]
                                                 for k in keys}

    def record() -> None:
        for k in keys:
            loc = router.locate(k)
            if history[k][-1][0] != loc.generation:
                history[k].append((loc.generation, str(loc.path)))

    router.nodes.add("n3")
    plan_id, first = router.rebalance.plan()
    router.rebalance.apply(plan_id)
    router.rebalance.complete(plan_id)  # the old files are deleted: their names must still not come back
    record()
    router.nodes.drain("n3")  # and back again
    plan_id, second = router.rebalance.plan()
    assert {m.key for m in second.moves} == {m.key for m in first.moves}
    router.rebalance.apply(plan_id)
    router.rebalance.complete(plan_id)
    record()
    reborn = next(k for k in keys if k not in {m.key for m in first.moves})
    router.drop(reborn)  # a tenant dropped and re-created gets a new path too
    with router.transaction(reborn) as tx:
        tx.execute("INSERT INTO t(v) VALUES ('reborn')")
    record()
    all_paths = [p for h in history.values() for _, p in h]
    all_generations = [g for h in history.values() for g, _ in h]
    assert len(set(all_paths)) == len(all_paths)
    assert len(set(all_generations)) == len(all_generations)
    for k in keys:
        generations = [g for g, _ in history[k]]
        assert generations == sorted(generations)
    for m in first.moves:
        assert len(history[m.key]) == 3 and history[m.key][0][1] != history[m.key][2][1]
        assert router.locate(m.key).node == m.source  # back on its first node, under a new name
    assert_no_orphans(router)


# -- bad input: a clear error that changes nothing ---------------------------------------------------------------


@pytest.mark.parametrize("call", [
    lambda r: r.nodes.drain("nope"),
    lambda r: r.nodes.remove("nope"),
    lambda r: r.nodes.remove("n1"),  # still active: drain first
    lambda r: r.nodes.add("n1"),  # exists
    lambda r: r.nodes.add("../evil"),
    lambda r: r.nodes.add(""),
    lambda r: r.nodes.add("a/b"),
    lambda r: r.nodes.add("x" * 65),
    lambda r: r.nodes.add("n3\n"),  # a regular expression's $ would let the newline through
    lambda r: r.nodes.add("n3", weight=0),
    lambda r: r.nodes.add("n3", weight=True),
    lambda r: r.nodes.add("n3", weight=1.5),
], ids=["drain-unknown", "remove-unknown", "remove-active", "add-existing", "add-dotdot", "add-empty",
        "add-slash", "add-too-long", "add-newline", "weight-0", "weight-bool", "weight-float"])
def test_bad_node_operations_raise_and_change_nothing(router: Router, call: Callable[[Router], Any]) -> None:
    populate(router, 10, rows=1)
    before = snapshot(router)
    with pytest.raises(ConfigurationError) as info:
        call(router)
    assert str(info.value)
    assert snapshot(router) == before


def test_unknown_node_error_names_the_known_ones(router: Router) -> None:
    with pytest.raises(ConfigurationError, match="unknown node 'nope'.*n1, n2"):
        router.nodes.drain("nope")


def test_removing_the_last_node_is_refused(make_router: Any) -> None:
    router = make_router(schema=SCHEMA)
    populate(router, 5, rows=1)
    before = snapshot(router)
    with pytest.raises(ConfigurationError, match="last active node"):
        router.nodes.drain("n1")
    assert snapshot(router) == before
    # also when the only other node is already draining
    router.nodes.add("n2")
    router.nodes.drain("n2")
    before = snapshot(router)
    with pytest.raises(ConfigurationError, match="last active node"):
        router.nodes.drain("n1")
    assert snapshot(router) == before


@pytest.mark.parametrize("where", ["inside", "contains", "same", "symlink-inside", "is-a-file", "under-a-file",
                                   "not-writable"])
def test_bad_node_paths_raise_and_change_nothing(router: Router, tmp_path: Any, where: str) -> None:
    populate(router, 10, rows=1)
    n1 = node_path(router, "n1")
    if where == "inside":
        path = os.path.join(n1, "sub")
    elif where == "contains":
        path = router.root
    elif where == "same":
        path = n1
    elif where == "symlink-inside":
        path = os.fspath(tmp_path / "link")
        os.symlink(os.path.join(n1, "deeper"), path)
    elif where == "is-a-file":
        path = os.fspath(tmp_path / "plain-file")
        open(path, "w").close()
    elif where == "under-a-file":
        open(tmp_path / "plain-file", "w").close()
        path = os.fspath(tmp_path / "plain-file" / "node")
    else:
        if os.geteuid() == 0:
            if not os.path.isdir("/sys/kernel"):
                pytest.skip("running as root without sysfs: no directory is unwritable")
            path = "/sys/shardlite-test-node"  # root may write anywhere but here (sysfs refuses mkdir)
        else:
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o500)
            path = os.fspath(locked / "node")
    before = snapshot(router)
    with pytest.raises(ConfigurationError) as info:
        router.nodes.add("n3", path=path)
    assert str(info.value)
    assert snapshot(router) == before
    assert not os.path.exists(os.path.join(n1, "sub")) and not os.path.exists(os.path.join(n1, "deeper"))


@pytest.mark.parametrize("change", ["planned tenant dropped", "node added", "node drained",
                                    "tenant moved by another plan"])
@pytest.mark.usefixtures("any_meta")
def test_a_stale_plan_is_refused_and_changes_nothing(router: Router, make_router: Any, change: str) -> None:
    keys = populate(router, 20, rows=1)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    assert keys
    if change == "planned tenant dropped":
        router.drop(plan.moves[0].key)
    elif change == "node added":
        router.nodes.add("n4")
    elif change == "node drained":
        router.nodes.drain("n1")
    else:
        other = make_router().rebalance
        other_id, _ = other.plan()  # supersedes ours; apply it, then put ours back as if still current
        other.apply(other_id)
        assert gread(router, "SELECT state FROM _shardlite_rebalance WHERE id = ?", (plan_id,)) == [("superseded",)]
    before = snapshot(router)
    with pytest.raises(ConfigurationError, match="stale|no planned"):
        router.rebalance.apply(plan_id)
    assert snapshot(router) == before
    # a fresh plan reflects the change and applies
    new_id, _ = router.rebalance.plan()
    assert router.rebalance.apply(new_id)["state"] == "done"


def test_tenants_created_after_the_plan_do_not_make_it_stale(router: Router) -> None:
    """A live application creates tenants all the time; they land where the ring (with the new node)
    places them, so a plan made a moment ago still applies."""
    populate(router, 20, rows=1)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    late = populate(router, 5, prefix="late")
    status = router.rebalance.apply(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)}
    moved = move_generations(router)
    assert not any(key in moved for key in late)  # placed by the ring over n1..n3 when created: not moved
    assert all(len(router.query(key, "SELECT v FROM t")) == 2 for key in late)
    assert router.rebalance.plan()[1].moves == []  # nothing left to move


def test_writes_inside_tenants_do_not_make_a_plan_stale(router: Router) -> None:
    keys = populate(router, 20, rows=1)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    for key in keys:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES (randomblob(5000))")
    assert router.rebalance.apply(plan_id)["steps"] == {"done": len(plan.moves)}


def test_journal_state_errors(router: Router) -> None:
    populate(router, 20, rows=1)
    assert router.rebalance.status() == {"plan": None}
    for call in (router.rebalance.apply, router.rebalance.resume, router.rebalance.complete,
                 router.rebalance.cancel):
        with pytest.raises(ConfigurationError, match="rebalance plan"):
            call()
    router.nodes.add("n3")
    plan_id, _ = router.rebalance.plan()
    router.rebalance.fault = faulting("copied")
    router.rebalance.apply(plan_id)
    router.rebalance.fault = None
    before = snapshot(router)
    with pytest.raises(ConfigurationError, match="being applied"):
        router.rebalance.plan()
    with pytest.raises(ConfigurationError, match="no done"):
        router.rebalance.complete()
    assert snapshot(router) == before
    router.rebalance.resume()
    assert router.rebalance.complete()["state"] == "completed"


def test_a_new_plan_supersedes_an_unapplied_one(router: Router) -> None:
    populate(router, 20, rows=1)
    router.nodes.add("n3")
    old_id, _ = router.rebalance.plan()
    new_id, _ = router.rebalance.plan()
    assert new_id > old_id
    with pytest.raises(ConfigurationError):
        router.rebalance.apply(old_id)
    assert router.rebalance.apply()["plan"] == new_id


# -- CLI ----------------------------------------------------------------------------------------------------------


def run_cli(capsys: Any, *args: str) -> tuple[int, list[Any], str]:
    code = cli_main(list(args))
    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return code, lines, err


def test_cli_nodes_and_rebalance_json(router: Router, capsys: Any) -> None:
    populate(router, 30, rows=1)
    before = contents(router)
    root = router.root
    code, lines, _ = run_cli(capsys, "nodes", "list", "--root", root, "--json")
    assert code == 0 and [(n["name"], n["state"]) for n in lines] == [("n1", "active"), ("n2", "active")]
    assert sum(n["tenants"] for n in lines) == 30

    code, lines, _ = run_cli(capsys, "nodes", "add", "n3", "--root", root, "--json")
    assert code == 0 and lines == [{"added": "n3", "path": os.path.join(root, "n3"), "weight": 1}]

    code, lines, _ = run_cli(capsys, "rebalance", "plan", "--root", root, "--json")
    assert code == 0 and len(lines) == 1
    plan = lines[0]
    assert plan["moves"] == len(plan["move_list"]) > 0
    assert {m["to"] for m in plan["move_list"]} == {"n3"}

    # not on a terminal and no --yes: refused, nothing applied
    code, lines, err = run_cli(capsys, "rebalance", "apply", "--root", root)
    assert code == 2 and "--yes" in err
    assert router.rebalance.status()["state"] == "planned"

    code, lines, _ = run_cli(capsys, "rebalance", "apply", "--yes", "--root", root, "--json", "--parallel", "2")
    assert code == 0
    progress, final = lines[:-1], lines[-1]
    assert sorted(p["key"] for p in progress) == sorted(m["key"] for m in plan["move_list"])
    assert all(p["step"] == "done" and p["to"] == "n3" and p["error"] is None for p in progress)
    assert final["state"] == "done" and final["steps"] == {"done": plan["moves"]}

    code, lines, _ = run_cli(capsys, "rebalance", "status", "--root", root, "--json")
    assert code == 0 and lines[0]["plan"] == plan["plan"] and lines[0]["state"] == "done"
    code, lines, _ = run_cli(capsys, "rebalance", "complete", "--root", root, "--json")
    assert code == 0 and lines[0]["retired_files_removed"] == plan["moves"]
    assert_no_orphans(router)

    # remove drains (moves every tenant of n3 away), completes and removes the node
    code, lines, _ = run_cli(capsys, "nodes", "remove", "n3", "--yes", "--root", root, "--json")
    assert code == 0 and lines[-1] == {"removed": "n3", "moved": plan["moves"]}
    assert all(p["from"] == "n3" and p["step"] == "done" for p in lines[:-1]) and len(lines) == plan["moves"] + 1
    assert [n.name for n in router.nodes.list()] == ["n1", "n2"]
    assert contents(router) == before
    assert_no_orphans(router)


def test_cli_human_output(router: Router, capsys: Any) -> None:
    populate(router, 10, rows=1)
    root = router.root
    assert cli_main(["nodes", "add", "n3", "--root", root]) == 0
    assert "added node n3" in capsys.readouterr().out
    assert cli_main(["rebalance", "plan", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "recorded" in out and "n3" in out
    assert cli_main(["rebalance", "apply", "--yes", "--pause-ms", "1", "--root", root]) == 0
    assert "done" in capsys.readouterr().out
    assert cli_main(["rebalance", "status", "--root", root]) == 0
    out = capsys.readouterr().out
    assert "done" in out and "write pause per tenant" in out
    assert cli_main(["nodes", "list", "--root", root]) == 0
    assert "n3" in capsys.readouterr().out


@pytest.mark.parametrize("args", [
    ["nodes", "remove", "nope", "--yes"],
    ["nodes", "remove", "n1", "--yes"],  # the last node
    ["nodes", "add", "../x"],
    ["nodes", "add", "n1"],
    ["rebalance", "apply", "--yes"],  # no plan
    ["rebalance", "resume"],
    ["rebalance", "complete"],
    ["rebalance", "cancel"],
], ids=["remove-unknown", "remove-last", "add-bad-name", "add-existing", "apply-no-plan", "resume-nothing",
        "complete-nothing", "cancel-nothing"])
def test_cli_errors_exit_2_and_change_nothing(make_router: Any, capsys: Any, args: list[str]) -> None:
    router = make_router(schema=SCHEMA)
    populate(router, 5, rows=1)
    before = snapshot(router)
    code = cli_main([*args, "--root", router.root])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("shardlite ") and len(err.strip().splitlines()) == 1
    assert snapshot(router) == before


def test_cli_stale_plan_is_refused(router: Router, capsys: Any) -> None:
    populate(router, 10, rows=1)
    root = router.root
    assert cli_main(["nodes", "add", "n3", "--root", root, "--json"]) == 0
    assert cli_main(["rebalance", "plan", "--root", root, "--json"]) == 0
    capsys.readouterr()
    router.nodes.add("n4")  # the node set changed since the plan
    before = snapshot(router)
    code = cli_main(["rebalance", "apply", "--yes", "--root", root])
    err = capsys.readouterr().err
    assert code == 2 and "stale" in err and "rebalance plan" in err
    assert snapshot(router) == before


@pytest.mark.parametrize("situation", ["no --yes off a terminal", "a rebalance is being applied"])
def test_cli_nodes_remove_refused_changes_nothing(router: Router, capsys: Any, situation: str) -> None:
    populate(router, 20, rows=1)
    router.nodes.add("n3")
    if situation == "a rebalance is being applied":
        plan_id, _ = router.rebalance.plan()
        router.rebalance.fault = faulting("copied")
        router.rebalance.apply(plan_id)
        router.rebalance.fault = None
        args = ["nodes", "remove", "n2", "--yes"]
    else:
        args = ["nodes", "remove", "n2"]
    before = snapshot(router)
    code = cli_main([*args, "--root", router.root])
    assert code == 2, capsys.readouterr()
    assert snapshot(router) == before
