"""Conformance: the :class:`~shardlite.meta.nodes.NodeRegistry` contract (``meta.nodes``), over every backend.
Written against the contract only (the ``meta`` fixture): no backend's SQL here."""

from __future__ import annotations

import os

import pytest
from test_meta_tenants import drop, make, race

from shardlite import ConfigurationError, MetaConflict
from shardlite.files.catalog import Node
from shardlite.meta import MetaStore

#: The parts of the metadata store these tests exercise (helpers_meta.missing_parts).
META_PART = ("tenants", "nodes")


def stored(meta: MetaStore, root: str) -> list[tuple[str, str, int, str]]:
    """The node list with paths inside the root made relative again (as recorded)."""
    return [(n.name, os.path.relpath(n.path, root) if n.path.startswith(root + os.sep) else n.path, n.weight,
             n.state) for n in meta.nodes.list()]


def test_list_gives_absolute_paths_in_name_order(meta: MetaStore, root: str, tmp_path: object) -> None:
    outside = os.path.join(os.path.dirname(root), "elsewhere")
    meta.nodes.add("a", "sub/a", 2)
    meta.nodes.add("B", outside, 1)
    nodes = meta.nodes.list()
    assert [n.name for n in nodes] == ["B", "a", "n1"]  # code points: upper case first
    assert [n.path for n in nodes] == [outside, os.path.join(root, "sub/a"), os.path.join(root, "n1")]
    assert [(n.weight, n.state) for n in nodes] == [(1, "active"), (2, "active"), (1, "active")]


@pytest.mark.parametrize("name, path, weight, match", [
    ("n1", "other", 1, "already exists"),
    ("n2", "n1", 1, "already has the path"),
    ("n2", "n2", 0, "weight"),
])
def test_add_refuses_duplicates_with_a_configuration_error(meta: MetaStore, root: str, name: str, path: str,
                                                           weight: int, match: str) -> None:
    """Gap F5: a duplicate path was a raw ``apsw.ConstraintError``."""
    before = meta.nodes.list()
    with pytest.raises(ConfigurationError, match=match):
        meta.nodes.add(name, path, weight)
    assert meta.nodes.list() == before


def test_threads_adding_one_name_or_path_have_one_winner(meta: MetaStore) -> None:
    results, errors = race(6, lambda i: meta.nodes.add("n2", f"p{i}", 1))
    assert len(results) == 1 and len(errors) == 5 and all(isinstance(e, ConfigurationError) for e in errors)
    results, errors = race(6, lambda i: meta.nodes.add(f"m{i}", "shared", 1))
    assert len(results) == 1 and len(errors) == 5 and all(isinstance(e, ConfigurationError) for e in errors)
    assert len(meta.nodes.list()) == 3


def test_set_state_drains_and_reactivates(meta: MetaStore) -> None:
    meta.nodes.add("n2", "n2", 1)
    meta.nodes.set_state("n1", "draining")
    meta.nodes.set_state("n1", "draining")  # idempotent
    assert {n.name: n.state for n in meta.nodes.list()} == {"n1": "draining", "n2": "active"}
    meta.nodes.set_state("n1", "active")
    assert {n.state for n in meta.nodes.list()} == {"active"}


@pytest.mark.parametrize("name, state, match", [("n9", "draining", "unknown node"), ("n1", "gone", "state"),
                                                ("n1", "draining", "last active node")])
def test_set_state_refusals_write_nothing(meta: MetaStore, name: str, state: str, match: str) -> None:
    before = meta.nodes.list()
    with pytest.raises(ConfigurationError, match=match):
        meta.nodes.set_state(name, state)
    assert meta.nodes.list() == before


def test_two_drains_at_once_never_leave_no_active_node(meta: MetaStore) -> None:
    for round_ in range(10):
        meta.nodes.add(f"x{round_}", f"x{round_}", 1)
        names = [n.name for n in meta.nodes.list() if n.state == "active"]
        assert len(names) == 2
        results, errors = race(2, lambda i, names=names: meta.nodes.set_state(names[i], "draining"))
        assert len(results) == 1 and len(errors) == 1 and isinstance(errors[0], ConfigurationError)
        assert sum(n.state == "active" for n in meta.nodes.list()) == 1


# -- remove, and the tombstone policy (gap F1) -------------------------------------------------------------


def test_remove_deletes_an_empty_node_and_ignores_an_unknown_one(meta: MetaStore) -> None:
    meta.nodes.add("n2", "n2", 1)
    assert meta.nodes.remove("n2") is True
    assert [n.name for n in meta.nodes.list()] == ["n1"]
    assert meta.nodes.remove("n2") is False
    meta.nodes.add("n2", "n2", 1)  # the name and path are free again


@pytest.mark.parametrize("state, match", [("active", "drain it first"), ("moving", "drain it first"),
                                          ("dropping", "drop")])
def test_remove_refuses_a_node_holding_a_tenant_that_is_not_a_tombstone(meta: MetaStore, state: str,
                                                                        match: str) -> None:
    meta.nodes.add("n2", "n2", 1)
    record = make(meta, "t:1", "n2")
    if state != "active":
        meta.tenants.set_state("t:1", state, expect_generation=record.generation, expect_states=("active",))
    before = meta.nodes.list()
    with pytest.raises(ConfigurationError, match=match):
        meta.nodes.remove("n2")
    assert meta.nodes.list() == before
    assert meta.tenants.lookup("t:1").node == "n2"  # type: ignore[union-attr]


def test_removing_a_node_moves_its_tombstones_to_a_remaining_node(meta: MetaStore) -> None:
    """Gap F1: a node holding only tombstones failed to go with a raw foreign-key error. Now the tombstones
    move (generation, epoch and state kept: a re-creation still gets the next epoch and a new generation)."""
    meta.nodes.add("a", "a", 1)
    meta.nodes.add("n2", "n2", 1)
    meta.nodes.set_state("a", "draining")
    gone = make(meta, "t:gone", "n2")
    drop(meta, "t:gone")
    assert meta.nodes.remove("n2") is True
    tombstone = meta.tenants.lookup("t:gone")
    assert tombstone is not None
    assert (tombstone.node, tombstone.generation, tombstone.epoch, tombstone.state) == \
        ("n1", gone.generation, 1, "dropped")  # the first active node, though "a" sorts first
    assert meta.tenants.count_by_node() == {}
    generation = meta.tenants.allocate_generation("t:gone", "n1", "create")
    again = meta.tenants.register("t:gone", "n1", generation, "inc2", 1)
    assert again.epoch == 2 and again.generation > gone.generation


def test_the_last_node_holding_tombstones_stays(meta: MetaStore) -> None:
    make(meta, "t:gone")
    drop(meta, "t:gone")
    with pytest.raises(ConfigurationError, match="last node"):
        meta.nodes.remove("n1")
    assert [n.name for n in meta.nodes.list()] == ["n1"]


def test_a_remove_racing_a_registration_never_orphans_the_tenant(meta: MetaStore) -> None:
    """Either the node goes first (then the registration is refused) or the tenant lands first (then the
    removal is refused): never both."""
    for round_ in range(10):
        meta.nodes.add("n2", "n2", 1)
        key = f"t:{round_}"
        generation = meta.tenants.allocate_generation(key, "n2", "create")

        def act(i: int, key: str = key, generation: int = generation) -> object:
            if i == 0:
                return meta.nodes.remove("n2")
            return meta.tenants.register(key, "n2", generation, "inc", 1)

        results, errors = race(2, act)
        assert len(results) == 1 and len(errors) == 1 and isinstance(errors[0], ConfigurationError)
        record = meta.tenants.lookup(key)
        names = [n.name for n in meta.nodes.list()]
        assert (record is None and names == ["n1"]) or (record is not None and "n2" in names)
        if record is not None:
            meta.tenants.set_state(key, "dropping", expect_generation=generation, expect_states=("active",))
            meta.tenants.set_state(key, "dropped", expect_generation=generation, expect_states=("dropping",))
            meta.nodes.remove("n2")


# -- replace_all -------------------------------------------------------------------------------------------------

NEW = [Node("a", "disk/a", 2, "active"), Node("b", "/abs/b", 1, "draining")]


def test_replace_all_makes_the_list_exactly_the_given_one(meta: MetaStore, root: str) -> None:
    meta.nodes.replace_all(NEW, only_if_pristine=True, expect=[[], [Node("n1", "n1", 1, "active")]])
    assert stored(meta, root) == [("a", "disk/a", 2, "active"), ("b", "/abs/b", 1, "draining")]
    swapped = [Node("a", "/abs/b", 1, "active"), Node("b", "disk/a", 3, "active")]  # paths trade places
    meta.nodes.replace_all(swapped, only_if_pristine=False)
    assert stored(meta, root) == [("a", "/abs/b", 1, "active"), ("b", "disk/a", 3, "active")]


@pytest.mark.parametrize("case", ["tenants", "tombstones", "other nodes"])
def test_replace_all_conflicts_write_nothing(meta: MetaStore, root: str, case: str) -> None:
    if case == "other nodes":
        meta.nodes.add("n2", "n2", 1)
    else:
        make(meta, "t:1")
        if case == "tombstones":
            drop(meta, "t:1")
    before = meta.nodes.list()
    with pytest.raises(MetaConflict):
        meta.nodes.replace_all(NEW, only_if_pristine=True, expect=[[], [Node("n1", "n1", 1, "active")]])
    assert meta.nodes.list() == before


@pytest.mark.parametrize("nodes, match", [
    ([Node("a", "x", 1, "active"), Node("a", "y", 1, "active")], "name twice"),
    ([Node("a", "x", 1, "active"), Node("b", "x", 1, "active")], "path twice"),
    ([Node("a", "x", 1, "draining")], "no active node"),
    ([Node("a", "x", 0, "active")], "weight"),
])
def test_replace_all_refuses_an_invalid_list(meta: MetaStore, nodes: list[Node], match: str) -> None:
    before = meta.nodes.list()
    with pytest.raises(ConfigurationError, match=match):
        meta.nodes.replace_all(nodes, only_if_pristine=True)
    assert meta.nodes.list() == before


def test_replace_all_keeps_nodes_that_tenant_rows_name(meta: MetaStore, root: str) -> None:
    make(meta, "t:1")
    before = meta.nodes.list()
    with pytest.raises(ConfigurationError, match="n1"):
        meta.nodes.replace_all(NEW, only_if_pristine=False)
    assert meta.nodes.list() == before
    meta.nodes.replace_all([Node("n1", "moved/n1", 4, "active"), *NEW], only_if_pristine=False)
    assert stored(meta, root)[2] == ("n1", "moved/n1", 4, "active")


def test_forget_all_removes_the_roots_tenants_and_nodes(meta: MetaStore) -> None:
    """Taking back a restore into a new root: its tenant rows (tombstones too) and nodes go in one step."""
    meta.nodes.add("n2", "n2", 1)
    make(meta, "a")
    make(meta, "b", "n2")
    make(meta, "c")
    drop(meta, "c")
    assert meta.nodes.forget_all() == 3
    assert meta.nodes.list() == [] and not meta.tenants.has_rows()
    assert meta.tenants.lookup("a") is None and meta.tenants.lookup("c") is None
    assert meta.nodes.forget_all() == 0  # again: nothing left, not an error
