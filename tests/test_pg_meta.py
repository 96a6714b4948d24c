"""The PostgreSQL metadata store as a whole (``shardlite.meta.postgres``), on a real server: the versioned
schema created once under concurrent openers, roots sharing one database with distinct nodes, no secret in
what it prints, and :class:`~shardlite.MetaUnavailable` while the server is down, gone by itself after."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers_pg import separate_server

from shardlite import ConfigurationError, MetaUnavailable, Settings
from shardlite.meta.location import parse_location
from shardlite.meta.postgres import PgMeta
from shardlite.meta.postgres.schema import STEPS
from shardlite.meta.record import new_root_id


def _meta(dsn: str, root: str, root_id: str | None = None, **kw: float) -> PgMeta:
    return PgMeta(root, parse_location(dsn), root_id or new_root_id(), Settings(), **kw)  # type: ignore[arg-type]


def test_open_creates_the_schema_and_the_root_once(pg_dsn: str, tmp_path: Path) -> None:
    root = os.fspath(tmp_path)
    root_id = new_root_id()
    with pytest.raises(ConfigurationError, match="not a shardlite root"):
        _meta(pg_dsn, root, root_id).open(create=False)
    opened: list[PgMeta] = []
    errors: list[BaseException] = []

    def one() -> None:
        meta = _meta(pg_dsn, root, root_id)
        try:
            meta.open(create=True, default_nodes=[("n1", "n1", 1), ("n2", "n2", 2)])
            opened.append(meta)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(opened) == 6
    for meta in opened:
        assert meta.exists and not meta.closed
        meta.close()
        assert meta.closed
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT version FROM shardlite.version").fetchall() == [(len(STEPS),)]
        assert conn.execute("SELECT count(*) FROM shardlite.roots").fetchone() == (1,)
        assert conn.execute("SELECT name, path, weight FROM shardlite.nodes ORDER BY name").fetchall() == [
            ("n1", "n1", 1), ("n2", "n2", 2)]
    again = _meta(pg_dsn, root, root_id)
    again.open(create=False)
    again.close()


def test_a_newer_schema_is_refused(pg_dsn: str, tmp_path: Path) -> None:
    _meta(pg_dsn, os.fspath(tmp_path)).open(create=True)
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("UPDATE shardlite.version SET version = version + 1")
    with pytest.raises(ConfigurationError, match="newer than this shardlite"):
        _meta(pg_dsn, os.fspath(tmp_path)).open(create=True)


def test_roots_share_a_database_only_with_distinct_node_names(pg_dsn: str, tmp_path: Path) -> None:
    first = _meta(pg_dsn, os.fspath(tmp_path / "a"))
    first.open(create=True, default_nodes=[("n1", "n1", 1)])
    clash = _meta(pg_dsn, os.fspath(tmp_path / "b"))
    with pytest.raises(ConfigurationError, match="distinct node names"):
        clash.open(create=True, default_nodes=[("n1", "n1", 1)])
    assert clash.closed
    other = _meta(pg_dsn, os.fspath(tmp_path / "c"))
    other.open(create=True, default_nodes=[("h2n1", "n1", 1)])
    other.close()
    first.close()


def test_location_names_no_password(pg_dsn: str, tmp_path: Path) -> None:
    meta = _meta(pg_dsn, os.fspath(tmp_path))
    meta.open(create=True)
    password = psycopg.conninfo.conninfo_to_dict(pg_dsn)["password"]
    assert password and str(password) not in meta.location and meta.location.startswith("postgresql://")
    meta.close()


def test_no_server_is_metaunavailable_soon(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    meta = _meta(f"postgresql://u:pw@127.0.0.1:{port}/db", os.fspath(tmp_path), connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(MetaUnavailable) as info:
        meta.open(create=True)
    assert time.monotonic() - started < 10
    assert f"127.0.0.1:{port}" in str(info.value) and "pw" not in str(info.value).replace("postgresql", "")
    assert meta.closed


def test_server_killed_then_back_resumes_without_reopening(tmp_path: Path) -> None:
    with separate_server() as server:
        meta = _meta(server.dsn(), os.fspath(tmp_path), connect_timeout=1.0)
        meta.open(create=True)
        assert meta.exists
        server.kill()
        with pytest.raises(MetaUnavailable, match="cannot be reached"):
            meta.exists  # noqa: B018 - the property reaches the server
        server.start()
        deadline = time.monotonic() + 30
        while True:  # the pool reconnects in the background: the first calls may still see the old failure
            try:
                assert meta.exists
                break
            except MetaUnavailable:
                assert time.monotonic() < deadline, "the store did not come back after the server did"
        meta.close()


def test_a_version_2_schema_is_upgraded_on_open_with_the_node_hints(pg_dsn: str, tmp_path: Path) -> None:
    """Version 3 adds the node-list hints (a trigger NOTIFYing ``shardlite_nodes`` with the root id); a
    database at version 2 gets it on the next open, and its node changes are hinted from then on."""
    root_id = new_root_id()
    first = _meta(pg_dsn, os.fspath(tmp_path), root_id)
    first.open(create=True, default_nodes=[("n1", "n1", 1)])
    first.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # back to version 2, as an older shardlite left it
        conn.execute("DROP TRIGGER nodes_hint ON shardlite.nodes")
        conn.execute("DROP FUNCTION shardlite.node_changed()")
        _rewind_kv(conn)
        conn.execute("UPDATE shardlite.version SET version = 2")
    again = _meta(pg_dsn, os.fspath(tmp_path), root_id)
    again.open(create=False)
    try:
        with psycopg.connect(pg_dsn, autocommit=True) as listener, psycopg.connect(pg_dsn, autocommit=True) as conn:
            assert conn.execute("SELECT version FROM shardlite.version").fetchone() == (len(STEPS),) == (6,)
            listener.execute("LISTEN shardlite_nodes")
            again.nodes.add("n2", "n2", 1)
            notes = [(n.channel, n.payload) for n in listener.notifies(timeout=30, stop_after=1)]
            assert notes == [("shardlite_nodes", root_id)]
    finally:
        again.close()


def _two_roots(dsn: str, tmp_path: Path, nodes: tuple[str, str] = ("x", "y"),
               ids: tuple[str, str] | None = None) -> tuple[PgMeta, PgMeta]:
    """Roots ``a`` and ``b`` on one database, open: new ones with the node names ``nodes``, or (``ids``) the
    ones made before, reopened."""
    opened = []
    for n, name in enumerate("ab"):
        meta = _meta(dsn, os.fspath(tmp_path / name), None if ids is None else ids[n])
        if ids is None:
            meta.open(create=True, default_nodes=[(nodes[n], "n1", 1)])
        else:
            meta.open(create=False)
        opened.append(meta)
    return opened[0], opened[1]


def _rewind_plans(conn: psycopg.Connection[Any]) -> None:
    """``shardlite.plans`` back to its shape before version 6 (plans of the whole database)."""
    conn.execute("DROP INDEX shardlite.plans_by_root")
    conn.execute("ALTER TABLE shardlite.plans DROP COLUMN root_id")


def _rewind_kv(conn: psycopg.Connection[Any]) -> None:
    """``shardlite.kv`` and ``plans`` back to their shape before version 5 (one name space for the whole
    database)."""
    _rewind_plans(conn)
    conn.execute("ALTER TABLE shardlite.kv DROP CONSTRAINT kv_root_fkey")
    conn.execute("ALTER TABLE shardlite.kv DROP CONSTRAINT kv_pkey")
    conn.execute("ALTER TABLE shardlite.kv DROP COLUMN root_id")
    conn.execute("ALTER TABLE shardlite.kv ADD PRIMARY KEY (name)")


def test_roots_sharing_a_database_have_their_own_named_values(pg_dsn: str, tmp_path: Path) -> None:
    """One root's replica location (a named value) is not another's: before version 5 a second root on the
    database found the first one's and could not record its own. A forgotten root's values go with it."""
    first, second = _two_roots(pg_dsn, tmp_path, ("ka1", "kb1"))
    try:
        first.kv.put("replicate", "file:///a")
        assert second.kv.get("replicate") is None
        assert second.kv.put_if_absent("replicate", "file:///b") == "file:///b"
        assert first.kv.put_if_absent("replicate", "file:///x") == "file:///a"
        second.kv.put("replicate", "file:///b2")
        assert (first.kv.get("replicate"), second.kv.get("replicate")) == ("file:///a", "file:///b2")
        second.nodes.forget_all()
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT root_id, name, value FROM shardlite.kv").fetchall() == [
                (first.root_id, "replicate", "file:///a")]
    finally:
        first.close()
        second.close()


def test_version_5_gives_every_root_the_values_put_before(pg_dsn: str, tmp_path: Path) -> None:
    """A database at version 4 had one name space: each root it held then keeps seeing the values, and from
    the upgrade on each root's puts are its own."""
    first, second = _two_roots(pg_dsn, tmp_path, ("va1", "vb1"))
    first.close()
    second.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        _rewind_kv(conn)
        conn.execute("INSERT INTO shardlite.kv(name, value) VALUES ('replicate_retention', '{\"default\": 5}')")
        conn.execute("UPDATE shardlite.version SET version = 4")
    first, second = _two_roots(pg_dsn, tmp_path, ids=(first.root_id, second.root_id))
    try:
        assert first.kv.get("replicate_retention") == second.kv.get("replicate_retention") == '{"default": 5}'
        first.kv.put("replicate_retention", "{}")
        assert second.kv.get("replicate_retention") == '{"default": 5}'
    finally:
        first.close()
        second.close()


def test_forget_all_leaves_another_root_in_the_database_alone(pg_dsn: str, tmp_path: Path) -> None:
    """Two roots share a database (distinct node names): forgetting one removes its rows and its record only."""
    first, second = _two_roots(pg_dsn, tmp_path, ("fa1", "fb1"))
    try:
        for meta, node, key in ((first, "fa1", "ka"), (second, "fb1", "kb")):
            generation = meta.tenants.allocate_generation(key, node, "create")
            meta.tenants.register(key, node, generation, "inc", 1)
        assert second.nodes.forget_all() == 1
        assert not second.exists
        assert [n.name for n in first.nodes.list()] == ["fa1"] and first.tenants.lookup("ka") is not None
        assert first.tenants.lookup("kb") is None
        with psycopg.connect(pg_dsn) as conn:
            assert conn.execute("SELECT id FROM shardlite.roots").fetchall() == [(first.root_id,)]
    finally:
        first.close()
        second.close()


def test_roots_sharing_a_database_rebalance_independently(pg_dsn: str, tmp_path: Path) -> None:
    """Each root plans, applies and lists its own rebalances: before version 6 a plan of the second root
    superseded the first one's, and each saw the other's as its own."""
    import shardlite

    routers = {name: shardlite.Router(tmp_path / name, meta=pg_dsn, nodes=[f"{name}1"], schema=["CREATE TABLE t(x)"])
               for name in ("ra", "rb")}
    try:
        for name, router in routers.items():
            for i in range(12):
                with router.transaction(f"{name}:{i}") as tx:
                    tx.execute("INSERT INTO t VALUES (1)")
            router.nodes.add(f"{name}2")
        first, plan = routers["ra"].rebalance.plan()
        assert plan.moves, "the ring moved nothing to the new node"
        second, _ = routers["rb"].rebalance.plan()
        assert routers["ra"].rebalance.status()["plan"] == first  # still planned, not superseded by rb's
        assert routers["rb"].rebalance.status()["plan"] == second
        assert routers["ra"].rebalance.apply()["state"] == "done"
        assert {routers["ra"].locate(m.key).node for m in plan.moves} == {"ra2"}
        assert [p.id for p in routers["rb"]._store.meta.journal.plans()] == [second]
        with pytest.raises(ConfigurationError, match=f"no .*rebalance plan {first}"):
            routers["rb"]._store.meta.journal.plan_row(first, ["planned", "applying", "done"])
    finally:
        for router in routers.values():
            router.close()


def test_version_6_gives_each_plan_the_root_of_its_moves(pg_dsn: str, tmp_path: Path) -> None:
    first, second = _two_roots(pg_dsn, tmp_path, ("pa1", "pb1"))
    first.close()
    second.close()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:  # back to version 5: plans of the database
        _rewind_plans(conn)
        made = [conn.execute("INSERT INTO shardlite.plans(created, state, fingerprint, summary) VALUES "
                             "(1, 'done', 'f', '{}') RETURNING id").fetchone()[0] for _ in range(3)]
        for plan_id, source in ((made[0], "pb1"), (made[1], "pa1")):
            conn.execute("INSERT INTO shardlite.moves(plan_id, key, source, target, source_generation, size, "
                         "step, updated) VALUES (%s, %s, %s, 'x', 1, 1, 'done', 1)", (plan_id, f"k{plan_id}", source))
        conn.execute("UPDATE shardlite.version SET version = 5")
    first, second = _two_roots(pg_dsn, tmp_path, ids=(first.root_id, second.root_id))
    try:
        # the plan without moves goes to the oldest root: the first one
        assert sorted(p.id for p in first.journal.plans()) == [made[1], made[2]]
        assert [p.id for p in second.journal.plans()] == [made[0]]
        second.nodes.forget_all()
        with psycopg.connect(pg_dsn) as conn:
            gone = conn.execute("SELECT count(*) FROM shardlite.moves WHERE plan_id = %s", (made[0],)).fetchone()
            assert gone == (0,)
        assert sorted(p.id for p in first.journal.plans()) == [made[1], made[2]]
    finally:
        first.close()
        second.close()
