"""Conformance: the :class:`~shardlite.meta.journal.MoveJournal` contract (``meta.journal``), over every backend.

Only the contract is used (through the ``meta`` fixture or :func:`helpers_meta.open_meta`): the PostgreSQL
backend runs these tests unchanged. Leases are the client's ``time.time()``: a lapsed claim is made with a
negative lease, never by sleeping.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Sequence

import pytest
from helpers_meta import open_meta

from shardlite import ConfigurationError, MetaConflict
from shardlite.core.movejournal import LostClaim, MoveRow, PlanCancelled
from shardlite.core.planning import Move
from shardlite.files.catalog import TenantRecord
from shardlite.meta import MetaStore, MoveJournal

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = ("tenants", "journal")


LEASE = 30.0
LAPSED = -1.0  # a claim whose lease is already over when it is taken


def make_plan(journal: MoveJournal, keys: Sequence[str], *, source: str = "n1", target: str = "n2",
              fingerprint: str = "fp") -> int:
    moves = [Move(key, source, target, 100 + i, 10 * i) for i, key in enumerate(keys)]
    return journal.create_plan(fingerprint, {"moves": len(moves)}, moves)


def applying_plan(journal: MoveJournal, keys: Sequence[str] = ("t:1",)) -> int:
    plan_id = make_plan(journal, keys)
    assert journal.set_plan_state(plan_id, "applying", only_from=("planned",))
    return plan_id


def claimed(journal: MoveJournal, plan_id: int, key: str, owner: str = "a", lease: float = LEASE) -> MoveRow:
    move = journal.claim(plan_id, key, owner, lease)
    assert move is not None
    return move


def row(journal: MoveJournal, plan_id: int, key: str) -> MoveRow:
    found = journal.move(plan_id, key)
    assert found is not None
    return found


def new_tenant(meta: MetaStore, key: str) -> TenantRecord:
    return meta.tenants.register(key, "n1", meta.tenants.allocate_generation(key, "n1", "create"), "i1", 0)


def run_threads(count: int, body: Callable[[int], object]) -> list[object]:
    """Run ``body(i)`` on ``count`` threads released together; their results (or exceptions) by index."""
    barrier = threading.Barrier(count)
    results: list[object] = [None] * count

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = body(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# -- plans ------------------------------------------------------------------------------------------------

def test_plan_ids_strictly_increase_and_are_never_reused(meta_backend: str, root: str) -> None:
    store = open_meta(meta_backend, root)
    try:
        journal = store.journal
        assert journal.latest_plan_id() is None and journal.plans() == []
        ids = [make_plan(journal, [f"t:{i}"], fingerprint=f"fp{i}") for i in range(3)]
        assert ids == sorted(set(ids)) and ids[0] > 0
        assert journal.latest_plan_id() == ids[-1]
        assert [p.id for p in journal.plans()] == ids[::-1]
        assert [p.id for p in journal.plans(limit=2)] == ids[:0:-1]
        # Making a plan supersedes every older planned one.
        assert [journal.plan_state(i) for i in ids] == ["superseded", "superseded", "planned"]
        newest = journal.plan(ids[-1])
        assert newest is not None and newest.fingerprint == "fp2" and newest.summary == {"moves": 1}
        assert journal.plan(ids[-1] + 1000) is None and journal.plan_state(ids[-1] + 1000) is None
        # A refused plan burns nothing it could hand out twice.
        assert journal.set_plan_state(ids[-1], "applying", only_from=("planned",))
        with pytest.raises(ConfigurationError):
            make_plan(journal, ["t:x"])
        assert journal.set_plan_state(ids[-1], "done", only_from=("applying",))
    finally:
        store.close()
    store = open_meta(meta_backend, root, create=False)
    try:
        later = make_plan(store.journal, ["t:y"])
        assert later > ids[-1]
    finally:
        store.close()


def test_moves_are_listed_by_source_then_key_in_code_points(meta: MetaStore) -> None:
    journal = meta.journal
    keys = ["t:é", "t:z", "t:Z", "t:a", "t:\U0001f600", "t:\u00ff", "t:\uffef", "t:ß"]
    moves = [Move(key, ("n2", "n10")[i % 2], "n9", 7, 1) for i, key in enumerate(keys + [k + "/" for k in keys])]
    plan_id = journal.create_plan("fp", {}, moves)
    listed = journal.moves(plan_id)
    assert [(m.source, m.key) for m in listed] == sorted((m.source, m.key) for m in moves)
    first = listed[0]
    assert (first.plan_id, first.target, first.source_generation, first.target_generation, first.step,
            first.owner, first.lease, first.error, first.pause_ms) == (plan_id, "n9", 7, None, "pending", None,
                                                                        0.0, None, None)
    assert journal.move(plan_id, "t:\U0001f600") is not None and journal.move(plan_id, "t:nope") is None
    assert journal.moves(plan_id + 1) == []


def test_create_plan_is_refused_while_a_plan_is_applying(meta: MetaStore) -> None:
    journal = meta.journal
    applying = applying_plan(journal)
    with pytest.raises(ConfigurationError, match="being applied"):
        make_plan(journal, ["t:2"])
    assert journal.latest_plan_id() == applying and journal.plan_state(applying) == "applying"


def test_create_plan_is_refused_while_a_cancelled_plan_has_moves_to_undo(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal, ["t:1", "t:2"])
    claimed(journal, plan_id, "t:1")  # held: cancel_unstarted leaves it
    assert journal.set_plan_state(plan_id, "cancelled", only_from=("applying",))
    assert journal.cancel_unstarted(plan_id, "b") == 1
    assert journal.unfinished_plans("cancelled") == [plan_id]
    with pytest.raises(ConfigurationError, match=f"plan {plan_id} was cancelled"):
        make_plan(journal, ["t:3"])
    assert journal.latest_plan_id() == plan_id
    assert journal.cancel_unstarted(plan_id, "a") == 1  # ours: nothing to undo at pending
    assert journal.unfinished_plans("cancelled") == []
    assert make_plan(journal, ["t:3"]) > plan_id


def test_create_plan_and_apply_never_leave_a_planned_plan_beside_an_applying_one(meta: MetaStore) -> None:
    """The F6 window: the 'applying' check and the insert are one unit, so a concurrent apply either wins
    (the new plan is refused) or loses (its plan was superseded, its CAS returns False)."""
    journal = meta.journal
    for round_ in range(15):
        old = make_plan(journal, [f"t:{round_}"])

        def body(i: int, old: int = old, round_: int = round_) -> object:
            if i == 0:
                return journal.set_plan_state(old, "applying", only_from=("planned",))
            return make_plan(journal, [f"t:new{round_}"])

        applied, created = run_threads(2, body)
        if applied is True:
            assert isinstance(created, ConfigurationError)
            assert journal.plan_state(old) == "applying"
            assert journal.set_plan_state(old, "done", only_from=("applying",))
        else:
            assert applied is False and isinstance(created, int)
            assert journal.plan_state(old) == "superseded" and journal.plan_state(created) == "planned"


def test_set_plan_state_reports_a_lost_compare_and_set(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = make_plan(journal, ["t:1"])
    assert journal.set_plan_state(plan_id, "done", only_from=("applying",)) is False
    assert journal.plan_state(plan_id) == "planned"
    assert journal.set_plan_state(plan_id + 1, "cancelled") is False
    assert journal.plan_state(plan_id + 1) is None
    assert journal.set_plan_state(plan_id, "applying", only_from=("planned",)) is True
    assert journal.set_plan_state(plan_id, "applying", only_from=("planned",)) is False
    assert journal.set_plan_state(plan_id, "cancelled") is True
    assert journal.plan_state(plan_id) == "cancelled"


def test_set_plan_state_races_have_one_winner(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = make_plan(journal, ["t:1"])
    results = run_threads(6, lambda i: journal.set_plan_state(plan_id, "applying", only_from=("planned",)))
    assert sorted(map(repr, results)) == ["False"] * 5 + ["True"]


def test_plan_row_and_unfinished_plans(meta: MetaStore) -> None:
    journal = meta.journal
    with pytest.raises(ConfigurationError, match="no planned rebalance plan"):
        journal.plan_row(None, ("planned",))
    first = make_plan(journal, ["t:1"], fingerprint="one")
    second = make_plan(journal, ["t:2"], fingerprint="two")
    assert journal.plan_row(None, ("planned",)) == (second, "planned", "two")
    assert journal.plan_row(first, ("superseded", "planned")) == (first, "superseded", "one")
    assert journal.plan_row(None, ("planned", "superseded")) == (second, "planned", "two")
    with pytest.raises(ConfigurationError, match=f"plan {first}"):
        journal.plan_row(first, ("planned",))
    assert journal.unfinished_plans("planned") == [second]
    assert journal.unfinished_plans("superseded") == [first]
    assert journal.unfinished_plans("cancelled") == []


def test_note_rollback_keeps_every_concurrent_note(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = make_plan(journal, [f"t:{i}" for i in range(8)])
    run_threads(8, lambda i: journal.note_rollback(plan_id, f"t:{i}", f"undone {i}"))
    journal.note_rollback(plan_id, "t:0", "undone again")
    plan = journal.plan(plan_id)
    assert plan is not None
    assert plan.summary["rolled_back"] == {f"t:{i}": f"undone {i}" for i in range(1, 8)} | {"t:0": "undone again"}
    assert plan.summary["moves"] == 8  # the rest of the summary is kept
    journal.note_rollback(plan_id + 1, "t:0", "no such plan")  # nothing happens
    assert journal.plan(plan_id + 1) is None


# -- claims -----------------------------------------------------------------------------------------------

def test_claim_compare_and_set(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal, ["t:1", "t:2"])
    before = time.time()
    move = claimed(journal, plan_id, "t:1", "a")
    assert move.owner == "a" and before + LEASE <= move.lease <= time.time() + LEASE
    assert row(journal, plan_id, "t:1") == move
    again = claimed(journal, plan_id, "t:1", "a")  # ours: renewed
    assert again.lease >= move.lease
    # Another owner's live claim: None, nothing written.
    assert journal.claim(plan_id, "t:1", "b", LEASE) is None
    assert row(journal, plan_id, "t:1") == again
    # A lapsed claim is taken over.
    claimed(journal, plan_id, "t:2", "a", lease=LAPSED)
    assert claimed(journal, plan_id, "t:2", "b").owner == "b"
    # No such move.
    assert journal.claim(plan_id, "t:3", "a", LEASE) is None and journal.claim(plan_id + 1, "t:1", "a", LEASE) is None


def test_claim_refuses_finished_moves_and_restarts_failed_ones(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal, ["t:1", "t:2"])
    done = claimed(journal, plan_id, "t:1")
    journal.set_step(done, "a", "done", applying=False)
    journal.release(done, "a")
    assert journal.claim(plan_id, "t:1", "a", LEASE) is None
    assert row(journal, plan_id, "t:1").owner is None
    failed = claimed(journal, plan_id, "t:2")
    journal.set_step(failed, "a", "copying", applying=True, target_generation=9)
    journal.set_step(failed, "a", "failed", applying=False, error="boom")
    journal.release(failed, "a")
    again = claimed(journal, plan_id, "t:2", "b")
    assert (again.step, again.error, again.owner, again.target_generation) == ("pending", None, "b", 9)


def test_threads_racing_for_one_move_have_exactly_one_winner(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal)
    results = run_threads(8, lambda i: journal.claim(plan_id, "t:1", f"owner{i}", LEASE))
    winners = [r for r in results if isinstance(r, MoveRow)]
    assert len(winners) == 1 and results.count(None) == 7
    assert row(journal, plan_id, "t:1").owner == winners[0].owner


_CLAIMER = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers_meta import open_meta
store = open_meta(sys.argv[2], sys.argv[3], create=False)
try:
    print("ready", flush=True)
    sys.stdin.readline()
    move = store.journal.claim(int(sys.argv[4]), "t:1", sys.argv[5], 30.0)
    print("won" if move is not None else "lost", flush=True)
finally:
    store.close()
"""


def test_processes_racing_for_one_move_have_exactly_one_winner(meta_backend: str, meta: MetaStore,
                                                                root: str) -> None:
    plan_id = applying_plan(meta.journal)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(_CLAIMER), tests_dir, meta_backend, root,
                               str(plan_id), f"proc{i}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for i in range(4)]
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert sorted(outcomes) == ["lost"] * 3 + ["won"]
    winner = outcomes.index("won")
    assert row(meta.journal, plan_id, "t:1").owner == f"proc{winner}"


def test_release_and_record_error_only_touch_our_own_claim(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal)
    move = claimed(journal, plan_id, "t:1", "a")
    stranger = row(journal, plan_id, "t:1")
    journal.release(stranger, "b")
    journal.record_error(stranger, "b", "not mine")
    assert row(journal, plan_id, "t:1") == move
    journal.record_error(move, "a", "undo failed")
    assert move.error == "undo failed" and row(journal, plan_id, "t:1").error == "undo failed"
    journal.release(move, "a")
    assert (move.owner, move.lease) == (None, 0.0)
    stored = row(journal, plan_id, "t:1")
    assert (stored.owner, stored.lease, stored.step) == (None, 0.0, "pending")


def test_renew_extends_our_leases_and_reports_lost_and_cancelled(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal, ["t:1", "t:2", "t:3"])
    ours = claimed(journal, plan_id, "t:1", "a", lease=1.0)
    lapsed = claimed(journal, plan_id, "t:2", "a", lease=LAPSED)
    theirs = claimed(journal, plan_id, "t:3", "b")
    assert journal.renew([ours, lapsed, theirs], "a", LEASE) == {"t:3": "lost"}
    assert ours.lease > time.time() + 1.0 and row(journal, plan_id, "t:1").lease == ours.lease
    assert row(journal, plan_id, "t:2").lease == lapsed.lease > time.time()  # still ours: extended
    assert row(journal, plan_id, "t:3") == theirs
    assert journal.set_plan_state(plan_id, "cancelled")
    assert journal.renew([ours, theirs], "a", LEASE) == {"t:1": "cancelled", "t:3": "lost"}


def test_check_and_set_step_refuse_with_nothing_written(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal, ["t:1", "t:2"])
    move = claimed(journal, plan_id, "t:1", "a", lease=5.0)
    journal.check(move, "a", applying=True)
    with pytest.raises(LostClaim):
        journal.check(move, "a", applying=True, margin=60.0)
    with pytest.raises(LostClaim):
        journal.check(move, "b", applying=False)
    before = row(journal, plan_id, "t:1")
    with pytest.raises(LostClaim):
        journal.set_step(move, "b", "copying", applying=True, target_generation=5)
    assert row(journal, plan_id, "t:1") == before and move.step == "pending"
    with pytest.raises(ValueError):
        journal.set_step(move, "a", "copying", applying=True, lease=0.0)
    with pytest.raises(ValueError):
        journal.set_step(move, "a", "nonsense", applying=True)
    assert row(journal, plan_id, "t:1") == before
    journal.set_step(move, "a", "copying", applying=True, target_generation=5)
    assert (move.step, move.target_generation) == ("copying", 5) and row(journal, plan_id, "t:1") == move
    # A lapsed claim is lost even when nobody took it over yet.
    lapsed = claimed(journal, plan_id, "t:2", "a", lease=LAPSED)
    with pytest.raises(LostClaim):
        journal.set_step(lapsed, "a", "copying", applying=True)
    assert row(journal, plan_id, "t:2").step == "pending"
    # A cancelled plan: forward steps are refused, the undo's steps are not.
    assert journal.set_plan_state(plan_id, "cancelled")
    with pytest.raises(PlanCancelled) as caught:
        journal.set_step(move, "a", "fenced", applying=True)
    assert isinstance(caught.value, MetaConflict) and not isinstance(caught.value, ConfigurationError)
    assert row(journal, plan_id, "t:1").step == "copying" and move.step == "copying"
    with pytest.raises(PlanCancelled):
        journal.check(move, "a", applying=True)
    journal.set_step(move, "a", "cancelled", applying=False, error=None)
    assert row(journal, plan_id, "t:1").step == "cancelled"


def test_the_claim_errors_are_meta_conflicts() -> None:
    assert issubclass(LostClaim, MetaConflict) and issubclass(PlanCancelled, MetaConflict)
    assert not issubclass(LostClaim, ConfigurationError) and not issubclass(PlanCancelled, ConfigurationError)


def _contend_during_holding(journal: MoveJournal, move: MoveRow, attempt: Callable[[], object], *,
                            hold_for: float = 1.0) -> object:
    """Run ``attempt`` on another thread while ``holding`` is entered; check it does not return while the
    block runs (``hold_for`` seconds). Returns what it returned (or raised) once the block ended."""
    entered = threading.Event()
    finished = threading.Event()
    outcome: list[object] = []

    def contender() -> None:
        entered.wait()
        try:
            outcome.append(attempt())
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)
        finished.set()

    thread = threading.Thread(target=contender)
    thread.start()
    try:
        with journal.holding(move, "a", applying=True):
            entered.set()
            # The contender must wait for the block: if it may run meanwhile, it finishes well within this.
            assert not finished.wait(hold_for), f"a concurrent call ran inside the holding block: {outcome}"
            stored = journal.move(move.plan_id, move.key)
            assert stored is not None and stored.owner == "a" and stored.step == move.step
    finally:
        entered.set()
        thread.join()
    assert finished.is_set()
    return outcome[0]


def test_holding_keeps_a_lapsing_claim_from_being_taken_over(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal)
    move = claimed(journal, plan_id, "t:1", "a", lease=1.0)
    # The lease lapses while the block runs: "b" may take the move over only once the block ended.
    taken = _contend_during_holding(journal, move, lambda: journal.claim(plan_id, "t:1", "b", LEASE),
                                    hold_for=1.5)
    assert isinstance(taken, MoveRow) and taken.owner == "b"


def test_holding_blocks_a_concurrent_step_until_the_block_ends(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal)
    move = claimed(journal, plan_id, "t:1", "a")
    twin = row(journal, plan_id, "t:1")  # the same claim, as another worker of this owner sees it
    result = _contend_during_holding(journal, move,
                                     lambda: journal.set_step(twin, "a", "copying", applying=True,
                                                              target_generation=3))
    assert result is None and row(journal, plan_id, "t:1").step == "copying"


def test_holding_blocks_a_cancel_until_the_block_ends(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal)
    move = claimed(journal, plan_id, "t:1", "a")
    result = _contend_during_holding(journal, move, lambda: journal.set_plan_state(plan_id, "cancelled"))
    assert result is True and journal.plan_state(plan_id) == "cancelled"


def test_holding_refuses_on_entry(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal)
    move = claimed(journal, plan_id, "t:1", "a", lease=5.0)
    ran: list[str] = []
    with pytest.raises(LostClaim):
        with journal.holding(move, "b", applying=False):
            ran.append("b")
    with pytest.raises(LostClaim):
        with journal.holding(move, "a", applying=False, margin=60.0):
            ran.append("margin")
    assert journal.set_plan_state(plan_id, "cancelled")
    with pytest.raises(PlanCancelled):
        with journal.holding(move, "a", applying=True):
            ran.append("cancelled")
    with journal.holding(move, "a", applying=False):
        ran.append("undo")
    assert ran == ["undo"]


# -- the flip ----------------------------------------------------------------------------------------------

def moving_tenant(meta: MetaStore, key: str = "t:1") -> tuple[MoveRow, TenantRecord, int]:
    """A tenant, an applying plan moving it, the move claimed by "a" at ``copying`` with a new generation."""
    record = new_tenant(meta, key)
    journal = meta.journal
    plan_id = journal.create_plan("fp", {}, [Move(key, "n1", "n1", record.generation, 1)])
    assert journal.set_plan_state(plan_id, "applying", only_from=("planned",))
    move = claimed(journal, plan_id, key, "a")
    target = meta.tenants.allocate_generation(key, "n1", "move")
    journal.set_step(move, "a", "copying", applying=True, target_generation=target)
    return move, record, target


def test_flip_held_flips_with_the_claim_checked(meta: MetaStore) -> None:
    move, record, target = moving_tenant(meta)
    flipped = meta.journal.flip_held(move, "a", node="n1", generation=target,
                                     from_generation=record.generation, incarnation="i2")
    assert (flipped.key, flipped.node, flipped.generation, flipped.epoch, flipped.state, flipped.incarnation) == \
        (record.key, "n1", target, record.epoch + 1, "active", "i2")
    assert meta.tenants.lookup(record.key) == flipped
    again = meta.journal.flip_held(move, "a", node="n1", generation=target + 1000, from_generation=target)
    assert again.incarnation == "i2" and again.epoch == record.epoch + 2  # no incarnation given: kept


def test_flip_held_compare_and_set_on_the_generation(meta: MetaStore) -> None:
    move, record, target = moving_tenant(meta)
    with pytest.raises(MetaConflict) as caught:
        meta.journal.flip_held(move, "a", node="n1", generation=target, from_generation=record.generation + 1000)
    assert not isinstance(caught.value, (LostClaim, PlanCancelled, ConfigurationError))
    assert meta.tenants.lookup(record.key) == record


def test_flip_held_compare_and_set_on_the_claim_and_the_plan(meta: MetaStore) -> None:
    move, record, target = moving_tenant(meta)
    journal = meta.journal
    with pytest.raises(LostClaim):
        journal.flip_held(move, "b", node="n1", generation=target, from_generation=record.generation)
    assert meta.tenants.lookup(record.key) == record
    assert journal.set_plan_state(move.plan_id, "cancelled")
    with pytest.raises(PlanCancelled):
        journal.flip_held(move, "a", node="n1", generation=target, from_generation=record.generation)
    assert meta.tenants.lookup(record.key) == record


# -- the rest ----------------------------------------------------------------------------------------------

def test_cancel_unstarted(meta: MetaStore) -> None:
    journal = meta.journal
    keys = ["t:free", "t:ours", "t:lapsed", "t:theirs", "t:failed", "t:copying"]
    plan_id = applying_plan(journal, keys)
    claimed(journal, plan_id, "t:ours", "a")
    claimed(journal, plan_id, "t:lapsed", "b", lease=LAPSED)
    claimed(journal, plan_id, "t:theirs", "b")
    failed = claimed(journal, plan_id, "t:failed", "b")
    journal.set_step(failed, "b", "failed", applying=False, error="boom")
    journal.release(failed, "b")
    copying = claimed(journal, plan_id, "t:copying", "b", lease=LAPSED + 2 * LEASE)
    journal.set_step(copying, "b", "copying", applying=True)
    journal.release(copying, "b")
    assert journal.cancel_unstarted(plan_id, "a") == 4
    steps = {m.key: (m.step, m.owner) for m in journal.moves(plan_id)}
    assert steps == {"t:free": ("cancelled", None), "t:ours": ("cancelled", None), "t:lapsed": ("cancelled", None),
                     "t:theirs": ("pending", "b"), "t:failed": ("cancelled", None), "t:copying": ("copying", None)}
    assert journal.cancel_unstarted(plan_id, "a") == 0


def test_mark_completed_is_a_compare_and_set_on_done(meta: MetaStore) -> None:
    journal = meta.journal
    plan_id = applying_plan(journal, ["t:1", "t:2"])
    move = claimed(journal, plan_id, "t:1")
    assert journal.mark_completed(plan_id, "t:1") is False  # pending
    journal.set_step(move, "a", "done", applying=False)
    assert journal.mark_completed(plan_id, "t:1") is True
    assert journal.mark_completed(plan_id, "t:1") is False
    assert row(journal, plan_id, "t:1").step == "completed"
    assert journal.mark_completed(plan_id, "t:nope") is False


def test_lapsed_moves_lists_started_moves_nobody_holds(meta: MetaStore) -> None:
    journal = meta.journal
    plans: dict[str, int] = {}
    for name, step, lease in [("lapsed copying", "copying", LAPSED), ("live fenced", "fenced", LEASE),
                              ("lapsed switched", "switched", LAPSED), ("unowned copying", "copying", None),
                              ("lapsed pending", None, LAPSED), ("done", "done", LEASE)]:
        plan_id = plans[name] = applying_plan(journal, ["t:1"])
        move = claimed(journal, plan_id, "t:1", "a")
        if step is not None:
            journal.set_step(move, "a", step, applying=False)
        if lease is None:
            journal.release(move, "a")
        elif step != "done":
            claimed(journal, plan_id, "t:1", "a", lease=lease)
        assert journal.set_plan_state(plan_id, "done", only_from=("applying",))
    assert journal.lapsed_moves("t:1", time.time()) == [plans["lapsed copying"], plans["lapsed switched"],
                                                       plans["unowned copying"]]
    later = time.time() + 2 * LEASE  # every lease has lapsed by then; pending and done moves never count
    assert journal.lapsed_moves("t:1", later) == [plans["lapsed copying"], plans["live fenced"],
                                                 plans["lapsed switched"], plans["unowned copying"]]
    assert journal.lapsed_moves("t:2", later) == []


def test_no_nul_is_stored(meta: MetaStore) -> None:
    """The contract's "Text" rule: PostgreSQL cannot store U+0000, so no backend stores it."""
    journal = meta.journal
    with pytest.raises(ValueError, match="NUL"):
        make_plan(journal, ["t:1"], fingerprint="f\0p")
    with pytest.raises(ValueError, match="NUL"):
        journal.create_plan("fp", {}, [Move("t:1", "n\0", "n2", 1, 1)])
    assert journal.latest_plan_id() is None
    plan_id = applying_plan(journal, ["t:1"])
    with pytest.raises(ValueError, match="NUL"):
        journal.claim(plan_id, "t:1", "a\0", LEASE)
    assert journal.claim(plan_id, "t:\0", "a", LEASE) is None and journal.move(plan_id, "t:\0") is None
    assert journal.lapsed_moves("t:\0", time.time()) == [] and journal.mark_completed(plan_id, "t:\0") is False
    move = claimed(journal, plan_id, "t:1")
    journal.record_error(move, "a", "bad\0byte")
    assert move.error == "bad\ufffdbyte" and row(journal, plan_id, "t:1").error == "bad\ufffdbyte"
    journal.set_step(move, "a", "failed", applying=False, error="again\0")
    assert move.error == "again\ufffd" and row(journal, plan_id, "t:1") == move
    with pytest.raises(ValueError, match="NUL"):
        journal.set_step(move, "a\0", "copying", applying=True)
    assert row(journal, plan_id, "t:1") == move
