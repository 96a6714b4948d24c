"""Conformance: the :class:`~shardlite.meta.tenants.TenantCatalog` contract (``meta.tenants``), over every
backend. Written against the contract only (the ``meta`` fixture, ``open_meta``): no backend's SQL here."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers_meta import open_meta
from helpers_procs import FileBarrier, child_env, finish_all, spawn, write_script

from shardlite import ConfigurationError, MetaConflict
from shardlite.files.catalog import TenantRecord
from shardlite.meta import MetaStore
from shardlite.meta.tenants import GenerationTaken

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = ("tenants", "nodes")


TESTS = Path(__file__).resolve().parent


def make(meta: MetaStore, key: str, node: str = "n1", *, incarnation: str = "inc", version: int = 1) -> TenantRecord:
    """A registered tenant (a fresh generation), asserted to be the winner."""
    generation = meta.tenants.allocate_generation(key, node, "create")
    record = meta.tenants.register(key, node, generation, incarnation, version)
    assert record.generation == generation
    return record


def drop(meta: MetaStore, key: str) -> None:
    record = meta.tenants.lookup(key)
    assert record is not None
    meta.tenants.set_state(key, "dropping", expect_generation=record.generation, expect_states=("active",))
    meta.tenants.set_state(key, "dropped", expect_generation=record.generation, expect_states=("dropping",))


def race(n: int, body: Callable[[int], Any]) -> tuple[list[Any], list[BaseException]]:
    """Run ``body(i)`` on ``n`` threads released together; their results and exceptions."""
    start = threading.Barrier(n)
    results: list[Any] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        start.wait()
        try:
            found = body(i)
        except BaseException as exc:  # noqa: BLE001 - collected for the test's assertions
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(found)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


# -- lookup, allocate_generation, register -------------------------------------------------------------


def test_an_unknown_key_has_no_row(meta: MetaStore) -> None:
    assert meta.tenants.lookup("t:nobody") is None
    assert not meta.tenants.has_rows()


def test_register_inserts_epoch_1_active(meta: MetaStore) -> None:
    generation = meta.tenants.allocate_generation("t:é", "n1", "create")
    assert meta.tenants.lookup("t:é") is None  # allocating writes no tenant row
    record = meta.tenants.register("t:é", "n1", generation, "abc", 3)
    assert (record.key, record.node, record.generation, record.epoch, record.state, record.incarnation,
            record.schema_version) == ("t:é", "n1", generation, 1, "active", "abc", 3)
    assert meta.tenants.lookup("t:é") == record
    assert meta.tenants.has_rows()


def test_the_first_registrant_wins_and_losers_get_its_row_unchanged(meta: MetaStore) -> None:
    first = make(meta, "t:1")
    later = meta.tenants.allocate_generation("t:1", "n1", "create")
    assert meta.tenants.register("t:1", "n1", later, "other", 9) == first
    assert meta.tenants.lookup("t:1") == first


def test_register_adopts_a_tenant_being_dropped(meta: MetaStore) -> None:
    first = make(meta, "t:1")
    meta.tenants.set_state("t:1", "dropping", expect_generation=first.generation, expect_states=("active",))
    later = meta.tenants.allocate_generation("t:1", "n1", "create")
    winner = meta.tenants.register("t:1", "n1", later, "other", 9)
    assert winner.generation == first.generation and winner.state == "dropping"


def test_register_over_a_tombstone_recreates_it_with_the_next_epoch(meta: MetaStore) -> None:
    meta.nodes.add("n2", "n2", 1)
    first = make(meta, "t:1")
    drop(meta, "t:1")
    assert meta.tenants.lookup("t:1").state == "dropped"  # type: ignore[union-attr]
    again = meta.tenants.allocate_generation("t:1", "n2", "create")
    assert again > first.generation
    record = meta.tenants.register("t:1", "n2", again, "new-inc", 7)
    assert (record.node, record.generation, record.epoch, record.state, record.incarnation, record.schema_version) \
        == ("n2", again, 2, "active", "new-inc", 7)


def test_register_on_an_unknown_node_is_refused_and_writes_nothing(meta: MetaStore) -> None:
    generation = meta.tenants.allocate_generation("t:1", "n9", "create")
    with pytest.raises(ConfigurationError, match="n9"):
        meta.tenants.register("t:1", "n9", generation, "inc", 1)
    assert meta.tenants.lookup("t:1") is None


def test_register_with_a_generation_another_row_holds_is_refused_and_writes_nothing(meta: MetaStore) -> None:
    held = make(meta, "t:1")
    with pytest.raises(GenerationTaken, match="already used"):
        meta.tenants.register("t:2", "n1", held.generation, "inc", 1)
    assert meta.tenants.lookup("t:2") is None and meta.tenants.lookup("t:1") == held
    drop(meta, "t:1")  # a tombstone keeps its generation (its old path is never reused either)
    with pytest.raises(GenerationTaken):
        meta.tenants.register("t:2", "n1", held.generation, "inc", 1)
    assert meta.tenants.lookup("t:2") is None


def test_lookup_or_allocate_allocates_only_for_a_key_to_create(meta: MetaStore) -> None:
    before = meta.tenants.allocate_generation("t:0", "n1", "create")
    record, fresh = meta.tenants.lookup_or_allocate("t:1", "n1", revive=False)  # revive: over a tombstone only
    assert record is None and fresh is not None and fresh > before
    live = meta.tenants.register("t:1", "n1", fresh, "inc", 1)
    assert meta.tenants.lookup_or_allocate("t:1", "n1") == (live, None)
    meta.tenants.set_state("t:1", "dropping", expect_generation=live.generation, expect_states=("active",))
    assert meta.tenants.lookup_or_allocate("t:1", "n1") == (meta.tenants.lookup("t:1"), None)
    meta.tenants.set_state("t:1", "dropped", expect_generation=live.generation, expect_states=("dropping",))
    tombstone = meta.tenants.lookup("t:1")
    assert tombstone is not None and tombstone.state == "dropped"
    assert meta.tenants.lookup_or_allocate("t:1", "n1", revive=False) == (tombstone, None)
    found, again = meta.tenants.lookup_or_allocate("t:1", "n1")
    assert found == tombstone and again is not None and again > fresh
    assert meta.tenants.allocate_generation("t:2", "n1", "create") > again  # what it allocated is never reused


def test_generations_are_never_reused_and_increase(meta: MetaStore) -> None:
    """Distinct and increasing across keys, purposes, tombstones and re-creations."""
    seen = [make(meta, "t:a").generation]
    drop(meta, "t:a")
    for key in ("t:a", "t:b", "t:a"):
        seen.append(meta.tenants.allocate_generation(key, "n1", "move"))
    seen.append(make(meta, "t:a").generation)
    assert seen == sorted(seen) and len(set(seen)) == len(seen)


def test_generations_from_many_threads_are_distinct_and_increase_per_caller(meta: MetaStore) -> None:
    def allocate(i: int) -> list[int]:
        return [meta.tenants.allocate_generation(f"t:{i}", "n1", "create") for _ in range(25)]

    results, errors = race(6, allocate)
    assert errors == []
    assert all(found == sorted(found) for found in results)
    flat = [g for found in results for g in found]
    assert len(set(flat)) == len(flat) == 150
    assert meta.tenants.allocate_generation("t:after", "n1", "create") > max(flat)


def test_threads_racing_to_register_one_key_agree_on_one_winner(meta: MetaStore) -> None:
    def register(i: int) -> tuple[int, TenantRecord]:
        generation = meta.tenants.allocate_generation("t:contended", "n1", "create")
        return generation, meta.tenants.register("t:contended", "n1", generation, f"inc-{i}", 1)

    results, errors = race(8, register)
    assert errors == []
    winners = {record for _, record in results}
    assert len(winners) == 1
    (winner,) = winners
    assert sum(generation == winner.generation for generation, _ in results) == 1
    assert meta.tenants.lookup("t:contended") == winner and winner.epoch == 1


_REGISTER_WORKER = """
{prelude}
sys.path.insert(0, sys.argv[4])
from helpers_meta import open_meta
backend, root, sync, _tests, name = sys.argv[1:6]
meta = open_meta(backend, root, create=False)
generation = meta.tenants.allocate_generation("t:procs", "n1", "create")
barrier(sync, name)
record = meta.tenants.register("t:procs", "n1", generation, "inc-" + name, 1)
ack(generation, record.generation, record.incarnation)
meta.close()
"""


def test_processes_racing_to_register_one_key_agree_on_one_winner(meta: MetaStore, meta_backend: str, root: str,
                                                                   tmp_path: Path) -> None:
    script = write_script(tmp_path, "register.py", _REGISTER_WORKER)
    sync = FileBarrier(tmp_path / "sync")
    names = list(range(4))
    procs = [spawn(script, meta_backend, root, sync, TESTS, name, env=child_env()) for name in names]
    sync.wait_ready(procs, names)
    sync.go()
    lines = [out.split() for out in finish_all(procs)]
    own = [int(line[0]) for line in lines]
    assert len(set(own)) == 4  # every process got its own generation
    assert len({(line[1], line[2]) for line in lines}) == 1  # and all adopted one winner
    record = meta.tenants.lookup("t:procs")
    assert record is not None and str(record.generation) == lines[0][1] and record.generation in own


# -- set_state: compare-and-set on generation and state -------------------------------------------------


def test_set_state_moves_through_the_expected_states(meta: MetaStore) -> None:
    record = make(meta, "t:1")
    meta.tenants.set_state("t:1", "moving", expect_generation=record.generation, expect_states=("active",))
    assert meta.tenants.lookup("t:1").state == "moving"  # type: ignore[union-attr]
    meta.tenants.set_state("t:1", "active", expect_generation=record.generation, expect_states=("moving",))
    after = meta.tenants.lookup("t:1")
    assert after == record  # state back, nothing else changed (epoch included)


@pytest.mark.parametrize("case", ["stale generation", "unexpected state", "unknown key"])
def test_set_state_conflicts_write_nothing(meta: MetaStore, case: str) -> None:
    record = make(meta, "t:1")
    generation, expected, key = record.generation, ("active",), "t:1"
    if case == "stale generation":
        generation -= 1
    elif case == "unexpected state":
        expected = ("moving", "dropping")
    else:
        key = "t:2"
    with pytest.raises(MetaConflict):
        meta.tenants.set_state(key, "dropping", expect_generation=generation, expect_states=expected)
    assert meta.tenants.lookup("t:1") == record
    assert meta.tenants.lookup("t:2") is None


def test_a_drop_decided_on_a_stale_lookup_loses_to_a_move(meta: MetaStore) -> None:
    """Gap F3: drop and mover both read ``active``; the mover's ``active -> moving`` commits first, so the
    drop's ``active -> dropping`` must lose (before, the CAS checked only the generation and both won)."""
    record = make(meta, "t:1")
    stale = meta.tenants.lookup("t:1")
    assert stale is not None and stale.state == "active"
    meta.tenants.set_state("t:1", "moving", expect_generation=record.generation, expect_states=("active",))
    with pytest.raises(MetaConflict, match="moving"):
        meta.tenants.set_state("t:1", "dropping", expect_generation=stale.generation, expect_states=("active",))
    assert meta.tenants.lookup("t:1").state == "moving"  # type: ignore[union-attr]


def test_threads_racing_from_active_to_different_states_have_one_winner(meta: MetaStore) -> None:
    targets = ("moving", "dropping")
    for round_ in range(10):
        key = f"t:{round_}"
        record = make(meta, key)

        def change(i: int, key: str = key, generation: int = record.generation) -> str:
            meta.tenants.set_state(key, targets[i % 2], expect_generation=generation, expect_states=("active",))
            return targets[i % 2]

        results, errors = race(4, change)
        assert len(results) == 1 and len(errors) == 3, (results, errors)
        assert all(isinstance(exc, MetaConflict) for exc in errors)
        assert meta.tenants.lookup(key).state == results[0]  # type: ignore[union-attr]


def test_set_state_refuses_unknown_states(meta: MetaStore) -> None:
    record = make(meta, "t:1")
    with pytest.raises(ValueError):
        meta.tenants.set_state("t:1", "gone", expect_generation=record.generation, expect_states=("active",))
    with pytest.raises(ValueError):
        meta.tenants.set_state("t:1", "moving", expect_generation=record.generation, expect_states=())
    assert meta.tenants.lookup("t:1") == record


# -- flip ---------------------------------------------------------------------------------------------------


def test_flip_points_the_key_at_its_new_file(meta: MetaStore) -> None:
    meta.nodes.add("n2", "n2", 1)
    record = make(meta, "t:1", incarnation="keep")
    meta.tenants.set_state("t:1", "moving", expect_generation=record.generation, expect_states=("active",))
    target = meta.tenants.allocate_generation("t:1", "n2", "move")
    flipped = meta.tenants.flip("t:1", from_generation=record.generation, node="n2", generation=target,
                                expect_states=("moving",))
    assert (flipped.node, flipped.generation, flipped.epoch, flipped.state, flipped.incarnation) == \
        ("n2", target, 2, "active", "keep")
    assert meta.tenants.lookup("t:1") == flipped
    restored = meta.tenants.allocate_generation("t:1", "n2", "restore")
    again = meta.tenants.flip("t:1", from_generation=target, node="n2", generation=restored,
                              expect_states=("active",), incarnation="fresh")
    assert (again.generation, again.epoch, again.incarnation) == (restored, 3, "fresh")


@pytest.mark.parametrize("case", ["stale generation", "unexpected state", "tombstone", "unknown key"])
def test_flip_conflicts_write_nothing(meta: MetaStore, case: str) -> None:
    record = make(meta, "t:1")
    target = meta.tenants.allocate_generation("t:1", "n1", "move")
    source, expected, key = record.generation, ("active", "moving"), "t:1"
    if case == "stale generation":
        source = target
    elif case == "unexpected state":
        expected = ("moving",)
    elif case == "tombstone":
        drop(meta, "t:1")
        record = meta.tenants.lookup("t:1")  # type: ignore[assignment]
        expected = ("active", "moving", "dropping")
    else:
        key = "t:2"
    with pytest.raises(MetaConflict):
        meta.tenants.flip(key, from_generation=source, node="n1", generation=target, expect_states=expected)
    assert meta.tenants.lookup("t:1") == record
    assert meta.tenants.lookup("t:2") is None


def test_flip_to_an_unknown_node_is_refused_and_writes_nothing(meta: MetaStore) -> None:
    record = make(meta, "t:1")
    target = meta.tenants.allocate_generation("t:1", "n9", "move")
    with pytest.raises(ConfigurationError, match="n9"):
        meta.tenants.flip("t:1", from_generation=record.generation, node="n9", generation=target,
                          expect_states=("active",))
    assert meta.tenants.lookup("t:1") == record


def test_two_flips_from_one_generation_have_one_winner(meta: MetaStore) -> None:
    record = make(meta, "t:1")
    targets = [meta.tenants.allocate_generation("t:1", "n1", "move") for _ in range(4)]
    results, errors = race(4, lambda i: meta.tenants.flip("t:1", from_generation=record.generation, node="n1",
                                                          generation=targets[i], expect_states=("active",)))
    assert len(results) == 1 and len(errors) == 3 and all(isinstance(e, MetaConflict) for e in errors)
    assert meta.tenants.lookup("t:1") == results[0] and results[0].epoch == 2


# -- schema versions ------------------------------------------------------------------------------------------


def test_schema_version_notes_only_go_up(meta: MetaStore) -> None:
    make(meta, "t:1", version=2)
    meta.tenants.note_schema_version("t:1", 5)
    meta.tenants.note_schema_version("t:1", 3)
    assert meta.tenants.lookup("t:1").schema_version == 5  # type: ignore[union-attr]
    meta.tenants.note_schema_version("t:unknown", 4)  # a no-op
    assert meta.tenants.lookup("t:unknown") is None


def test_counts_and_versions_cover_live_tenants_only(meta: MetaStore) -> None:
    meta.nodes.add("n2", "n2", 1)
    make(meta, "p:1", version=1)
    make(meta, "p:2", "n2", version=3)
    moving = make(meta, "p:3", "n2", version=3)
    meta.tenants.set_state("p:3", "moving", expect_generation=moving.generation, expect_states=("active",))
    make(meta, "p:4", "n2", version=9)
    drop(meta, "p:4")
    make(meta, "q:1", version=7)
    make(meta, "pp:1", version=8)  # 'pp' is another prefix
    make(meta, "pé:1", version=6)
    assert meta.tenants.count_by_node() == {"n1": 4, "n2": 2}
    assert list(meta.tenants.schema_versions().items()) == [(1, 1), (3, 2), (6, 1), (7, 1), (8, 1)]
    assert meta.tenants.max_schema_version("p") == 3
    assert meta.tenants.max_schema_version("pé") == 6
    assert meta.tenants.max_schema_version("zz") is None


# -- iter_tenants: code-point order, pages, states ----------------------------------------------------------

#: Keys whose code-point order differs from a locale's (upper before lower, accents, astral after U+FFFF).
KEYS = ["t:Z", "t:a", "t:b", "t:é", "t:\u00ff", "t:\u0101", "t:\u4e2d", "t:\uffee", "t:\U0001f600", "u:0"]


@pytest.mark.parametrize("batch", [1, 2, 3, 1000])
def test_iter_tenants_yields_every_live_tenant_once_in_code_point_order(meta: MetaStore, batch: int) -> None:
    for key in reversed(KEYS):
        make(meta, key)
    make(meta, "t:gone")
    drop(meta, "t:gone")
    found = [record.key for record in meta.tenants.iter_tenants(batch=batch)]
    assert found == sorted(KEYS) == KEYS
    assert [r.key for r in meta.tenants.iter_tenants(states=("dropped",), batch=batch)] == ["t:gone"]
    assert [r.key for r in meta.tenants.iter_tenants(after="t:é", batch=batch)] == KEYS[4:]


def test_iter_tenants_sees_a_row_added_behind_its_page_once_at_most(meta: MetaStore) -> None:
    for key in ("t:1", "t:3", "t:5"):
        make(meta, key)
    seen = []
    for record in meta.tenants.iter_tenants(batch=1):
        seen.append(record.key)
        if record.key == "t:3":
            make(meta, "t:2")  # behind the cursor: not seen
            make(meta, "t:4")  # ahead of it: seen in its page
    assert seen == ["t:1", "t:3", "t:4", "t:5"]


def test_has_rows_counts_tombstones(meta: MetaStore) -> None:
    make(meta, "t:1")
    drop(meta, "t:1")
    assert list(meta.tenants.iter_tenants()) == []
    assert meta.tenants.has_rows()


def test_a_second_store_on_the_root_sees_committed_rows(meta: MetaStore, meta_backend: str, root: str) -> None:
    record = make(meta, "t:1")
    other = open_meta(meta_backend, root, create=False)
    try:
        assert other.tenants.lookup("t:1") == record
        other.tenants.set_state("t:1", "moving", expect_generation=record.generation, expect_states=("active",))
        assert meta.tenants.lookup("t:1").state == "moving"  # type: ignore[union-attr]
    finally:
        other.close()
    assert os.path.isabs(meta.nodes.list()[0].path)
