"""Tenant creation step by step, on both metadata backends (``any_meta``): allocate a generation, link the
file at ``(key, generation)``, register (``shardlite/front/tenant_create.py``).

* A creation killed (SIGKILL, in a worker process, at the ``create_fault`` hook) after its allocation or
  after its file leaves nothing registered; the key is creatable afterwards at a new generation, other keys
  too, and no two registered tenants share a generation. A file it left is an orphan nothing routes to.
* A generation handed out again (a crash of the metadata store lost its allocation: emulated by rewinding
  the store's counter to it) meets the orphan at its path: the creation leaves that file alone and takes
  another generation. A registration refused because another key's row holds the generation removes its
  own file and takes another.
* The node list a router caches for placement (PostgreSQL: while the node hints flow) follows ``nodes
  add`` / ``drain`` in another process, is read again after every reconnect of the hints (a change whose
  hint was lost shows then), and a registration on a node removed meanwhile is retried on the current list.

Waits are loops with deadlines, never timing assertions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import psycopg
import pytest
from helpers_pg import separate_server
from helpers_procs import LineReader, child_env, close_pipes, spawn, write_script

from shardlite import MetaUnavailable, Router
from shardlite.core.keys import key_digest
from shardlite.core.placement import parse_tenant_name
from shardlite.meta.choose import ENV_VAR
from shardlite.meta.tenants import GenerationTaken

DEADLINE = 60.0


def _files_of(root: str, key: str) -> list[Path]:
    """Every tenant file of ``key`` under ``root``, in generation order."""
    digest = key_digest(key)
    found = [p for p in Path(root).rglob(f"{digest}.*.db") if p.is_file()]
    return sorted(found, key=lambda p: parse_tenant_name(p.name)[1])  # type: ignore[index]


def _generation_of(path: Path | str) -> int:
    parsed = parse_tenant_name(os.path.basename(path))
    assert parsed is not None, path
    return parsed[1]


def _registered(router: Router) -> dict[str, int]:
    """Generation of every live tenant of the router's root, by key."""
    return {r.key: r.generation for r in router._store.meta.tenants.iter_tenants()}


def _assert_generations_distinct(router: Router) -> None:
    generations = list(_registered(router).values())
    assert len(set(generations)) == len(generations), f"a generation held by two tenants: {generations}"


def _rewind_generations(backend: str, root: str, generation: int) -> None:
    """Make the store hand ``generation`` out again, as after a crash of the store that lost its allocation
    (and every later one). No router of ``root`` may be open in this process (SQLite: APSW, never the
    stdlib module)."""
    if backend == "postgresql":
        with psycopg.connect(os.environ[ENV_VAR], autocommit=True) as conn, conn.transaction():
            conn.execute("DELETE FROM shardlite.generations WHERE generation >= %s", (generation,))
            conn.execute("SELECT setval(pg_get_serial_sequence('shardlite.generations', 'generation'), %s, false)",
                         (generation,))
        return
    conn = apsw.Connection(os.path.join(root, "global.db"))
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        with conn:
            conn.execute("DELETE FROM _shardlite_generations WHERE generation >= ?", (generation,))
            conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = '_shardlite_generations'", (generation - 1,))
    finally:
        conn.close()


_KILLED_WORKER = """
{prelude}
import signal
from shardlite import Router

root, key, step = sys.argv[1], sys.argv[2], sys.argv[3]
router = Router(root)


def fault(at):
    if at == step:
        ack("dying", at)
        os.kill(os.getpid(), signal.SIGKILL)


router._store.create_fault = fault
with router.transaction(key) as tx:
    tx.execute("CREATE TABLE t(x)")
ack("survived")
"""


def _killed_creation(tmp_path: Path, root: str, key: str, step: str) -> None:
    """Create ``key`` in a worker that SIGKILLs itself right after creation step ``step``."""
    proc = spawn(write_script(tmp_path, "killed.py", _KILLED_WORKER), root, key, step)
    reader = LineReader(proc.stdout)  # type: ignore[arg-type]
    try:
        assert reader.next() == f"dying {step}"
        assert proc.wait(timeout=DEADLINE) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        close_pipes(proc)


@pytest.fixture
def made(root: str) -> Iterator[Callable[..., Router]]:
    routers: list[Router] = []

    def make(**kwargs: Any) -> Router:
        routers.append(Router(root, **kwargs))
        return routers[-1]

    yield make
    for router in reversed(routers):
        router.close()


def _create(router: Router, key: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS t(x)")
        tx.execute("INSERT INTO t VALUES (1)")


# -- killed between the steps ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.usefixtures("any_meta")
@pytest.mark.parametrize("step", ["allocated", "written"])
def test_a_creation_killed_between_its_steps_registers_nothing_and_the_key_stays_creatable(
        made: Callable[..., Router], root: str, tmp_path: Path, step: str) -> None:
    made().close()  # the root exists
    _killed_creation(tmp_path, root, "k:1", step)
    left = _files_of(root, "k:1")
    assert len(left) == (1 if step == "written" else 0), left
    router = made()
    assert router.locate("k:1").state == "absent"
    _create(router, "k:1")
    for i in range(3):
        _create(router, f"other:{i}")
    location = router.locate("k:1")
    assert location.state == "active" and router.query("k:1", "SELECT x FROM t") == [(1,)]
    assert location.path is not None and all(os.fspath(p) != location.path for p in left)
    if left:
        assert left[0].exists(), "the orphan is left alone (nothing routes to it)"
        assert _generation_of(location.path) > _generation_of(left[0]), "generations only grow"
    _assert_generations_distinct(router)


@pytest.mark.slow
def test_a_generation_handed_out_again_meets_the_orphan_and_takes_another(
        any_meta: str, made: Callable[..., Router], root: str, tmp_path: Path) -> None:
    made().close()
    _killed_creation(tmp_path, root, "k:1", "written")
    [orphan] = _files_of(root, "k:1")
    lost = _generation_of(orphan)
    _rewind_generations(any_meta, root, lost)  # the store's crash lost the allocation: it comes out again
    router = made()
    _create(router, "k:1")
    location = router.locate("k:1")
    assert location.path is not None and location.path != os.fspath(orphan)
    assert _generation_of(location.path) > lost
    assert orphan.exists(), "a file at a new path is never removed or reused: it may be a racing creator's"
    _create(router, "k:2")  # another key and the generations after it
    assert router.query("k:1", "SELECT x FROM t") == [(1,)]
    _assert_generations_distinct(router)


@pytest.mark.usefixtures("any_meta")
def test_a_registration_refused_for_a_taken_generation_removes_its_file_and_takes_another(
        made: Callable[..., Router], root: str) -> None:
    router = made()
    store = router._store
    allocated: list[int] = []
    allocate, lookup_or_allocate = store.meta.tenants.allocate_generation, store.meta.tenants.lookup_or_allocate

    def spy(key: str, node: str, purpose: str) -> int:
        allocated.append(allocate(key, node, purpose))
        return allocated[-1]

    def spy_first(key: str, node: str, **kwargs: Any) -> Any:
        record, generation = lookup_or_allocate(key, node, **kwargs)
        if generation is not None:
            allocated.append(generation)
        return record, generation

    def fault(step: str) -> None:
        if step == "written" and len(allocated) == 1:  # another key registered with the same generation first
            store.meta.tenants.register("thief:1", "n1", allocated[0], "inc", 0)

    store.meta.tenants.allocate_generation = spy  # type: ignore[method-assign]
    store.meta.tenants.lookup_or_allocate = spy_first  # type: ignore[method-assign]
    store.create_fault = fault
    _create(router, "k:1")
    assert len(allocated) == 2
    assert _generation_of(router.locate("k:1").path or "") == allocated[1]
    assert [_generation_of(p) for p in _files_of(root, "k:1")] == [allocated[1]], "its first file is removed"
    assert store.meta.tenants.lookup("thief:1").generation == allocated[0]  # type: ignore[union-attr]
    with pytest.raises(GenerationTaken):
        store.meta.tenants.register("k:2", "n1", allocated[1], "inc", 0)
    _assert_generations_distinct(router)


# -- the node list for placement ----------------------------------------------------------------------------

_PLACING_WORKER = """
{prelude}
from shardlite import Router

router = Router(sys.argv[1])
ack("ready")
for line in sys.stdin:
    key = line.strip()
    with router.transaction(key) as tx:
        tx.execute("CREATE TABLE IF NOT EXISTS t(x)")
    ack(key, router.locate(key).node)
router.close()
"""


class _Placer:
    """A worker process with its own router that creates the keys it is sent and says where they went."""

    def __init__(self, tmp_path: Path, root: str) -> None:
        script = write_script(tmp_path, "placer.py", _PLACING_WORKER)
        self.proc = subprocess.Popen([sys.executable, os.fspath(script), root], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        self.reader = LineReader(self.proc.stdout)  # type: ignore[arg-type]
        assert self.reader.next() == "ready"
        self.count = 0

    def place(self) -> str:
        self.count += 1
        key = f"placed:{self.count}"
        assert self.proc.stdin is not None
        self.proc.stdin.write(key + "\n")
        self.proc.stdin.flush()
        line = self.reader.next()
        assert line is not None and line.startswith(key + " "), (line, close_pipes(self.proc))
        return line.split(" ", 1)[1]

    def until_placed_on(self, node: str, what: str) -> None:
        deadline = time.monotonic() + DEADLINE
        while self.place() != node:
            assert time.monotonic() < deadline, f"not within {DEADLINE} s: {what}"

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=DEADLINE) == 0, close_pipes(self.proc)
        close_pipes(self.proc)


def _unhinted(sql: str, *params: object) -> None:
    """Change ``shardlite.nodes`` with its triggers off: the change sends no hint (as if it were lost)."""
    with psycopg.connect(os.environ[ENV_VAR], autocommit=True) as conn, conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(sql, params)  # type: ignore[arg-type]


_LISTENERS = "SELECT pid, query, state FROM pg_stat_activity WHERE application_name = 'shardlite-listen'"


def _reconnect_hints() -> None:
    """End every listening connection of the database and return once as many are back, each idle after its
    LISTEN commands (each listener reconnects by itself); no creation runs in the meantime."""
    with psycopg.connect(os.environ[ENV_VAR], autocommit=True) as conn:
        before = {pid for pid, _query, _state in conn.execute(_LISTENERS).fetchall()}
        assert before
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (list(before),))
        deadline = time.monotonic() + DEADLINE
        while True:
            now = conn.execute(_LISTENERS).fetchall()
            pids = {pid for pid, _query, _state in now}
            if (len(pids) == len(before) and not pids & before
                    and all(state == "idle" and query.startswith("LISTEN") for _pid, query, state in now)):
                return
            assert time.monotonic() < deadline, f"the listeners did not come back within {DEADLINE} s"
            time.sleep(0.01)


def _listening(router: Router) -> None:
    listener = getattr(router._store.meta, "_hints", None)
    assert listener is None or listener.wait_connected(DEADLINE)


@pytest.mark.slow
def test_nodes_changed_in_another_process_are_seen_by_its_creations_and_after_a_reconnect(
        any_meta: str, made: Callable[..., Router], root: str, tmp_path: Path) -> None:
    admin = made()
    placer = _Placer(tmp_path, root)
    try:
        assert placer.place() == "n1"
        admin.nodes.add("n2")
        admin.nodes.drain("n1")
        placer.until_placed_on("n2", "the other process places on the node added and not on the drained one")
        admin.nodes.add("n3")
        admin.nodes.drain("n2")
        placer.until_placed_on("n3", "a second change is seen too")
        if any_meta == "postgresql":
            _unhinted("UPDATE shardlite.nodes SET state = CASE name WHEN 'n1' THEN 'active' ELSE 'draining' END")
            assert placer.place() == "n3", "the list is cached while the hints flow (a lost hint shows later)"
            _reconnect_hints()
            assert placer.place() == "n1", "every reconnect of the hints reads the node list again"
    finally:
        placer.close()
    assert admin.locate("placed:1").node == "n1"


@pytest.mark.usefixtures("any_meta")
def test_a_registration_on_a_node_removed_meanwhile_is_retried_on_the_current_list(
        made: Callable[..., Router], root: str) -> None:
    router = made(nodes=["n1", "n2"])
    _listening(router)
    store = router._store
    if store.meta.node_list_token() is None:
        pytest.skip("this backend keeps no node list: it is read for every creation")
    router.nodes.drain("n1")
    # a new listening connection: hints sent before it (the nodes' seeding, the drain) can no longer arrive
    # late and refresh the list this test makes stale below (they did on a loaded machine)
    _reconnect_hints()
    deadline = time.monotonic() + DEADLINE
    while store.propose("x") != "n2" or store.meta.node_list_token() != store._nodes_token:
        assert time.monotonic() < deadline, "the router's node list never settled"  # read again after the reconnect
    registered: list[str] = []
    register = store.meta.tenants.register

    def spy(key: str, node: str, *args: Any) -> Any:
        registered.append(node)
        return register(key, node, *args)

    store.meta.tenants.register = spy  # type: ignore[method-assign]
    _unhinted("UPDATE shardlite.nodes SET state = 'active' WHERE name = 'n1'")
    _unhinted("DELETE FROM shardlite.nodes WHERE name = 'n2'")
    _create(router, "k:1")
    assert registered == ["n2", "n1"], "the cached list named n2; its registration was refused and retried"
    assert router.locate("k:1").node == "n1"
    assert _files_of(os.path.join(root, "n2"), "k:1") == [], "the refused file is removed"


# -- the metadata server crashing in the middle of a creation (PostgreSQL) ------------------------------------


@pytest.mark.slow
def test_a_server_crash_between_allocation_and_registration_keeps_the_file_and_the_key_creatable(
        tmp_path: Path) -> None:
    """The server is killed (kill -9, as a crash) right after the file is linked: the registration fails with
    MetaUnavailable and the file stays (its outcome is unknown to the caller). The creation's allocation
    committed without waiting for its flush, so the crash may have lost it and the restarted server may hand
    that generation out again: either way the retried creation succeeds at a generation no other tenant
    holds, and the file left behind is never routed to."""
    root = os.fspath(tmp_path / "data")
    with separate_server() as server:
        with Router(root, meta=server.dsn()) as router:
            for i in range(3):
                _create(router, f"before:{i}")
            crashed: list[str] = []

            def fault(step: str) -> None:
                if step == "written" and not crashed:
                    crashed.append(step)
                    server.kill()

            router._store.create_fault = fault
            with pytest.raises(MetaUnavailable):
                _create(router, "k:1")
            [left] = _files_of(root, "k:1")
            server.start()
            deadline = time.monotonic() + DEADLINE
            while True:
                try:
                    _create(router, "k:1")
                    break
                except MetaUnavailable:
                    assert time.monotonic() < deadline, "the router never came back"
                    time.sleep(0.05)
            for i in range(3):
                _create(router, f"after:{i}")
            location = router.locate("k:1")
            assert location.path != os.fspath(left) and left.exists()
            assert router.query("k:1", "SELECT x FROM t") == [(1,)]
            _assert_generations_distinct(router)
