"""Online rebalancing across processes (brief rules 8 and 12; §7 "Moves").

* two writer processes keep writing to random tenants while a node is added and the rebalance runs: every
  acknowledged write is present exactly once afterwards and every file passes ``integrity_check``;
* a process stopped with SIGSTOP while it holds a cached location (and one stopped inside its write
  transaction) is resumed after its tenant moved: its write lands at the new home, the retired copy stays as
  it was at its fence;
* the rebalancer is killed with SIGKILL right after each journaled step, then resumed (or cancelled): one
  active copy per tenant, no orphan file, nothing acknowledged lost;
* two rebalancer processes apply the same plan at once: no tenant is moved twice;
* a rebalancer with the default lease killed while a tenant is fenced: ``shardlite rebalance resume`` in
  another process takes its moves over within seconds while writer processes keep writing (every
  acknowledged write present once), and ``shardlite rebalance cancel`` (also run again after giving up)
  leaves no tenant fenced or moving.

Subprocesses are plain ``python -c`` scripts; files are inspected through APSW, read-only. Waiting is done by
polling with generous deadlines, never by asserting on time.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers_meta import meta_rows
from helpers_rebalance import assert_reachable_now, contents, populate, ro

from shardlite import Router
from shardlite.cli import main as cli_main
from shardlite.core.placement import tenant_relpath
from shardlite.core.ring import Ring

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("any_meta")]  # both metadata backends (issue 15)

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)",
          "CREATE TABLE w(id INTEGER PRIMARY KEY, writer TEXT, seq INTEGER)"]
STEPS = ("copying", "copied", "fenced", "linked", "switched", "done")
DEADLINE = 90.0


# -- helpers (local on purpose: other test files are written independently) ---------------------------------------


@pytest.fixture
def router(make_router: Any) -> Router:
    return make_router(nodes=["n1", "n2"], schema=SCHEMA)  # type: ignore[no-any-return]








def gread(router: Router, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    return meta_rows(router.root, sql, params)  # global.db, or an export of the PostgreSQL metadata


def file_info(path: str) -> tuple[bool, str | None, str | None]:
    conn = ro(path)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        key, retired = conn.execute("SELECT key, retired FROM _shardlite_meta WHERE id = 1").fetchall()[0]
        return ok, key, retired
    finally:
        conn.close()


def file_rows(path: str, sql: str) -> list[tuple[Any, ...]]:
    conn = ro(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def image(path: str) -> bytes:
    conn = ro(path)
    try:
        return bytes(conn.serialize("main") or b"")
    finally:
        conn.close()


def tenant_files(root: str) -> tuple[set[str], set[str]]:
    dbs, others = set(), set()
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if dirpath == root and name.startswith(("global.db", "app_global.db", "meta.json")):
                continue
            (dbs if name.endswith(".db") else others).add(os.path.join(dirpath, name))
    return dbs, others


def node_path(router: Router, name: str) -> str:
    return next(n.path for n in router.nodes.list() if n.name == name)


def journal(router: Router, plan_id: int) -> list[dict[str, Any]]:
    names = ("key", "source", "target", "source_generation", "target_generation", "step", "error", "lease")
    rows = gread(router, f"SELECT {', '.join(names)} FROM _shardlite_moves WHERE plan_id = ? ORDER BY key",
                 (plan_id,))
    return [dict(zip(names, row, strict=True)) for row in rows]


def source_path(router: Router, move: dict[str, Any]) -> str:
    return os.path.join(node_path(router, move["source"]), tenant_relpath(move["key"], move["source_generation"]))


def target_path(router: Router, move: dict[str, Any]) -> str:
    return os.path.join(node_path(router, move["target"]), tenant_relpath(move["key"], move["target_generation"]))


def retired_sources(router: Router, plan_id: int) -> set[str]:
    return {source_path(router, m) for m in journal(router, plan_id) if m["step"] == "done"}


def move_generations(router: Router) -> dict[str, int]:
    return dict(gread(router, "SELECT key, count(*) FROM _shardlite_generations WHERE purpose = 'move' GROUP BY key"))


def assert_no_orphans(router: Router, retired: set[str] | None = None) -> None:
    """*.db files are exactly the live tenants (plus ``retired``, fenced); everything else is their WAL/SHM."""
    retired = retired or set()
    dbs, others = tenant_files(router.root)
    live = {str(router.locate(k).path) for k in router.tenants()}
    assert dbs == live | retired, {"unexpected": dbs - live - retired, "missing": (live | retired) - dbs}
    assert others <= {p + s for p in dbs for s in ("-wal", "-shm")}, others
    for path in live:
        assert file_info(path)[0::2] == (True, None), path
    for path in retired:
        ok, _key, marker = file_info(path)
        assert ok and marker is not None and marker.startswith("moved:"), (path, marker)


def assert_all_files_intact(root: str) -> None:
    dbs, _ = tenant_files(root)
    embedded = [os.path.join(root, "global.db")] if os.path.exists(os.path.join(root, "global.db")) else []
    for path in sorted(dbs) + embedded:
        conn = ro(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
        finally:
            conn.close()


def wait_for(what: str, check: Callable[[], bool], *, procs: tuple[subprocess.Popen[str], ...] = (),
             deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        for proc in procs:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"a helper process exited ({proc.returncode}) while waiting for {what}: {err[-2000:]}")
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def script(body: str) -> str:
    return "import json, os, signal, sys, time\nfrom shardlite import Router\n" \
           f"SCHEMA = {SCHEMA!r}\n" + textwrap.dedent(body)


def spawn(body: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", script(body), *args], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Helper processes; any still alive at teardown are continued and killed (by their own pid)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, signal.SIGCONT)
                proc.kill()
            except ProcessLookupError:
                pass
        proc.communicate(timeout=30)


def key_moving_to(router: Router, keys: list[str], weights: dict[str, int], node: str) -> str:
    ring = Ring(weights)
    return next(k for k in keys if ring.node_for(k) == node)


def stop(proc: subprocess.Popen[str]) -> None:
    """SIGSTOP ``proc`` and wait until it is stopped (portable: waitpid with WUNTRACED, no reaping)."""
    os.kill(proc.pid, signal.SIGSTOP)
    _, status = os.waitpid(proc.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), status


# -- two writer processes while a node is added -------------------------------------------------------------------

WRITER = """
import random
root, name, nkeys, stopfile, progress = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
rng = random.Random(name)
acked, errors = [], []
with Router(root, schema=SCHEMA, move_wait=60) as router, open(progress, "ab", buffering=0) as prog:
    seq = 0
    while not os.path.exists(stopfile):
        seq += 1
        key = f"user:{rng.randrange(nkeys)}"
        try:
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO w(writer, seq) VALUES (?, ?)", (name, seq))
        except Exception as exc:
            errors.append(f"{key} {seq}: {type(exc).__name__}: {exc}")
            continue
        acked.append([key, seq])
        prog.write(b".")
print(json.dumps({"acked": acked, "errors": errors}))
"""


def test_two_writer_processes_while_a_node_is_added_and_the_rebalance_runs(router: Router, tmp_path: Any,
                                                                         procs: list[Any]) -> None:
    keys = populate(router, 40)
    stopfile = os.fspath(tmp_path / "stop")
    progress = {name: os.fspath(tmp_path / f"{name}.progress") for name in ("wA", "wB")}
    for name in progress:
        open(progress[name], "wb").close()
        procs.append(spawn(WRITER, router.root, name, str(len(keys)), stopfile, progress[name]))
    writers = tuple(procs)

    def acks(name: str) -> int:
        return os.path.getsize(progress[name])

    wait_for("both writers to commit", lambda: all(acks(n) >= 50 for n in progress), procs=writers)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    assert plan.moves and {m.target for m in plan.moves} == {"n3"}
    during = {n: acks(n) for n in progress}
    status = router.rebalance.apply(plan_id, parallel=2)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)}, status
    after = {n: acks(n) for n in progress}
    # the writers kept committing during the moves and after them, at the new homes
    wait_for("the writers to go on after the rebalance", lambda: all(acks(n) >= after[n] + 50 for n in progress),
             procs=writers)
    open(stopfile, "w").close()
    results = {}
    for name, proc in zip(progress, writers, strict=True):
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        results[name] = json.loads(out)
    assert sum(after.values()) > sum(during.values())  # commits went on while the tenants moved

    acked = Counter((name, key, seq) for name, r in results.items() for key, seq in r["acked"])
    assert all(c == 1 for c in acked.values())
    assert not any(r["errors"] for r in results.values()), [r["errors"][:3] for r in results.values()]
    found: Counter[tuple[str, str, int]] = Counter()
    for key in router.tenants():
        for name, seq in router.query(key, "SELECT writer, seq FROM w"):
            found[(name, key, seq)] += 1
    # every acknowledged write is present exactly once, at its tenant's current home, and nothing else is
    assert found == acked
    moved = {m.key for m in plan.moves}
    assert any(key in moved for _, key, _ in acked), "the writers must have hit moved tenants"
    assert {router.locate(k).node for k in moved} == {"n3"}
    assert_all_files_intact(router.root)
    assert_no_orphans(router, retired_sources(router, plan_id))
    # the retired copies hold nothing that was written after their fence: all of it is at the new homes
    router.rebalance.complete(plan_id)
    assert_no_orphans(router)


# -- a stopped process with a cached location ---------------------------------------------------------------------

HOLDER = """
root, key = sys.argv[1], sys.argv[2]
router = Router(root, schema=SCHEMA, move_wait=60)
with router.transaction(key) as tx:  # opens the file and caches the location and the handle
    tx.execute("INSERT INTO t(v) VALUES ('before the stop')")
assert router.query(key, "SELECT count(*) FROM t") == [(2,)]
print(json.dumps({"path": router.locate(key).path}), flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "write":
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('after the move')")
        rows = router.query(key, "SELECT v FROM t ORDER BY id")
        print(json.dumps({"rows": rows}), flush=True)
    elif command == "begin":  # stop inside an open write transaction (holding the write lock)
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('inside the transaction')")
            print(json.dumps({"in": "transaction"}), flush=True)
            assert sys.stdin.readline().strip() == "commit"
        print(json.dumps({"committed": True}), flush=True)
    else:
        break
router.close()
"""


def test_sigstopped_process_with_a_cached_location_writes_at_the_new_home(router: Router, procs: list[Any]) -> None:
    keys = populate(router, 20)
    key = key_moving_to(router, keys, {"n1": 1, "n2": 1, "n3": 1}, "n3")
    holder = spawn(HOLDER, router.root, key, stdin=True)
    procs.append(holder)
    old_path = json.loads(holder.stdout.readline())["path"]
    assert old_path == router.locate(key).path
    stop(holder)

    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    assert key in {m.key for m in plan.moves}
    at_fence: dict[str, bytes] = {}

    def capture(step: str) -> None:  # the retired copy's image right after its fence committed
        if step == "fenced" and any(m["key"] == key and m["step"] == "fenced" for m in journal(router, plan_id)):
            at_fence[key] = image(old_path)

    router.rebalance.fault = capture
    assert router.rebalance.apply(plan_id)["state"] == "done"
    router.rebalance.fault = None
    new = router.locate(key)
    assert new.node == "n3" and new.path != old_path
    frozen = at_fence[key]
    assert image(old_path) == frozen
    assert file_info(old_path)[2] == f"moved:n3:{new.generation}"

    os.kill(holder.pid, signal.SIGCONT)
    holder.stdin.write("write\n")
    holder.stdin.flush()
    reply = json.loads(holder.stdout.readline())
    expected = [[f"{key}/0"], ["before the stop"], ["after the move"]]
    assert reply["rows"] == expected  # the resumed process reads its own write back from the new home
    assert [list(r) for r in router.query(key, "SELECT v FROM t ORDER BY id")] == expected
    assert file_rows(str(new.path), "SELECT count(*) FROM t WHERE v = 'after the move'") == [(1,)]
    assert file_rows(old_path, "SELECT count(*) FROM t WHERE v = 'after the move'") == [(0,)]
    assert image(old_path) == frozen, "the retired copy changed after its fence"
    holder.stdin.write("quit\n")
    holder.stdin.flush()
    holder.communicate(timeout=30)
    assert holder.returncode == 0
    assert_all_files_intact(router.root)


def test_sigstopped_inside_its_transaction_the_move_waits_and_nothing_is_lost(make_router: Any,
                                                                             procs: list[Any]) -> None:
    router = make_router(nodes=["n1", "n2"], schema=SCHEMA, busy_timeout_ms=300)
    keys = populate(router, 20)
    key = key_moving_to(router, keys, {"n1": 1, "n2": 1, "n3": 1}, "n3")
    holder = spawn(HOLDER, router.root, key, stdin=True)
    procs.append(holder)
    old_path = json.loads(holder.stdout.readline())["path"]
    holder.stdin.write("begin\n")
    holder.stdin.flush()
    assert json.loads(holder.stdout.readline()) == {"in": "transaction"}
    stop(holder)

    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    status = router.rebalance.apply(plan_id)
    # the fence could not take the source's write lock: that move is held back, the others went on
    assert status["state"] == "applying" and list(status["errors"]) == [key]
    assert router.locate(key).path == old_path
    assert file_info(old_path)[2] is None  # not fenced: the stopped writer's transaction is still valid

    os.kill(holder.pid, signal.SIGCONT)
    holder.stdin.write("commit\n")
    holder.stdin.flush()
    assert json.loads(holder.stdout.readline()) == {"committed": True}
    status = router.rebalance.resume(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)}
    assert router.locate(key).node == "n3"
    assert router.query(key, "SELECT v FROM t ORDER BY id") == [(f"{key}/0",), ("before the stop",),
                                                                ("inside the transaction",)]
    holder.stdin.write("write\n")
    holder.stdin.flush()
    assert json.loads(holder.stdout.readline())["rows"][-1] == ["after the move"]
    holder.stdin.write("quit\n")
    holder.stdin.flush()
    holder.communicate(timeout=30)
    assert_all_files_intact(router.root)
    assert_no_orphans(router, retired_sources(router, plan_id))


# -- the rebalancer killed at each step -------------------------------------------------------------------------

KILLED_REBALANCER = """
root, step = sys.argv[1], sys.argv[2]
router = Router(root)
router.rebalance.lease = 0.5  # so that the resume can take the dead owner's moves over quickly
router.rebalance.fault = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
router.rebalance.apply()
print("not killed")
"""


def kill_rebalancer_at(router: Router, step: str) -> tuple[int, Any]:
    """Add n3, plan, and apply in a subprocess that SIGKILLs itself right after ``step`` is journaled."""
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    proc = subprocess.run([sys.executable, "-c", script(KILLED_REBALANCER), router.root, step],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    return plan_id, plan


def wait_for_dead_leases(router: Router, plan_id: int) -> None:
    wait_for("the dead rebalancer's leases to expire", lambda: all(
        m["lease"] < time.time() for m in journal(router, plan_id)))


@pytest.mark.parametrize("step", STEPS)
def test_rebalancer_killed_at_each_step_then_resumed(router: Router, capsys: Any, step: str) -> None:
    populate(router, 16)
    before = contents(router)
    plan_id, plan = kill_rebalancer_at(router, step)
    first = min(journal(router, plan_id), key=lambda m: (m["source"], m["key"]))  # the order moves run in
    assert first["step"] == ("fenced" if step in ("fenced", "linked") else
                                       "copying" if step == "copied" else step)
    # right after the kill: every tenant has one routed file, intact; the one in flight is where the journal says
    for key in router.tenants():
        loc = router.locate(key)
        assert loc.path is not None and file_info(loc.path)[:2] == (True, key)
    in_flight = router.locate(first["key"])
    assert in_flight.node == (first["target"] if step in ("switched", "done") else first["source"])
    if step in ("fenced", "linked"):
        assert file_info(source_path(router, first))[2] is not None  # frozen until the resume
    assert_all_files_intact(router.root)

    wait_for_dead_leases(router, plan_id)
    if step in ("copied", "switched"):  # through the CLI: `shardlite rebalance resume`
        assert cli_main(["rebalance", "resume", "--root", router.root, "--json"]) == 0
        status = json.loads(capsys.readouterr().out.splitlines()[-1])
    else:
        status = router.rebalance.resume(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)}, status
    assert move_generations(router) == {m.key: 1 for m in plan.moves}  # each moved once, no extra generation
    assert {router.locate(m.key).node for m in plan.moves} == {"n3"}
    assert contents(router) == before
    for m in plan.moves:  # writable at the new home
        with router.transaction(m.key) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('after resume')")
        assert router.query(m.key, "SELECT v FROM t ORDER BY id")[-1] == ("after resume",)
    assert_all_files_intact(router.root)
    # before complete: the only extra files are the retired sources the journal records
    assert retired_sources(router, plan_id) == {source_path(router, m) for m in journal(router, plan_id)}
    assert_no_orphans(router, retired_sources(router, plan_id))
    router.rebalance.complete(plan_id)
    assert_no_orphans(router)


def test_rebalancer_killed_at_fenced_then_cancelled(router: Router, capsys: Any) -> None:
    keys = populate(router, 16)
    before = contents(router)
    plan_id, plan = kill_rebalancer_at(router, "fenced")
    (first,) = [m for m in journal(router, plan_id) if m["step"] == "fenced"]
    assert file_info(source_path(router, first))[2] is not None
    # the verified copy, not linked yet, under the dead rebalancer's own temporary name
    assert len(glob.glob(glob.escape(target_path(router, first)) + ".moving-*")) == 1

    assert cli_main(["rebalance", "cancel", "--root", router.root, "--json"]) == 0
    status = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert status["state"] == "cancelled" and status["steps"] == {"cancelled": len(plan.moves)}
    loc = router.locate(first["key"])
    assert (loc.state, loc.node, loc.generation) == ("active", first["source"], first["source_generation"])
    assert file_info(str(loc.path)) == (True, first["key"], None)  # unfenced
    assert not os.path.exists(target_path(router, first))
    assert not any(".moving" in p for p in tenant_files(router.root)[1])
    with router.transaction(first["key"]) as tx:  # writable at its source
        tx.execute("INSERT INTO t(v) VALUES ('after cancel')")
    assert router.query(first["key"], "SELECT v FROM t ORDER BY id")[-1] == ("after cancel",)
    assert {router.locate(k).node for k in keys} <= {"n1", "n2"}  # nothing moved
    before[first["key"]].append((before[first["key"]][-1][0] + 1, "after cancel"))
    assert contents(router) == before
    assert_no_orphans(router)
    assert_all_files_intact(router.root)


WAITING_WRITER = """
root, key = sys.argv[1], sys.argv[2]
with Router(root, schema=SCHEMA, move_wait=120) as router:
    print("ready", flush=True)
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO t(v) VALUES ('written while frozen')")
    print(json.dumps({"node": router.locate(key).node}), flush=True)
"""


def test_writer_waiting_on_a_frozen_tenant_lands_at_the_new_home_after_the_resume(router: Router,
                                                                                  procs: list[Any]) -> None:
    populate(router, 16)
    plan_id, plan = kill_rebalancer_at(router, "fenced")
    (first,) = [m for m in journal(router, plan_id) if m["step"] == "fenced"]
    writer = spawn(WAITING_WRITER, router.root, first["key"])
    procs.append(writer)
    assert writer.stdout.readline().strip() == "ready"
    wait_for_dead_leases(router, plan_id)
    assert router.rebalance.resume(plan_id)["state"] == "done"
    out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert json.loads(out) == {"node": "n3"}
    assert router.query(first["key"], "SELECT v FROM t ORDER BY id")[-1] == ("written while frozen",)
    assert file_rows(source_path(router, first), "SELECT count(*) FROM t WHERE v = 'written while frozen'") == [(0,)]
    assert_no_orphans(router, retired_sources(router, plan_id))


# -- two rebalancer processes on one plan ---------------------------------------------------------------------

REBALANCER = """
root, mode, startfile = sys.argv[1], sys.argv[2], sys.argv[3]
router = Router(root)
moved = []
router.rebalance.fault = lambda step: time.sleep(0.02) if step == "copied" else None  # widen the overlap
if mode == "resume":  # joins in as soon as the other one has started applying
    from shardlite import ConfigurationError
    open(startfile, "w").close()
    while router.rebalance.status().get("state") == "planned":
        time.sleep(0.002)
    try:
        status = router.rebalance.resume(parallel=2, progress=lambda move: moved.append(move.key))
    except ConfigurationError:  # the other one had already finished
        status = {"state": "late"}
else:
    status = router.rebalance.apply(parallel=2, progress=lambda move: moved.append(move.key))
router.close()
print(json.dumps({"moved": moved, "state": status["state"]}))
"""


def test_two_rebalancer_processes_never_move_a_tenant_twice(make_router: Any, tmp_path: Any,
                                                           procs: list[Any]) -> None:
    router = make_router(nodes=["n1", "n2"], schema=SCHEMA)
    populate(router, 40)
    before = contents(router)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    startfile = os.fspath(tmp_path / "started")
    second = spawn(REBALANCER, router.root, "resume", startfile)
    procs.append(second)
    wait_for("the second rebalancer to be ready", lambda: os.path.exists(startfile), procs=(second,))
    first = spawn(REBALANCER, router.root, "apply", startfile)
    procs.append(first)
    results = []
    for proc in (first, second):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    a, b = ({*r["moved"]} for r in results)
    assert not a & b, f"moved by both: {a & b}"
    assert a | b == {m.key for m in plan.moves}
    assert all(len(r["moved"]) == len(set(r["moved"])) for r in results)
    status = router.rebalance.status(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)} and not status["errors"]
    assert move_generations(router) == {m.key: 1 for m in plan.moves}
    assert contents(router) == before
    assert_all_files_intact(router.root)
    assert_no_orphans(router, retired_sources(router, plan_id))


# -- kill -9 with the default lease: taken over within seconds, cancel leaves nothing frozen ------------------------

KILLED_WITH_THE_DEFAULT_LEASE = """
root, step = sys.argv[1], sys.argv[2]
router = Router(root)  # the default lease: what `shardlite rebalance apply` uses
router.rebalance.fault = lambda name: os.kill(os.getpid(), signal.SIGKILL) if name == step else None
router.rebalance.apply(parallel=2)
print("not killed")
"""


def kill_with_the_default_lease_at_fenced(router: Router) -> tuple[int, Any, list[dict[str, Any]], str]:
    """Plan a move onto n3 and apply it in a subprocess killed right after its first fence is journaled.
    Returns the plan, the fenced moves and the dead rebalancer's name."""
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    proc = subprocess.run([sys.executable, "-c", script(KILLED_WITH_THE_DEFAULT_LEASE), router.root, "fenced"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    fenced = [m for m in journal(router, plan_id) if m["step"] == "fenced"]
    assert fenced
    (owner, lease), = gread(router, "SELECT owner, lease FROM _shardlite_moves WHERE plan_id = ? AND key = ?",
                            (plan_id, fenced[0]["key"]))
    assert owner is not None and lease > time.time()  # the dead rebalancer's claim outlives it for a while
    for move in fenced:
        assert file_info(source_path(router, move))[2] is not None  # frozen: every write to it waits
    return plan_id, plan, fenced, str(owner)


def shardlite_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``python -m shardlite ARGS`` in a process of its own; returns it and how long it took."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "shardlite", *args], capture_output=True, text=True, timeout=240)
    return proc, time.monotonic() - start


def test_kill9_while_fenced_then_resume_in_another_process_takes_over_within_seconds(
        router: Router, tmp_path: Any, procs: list[Any]) -> None:
    keys = populate(router, 24)
    stopfile = os.fspath(tmp_path / "stop")
    progress = {name: os.fspath(tmp_path / f"{name}.progress") for name in ("wA", "wB")}
    for name in progress:
        open(progress[name], "wb").close()
        procs.append(spawn(WRITER, router.root, name, str(len(keys)), stopfile, progress[name]))
    writers = tuple(procs)

    def acks(name: str) -> int:
        return os.path.getsize(progress[name])

    wait_for("both writers to commit", lambda: all(acks(n) >= 30 for n in progress), procs=writers)
    plan_id, plan, fenced, dead = kill_with_the_default_lease_at_fenced(router)

    resume, took = shardlite_cli("rebalance", "resume", "--root", router.root)
    assert resume.returncode == 0, resume.stderr[-3000:]
    # A generous bound far from the old behaviour: the dead rebalancer's claim held for 300 s before; with
    # the default lease (10 s) it is taken over within seconds.
    assert took < 30, took
    for move in fenced:  # it said what it waited for (tenant, owner, until when), then took the move over
        assert f"waiting for {move['key']} (step fenced): held by {dead}, lease until" in resume.stderr, resume.stderr
        assert f"taking over {move['key']} at step fenced from {dead}" in resume.stderr, resume.stderr
    status = router.rebalance.status(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)}, status
    assert {router.locate(m.key).node for m in plan.moves} == {"n3"}
    # Taken over, not moved again: each fenced move kept the generation the dead rebalancer copied to, and every
    # tenant is at the generation its move journaled. A move the kill caught between allocating its generation
    # and journaling it (the second of parallel=2) allocates again on resume: a gap in the numbering, which
    # the allocation contract allows, never a second copy.
    generations = move_generations(router)
    assert {m["key"]: generations[m["key"]] for m in fenced} == {m["key"]: 1 for m in fenced}, generations
    assert all(1 <= generations[m.key] <= 2 for m in plan.moves), generations
    assert {m["key"]: router.locate(m["key"]).generation for m in journal(router, plan_id)} == \
        {m["key"]: m["target_generation"] for m in journal(router, plan_id)}

    after = {n: acks(n) for n in progress}
    wait_for("the writers to go on after the resume", lambda: all(acks(n) >= after[n] + 30 for n in progress),
             procs=writers)
    open(stopfile, "w").close()
    results = {}
    for name, proc in zip(progress, writers, strict=True):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results[name] = json.loads(out)
    assert not any(r["errors"] for r in results.values()), [r["errors"][:3] for r in results.values()]
    acked = Counter((name, key, seq) for name, r in results.items() for key, seq in r["acked"])
    found: Counter[tuple[str, str, int]] = Counter()
    for key in router.tenants():
        for name, seq in router.query(key, "SELECT writer, seq FROM w"):
            found[(name, key, seq)] += 1
    assert found == acked  # every acknowledged write present exactly once, nothing else
    assert_reachable_now(router.root, [m["key"] for m in fenced], "after the resume")
    assert_all_files_intact(router.root)
    assert_no_orphans(router, retired_sources(router, plan_id))


def test_kill9_while_fenced_then_cancel_leaves_no_tenant_fenced_or_moving(router: Router) -> None:
    keys = populate(router, 16)
    before = contents(router)
    plan_id, plan, fenced, dead = kill_with_the_default_lease_at_fenced(router)

    # a cancel told not to wait gives up on the dead rebalancer's live-looking claims, and says so
    gave_up, _ = shardlite_cli("rebalance", "cancel", "--wait", "0", "--root", router.root)
    assert gave_up.returncode == 1, gave_up.stderr[-3000:]
    for move in fenced:
        assert f"{move['key']}: held by {dead} at step fenced" in gave_up.stdout, gave_up.stdout
        assert f"not undone yet: {move['key']} (step fenced): held by {dead}, lease until" in gave_up.stderr, \
            gave_up.stderr
    assert router.rebalance.status(plan_id)["state"] == "cancelled"

    # run again on the cancelled plan: it waits for the dead owner's lease, then undoes the moves
    cancel, took = shardlite_cli("rebalance", "cancel", "--root", router.root)
    assert cancel.returncode == 0, (cancel.stdout, cancel.stderr[-3000:])
    # A generous bound far from the old behaviour (300 s claims; the old cancel gave up after 15 s and left
    # the tenant fenced): with the default lease the dead owner's moves are undone within seconds.
    assert took < 30, took
    status = router.rebalance.status(plan_id)
    assert status["state"] == "cancelled" and status["steps"] == {"cancelled": len(plan.moves)}, status
    assert not status["held"] and not status["errors"]
    for move in fenced:
        assert "fence lifted" in status["rolled_back"][move["key"]]
        assert f"{move['key']}: rolled back: " in cancel.stdout
    assert {state for state, _node, _gen in gread_states(router).values()} == {"active"}
    assert {router.locate(k).node for k in keys} <= {"n1", "n2"}
    assert contents(router) == before
    assert_no_orphans(router)
    assert_all_files_intact(router.root)
    assert_reachable_now(router.root, keys, "right after cancel")  # no wait: move_wait=0 would raise


def gread_states(router: Router) -> dict[str, tuple[str, str, int]]:
    return {str(k): (str(s), str(n), int(g)) for k, s, n, g in
            gread(router, "SELECT key, state, node, generation FROM _shardlite_tenants")}


def test_a_frozen_tenant_of_a_dead_rebalancer_can_be_rescued_without_the_operator(router: Router) -> None:
    """``Rebalancer.rescue(key)``: what a process that finds a tenant frozen by a dead rebalancer can call
    instead of waiting for `resume` or `cancel`."""
    keys = populate(router, 16)
    before = contents(router)
    plan_id, plan = kill_rebalancer_at(router, "fenced")  # its lease is 0.5 s
    (first,) = [m for m in journal(router, plan_id) if m["step"] == "fenced"]
    assert file_info(source_path(router, first))[2] is not None
    other = next(k for k in keys if k != first["key"])
    assert not router.rebalance.rescue(other)  # nothing abandoned there
    wait_for_dead_leases(router, plan_id)
    assert router.rebalance.rescue(first["key"])
    assert_reachable_now(router.root, [first["key"]], "after the rescue")
    status = router.rebalance.status(plan_id)
    assert status["state"] == "applying" and status["failed"] == {
        first["key"]: "abandoned: its rebalancer stopped renewing its claim"}
    assert "fence lifted" in status["rolled_back"][first["key"]]
    assert not router.rebalance.rescue(first["key"])  # settled once
    assert router.rebalance.resume(plan_id)["steps"] == {"done": len(plan.moves)}
    before[first["key"]].append((before[first["key"]][-1][0] + 1, "after the rescue"))
    assert contents(router) == before
    assert_no_orphans(router, retired_sources(router, plan_id))
