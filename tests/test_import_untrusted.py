"""Imported files are untrusted (rule 14): crafted files are refused whole or neutralised, and the fence
holds afterwards (``shardlite.services.restore.import_tenant``, ``shardlite.files.sanitize``).

Each crafted file starts as a real export and is then edited with APSW as an attacker would:

* a spy trigger on ``_shardlite_feed`` (copying private feed entries into an app table), an index on an
  internal table, a trigger that blocks the fence, ``_shardlite_meta`` replaced by a view whose INSTEAD OF
  trigger swallows the retired marker, a foreign key onto ``_shardlite_relay``, a table taking a reserved
  name: refused, naming the objects, with nothing registered and no file left in the nodes;
* forged outbox events: dropped by default; kept with ``keep_events`` only when they are well formed (a
  destination that is not a canonical key, a bad topic or a payload that is not JSON refuses the file);
* internal tables redefined so that the fence cannot be written (``CHECK (retired IS NULL)``, a generated
  ``retired`` column): the import rebuilds them from shardlite's definitions, after which a drop works
  and a move of the tenant while another client writes loses no acknowledged write.

Trusted connections (copies, checks, the fence) fire no trigger and expand no view.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows, router_factory, run_cli

from shardlite import IdentityMismatch, Router, ShardliteError
from shardlite.core.outbox import Event
from shardlite.files.copying import open_trusted
from shardlite.files.sanitize import foreign_references
from shardlite.services.restore import import_tenant

SCHEMA = ["CREATE TABLE items(id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
          "CREATE TABLE applied(n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL)"]
DEADLINE = 60.0


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    yield from router_factory(tmp_path, SCHEMA)


def add(router: Router, key: str, *bodies: str) -> None:
    with router.transaction(key) as tx:
        for body in bodies:
            tx.execute("INSERT INTO items(body) VALUES (?)", (body,))


def items(router: Router, key: str) -> list[str]:
    return [str(r[0]) for r in router.query(key, "SELECT body FROM items ORDER BY id")]


def node_files(router: Router) -> list[str]:
    out: list[str] = []
    for node in router.status()["nodes"]:
        for dirpath, _, filenames in os.walk(node["path"]):
            out += [os.path.join(dirpath, f) for f in filenames]
    return sorted(out)


def edit(path: Path, sql: str, params: tuple[Any, ...] = ()) -> None:
    """What an attacker does to an exported file (a closed, standalone copy of their own)."""
    conn = apsw.Connection(os.fspath(path))
    try:
        for _ in conn.execute(sql, params):  # every statement of the text runs
            pass
    finally:
        conn.close()


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Event] = []

    def __call__(self, tx: Any, event: Event) -> None:
        tx.execute("INSERT INTO applied(event_id) VALUES (?)", (event.id,))
        self.seen.append(event)


def exported(router: Router, tmp_path: Path, name: str = "export.db", key: str = "acct:src") -> Path:
    """A real export of ``key`` (one item, one private feed entry) to ``tmp_path/name``."""
    if not router.exists(key):
        add(router, key, "private")
        router.use_feed("mention")
        with router.transaction("acct:friend") as tx:
            tx.emit(key, "mention", {"secret": "for your eyes only"})
        router.relay.drain(timeout=DEADLINE)
        assert len(router.feed(key)) == 1
    path = tmp_path / name
    router.export(key, path)
    return path


def catalog_state(router: Router) -> tuple[Any, ...]:
    return (sorted(router.tenants()), router._store.meta.globaldb.read("SELECT count(*) FROM _shardlite_generations"),
            node_files(router))


def refused(router: Router, path: Path, key: str, match: str, **kwargs: Any) -> ShardliteError:
    before = catalog_state(router)
    with pytest.raises(ShardliteError, match=match) as info:
        import_tenant(router._store, os.fspath(path), key, **kwargs)
    assert catalog_state(router) == before  # nothing registered, no temporary left in a node
    return info.value


# -- refused --------------------------------------------------------------------------------------------------------


ATTACKS = {
    "spy trigger on the feed": (
        "CREATE TABLE loot(payload TEXT); CREATE TRIGGER spy AFTER INSERT ON _shardlite_feed "
        "BEGIN INSERT INTO loot VALUES (new.payload); END",
        r"trigger spy on _shardlite_feed"),
    "index on an internal table": ("CREATE INDEX peek ON _shardlite_feed(payload)", r"index peek on _shardlite_feed"),
    "trigger blocking the fence": (
        "CREATE TRIGGER block BEFORE UPDATE OF retired ON _shardlite_meta WHEN new.retired IS NOT NULL "
        "BEGIN SELECT RAISE(ABORT, 'no fence'); END",
        r"trigger block on _shardlite_meta"),
    "meta replaced by a view": (
        "ALTER TABLE _shardlite_meta RENAME TO real_meta; "
        "CREATE VIEW _shardlite_meta AS SELECT id, key, incarnation, internal_version, created, NULL AS retired "
        "FROM real_meta; "
        "CREATE TRIGGER swallow INSTEAD OF UPDATE ON _shardlite_meta BEGIN UPDATE real_meta SET key = new.key, "
        "incarnation = new.incarnation WHERE id = 1; END",
        r"view _shardlite_meta takes a reserved"),
    "foreign key onto the relay": (
        "CREATE TABLE trap(id INTEGER PRIMARY KEY REFERENCES _shardlite_relay(id) ON DELETE CASCADE)",
        r"table trap references _shardlite_relay"),
    "trigger writing the outbox": (
        "CREATE TRIGGER forge AFTER INSERT ON items BEGIN INSERT INTO _SHARDLITE_OUTBOX(seq, dest, topic, "
        "payload, created) VALUES (99, 'acct:victim', 'note', '{}', 0); END",
        r"trigger forge references _SHARDLITE_OUTBOX"),
    "a table taking a reserved name": ("CREATE TABLE _shardlite_tenants(key TEXT)",
                                       r"table _shardlite_tenants takes a reserved"),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_crafted_schemas_are_refused_whole(make: Callable[..., Router], tmp_path: Path, attack: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    path = exported(router, tmp_path)
    sql, match = ATTACKS[attack]
    edit(path, sql)
    before = path.read_bytes()
    error = refused(router, path, "acct:new", match)
    assert "refused" in str(error) and "\n" not in str(error)
    refused(router, path, "acct:src", match, force=True)  # nor over a live tenant
    assert items(router, "acct:src") == ["private"]
    assert not router.exists("acct:new")
    assert path.read_bytes() == before  # the file imported from is left as it was
    code, _, err = run_cli(capsys, "tenants", "import", os.fspath(path), "acct:new", "--root", router.root)
    assert code == 2 and "refused" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not router.exists("acct:new")


def test_foreign_references_describes_each_object_and_reads_the_schema_only(tmp_path: Path) -> None:
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE _shardlite_feed(id INTEGER PRIMARY KEY, payload TEXT);"
                 "CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT);"
                 "CREATE TABLE my_shardlite_notes(body TEXT);"  # not a reserved name: fine
                 "CREATE TABLE trap(x REFERENCES _shardlite_relay(id));"
                 "CREATE TRIGGER spy AFTER INSERT ON _shardlite_feed BEGIN INSERT INTO notes(body) "
                 "VALUES (new.payload); END;"
                 'CREATE VIEW v AS SELECT * FROM "_ShardLite_Feed";'
                 "CREATE INDEX by_body ON notes(body);"
                 'CREATE TRIGGER "sp\u202ey" AFTER DELETE ON notes BEGIN DELETE FROM _shardlite_feed; END;'
                 "CREATE TEMP TABLE scratch(x DEFAULT '_shardlite_meta')")
    assert foreign_references(conn) == ["table trap references _shardlite_relay",
                                        "trigger spy on _shardlite_feed", "view v references _ShardLite_Feed",
                                        "trigger 'sp\\u202ey' references _shardlite_feed"]
    assert foreign_references(conn, "temp") == ["table scratch references _shardlite_meta"]
    conn.close()


def test_trusted_connections_fire_no_trigger_and_expand_no_view(tmp_path: Path) -> None:
    path = tmp_path / "f.db"
    edit(path, "CREATE TABLE t(x); CREATE TABLE log(x); CREATE VIEW v AS SELECT * FROM t;"
               "CREATE TRIGGER tr AFTER INSERT ON t BEGIN INSERT INTO log VALUES (new.x); END")
    conn = open_trusted(os.fspath(path))
    try:
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.execute("SELECT count(*) FROM log").fetchall() == [(0,)]
        with pytest.raises(apsw.SQLError, match="view"):
            conn.execute("SELECT * FROM v").fetchall()
    finally:
        conn.close()


# -- forged events ----------------------------------------------------------------------------------------------


def forge(path: Path, *events: tuple[str, str, str]) -> None:
    for n, (dest, topic, payload) in enumerate(events, 1000):
        edit(path, "INSERT INTO _shardlite_outbox(seq, dest, topic, payload, created) VALUES (?, ?, ?, ?, 0)",
             (n, dest, topic, payload))


def test_forged_events_are_dropped_unless_kept_and_kept_only_when_well_formed(
        make: Callable[..., Router], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recorder = Recorder()
    router = make()
    router.handler("note")(recorder)
    path = exported(router, tmp_path)
    forge(path, ("acct:victim", "note", json.dumps({"grant": "admin"})))
    record = import_tenant(router._store, os.fspath(path), "acct:src", force=True)  # same key, the default
    assert internal_rows(router, "acct:src", "SELECT count(*) FROM _shardlite_outbox") == [(0,)]
    # numbers are never handed out again, even those of dropped events
    assert internal_rows(router, "acct:src", "SELECT last_seq FROM _shardlite_relay") == [(1000,)]
    router.relay.drain(timeout=DEADLINE)
    assert recorder.seen == [] and not router.exists("acct:victim")
    assert record.generation == router.locate("acct:src").generation

    for bad, match in ((("acct:\u202evictim", "note", "{}"), "U\\+202E"),
                       (("acct:vi\u0301ctim", "note", "{}"), "canonical"),
                       (("acct:victim", "", "{}"), "topic"),
                       (("acct:victim", "note", "{not json"), "not JSON")):
        crafted = exported(router, tmp_path, f"bad-{len(match)}.db")
        forge(crafted, bad)
        refused(router, crafted, "acct:src", match, force=True, keep_events=True)
        code, _, err = run_cli(capsys, "tenants", "import", os.fspath(crafted), "acct:src", "--force",
                               "--keep-events", "--root", router.root)
        assert code == 2 and "_shardlite_outbox" in err and "Traceback" not in err

    # well formed and asked for: kept, with the identity of the incarnation that emitted them
    good = exported(router, tmp_path, "good.db")
    forge(good, ("acct:victim", "note", json.dumps({"n": 1})))
    code, out, err = run_cli(capsys, "tenants", "import", os.fspath(good), "acct:src", "--force", "--keep-events",
                             "--json", "--root", router.root)
    assert code == 0, err
    router.relay.drain(timeout=DEADLINE)
    assert [e.payload for e in recorder.seen] == [{"n": 1}]
    # into another key, the file's events are never carried (they were another tenant's)
    other = exported(router, tmp_path, "other.db")
    forge(other, ("acct:victim", "note", "{}"))
    import_tenant(router._store, os.fspath(other), "acct:else", keep_events=True)
    assert internal_rows(router, "acct:else", "SELECT count(*) FROM _shardlite_outbox") == [(0,)]


# -- neutralised, and the fence holds ---------------------------------------------------------------------------------

REDEFINED = {
    "retired refused by a CHECK": "CREATE TABLE _shardlite_meta(id INTEGER PRIMARY KEY, key TEXT, incarnation TEXT, "
                                  "internal_version INTEGER, created REAL, retired TEXT CHECK (retired IS NULL))",
    "retired a generated column": "CREATE TABLE _shardlite_meta(id INTEGER PRIMARY KEY, key TEXT, incarnation TEXT, "
                                  "internal_version INTEGER, created REAL, retired TEXT GENERATED ALWAYS AS (NULL))",
}


def redefine_meta(path: Path, definition: str) -> None:
    edit(path, "ALTER TABLE _shardlite_meta RENAME TO old_meta; " + definition + "; "
               "INSERT INTO _shardlite_meta(id, key, incarnation, internal_version, created) "
               "SELECT id, key, incarnation, internal_version, created FROM old_meta; DROP TABLE old_meta")


def internal_sql(router: Router, key: str) -> list[tuple[Any, ...]]:
    return router.query(key, "SELECT type, name, sql FROM sqlite_schema WHERE name LIKE '%shardlite%' ORDER BY name")


@pytest.mark.parametrize("how", sorted(REDEFINED))
def test_redefined_internal_tables_are_rebuilt_and_a_drop_fences(make: Callable[..., Router], tmp_path: Path,
                                                                  how: str) -> None:
    router = make()
    path = exported(router, tmp_path)
    redefine_meta(path, REDEFINED[how])
    import_tenant(router._store, os.fspath(path), "acct:imp")
    assert internal_sql(router, "acct:imp") == internal_sql(router, "acct:src")  # shardlite's definitions
    assert items(router, "acct:imp") == ["private"]

    other = make()  # another client holding the imported tenant's location
    add(other, "acct:imp", "before drop")
    old_path = str(router.locate("acct:imp").path)
    router.drop("acct:imp")  # writes the fence into the file: refused by the file's own definition before
    assert not os.path.exists(old_path)
    add(other, "acct:imp", "after drop")  # re-creates the key; never lands in the dropped file
    assert items(router, "acct:imp") == ["after drop"]


@pytest.mark.parametrize("how", sorted(REDEFINED))
def test_a_move_of_an_imported_tenant_loses_no_acknowledged_write(make: Callable[..., Router], tmp_path: Path,
                                                                 how: str) -> None:
    router = make()
    path = exported(router, tmp_path)
    redefine_meta(path, REDEFINED[how])
    import_tenant(router._store, os.fspath(path), "acct:imp")
    other = make()  # a client that keeps writing through the location it cached before the move
    acknowledged = ["private"]
    for n in range(3):
        add(other, "acct:imp", f"before {n}")
        acknowledged.append(f"before {n}")
    router.nodes.add("n2")
    router.nodes.drain("n1")
    plan_id, plan = router.rebalance.plan()
    assert [m.key for m in plan.moves if m.key == "acct:imp"] == ["acct:imp"]
    status = router.rebalance.apply(plan_id)
    assert not status["errors"], status["errors"]
    assert router.locate("acct:imp").node == "n2"
    for n in range(3):
        add(other, "acct:imp", f"after {n}")  # finds the fence in the old file, retries at the new home
        acknowledged.append(f"after {n}")
    assert items(router, "acct:imp") == acknowledged
    assert items(other, "acct:imp") == acknowledged


def test_a_file_that_is_not_a_tenant_or_in_wal_mode_with_a_log_is_refused(make: Callable[..., Router],
                                                                          tmp_path: Path) -> None:
    router = make()
    path = exported(router, tmp_path)
    edit(path, "DELETE FROM _shardlite_meta")
    with pytest.raises(IdentityMismatch, match="identity row"):
        import_tenant(router._store, os.fspath(path), "acct:new")
    live = tmp_path / "live.db"
    conn = apsw.Connection(os.fspath(live))
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    for _ in conn.execute("PRAGMA journal_mode=WAL; CREATE TABLE x(a); INSERT INTO x VALUES (1)"):
        pass
    conn.close()
    assert os.path.getsize(f"{live}-wal") > 0
    wal_before = os.stat(f"{live}-wal")
    refused(router, live, "acct:new", "write-ahead log")
    after = os.stat(f"{live}-wal")
    assert (after.st_size, after.st_mtime_ns) == (wal_before.st_size, wal_before.st_mtime_ns)  # never checkpointed
