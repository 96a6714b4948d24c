"""The PostgreSQL tenant catalog and node registry (``PgMeta.tenants``, ``PgMeta.nodes``) beyond the
conformance suite: roots sharing one database (one key space, each root its own nodes), text with NUL
refused before the server, a deadlock retried inside the method, and MetaUnavailable while the server is
down, gone by itself after."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from helpers_pg import separate_server, wait_for_lock_waiter
from test_meta_tenants import KEYS, race

from shardlite import ConfigurationError, MetaConflict, MetaUnavailable, Settings
from shardlite.files.catalog import Node, TenantRecord
from shardlite.meta.location import parse_location
from shardlite.meta.postgres import PgMeta
from shardlite.meta.record import new_root_id
from shardlite.testing.postgres import PgServer


def _open(dsn: str, root: Path, nodes: list[tuple[str, str, int]], **kw: float) -> PgMeta:
    meta = PgMeta(os.fspath(root), parse_location(dsn), new_root_id(), Settings(), **kw)  # type: ignore[arg-type]
    meta.open(create=True, default_nodes=nodes)
    return meta


@pytest.fixture
def two(pg_dsn: str, tmp_path: Path) -> Iterator[tuple[PgMeta, PgMeta]]:
    """Roots ``a`` (nodes a1, a2) and ``b`` (node b1) in one database; both record a node at ``n1``."""
    a = _open(pg_dsn, tmp_path / "a", [("a1", "n1", 1), ("a2", "n2", 1)])
    b = _open(pg_dsn, tmp_path / "b", [("b1", "n1", 1)])
    yield a, b
    a.close()
    b.close()


def _make(meta: PgMeta, key: str, node: str, version: int = 1) -> TenantRecord:
    generation = meta.tenants.allocate_generation(key, node, "create")
    return meta.tenants.register(key, node, generation, "inc", version)


def test_roots_sharing_a_database_have_one_key_space_and_their_own_nodes(two: tuple[PgMeta, PgMeta],
                                                                         tmp_path: Path) -> None:
    a, b = two
    assert [(n.name, n.path) for n in a.nodes.list()] == [("a1", str(tmp_path / "a" / "n1")),
                                                          ("a2", str(tmp_path / "a" / "n2"))]
    assert [(n.name, n.path) for n in b.nodes.list()] == [("b1", str(tmp_path / "b" / "n1"))]
    assert not b.tenants.has_rows()

    # one key space: what a registers, b finds by key, and b's registration of the same key loses
    first = _make(a, "t:1", "a1", version=2)
    assert b.tenants.lookup("t:1") == first
    assert _make(b, "t:1", "b1") == first
    _make(b, "p:2", "b1", version=5)
    assert a.tenants.lookup("p:2") is not None

    # the enumerations cover the tenants on this root's nodes
    assert [r.key for r in a.tenants.iter_tenants()] == ["t:1"]
    assert [r.key for r in b.tenants.iter_tenants(batch=1)] == ["p:2"]
    assert a.tenants.count_by_node() == {"a1": 1} and b.tenants.count_by_node() == {"b1": 1}
    assert a.tenants.schema_versions() == {2: 1} and b.tenants.schema_versions() == {5: 1}
    assert a.tenants.max_schema_version("p") is None and b.tenants.max_schema_version("p") == 5
    assert a.tenants.has_rows() and b.tenants.has_rows()

    # a name is the database's: another root's is refused, saying why; nothing is written
    with pytest.raises(ConfigurationError, match="another root"):
        a.nodes.add("b1", "elsewhere", 1)
    with pytest.raises(ConfigurationError, match="another root"):
        a.nodes.replace_all([Node("a1", "n1", 1, "active"), Node("a2", "n2", 1, "active"),
                             Node("b1", "n3", 1, "active")], only_if_pristine=False)
    assert [n.name for n in a.nodes.list()] == ["a1", "a2"]
    a.nodes.add("a3", "n3", 1)  # a path b uses too is fine: relative paths are inside each root

    # a registry touches only its root's nodes
    assert b.nodes.remove("a1") is False
    with pytest.raises(ConfigurationError, match="unknown node"):
        b.nodes.set_state("a2", "draining")
    with pytest.raises(ConfigurationError, match="last active node"):  # a's active nodes do not count
        b.nodes.set_state("b1", "draining")
    assert [(n.name, n.state) for n in b.nodes.list()] == [("b1", "active")]
    assert {n.state for n in a.nodes.list()} == {"active"}


def test_tombstones_of_a_removed_node_stay_on_its_root(two: tuple[PgMeta, PgMeta]) -> None:
    a, b = two
    record = _make(a, "t:gone", "a2")
    a.tenants.set_state("t:gone", "dropping", expect_generation=record.generation, expect_states=("active",))
    a.tenants.set_state("t:gone", "dropped", expect_generation=record.generation, expect_states=("dropping",))
    a.nodes.set_state("a1", "draining")  # the heir is then the first active node of the root: none, so a1
    assert a.nodes.remove("a2") is True
    tombstone = a.tenants.lookup("t:gone")
    assert tombstone is not None and tombstone.node == "a1"  # never b1, the database's first active node
    assert [r.key for r in a.tenants.iter_tenants(states=("dropped",))] == ["t:gone"]
    assert not b.tenants.has_rows()


def test_replace_all_is_pristine_per_root(two: tuple[PgMeta, PgMeta]) -> None:
    """A root whose nodes hold no tenant row is pristine, whatever other roots in the database hold."""
    a, b = two
    _make(a, "t:1", "a1")
    with pytest.raises(MetaConflict):
        a.nodes.replace_all([Node("a9", "x", 1, "active")], only_if_pristine=True)
    b.nodes.replace_all([Node("b2", "disk/b2", 3, "active")], only_if_pristine=True,
                        expect=[[Node("b1", "n1", 1, "active")]])
    assert [(n.name, n.weight) for n in b.nodes.list()] == [("b2", 3)]
    assert [n.name for n in a.nodes.list()] == ["a1", "a2"]


def test_text_with_nul_never_reaches_the_server(pg_dsn: str, tmp_path: Path) -> None:
    """PostgreSQL's text cannot hold U+0000 and no canonical key or node name does: reads find nothing,
    writes are refused with the contract's errors (not a psycopg error)."""
    meta = _open(pg_dsn, tmp_path, [("n1", "n1", 1)])
    try:
        for key in ("t:a", "t:b"):
            _make(meta, key, "n1")
        assert meta.tenants.lookup("t:\0") is None
        assert [r.key for r in meta.tenants.iter_tenants(after="t:a\0zzz")] == ["t:b"]
        assert meta.tenants.max_schema_version("t\0") is None
        meta.tenants.note_schema_version("t:\0", 9)  # a no-op, as for any unknown key
        with pytest.raises(ValueError, match="NUL"):
            meta.tenants.allocate_generation("t:\0", "n1", "create")
        generation = meta.tenants.allocate_generation("t:c", "n1", "create")
        with pytest.raises(ConfigurationError, match="no such node"):
            meta.tenants.register("t:c", "n\0", generation, "inc", 1)
        with pytest.raises(MetaConflict):
            meta.tenants.set_state("t:\0", "moving", expect_generation=generation, expect_states=("active",))
        with pytest.raises(ConfigurationError, match="invalid node name"):
            meta.nodes.add("n\0", "p", 1)
        with pytest.raises(ConfigurationError, match="unknown node"):
            meta.nodes.set_state("n\0", "draining")
        assert meta.nodes.remove("n\0") is False
    finally:
        meta.close()


def test_code_point_order_in_a_database_with_a_locale_collation(pg_server: PgServer, tmp_path: Path) -> None:
    """Keys and node names are ordered and ranged by code point even where the database's default collation
    is a language's (ICU 'en' sorts 'a' before 'B'): the columns are COLLATE "C"."""
    name = f"icu_{new_root_id()[:12]}"
    with psycopg.connect(pg_server.dsn(), autocommit=True) as conn:
        try:
            conn.execute(f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en' "
                         "LOCALE 'C'")
        except psycopg.Error as exc:
            pytest.skip(f"this PostgreSQL cannot create an ICU database: {exc}")
    try:
        with psycopg.connect(pg_server.dsn(name)) as conn:
            assert conn.execute("SELECT 'a' < 'B'").fetchone() == (True,)  # the locale's order, not ours
        meta = _open(pg_server.dsn(name), tmp_path, [("a", "a", 1), ("B", "b", 1)])
        try:
            for key in reversed(KEYS):
                _make(meta, key, "a", version=len(key))
            _make(meta, "t;x", "B", version=99)  # ';' is ':' + 1: outside the range of prefix "t"
            assert [r.key for r in meta.tenants.iter_tenants(batch=2) if r.key != "t;x"] == KEYS
            assert [n.name for n in meta.nodes.list()] == ["B", "a"]
            assert meta.tenants.max_schema_version("t") == max(len(k) for k in KEYS if k.startswith("t:"))
        finally:
            meta.close()
    finally:
        pg_server.drop_database(name)


def test_crossed_removals_deadlock_and_are_retried_not_surfaced(pg_dsn: str, tmp_path: Path) -> None:
    """Removing x and y at once, each holding tombstones whose heir is the other: each locks its own node and
    then needs the other's (the foreign-key check of the moved tombstones), a deadlock PostgreSQL breaks by
    aborting one. The aborted call is retried inside the method: one removal wins, the other finds its node
    is the last one holding tombstones; no psycopg error reaches the caller."""
    meta = _open(pg_dsn, tmp_path, [("x", "x", 1), ("y", "y", 1)])
    try:
        for round_ in range(3):
            for name in ("x", "y"):
                key = f"t:{round_}{name}"
                record = _make(meta, key, name)
                meta.tenants.set_state(key, "dropping", expect_generation=record.generation,
                                       expect_states=("active",))
                meta.tenants.set_state(key, "dropped", expect_generation=record.generation,
                                       expect_states=("dropping",))
            results, errors = race(2, lambda i: meta.nodes.remove(("x", "y")[i]))
            assert results == [True], (results, errors)
            assert len(errors) == 1 and isinstance(errors[0], ConfigurationError), errors
            assert "last node" in str(errors[0])
            (left,) = meta.nodes.list()
            assert {r.node for r in meta.tenants.iter_tenants(states=("dropped",))} == {left.name}
            gone = "y" if left.name == "x" else "x"
            meta.nodes.add(gone, gone, 1)
    finally:
        meta.close()


def test_server_down_is_metaunavailable_and_back_by_itself(tmp_path: Path) -> None:
    with separate_server() as server:
        meta = _open(server.dsn(), tmp_path, [("n1", "n1", 1)], connect_timeout=1.0)
        try:
            record = _make(meta, "t:1", "n1")
            server.kill()
            with pytest.raises(MetaUnavailable, match="cannot be reached"):
                meta.tenants.lookup("t:1")
            with pytest.raises(MetaUnavailable):
                meta.tenants.allocate_generation("t:2", "n1", "create")
            with pytest.raises(MetaUnavailable):
                meta.nodes.set_state("n1", "active")
            server.start()
            deadline = time.monotonic() + 30
            while True:  # the pool reconnects in the background: the first calls may still fail
                try:
                    assert meta.tenants.lookup("t:1") == record
                    break
                except MetaUnavailable:
                    assert time.monotonic() < deadline, "the catalog did not come back after the server did"
            assert _make(meta, "t:2", "n1").generation > record.generation
            assert [n.name for n in meta.nodes.list()] == ["n1"]
        finally:
            meta.close()


def test_a_registration_that_waited_for_a_racing_registrant_returns_its_row(pg_dsn: str, tmp_path: Path) -> None:
    """``register`` is one statement: a live row committed after its snapshot (by a registrant whose insert
    it waited for) is not in that snapshot; the method reads it then and returns it (and writes nothing)."""
    meta = _open(pg_dsn, tmp_path, [("n1", "n1", 1)])
    try:
        mine = meta.tenants.allocate_generation("t:race", "n1", "create")
        theirs = meta.tenants.allocate_generation("t:race", "n1", "create")
        results: list[TenantRecord] = []
        with psycopg.connect(pg_dsn, autocommit=True) as other:
            with other.transaction():
                other.execute("INSERT INTO shardlite.tenants(key, node, generation, epoch, state, incarnation, "
                              "schema_version, created, updated) VALUES ('t:race', 'n1', %s, 1, 'active', "
                              "'theirs', 1, 0, 0)", (theirs,))
                waiter = threading.Thread(
                    target=lambda: results.append(meta.tenants.register("t:race", "n1", mine, "mine", 1)))
                waiter.start()
                wait_for_lock_waiter(pg_dsn, "the registration")
            waiter.join(60)
        assert [(r.generation, r.incarnation) for r in results] == [(theirs, "theirs")]
        assert meta.tenants.lookup("t:race") == results[0]
    finally:
        meta.close()
