"""App schemas (brief §4 Schemas): list or per-prefix mapping, callables, atomic migration on open, migrate_all."""

from __future__ import annotations

import os
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows

from shardlite import ConfigurationError, Router, UnknownTenant
from shardlite.files.schema import INTERNAL_VERSION

USER_V1 = ["CREATE TABLE profile(id INTEGER PRIMARY KEY, name TEXT)"]
DM_V1 = ["CREATE TABLE messages(id INTEGER PRIMARY KEY, body TEXT)"]


def add_email(cur: apsw.Cursor) -> None:
    cur.execute("ALTER TABLE profile ADD COLUMN email TEXT")
    cur.execute("UPDATE profile SET email = lower(name) || '@example.com'")


def tables(router: Router, key: str) -> set[str]:
    return {r[0] for r in router.query(key, "SELECT name FROM sqlite_master WHERE type = 'table' "
                                            "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
                                            "AND name NOT LIKE '\\_shardlite\\_%' ESCAPE '\\'")}


def version(router: Router, key: str) -> int:
    rows = router.query(key, "PRAGMA user_version")
    return int(rows[0][0])


def files_under(root: str) -> set[str]:
    out = set()
    for dirpath, _, filenames in os.walk(root):
        out |= {os.path.join(dirpath, f) for f in filenames}
    return out


def test_list_schema_applies_to_every_prefix(make_router: Any) -> None:
    router = make_router(schema=["CREATE TABLE a(x)", "CREATE TABLE b(y)"])
    for key in ("user:1", "org:acme", "plain", "dm:alice:bob"):
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO a VALUES (1)")
            tx.execute("INSERT INTO b VALUES (2)")
        assert tables(router, key) == {"a", "b"}
        assert version(router, key) == 2
    assert router.status()["schema_versions"] == {2: 4}


def test_no_schema_means_version_zero_with_internal_tables(make_router: Any) -> None:
    router = make_router()
    with router.transaction("user:1") as tx:
        tx.execute("CREATE TABLE mine(x)")
    assert version(router, "user:1") == 0
    assert internal_rows(router, "user:1", "SELECT internal_version FROM _shardlite_meta") == [(INTERNAL_VERSION,)]


def test_mapping_schema_per_prefix(make_router: Any) -> None:
    router = make_router(schema={"user": USER_V1 + [add_email], "dm": DM_V1})
    with router.transaction("user:42") as tx:
        tx.execute("INSERT INTO profile(name, email) VALUES ('Ann', 'ann@x')")
    with router.transaction("dm:alice:bob") as tx:
        tx.execute("INSERT INTO messages(body) VALUES ('hi')")
    assert tables(router, "user:42") == {"profile"}
    assert tables(router, "dm:alice:bob") == {"messages"}
    assert version(router, "user:42") == 2
    assert version(router, "dm:alice:bob") == 1
    with router.transaction("dm:alice:bob") as tx:
        with pytest.raises(apsw.SQLError):
            tx.execute("SELECT * FROM profile")
    assert router.status()["schema_versions"] == {1: 1, 2: 1}


@pytest.mark.parametrize("key", ["org:acme", "plain", "users:1", "User:1", "user"])
def test_key_without_schema_entry_raises_and_creates_nothing(make_router: Any, root: str, key: str) -> None:
    router = make_router(schema={"user": USER_V1, "dm": DM_V1})
    with router.transaction("user:1"):
        pass
    files = files_under(root)
    tenants = list(router.tenants())
    if key == "user":  # the prefix of "user" (no ':') is "user": it has a schema
        with router.transaction(key):
            pass
        return
    with pytest.raises(ConfigurationError, match="schema"):
        with router.transaction(key) as tx:
            tx.execute("SELECT 1")
    with pytest.raises(ConfigurationError):
        router.run(key, lambda tx: None)
    with pytest.raises(UnknownTenant):
        router.query(key, "SELECT 1")
    assert not router.exists(key)
    assert router.locate(key).state == "absent"
    assert list(router.tenants()) == tenants
    assert files_under(root) == files
    assert router.status()["tenants_per_node"] == {"n1": 1}


def test_callable_steps_get_a_cursor(make_router: Any) -> None:
    seen: list[type] = []

    def seed(cur: apsw.Cursor) -> None:
        seen.append(type(cur))
        cur.execute("CREATE TABLE settings(k TEXT PRIMARY KEY, v TEXT)")
        cur.executemany("INSERT INTO settings VALUES (?, ?)", [("theme", "dark"), ("lang", "en")])

    router = make_router(schema=["CREATE TABLE a(x)", seed])
    with router.transaction("user:1"):
        pass
    assert seen and all(issubclass(t, apsw.Cursor) for t in seen)
    assert router.query("user:1", "SELECT k, v FROM settings ORDER BY k") == [("lang", "en"), ("theme", "dark")]
    assert version(router, "user:1") == 2


def test_multi_statement_sql_step_runs_whole(make_router: Any) -> None:
    # APSW stops at the first statement that returns rows unless the cursor is consumed: the step must run whole
    step = ("CREATE TABLE a(x); PRAGMA table_info(a); INSERT INTO a VALUES (1); SELECT 1; "
            "CREATE TABLE c(z); INSERT INTO c VALUES (2)")
    router = make_router(schema=[step])
    with router.transaction("user:1"):
        pass
    assert router.query("user:1", "SELECT x FROM a") == [(1,)]
    assert router.query("user:1", "SELECT z FROM c") == [(2,)]


def test_multi_statement_step_runs_whole_when_migrating(make_router: Any, root: str) -> None:
    with Router(root, schema=["CREATE TABLE a(x)"]) as r1:
        with r1.transaction("user:1") as tx:
            tx.execute("INSERT INTO a VALUES (1)")
    step2 = "SELECT count(*) FROM a; CREATE TABLE b(y); INSERT INTO b SELECT x * 10 FROM a"
    router = make_router(schema=["CREATE TABLE a(x)", step2])
    assert router.query("user:1", "SELECT y FROM b") == [(10,)]
    assert version(router, "user:1") == 2


@pytest.mark.parametrize("schema", [
    "CREATE TABLE a(x)",                      # a bare string, not a list
    {"us:er": ["CREATE TABLE a(x)"]},         # prefix containing ':'
    {"": ["CREATE TABLE a(x)"]},              # empty prefix
    {"user": "CREATE TABLE a(x)"},            # mapping to a bare string
    ["CREATE TABLE a(x)", 42],                # a step that is neither SQL nor callable
    42,
])
def test_malformed_schema_is_a_configuration_error(root: str, schema: Any) -> None:
    with pytest.raises(ConfigurationError):
        Router(root, schema=schema)


# -- migration on open ------------------------------------------------------------------------------------------


def _create_v1(root: str, keys: tuple[str, ...] = ("user:1",)) -> None:
    with Router(root, schema={"user": USER_V1, "dm": DM_V1}) as r1:
        for key in keys:
            with r1.transaction(key) as tx:
                if key.startswith("user"):
                    tx.execute("INSERT INTO profile(name) VALUES ('Ann')")
                else:
                    tx.execute("INSERT INTO messages(body) VALUES ('hi')")
        assert r1.status()["schema_versions"] == {1: len(keys)}


def test_v1_tenant_is_migrated_on_open_by_query(make_router: Any, root: str) -> None:
    _create_v1(root)
    router = make_router(schema={"user": USER_V1 + [add_email], "dm": DM_V1})
    assert router.status()["schema_versions"] == {1: 1}  # nothing opened yet
    assert router.query("user:1", "PRAGMA user_version") == [(2,)]
    assert router.query("user:1", "SELECT name, email FROM profile") == [("Ann", "ann@example.com")]
    assert router.status()["schema_versions"] == {2: 1}


def test_v1_tenant_is_migrated_on_open_by_transaction(make_router: Any, root: str) -> None:
    _create_v1(root)
    router = make_router(schema={"user": USER_V1 + [add_email], "dm": DM_V1})
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO profile(name, email) VALUES ('Bob', 'b@x')")
        assert tx.execute("PRAGMA user_version").fetchall() == [(2,)]
    assert router.query("user:1", "SELECT name, email FROM profile ORDER BY id") == [
        ("Ann", "ann@example.com"), ("Bob", "b@x")]


def _explode(cur: apsw.Cursor) -> None:
    cur.execute("CREATE TABLE half_done(x)")
    cur.execute("UPDATE profile SET name = 'CLOBBERED'")
    raise RuntimeError("step 3 exploded")


@pytest.mark.parametrize("bad_step", [_explode, "CREATE TABLE half_done(x); INSERT INTO no_such_table VALUES (1)"],
                         ids=["callable", "sql"])
def test_failing_step_rolls_back_the_whole_migration(make_router: Any, root: str, bad_step: Any) -> None:
    _create_v1(root)
    router = make_router(schema={"user": USER_V1 + [add_email, bad_step], "dm": DM_V1})
    expected = RuntimeError if callable(bad_step) else apsw.SQLError
    with pytest.raises(expected):
        router.query("user:1", "SELECT 1")
    with pytest.raises(expected):
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO profile(name) VALUES ('must not land')")
    router.close()
    # the tenant is still exactly at v1: step 2 (which succeeded) was rolled back with step 3
    with Router(root, schema={"user": USER_V1, "dm": DM_V1}) as old:
        assert old.query("user:1", "PRAGMA user_version") == [(1,)]
        assert tables(old, "user:1") == {"profile"}
        assert [r[1] for r in old.query("user:1", "PRAGMA table_info(profile)")] == ["id", "name"]
        assert old.query("user:1", "SELECT name FROM profile") == [("Ann",)]
        assert old.status()["schema_versions"] == {1: 1}


def test_migrate_all_reports_failures_per_tenant(make_router: Any, root: str) -> None:
    _create_v1(root, ("user:1", "user:2", "user:3", "dm:a:b"))

    def picky(cur: apsw.Cursor) -> None:
        key = cur.execute("SELECT key FROM _shardlite_meta").fetchall()[0][0]
        cur.execute("ALTER TABLE profile ADD COLUMN email TEXT")
        if key == "user:2":
            raise ValueError("user:2 has bad data")

    router = make_router(schema={"user": USER_V1 + [picky], "dm": DM_V1})
    seen: dict[str, Any] = {}
    failures = router.migrate_all(parallel=2, progress=lambda key, err: seen.__setitem__(key, err))
    assert set(failures) == {"user:2"}
    assert "user:2 has bad data" in failures["user:2"]
    assert set(seen) == {"user:1", "user:2", "user:3", "dm:a:b"}
    assert isinstance(seen["user:2"], ValueError)
    assert seen["user:1"] is None and seen["dm:a:b"] is None
    assert router.status()["schema_versions"] == {1: 2, 2: 2}  # dm:a:b (current at 1), user:2 (failed)
    assert version(router, "user:1") == 2 and version(router, "user:3") == 2
    router.close()
    with Router(root, schema={"user": USER_V1, "dm": DM_V1}) as old:
        assert version(old, "user:2") == 1
        assert [r[1] for r in old.query("user:2", "PRAGMA table_info(profile)")] == ["id", "name"]

    fixed = make_router(schema={"user": USER_V1 + [add_email], "dm": DM_V1})
    assert fixed.migrate_all() == {}
    assert fixed.status()["schema_versions"] == {1: 1, 2: 3}
    assert fixed.query("user:2", "SELECT email FROM profile") == [("ann@example.com",)]


def test_migrate_all_on_an_empty_root(make_router: Any) -> None:
    router = make_router(schema=USER_V1)
    assert router.migrate_all() == {}
    assert router.status()["schema_versions"] == {}


def test_status_counts_versions(make_router: Any) -> None:
    router = make_router(schema={"user": USER_V1 + [add_email], "dm": DM_V1})
    for key in ("user:1", "user:2", "dm:x:y"):
        with router.transaction(key):
            pass
    status = router.status()
    assert status["schema_versions"] == {1: 1, 2: 2}
    assert status["tenants_per_node"] == {"n1": 3}
    router.drop("user:1")
    assert router.status()["schema_versions"] == {1: 1, 2: 1}


def _downgrade_to_internal_v3(path: str) -> None:
    """Turn a tenant file into what shardlite's internal version 3 made: outbox and feed numbered with
    AUTOINCREMENT, no ``_shardlite_relay.last_seq`` (nor the later ``parked_version``)."""
    conn = apsw.Connection(path)
    try:
        conn.execute("BEGIN")
        conn.execute("DROP TABLE _shardlite_outbox")
        conn.execute("CREATE TABLE _shardlite_outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT, dest TEXT NOT NULL, "
                     "topic TEXT NOT NULL, payload TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL "
                     "DEFAULT 0, next_at REAL NOT NULL DEFAULT 0, last_error TEXT, origin TEXT)")
        conn.execute("DROP TABLE _shardlite_feed")
        conn.execute("CREATE TABLE _shardlite_feed(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, "
                     "topic TEXT NOT NULL, payload TEXT NOT NULL, event TEXT NOT NULL, at REAL NOT NULL)")
        conn.execute("ALTER TABLE _shardlite_relay DROP COLUMN last_seq")
        conn.execute("ALTER TABLE _shardlite_relay DROP COLUMN parked_version")
        # five events were emitted and delivered (deleted) under v3; one is still waiting; a feed entry
        conn.execute("INSERT INTO _shardlite_outbox(seq, dest, topic, payload, created) VALUES "
                     "(4, 'user:b', 't', '{}', 0)")
        conn.execute("UPDATE sqlite_sequence SET seq = 5 WHERE name = '_shardlite_outbox'")
        conn.execute("INSERT INTO _shardlite_feed(id, source, topic, payload, event, at) VALUES "
                     "(7, 'user:z', 't', '{}', 'user:z/x/1', 0)")
        conn.execute("UPDATE _shardlite_meta SET internal_version = 3")
        conn.execute("COMMIT")
        assert conn.execute("SELECT seq FROM sqlite_sequence WHERE name = '_shardlite_outbox'").fetchall() == [(5,)]
    finally:
        conn.close()


def test_internal_v3_tenant_is_migrated_on_open_and_keeps_its_numbers(make_router: Any, root: str) -> None:
    router = make_router(schema=USER_V1)
    with router.transaction("user:1") as tx:
        tx.execute("INSERT INTO profile(name) VALUES ('a')")
    path = str(router.locate("user:1").path)
    router.close()
    _downgrade_to_internal_v3(path)

    again = make_router(root, schema=USER_V1)
    with again.transaction("user:1") as tx:  # opening migrates, inside its own transaction first
        tx.emit("user:b", "t", {"after": True})
    assert internal_rows(again, "user:1", "SELECT internal_version FROM _shardlite_meta") == [(INTERNAL_VERSION,)]
    assert internal_rows(again, "user:1", "SELECT seq, payload FROM _shardlite_outbox ORDER BY seq") == [
        (4, "{}"), (6, '{"after":true}')]  # past the v3 sequence (5), not past the highest row left (4)
    assert internal_rows(again, "user:1", "SELECT id, event FROM _shardlite_feed") == [(7, "user:z/x/1")]
    ddl = " ".join(sql for (sql,) in internal_rows(again,
        "user:1", "SELECT sql FROM sqlite_master WHERE name IN ('_shardlite_outbox', '_shardlite_feed')"))
    assert "AUTOINCREMENT" not in ddl.upper()
    assert again.query("user:1", "SELECT count(*) FROM sqlite_sequence WHERE name LIKE '\\_shardlite%' "
                                 "ESCAPE '\\'") == [(0,)]
    assert again.query("user:1", "PRAGMA integrity_check") == [("ok",)]


def test_global_db_version_7_gets_parked_flags_on_open(make_router: Any, root: str) -> None:
    """A root whose global.db predates parked pending-work flags (version 7): its flags come through the
    upgrade due, and a drain parks them."""
    router = make_router()
    applied: list[int] = []
    with router.transaction("user:a") as tx:
        tx.emit("user:b", "t", {"n": 1})
    router.close()
    conn = apsw.Connection(os.path.join(root, "global.db"))
    try:
        conn.execute("DROP INDEX _shardlite_pending_by_due")
        conn.execute("ALTER TABLE _shardlite_pending DROP COLUMN parked")
        conn.execute("CREATE INDEX _shardlite_pending_by_due ON _shardlite_pending(due)")
        conn.execute("PRAGMA user_version = 7")
    finally:
        conn.close()
    again = make_router(root)
    again.handler("t")(lambda tx, event: applied.append(event.payload["n"]))
    (flag,) = again._store.meta.pending.all()
    assert flag.key == "user:a" and flag.parked is None
    again.relay.drain(timeout=30)
    assert applied == [1]
    parked = again._store.meta.pending.row("user:a")
    assert parked is not None and parked.parked is not None
