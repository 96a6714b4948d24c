"""The move journal on PostgreSQL (``shardlite.meta.postgres.journal``): what the conformance suite
(``test_meta_journal.py``) cannot say.

* A ``holding`` block in one process keeps its rows locked against every other process: a contender's
  backend is seen waiting on a lock (``pg_stat_activity``, not a timer) until the block ends.
* A process killed inside a ``holding`` block leaves nothing locked: the server ends its transaction.
* The server killed and restarted: journal calls raise :class:`~shardlite.MetaUnavailable` meanwhile and
  work again by themselves afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers_meta import open_meta
from helpers_pg import separate_server, wait_for_lock_waiter

from shardlite import MetaUnavailable, Settings
from shardlite.core.movejournal import LostClaim, MoveRow
from shardlite.core.planning import Move
from shardlite.meta import MetaStore, MoveJournal
from shardlite.meta.choose import ENV_VAR
from shardlite.meta.location import parse_location
from shardlite.meta.postgres import PgMeta
from shardlite.meta.record import new_root_id

LEASE = 30.0

_HOLDER = """
import sys
sys.path.insert(0, sys.argv[1])
from helpers_meta import open_meta
store = open_meta("postgresql", sys.argv[2], create=False)
try:
    move = store.journal.move(int(sys.argv[3]), "t:1")
    with store.journal.holding(move, "a", applying=True):
        print("holding", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
finally:
    store.close()
"""


@pytest.fixture
def pg_meta(pg_dsn: str, root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[MetaStore]:
    monkeypatch.setenv(ENV_VAR, pg_dsn)  # inherited by the child processes: they reopen this store
    store = open_meta("postgresql", root)
    yield store
    store.close()


def _claimed_plan(journal: MoveJournal) -> tuple[int, MoveRow]:
    plan_id = journal.create_plan("fp", {}, [Move("t:1", "n1", "n2", 1, 1)])
    assert journal.set_plan_state(plan_id, "applying", only_from=("planned",))
    move = journal.claim(plan_id, "t:1", "a", LEASE)
    assert move is not None
    return plan_id, move


def _holder(root: str, plan_id: int) -> subprocess.Popen[str]:
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_HOLDER), tests_dir, root, str(plan_id)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "holding"
    return proc



def _in_thread(attempt: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(attempt())
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


CONTENDERS: dict[str, Callable[[MetaStore, int, MoveRow], object]] = {
    "claim": lambda meta, plan_id, move: meta.journal.claim(plan_id, "t:1", "a", LEASE),
    "set_step": lambda meta, plan_id, move: meta.journal.set_step(move, "a", "copying", applying=True,
                                                                  target_generation=3),
    "cancel": lambda meta, plan_id, move: meta.journal.set_plan_state(plan_id, "cancelled"),
    "renew": lambda meta, plan_id, move: meta.journal.renew([move], "a", LEASE),
    "cancel_unstarted": lambda meta, plan_id, move: meta.journal.cancel_unstarted(plan_id, "a"),
}
EXPECTED: dict[str, type] = {"claim": MoveRow, "set_step": type(None), "cancel": bool, "renew": dict,
                             "cancel_unstarted": int}


@pytest.mark.parametrize("contender", sorted(CONTENDERS))
def test_a_holding_block_in_another_process_makes_contenders_wait(pg_meta: MetaStore, pg_dsn: str, root: str,
                                                                  contender: str) -> None:
    plan_id, move = _claimed_plan(pg_meta.journal)
    holder = _holder(root, plan_id)
    thread: threading.Thread | None = None
    try:
        thread, outcome = _in_thread(lambda: CONTENDERS[contender](pg_meta, plan_id, move))
        wait_for_lock_waiter(pg_dsn, "the contender (on the holding block's locks)")
        assert thread.is_alive() and not outcome  # blocked by the other process's row locks, not finished
        assert holder.stdin is not None
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.communicate(timeout=60)[0].strip() == "released"
        thread.join(timeout=60)
        assert not thread.is_alive() and isinstance(outcome[0], EXPECTED[contender]), outcome
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate(timeout=60)
        if thread is not None:
            thread.join(timeout=60)


def test_a_process_killed_inside_a_holding_block_leaves_nothing_locked(pg_meta: MetaStore, pg_dsn: str,
                                                                       root: str) -> None:
    plan_id, move = _claimed_plan(pg_meta.journal)
    holder = _holder(root, plan_id)
    thread: threading.Thread | None = None
    try:
        thread, outcome = _in_thread(lambda: pg_meta.journal.set_plan_state(plan_id, "cancelled"))
        wait_for_lock_waiter(pg_dsn, "the contender (on the holding block's locks)")
        holder.kill()  # SIGKILL inside the block: the server ends its transaction when the socket closes
        holder.communicate(timeout=60)
        thread.join(timeout=60)
        assert outcome == [True] and pg_meta.journal.plan_state(plan_id) == "cancelled"
        # The claim is still "a"'s (nothing of the block was written); its next step sees the cancel.
        stored = pg_meta.journal.move(plan_id, "t:1")
        assert stored is not None and stored.owner == "a" and stored.step == "pending"
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.communicate(timeout=60)
        if thread is not None:
            thread.join(timeout=60)


def test_journal_calls_are_metaunavailable_while_the_server_is_down(tmp_path: Path) -> None:
    with separate_server() as server:
        meta = PgMeta(os.fspath(tmp_path), parse_location(server.dsn()), new_root_id(), Settings(),
                      connect_timeout=1.0)
        meta.open(create=True, default_nodes=(("n1", "n1", 1),))
        try:
            plan_id, move = _claimed_plan(meta.journal)
            server.kill()
            with pytest.raises(MetaUnavailable, match="cannot be reached"):
                meta.journal.claim(plan_id, "t:1", "b", LEASE)
            with pytest.raises(MetaUnavailable):
                with meta.journal.holding(move, "a", applying=True):
                    pytest.fail("the block ran without the server")
            with pytest.raises(MetaUnavailable):
                meta.journal.check(move, "a", applying=True)
            server.start()
            deadline = time.monotonic() + 30
            while True:  # the pool reconnects in the background: the first calls may still see the failure
                try:
                    meta.journal.check(move, "a", applying=True)
                    break
                except MetaUnavailable:
                    assert time.monotonic() < deadline, "the journal did not come back after the server did"
            assert meta.journal.claim(plan_id, "t:1", "b", LEASE) is None  # "a" still holds it
            with pytest.raises(LostClaim):
                meta.journal.set_step(move, "b", "copying", applying=True)
            journal_move = meta.journal.move(plan_id, "t:1")
            assert journal_move is not None and journal_move.owner == "a"
        finally:
            meta.close()
