"""What user SQL may not do on tenant connections (brief §4 Results, rule 5), and that a refusal changes nothing."""

from __future__ import annotations

import os
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows

from shardlite import Router, ShardliteError, StatementNotAllowed

KEY = "user:1"
SCHEMA = ["CREATE TABLE p(id INTEGER PRIMARY KEY)", "CREATE TABLE t(x, p REFERENCES p(id))", "CREATE INDEX t_x ON t(x)"]

TRANSACTION_CONTROL = [
    "BEGIN", "BEGIN IMMEDIATE", "BEGIN EXCLUSIVE", "COMMIT", "END", "ROLLBACK",
    "SAVEPOINT s1", "RELEASE s1", "RELEASE SAVEPOINT s1", "ROLLBACK TO s1",
    "SAVEPOINT shardlite_sp1", "RELEASE shardlite_sp1",  # guessing the names shardlite uses when nesting
]
SETTING_PRAGMAS = [
    "PRAGMA journal_mode=DELETE", "PRAGMA journal_mode=OFF", "PRAGMA synchronous=OFF", "PRAGMA synchronous=0",
    "PRAGMA writable_schema=ON", "PRAGMA user_version=99", "PRAGMA main.user_version=99",
    "PRAGMA foreign_keys=OFF", "PRAGMA query_only=1", "PRAGMA query_only=0", "PRAGMA locking_mode=EXCLUSIVE",
    "PRAGMA cache_size=1", "PRAGMA mmap_size=0", "PRAGMA trusted_schema=1", "PRAGMA wal_checkpoint(TRUNCATE)",
    "PRAGMA wal_autocheckpoint=0", "PRAGMA schema_version=1", "PRAGMA application_id=5",
    "PRAGMA auto_vacuum=FULL", "PRAGMA busy_timeout=0", "PRAGMA max_page_count=1", "PRAGMA page_size=1024",
    "PRAGMA legacy_alter_table=ON", "PRAGMA ignore_check_constraints=1", "PRAGMA recursive_triggers=1",
    "PRAGMA temp_store=MEMORY", "PRAGMA secure_delete=0", "PRAGMA cell_size_check=1", "PRAGMA optimize",
    "PRAGMA shrink_memory", "PRAGMA incremental_vacuum", "PRAGMA case_sensitive_like=1",
]
RESERVED_WRITES = [
    "UPDATE _shardlite_meta SET key = 'user:2'",
    "UPDATE main._shardlite_meta SET retired = 'moved'",
    'UPDATE "_SHARDLITE_META" SET incarnation = \'x\'',
    "DELETE FROM _shardlite_meta",
    "REPLACE INTO _shardlite_meta(id, key, incarnation, internal_version, created) VALUES (1, 'user:2', 'x', 2, 0)",
    "INSERT INTO _shardlite_outbox(dest, topic, payload, created) VALUES ('user:2', 't', '{}', 0)",
    "INSERT INTO _shardlite_inbox(source, incarnation, last_seq) VALUES ('user:2', 'x', 99) ON CONFLICT DO NOTHING",
    "UPDATE _shardlite_relay SET claimed_by = 'me'",
    "DELETE FROM _shardlite_feed",
    "WITH c AS (SELECT 1) UPDATE _shardlite_meta SET key = 'user:3'",
    "CREATE TABLE _shardlite_evil(x)",
    'CREATE TABLE "_Shardlite_Evil"(x)',
    "CREATE TEMP TABLE _shardlite_tmp(x)",
    "CREATE VIEW _shardlite_view AS SELECT 1",
    "CREATE INDEX evil_idx ON _shardlite_meta(key)",
    "CREATE INDEX _shardlite_idx ON t(x)",
    "CREATE TRIGGER evil_trg AFTER INSERT ON _shardlite_outbox BEGIN SELECT 1; END",
    "CREATE TRIGGER _shardlite_trg AFTER INSERT ON t BEGIN SELECT 1; END",
    "DROP TABLE _shardlite_meta",
    "DROP TABLE _shardlite_outbox",
    "DROP TABLE IF EXISTS _shardlite_inbox",
    "ALTER TABLE _shardlite_meta ADD COLUMN z",
    "ALTER TABLE _shardlite_meta RENAME TO stolen",
    "ALTER TABLE _shardlite_meta RENAME COLUMN key TO k",
]
LOAD_EXTENSION = [
    "SELECT load_extension('/nonexistent/evil.so')",
    "SELECT load_extension('/nonexistent/evil.so', 'sqlite3_evil_init')",
    "SELECT LOAD_EXTENSION('x')",
]
READ_PRAGMAS = [
    "PRAGMA table_info(t)", "PRAGMA table_xinfo(t)", "PRAGMA user_version", "PRAGMA journal_mode",
    "PRAGMA index_list(t)", "PRAGMA foreign_key_list(t)", "PRAGMA integrity_check", "PRAGMA quick_check",
    "PRAGMA page_count", "PRAGMA schema_version", "SELECT * FROM pragma_table_info('t')",
    "SELECT * FROM pragma_user_version",
]


@pytest.fixture
def router(make_router: Any) -> Router:
    r = make_router(schema=SCHEMA)
    with r.transaction(KEY) as tx:
        tx.execute("INSERT INTO t(x) VALUES ('seed')")
    return r  # type: ignore[no-any-return]


def snapshot(router: Router) -> tuple[Any, ...]:
    """Everything a refused statement could have changed, read on the committed state."""
    return (
        router.query(KEY, "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"),
        internal_rows(router, KEY, "SELECT * FROM _shardlite_meta"),
        internal_rows(router, KEY, "SELECT * FROM _shardlite_outbox"),
        internal_rows(router, KEY, "SELECT * FROM _shardlite_inbox"),
        internal_rows(router, KEY, "SELECT * FROM _shardlite_relay"),
        router.query(KEY, "PRAGMA user_version"),
        router.query(KEY, "PRAGMA journal_mode"),
        router.query(KEY, "SELECT x FROM t ORDER BY rowid"),
        sorted(router.tenants()),
    )


def connection_state(tx: Any) -> tuple[Any, ...]:
    return (
        [row[1] for row in tx.execute("PRAGMA database_list").fetchall()],
        tx.execute("PRAGMA journal_mode").fetchall(),
        tx.execute("PRAGMA synchronous").fetchall(),
        tx.execute("PRAGMA foreign_keys").fetchall(),
        tx.execute("PRAGMA user_version").fetchall(),
    )


def assert_refused_in_transaction(router: Router, sql: str) -> StatementNotAllowed:
    before = snapshot(router)
    with router.transaction(KEY) as tx:
        state = connection_state(tx)
        tx.execute("INSERT INTO t(x) VALUES ('before')")
        with pytest.raises(StatementNotAllowed) as info:
            tx.execute(sql).fetchall()
        # the transaction is still ours and still usable; the connection was not reconfigured
        tx.execute("INSERT INTO t(x) VALUES ('after')")
        assert connection_state(tx) == state
    after = snapshot(router)
    assert after[-2] == before[-2] + [("before",), ("after",)]
    assert after[:-2] == before[:-2] and after[-1] == before[-1]
    return info.value


def assert_refused_in_query(router: Router, sql: str) -> StatementNotAllowed:
    before = snapshot(router)
    with pytest.raises(StatementNotAllowed) as info:
        router.query(KEY, sql)
    assert snapshot(router) == before
    return info.value


def test_statement_not_allowed_is_a_shardlite_error_and_an_apsw_auth_error() -> None:
    assert issubclass(StatementNotAllowed, ShardliteError)
    assert issubclass(StatementNotAllowed, apsw.AuthError)


# -- ATTACH / VACUUM INTO -------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["ATTACH DATABASE '{p}' AS other", "ATTACH '{p}' AS other",
                                  "ATTACH 'file:{p}?mode=rwc' AS other", "ATTACH ':memory:' AS mem",
                                  "DETACH DATABASE main"])
def test_attach_refused(router: Router, tmp_path: Any, form: str) -> None:
    target = str(tmp_path / "other.db")
    sql = form.format(p=target)
    err = assert_refused_in_transaction(router, sql)
    assert isinstance(err, apsw.AuthError)
    assert_refused_in_query(router, sql)
    assert not os.path.exists(target)


def test_attach_cannot_reach_another_tenant(router: Router) -> None:
    with router.transaction("user:2") as tx:
        tx.execute("INSERT INTO t(x) VALUES ('secret of user:2')")
    other = str(router.locate("user:2").path)
    sql = f"ATTACH '{other}' AS b"
    assert_refused_in_transaction(router, sql)
    assert_refused_in_query(router, sql)
    assert router.query("user:2", "SELECT x FROM t") == [("secret of user:2",)]


def test_vacuum_into_refused_in_query(router: Router, tmp_path: Any) -> None:
    target = str(tmp_path / "copy.db")
    assert_refused_in_query(router, f"VACUUM INTO '{target}'")
    assert not os.path.exists(target)


def test_vacuum_into_fails_in_transaction_and_copies_nothing(router: Router, tmp_path: Any) -> None:
    target = str(tmp_path / "copy.db")
    before = snapshot(router)
    with router.transaction(KEY) as tx:
        with pytest.raises(apsw.Error):
            tx.execute(f"VACUUM INTO '{target}'").fetchall()
        tx.execute("INSERT INTO t(x) VALUES ('after')")
    assert not os.path.exists(target)
    assert snapshot(router)[-2] == before[-2] + [("after",)]


def test_vacuum_into_in_transaction_is_statement_not_allowed(router: Router, tmp_path: Any) -> None:
    assert_refused_in_transaction(router, f"VACUUM INTO '{tmp_path / 'copy.db'}'")


# -- transaction control ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", TRANSACTION_CONTROL)
def test_transaction_control_refused(router: Router, sql: str) -> None:
    assert_refused_in_transaction(router, sql)
    assert_refused_in_query(router, sql)


def test_transaction_control_refused_inside_a_nested_transaction(router: Router) -> None:
    before = snapshot(router)
    with router.transaction(KEY) as outer:
        outer.execute("INSERT INTO t(x) VALUES ('outer')")
        with router.transaction(KEY) as inner:
            inner.execute("INSERT INTO t(x) VALUES ('inner')")
            for sql in ("RELEASE shardlite_sp1", "ROLLBACK TO shardlite_sp1", "COMMIT", "ROLLBACK"):
                with pytest.raises(StatementNotAllowed):
                    inner.execute(sql)
        outer.execute("INSERT INTO t(x) VALUES ('outer again')")
    assert snapshot(router)[-2] == before[-2] + [("outer",), ("inner",), ("outer again",)]


# -- pragmas ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", SETTING_PRAGMAS)
def test_setting_pragmas_refused(router: Router, sql: str) -> None:
    assert_refused_in_transaction(router, sql)
    assert_refused_in_query(router, sql)


@pytest.mark.parametrize("sql", READ_PRAGMAS)
def test_read_only_pragmas_allowed(router: Router, sql: str) -> None:
    with router.transaction(KEY) as tx:
        in_tx = tx.execute(sql).fetchall()
    assert in_tx
    assert router.query(KEY, sql) == in_tx


def test_read_only_pragmas_answer_correctly(router: Router) -> None:
    assert router.query(KEY, "PRAGMA user_version") == [(len(SCHEMA),)]
    assert [row[1] for row in router.query(KEY, "PRAGMA table_info(t)")] == ["x", "p"]
    assert [row[1] for row in router.query(KEY, "PRAGMA index_list(t)")] == ["t_x"]
    assert router.query(KEY, "PRAGMA journal_mode") == [("wal",)]
    assert router.query(KEY, "PRAGMA integrity_check") == [("ok",)]


# -- shardlite's own tables ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", RESERVED_WRITES)
def test_reserved_tables_cannot_be_written_created_or_dropped(router: Router, sql: str) -> None:
    assert_refused_in_transaction(router, sql)
    assert_refused_in_query(router, sql)


RESERVED_READS = [
    "SELECT key FROM _shardlite_meta",
    "SELECT count(*) FROM _shardlite_outbox",
    "SELECT * FROM main._shardlite_inbox",
    "SELECT 1 WHERE EXISTS (SELECT 1 FROM _SHARDLITE_RELAY)",
    "SELECT x FROM t UNION ALL SELECT payload FROM _shardlite_feed",
    "WITH f AS (SELECT * FROM _shardlite_feed) SELECT count(*) FROM f",
]


@pytest.mark.parametrize("sql", RESERVED_READS)
def test_user_sql_cannot_read_reserved_tables(router: Router, sql: str) -> None:
    """App SQL never reads shardlite's own tables: not in a query, not in a transaction."""
    assert internal_rows(router, KEY, "SELECT key FROM _shardlite_meta") == [(KEY,)]  # shardlite itself can
    with pytest.raises(StatementNotAllowed, match="may not read shardlite's own table"):
        router.query(KEY, sql)
    with pytest.raises(StatementNotAllowed, match="may not read shardlite's own table"):
        with router.transaction(KEY) as tx:
            tx.execute(sql)


def test_views_and_triggers_cannot_read_reserved_tables_either(router: Router) -> None:
    """Refused when created (the transaction's schema check), and refused when used if one exists anyway."""
    for sql in ("CREATE VIEW spy AS SELECT payload FROM _shardlite_feed",
                "CREATE TRIGGER copier AFTER INSERT ON t BEGIN SELECT payload FROM _shardlite_outbox; END"):
        with pytest.raises(StatementNotAllowed):
            with router.transaction(KEY) as tx:
                tx.execute(sql)
    path = router.locate(KEY).path
    assert path is not None
    raw = apsw.Connection(path)  # made by hand, past the authorizer
    try:
        raw.execute("CREATE VIEW spy AS SELECT payload FROM _shardlite_feed")
    finally:
        raw.close()
    with pytest.raises(StatementNotAllowed):
        router.query(KEY, "SELECT * FROM spy")


@pytest.mark.parametrize("body", [
    "UPDATE _shardlite_meta SET key = 'evil';",
    "UPDATE _shardlite_meta SET retired = 'moved';",
    "INSERT INTO _shardlite_outbox(dest, topic, payload, created) VALUES ('user:2', 't', '{}', 0);",
    "DELETE FROM _shardlite_inbox;",
    "INSERT INTO _shardlite_inbox(source, incarnation, last_seq) VALUES ('user:9', 'i', 1);",
])
def test_user_trigger_cannot_write_reserved_tables(router: Router, body: str) -> None:
    before = snapshot(router)
    created = True
    try:
        with router.transaction(KEY) as tx:
            tx.execute(f"CREATE TRIGGER sneaky AFTER INSERT ON t BEGIN {body} END")
    except StatementNotAllowed:
        created = False  # refusing at creation is fine too
    if created:
        with router.transaction(KEY) as tx:
            with pytest.raises(StatementNotAllowed):
                tx.execute("INSERT INTO t(x) VALUES ('fires the trigger')")
            # the refused statement (and its trigger) changed nothing inside the transaction either
            assert tx.execute("SELECT x FROM t ORDER BY rowid").fetchall() == before[-2]
        with pytest.raises(StatementNotAllowed):
            router.run(KEY, lambda tx: tx.execute("INSERT INTO t(x) VALUES ('via run')"))
    after = snapshot(router)
    assert after[1:] == before[1:], "a trigger managed to change shardlite's tables or the user's rows"
    assert internal_rows(router, KEY, "SELECT key, retired FROM _shardlite_meta") == [(KEY, None)]


def test_user_trigger_on_own_tables_still_works(router: Router) -> None:
    with router.transaction(KEY) as tx:
        tx.execute("CREATE TABLE audit(x)")
        tx.execute("CREATE TRIGGER a AFTER INSERT ON t BEGIN INSERT INTO audit VALUES (new.x); END")
        tx.execute("INSERT INTO t(x) VALUES ('hello')")
    assert router.query(KEY, "SELECT x FROM audit") == [("hello",)]


def test_rename_into_reserved_namespace_refused(router: Router) -> None:
    assert_refused_in_transaction(router, "ALTER TABLE t RENAME TO _shardlite_squat")


# -- extensions ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sql", LOAD_EXTENSION)
def test_load_extension_refused(router: Router, sql: str) -> None:
    assert_refused_in_transaction(router, sql)
    assert_refused_in_query(router, sql)
