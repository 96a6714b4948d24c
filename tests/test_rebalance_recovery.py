"""Rebalance failures, undo, leases and cancel in one process (brief rules 12 and 15).

* a move that fails at any step before its commit point is undone at once: its tenant is active at its
  source, unfenced and reachable without waiting, no partial copy is left, its claim is released and its
  error journaled; ``resume`` moves it; ``status`` shows the error and what was rolled back;
* a live rebalancer keeps its claim through a copy that takes many times its lease (the heartbeat), and
  another rebalancer waits for it (saying so) instead of taking the move over;
* ``cancel`` while a live rebalancer holds a fenced move waits for that rebalancer to undo it, then
  returns with no tenant fenced or moving;
* a move onto a node whose file system is full (a real tmpfs, in a private mount namespace) is left out
  of the plan, or fails with an error naming the tenant, the node and the file, and is undone.

The interruptions are the ``fault`` hook raising after a journaled step; the kill -9 versions are in
``test_rebalance_procs.py``. Leases are made short (``rebalancer.lease``) and the tests wait on journal
state, never on time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers_rebalance import (
    SCHEMA,
    assert_no_orphans,
    assert_reachable_now,
    catalog_states,
    contents,
    faulting,
    file_info,
    journal,
    move_generations,
    populate,
    retired_sources,
    source_path,
    wait_for,
)

from shardlite import ConfigurationError, Router
from shardlite.cli import main as cli_main
from shardlite.core.planning import space_needed
from shardlite.services.rebalance import Notice

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = ("copying", "copied", "fenced", "linked")
#: What an undo rolls back when the move failed right after each step.
ROLLED_BACK = {
    "copying": None,  # the catalog is marked moving only after this point: nothing to roll back yet
    "copied": "partial copy removed, catalog state back to active",
    "fenced": "partial copy removed, fence lifted, catalog state back to active",
    "linked": "unrouted target copy removed, fence lifted, catalog state back to active",
}


@pytest.fixture
def router(make_router: Any) -> Router:
    return make_router(nodes=["n1", "n2"], schema=SCHEMA)  # type: ignore[no-any-return]


# -- a failing move is undone at once --------------------------------------------------------------------------


@pytest.mark.parametrize("step", BEFORE_COMMIT)
def test_a_failing_move_is_undone_at_once_and_resume_moves_it(router: Router, step: str) -> None:
    populate(router, 16)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    keys = [m.key for m in plan.moves]
    router.rebalance.fault = faulting(step)
    status = router.rebalance.apply(plan_id)
    router.rebalance.fault = None

    # every move failed at `step` and was undone: nothing is fenced, moving, claimed or half-copied
    assert status["state"] == "applying" and status["steps"] == {"failed": len(keys)}
    assert status["failed"] == status["errors"] == {k: f"RuntimeError: injected at {step}" for k in keys}
    assert all(m["owner"] is None and m["lease"] == 0 for m in journal(router.root, plan_id))
    states = catalog_states(router.root)
    for m in plan.moves:
        assert states[m.key] == ("active", m.source, m.generation)
    assert_no_orphans(router)
    expected_notes = {} if ROLLED_BACK[step] is None else {k: ROLLED_BACK[step] for k in keys}
    assert status["rolled_back"] == expected_notes
    assert_reachable_now(router.root, keys, "after the failure")
    before = contents(router)

    status = router.rebalance.resume(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(keys)} and not status["errors"]
    assert {router.locate(k).node for k in keys} == {"n3"}
    assert contents(router) == before
    assert move_generations(router.root) == {k: 2 for k in keys}  # a fresh target generation per attempt
    assert_no_orphans(router, retired_sources(router, plan_id))


@pytest.mark.parametrize("step", ["switched", "done"])
def test_a_failure_after_the_commit_point_finishes_the_move(router: Router, step: str) -> None:
    populate(router, 16)
    before = contents(router)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    router.rebalance.fault = faulting(step)
    status = router.rebalance.apply(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)} and not status["errors"]
    assert {router.locate(m.key).node for m in plan.moves} == {"n3"}
    assert contents(router) == before
    assert move_generations(router.root) == {m.key: 1 for m in plan.moves}
    assert_no_orphans(router, retired_sources(router, plan_id))


def test_one_failing_move_does_not_stop_the_others_and_status_names_it(router: Router, capsys: Any) -> None:
    populate(router, 30)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    victim = plan.moves[1].key
    notices: list[Notice] = []

    def fault(step: str) -> None:
        if step == "fenced" and any(m["key"] == victim and m["step"] == "fenced"
                                    for m in journal(router.root, plan_id)):
            raise OSError(28, "No space left on device")

    router.rebalance.fault = fault
    status = router.rebalance.apply(plan_id, notice=notices.append)
    router.rebalance.fault = None
    assert status["steps"] == {"done": len(plan.moves) - 1, "failed": 1}
    assert list(status["errors"]) == [victim] and "No space left" in status["errors"][victim]
    assert status["rolled_back"] == {victim: ROLLED_BACK["fenced"]}
    assert [(n.kind, n.key) for n in notices] == [("failed", victim)]
    assert "rolled back: partial copy removed, fence lifted" in str(notices[0])
    assert_reachable_now(router.root, [victim], "while the others moved")

    assert cli_main(["rebalance", "status", "--root", router.root]) == 1  # a failed move needs attention
    out = capsys.readouterr().out
    assert f"{victim}: OSError" in out and f"{victim}: rolled back: partial copy removed, fence lifted" in out
    assert cli_main(["rebalance", "resume", "--root", router.root, "--json"]) == 0
    final = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert final["state"] == "done" and final["steps"] == {"done": len(plan.moves)}
    assert router.locate(victim).node == "n3"


def test_nodes_remove_stops_with_a_clear_error_when_a_move_fails(make_router: Any, capsys: Any) -> None:
    router = make_router(nodes=["n1", "n2", "n3"], schema=SCHEMA)
    populate(router, 30)
    on_n2 = sorted(k for k in router.tenants() if router.locate(k).node == "n2")
    locked = on_n2[0]
    holding, done = threading.Event(), threading.Event()

    def hold_the_write_lock() -> None:  # a writer that keeps its transaction open past the busy timeout
        with router.transaction(locked) as tx:
            tx.execute("INSERT INTO t(v) VALUES ('held')")
            holding.set()
            done.wait(120)

    holder = threading.Thread(target=hold_the_write_lock)
    holder.start()
    try:
        holding.wait(60)
        code = cli_main(["nodes", "remove", "n2", "--yes", "--root", router.root])
    finally:
        done.set()
        holder.join(60)
    err = capsys.readouterr().err
    assert code == 2 and "node n2 is draining but 1 of its moves failed" in err, err
    assert f"{locked}: MoveFailed: could not fence tenant {locked!r}" in err and "stayed locked" in err, err
    assert "shardlite rebalance resume" in err
    assert [(n.name, n.state) for n in router.nodes.list()] == [("n1", "active"), ("n2", "draining"),
                                                                 ("n3", "active")]
    assert_reachable_now(router.root, [locked], "after the failed drain")
    assert router.rebalance.resume()["state"] == "done"
    assert cli_main(["nodes", "remove", "n2", "--yes", "--root", router.root]) == 0
    assert [n.name for n in router.nodes.list()] == ["n1", "n3"]
    assert router.query(locked, "SELECT v FROM t ORDER BY id")[-2:] == [("held",), ("after the failed drain",)]


# -- leases: a live rebalancer keeps its claims --------------------------------------------------------------------


def test_a_live_rebalancer_keeps_its_claim_through_a_copy_longer_than_its_lease(router: Router,
                                                                                make_router: Any) -> None:
    populate(router, 30)
    slow = router.rebalance
    other = make_router().rebalance
    # the copy below takes many leases; a claim that lapsed would be taken over by `other` at once (1 s,
    # not less: the heartbeat shares two busy cores with the rest of the test)
    slow.lease = other.lease = 1.0
    router.nodes.add("n3")
    plan_id, plan = slow.plan()
    first = plan.moves[0].key
    copying, release = threading.Event(), threading.Event()

    def slow_copy(step: str) -> None:
        if step == "copied" and not copying.is_set():  # stands for a multi-GB copy
            copying.set()
            release.wait(120)

    slow.fault = slow_copy
    moved_by_slow: list[str] = []
    notices: list[Notice] = []
    threads = [threading.Thread(target=lambda: slow.apply(plan_id, progress=lambda m: moved_by_slow.append(m.key))),
               threading.Thread(target=lambda: other.resume(plan_id, notice=notices.append))]
    threads[0].start()
    try:
        wait_for("the slow copy to start", copying.is_set)
        threads[1].start()
        leases: list[float] = []

        def held_for_many_leases() -> bool:
            row = next(m for m in journal(router.root, plan_id) if m["key"] == first)
            # never taken over: still the slow rebalancer's, at its step, with a lease it keeps renewing
            assert (row["owner"], row["step"]) == (slow.owner, "copying"), row
            leases.append(row["lease"])
            others_done = all(m["step"] == "done" for m in journal(router.root, plan_id) if m["key"] != first)
            return others_done and leases[-1] - leases[0] > 5 * slow.lease

        wait_for("the other moves to finish while the slow copy holds its claim for five leases",
                 held_for_many_leases)
    finally:
        release.set()
        for thread in threads:
            thread.join(120)
    assert moved_by_slow[0] == first
    assert any(n.kind == "waiting" and n.key == first and n.owner == slow.owner for n in notices), notices
    status = slow.status(plan_id)
    assert status["state"] == "done" and status["steps"] == {"done": len(plan.moves)}
    assert move_generations(router.root) == {m.key: 1 for m in plan.moves}
    assert_no_orphans(router, retired_sources(router, plan_id))


# -- cancel -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", BEFORE_COMMIT)
def test_cancel_after_failures_cancels_the_undone_moves(router: Router, step: str) -> None:
    populate(router, 16)
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    router.rebalance.fault = faulting(step)
    router.rebalance.apply(plan_id)
    router.rebalance.fault = None
    status = router.rebalance.cancel(plan_id)
    assert status["state"] == "cancelled" and status["steps"] == {"cancelled": len(plan.moves)}
    assert not status["errors"] and not status["held"]
    assert_reachable_now(router.root, [m.key for m in plan.moves], "after cancel")
    assert {router.locate(m.key).node for m in plan.moves} <= {"n1", "n2"}
    assert_no_orphans(router)
    with pytest.raises(ConfigurationError, match="no applying"):
        router.rebalance.resume(plan_id)


def test_cancel_waits_for_a_live_rebalancer_to_undo_its_fenced_move(router: Router, make_router: Any) -> None:
    populate(router, 30)
    before = contents(router)
    operator = make_router().rebalance
    router.nodes.add("n3")
    plan_id, plan = router.rebalance.plan()
    first = plan.moves[0].key
    fenced, cancelled = threading.Event(), threading.Event()

    def hold_the_fence(step: str) -> None:
        if step == "fenced" and not fenced.is_set():
            fenced.set()
            cancelled.wait(120)  # the operator cancels while this move is fenced

    router.rebalance.fault = hold_the_fence
    results: list[dict[str, Any]] = []
    applier = threading.Thread(target=lambda: results.append(router.rebalance.apply(plan_id)))
    applier.start()
    try:
        wait_for("the first move to be fenced", fenced.is_set)
        assert file_info(source_path(router, journal(router.root, plan_id)[0]))[2] is not None
        notices: list[Notice] = []

        def say(notice: Notice) -> None:
            notices.append(notice)
            cancelled.set()  # the applier goes on only once cancel waits for it

        status = operator.cancel(plan_id, notice=say)
    finally:
        cancelled.set()
        applier.join(120)
    assert [(n.kind, n.key, n.owner) for n in notices] == [("waiting", first, router.rebalance.owner)]
    assert "held by" in str(notices[0]) and "lease until" in str(notices[0])
    # the live owner noticed the cancel before its flip and undid its own move; cancel returned after that
    assert status["state"] == "cancelled" and status["steps"] == {"cancelled": len(plan.moves)}, status
    assert status["rolled_back"] == {first: "partial copy removed, fence lifted, catalog state back to active"}
    assert not status["held"] and results[0]["state"] == "cancelled"
    assert contents(router) == before
    assert_reachable_now(router.root, [m.key for m in plan.moves], "after cancel")
    assert_no_orphans(router)


def test_cancel_of_a_planned_plan_and_of_a_finished_one(router: Router, capsys: Any) -> None:
    populate(router, 10)
    router.nodes.add("n3")
    plan_id, _ = router.rebalance.plan()
    assert cli_main(["rebalance", "cancel", "--root", router.root]) == 0
    assert f"plan {plan_id}: cancelled" in capsys.readouterr().out
    # nothing left to undo: a second cancel has no plan to work on
    assert cli_main(["rebalance", "cancel", "--root", router.root]) == 2
    assert "no applying or planned rebalance plan" in capsys.readouterr().err
    plan_id, _ = router.rebalance.plan()
    assert router.rebalance.apply(plan_id)["state"] == "done"
    with pytest.raises(ConfigurationError):
        router.rebalance.cancel(plan_id)


# -- full nodes (a real small file system: tmpfs in a private mount namespace) ------------------------------------

FULL_NODE = """
import json, os, subprocess, sys
from shardlite import Router, ShardliteError

root, mode = sys.argv[1], sys.argv[2]
n3 = os.path.join(root, "n3")
os.makedirs(n3)
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", n3], check=True)
out = {}
with Router(root, nodes=["n1", "n2"], schema=SCHEMA) as router:
    for i in range(24):
        with router.transaction(f"user:{i}") as tx:
            tx.execute("INSERT INTO t(v) VALUES (randomblob(150000))")
    router.nodes.add("n3")
    router.rebalance.reserve = 100_000
    plan_id, plan = router.rebalance.plan()
    out["sizes"] = [m.size for m in plan.moves]
    out["moves"] = [m.key for m in plan.moves]
    out["left_out"] = [[o.move.key, o.move.target, o.reason] for o in plan.left_out]
    out["status_left_out"] = router.rebalance.status(plan_id)["left_out"]
    import contextlib, io
    from shardlite.cli import main
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        main(["rebalance", "status", "--root", root])
    out["status_text"] = text.getvalue()
    filler = os.path.join(n3, "filler")
    if mode == "fill":  # the node fills up after the plan was made, while the first copy is under way
        def fill(step):
            if step == "copying" and not os.path.exists(filler):
                with open(filler, "wb", buffering=0) as f:
                    try:
                        while True:
                            f.write(b"x" * 4096)
                    except OSError:
                        pass
        router.rebalance.fault = fill
    status = router.rebalance.apply(plan_id)
    router.rebalance.fault = None
    out["status"] = {k: status[k] for k in ("state", "steps", "errors", "rolled_back")}
    out["catalog"] = {k: [router.locate(k).node, router.locate(k).state] for k in router.tenants()}
    out["n3_files"] = sorted(os.listdir(n3) if mode != "fill" else
                             [os.path.join(d, f) for d, _, fs in os.walk(n3) for f in fs])
    for key in router.tenants():
        router.query(key, "SELECT count(*) FROM t")  # readable (waits at most move_wait, which is 10 s)
    if mode == "fill":
        os.unlink(filler)
        status = router.rebalance.resume(plan_id)
        out["resumed"] = {k: status[k] for k in ("state", "steps", "errors")}
print(json.dumps(out))
"""


def run_in_mount_namespace(tmp_path: Any, body: str, *args: str) -> dict[str, Any]:
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux unshare to mount a small tmpfs in a private mount namespace")
    prefix = [unshare, "--mount"] if os.geteuid() == 0 else [unshare, "--user", "--map-root-user", "--mount"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a private mount namespace here: {probe.stderr.strip()}")
    source = f"SCHEMA = {SCHEMA!r}\n" + textwrap.dedent(body)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.fspath(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([*prefix, sys.executable, "-c", source, os.fspath(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    return result


def test_planning_leaves_out_moves_that_do_not_fit_on_the_target_node(tmp_path: Any) -> None:
    out = run_in_mount_namespace(tmp_path, FULL_NODE, "plan")
    assert out["left_out"] and out["moves"], out  # 1 MiB minus a 100 kB reserve holds some of them, not all
    assert sum(space_needed(size) for size in out["sizes"]) <= 1024 * 1024 - 100_000
    for _key, target, reason in out["left_out"]:
        assert target == "n3" and "does not fit on node 'n3'" in reason and "reserve" in reason, reason
    assert [o["key"] for o in out["status_left_out"]] == [o[0] for o in out["left_out"]]
    assert f"{len(out['left_out'])} moves were left out of the plan for lack of free space" in out["status_text"]
    assert out["status"]["state"] == "done" and out["status"]["steps"] == {"done": len(out["moves"])}
    assert not out["status"]["errors"]
    for key, (node, state) in out["catalog"].items():  # moved ones on n3, left-out ones where they were
        assert state == "active" and (node == "n3") == (key in out["moves"]), (key, node)


def test_a_move_onto_a_node_that_filled_up_fails_clearly_and_is_undone(tmp_path: Any) -> None:
    out = run_in_mount_namespace(tmp_path, FULL_NODE, "fill")
    status = out["status"]
    assert status["state"] == "applying" and status["steps"] == {"failed": len(out["moves"])}, status
    first, *rest = out["moves"]
    # the copy under way hit the full disk: the error names the tenant, the node and the file
    error = status["errors"][first]
    assert error.startswith("NodeFull: node 'n3' is full: no space left for tenant 'user:"), error
    assert f"{first!r}" in error and os.fspath(tmp_path / "data" / "n3") in error and ".moving-" in error
    assert status["rolled_back"][first] == "partial copy removed, catalog state back to active"
    # the next ones are refused before they copy anything
    for key in rest:
        assert status["errors"][key].startswith(f"NodeFull: node 'n3' has no room for tenant {key!r}"), status
        assert "bytes are free" in status["errors"][key] or "are free" in status["errors"][key]
    assert [os.path.basename(p) for p in out["n3_files"]] == ["filler"]  # no partial copy left behind
    assert all(state == "active" and node != "n3" for node, state in out["catalog"].values())
    assert out["resumed"]["state"] == "done" and out["resumed"]["steps"] == {"done": len(out["moves"])}
