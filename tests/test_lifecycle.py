"""Tenant lifecycle and operations: drop, export, import, ``router.stats()``, Prometheus text (brief §4 CLI).

* ``router.drop(key)`` / ``shardlite tenants drop KEY`` deletes the tenant's file with its WAL and SHM and
  records the drop in the catalog (a tombstone); a later write re-creates the key as a new tenant (new
  generation, incarnation and path); another client holding the old location never reads or writes the
  dropped file; events for a dropped destination never re-create it;
* ``export`` writes a standalone, private SQLite file; ``import`` creates a tenant from it with a new
  generation and incarnation, never over a live tenant without ``force``, and refuses files that are not
  shardlite tenants;
* ``router.stats()`` / ``shardlite status --json``: tenants and bytes per node, this process's open
  connections, schema versions, relay lag, rebalance state; ``prometheus_text`` and ``wsgi_app``.

Files are inspected with APSW only (never the stdlib ``sqlite3``: brief §3).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows, router_factory, run_cli

from shardlite import ConfigurationError, IdentityMismatch, Router, UnknownTenant
from shardlite.core.outbox import Event
from shardlite.services.metrics import prometheus_text, wsgi_app

SCHEMA = [
    "CREATE TABLE items(id INTEGER PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE applied(n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL)",
]
DEADLINE = 60.0


def mode(path: str | os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def add(router: Router, key: str, *bodies: str) -> None:
    with router.transaction(key) as tx:
        for body in bodies:
            tx.execute("INSERT INTO items(body) VALUES (?)", (body,))


def items(router: Router, key: str) -> list[str]:
    return [str(r[0]) for r in router.query(key, "SELECT body FROM items ORDER BY id")]


def meta(router: Router, key: str) -> tuple[str, str]:
    rows = internal_rows(router, key, "SELECT key, incarnation FROM _shardlite_meta")
    return str(rows[0][0]), str(rows[0][1])


def outbox_count(router: Router, key: str) -> int:
    return int(internal_rows(router, key, "SELECT count(*) FROM _shardlite_outbox")[0][0])


def node_files(router: Router) -> list[str]:
    out: list[str] = []
    for node in router.status()["nodes"]:
        for dirpath, _, filenames in os.walk(node["path"]):
            out += [os.path.join(dirpath, f) for f in filenames]
    return sorted(out)


_cli = run_cli


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    """``make(name="data", **kwargs)``: a Router on ``tmp_path/name`` (schema SCHEMA unless given)."""
    yield from router_factory(tmp_path, SCHEMA)

@pytest.fixture
def umask022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


class Counter:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, tx: Any, event: Event) -> None:
        tx.execute("INSERT INTO applied(event_id) VALUES (?)", (event.id,))
        self.seen.append(event.id)


# -- drop ----------------------------------------------------------------------------------------------------


def test_drop_deletes_the_file_with_wal_and_shm_and_records_a_tombstone(make: Callable[..., Router]) -> None:
    router = make(nodes=["n1", "n2"])
    for i in range(4):
        add(router, f"acct:{i}", f"row {i}")
    key = "acct:1"
    assert items(router, key) == ["row 1"]
    old = router.locate(key)
    old_incarnation = meta(router, key)[1]
    path = str(old.path)
    for suffix in ("", "-wal", "-shm"):  # the router has it open: WAL and SHM exist
        assert os.path.exists(path + suffix), suffix
    other = make()  # another client of the root with the tenant's location cached (read and write)
    assert items(other, key) == ["row 1"]
    add(other, key, "from other")
    counts = router.stats()["tenants_per_node"]
    bytes_before = router.stats()["bytes_per_node"][old.node]

    router.drop(key)

    for suffix in ("", "-wal", "-shm"):
        assert not os.path.exists(path + suffix), suffix
    record = router._store.meta.tenants.lookup(key)
    assert record is not None and record.state == "dropped" and record.generation == old.generation
    assert not router.exists(key)
    location = router.locate(key)
    assert location.state == "absent" and location.path is None
    assert key not in list(router.tenants())
    stats = router.stats()
    assert stats["tenants_per_node"][old.node] == counts[old.node] - 1
    assert sum(stats["tenants_per_node"].values()) == 3
    assert stats["bytes_per_node"][old.node] < bytes_before
    with pytest.raises(UnknownTenant):
        router.query(key, "SELECT 1")
    with pytest.raises(UnknownTenant):
        other.query(key, "SELECT body FROM items")  # its cached connection finds the drop
    with pytest.raises(UnknownTenant):
        router.drop(key)
    with pytest.raises(UnknownTenant):
        router.drop("acct:never")
    assert [items(router, f"acct:{i}") for i in (0, 2, 3)] == [["row 0"], ["row 2"], ["row 3"]]

    # a later write creates a new tenant: new generation, incarnation and path; the old data is gone
    add(other, key, "reborn")
    new = router.locate(key)
    assert new.state == "active" and new.generation > old.generation and new.path != old.path
    assert items(router, key) == ["reborn"]
    assert meta(router, key)[1] != old_incarnation
    assert not os.path.exists(path)


def test_events_for_a_dropped_destination_never_recreate_it(make: Callable[..., Router]) -> None:
    counter = Counter()
    router = make()
    router.handler("note")(counter)
    add(router, "dst:1", "x")
    router.drop("dst:1")
    with router.transaction("src:1") as tx:
        tx.emit("dst:1", "note", {"n": 1})
    router.relay.drain(timeout=DEADLINE)
    assert counter.seen == []
    assert not router.exists("dst:1")
    assert router.stats()["relay"]["dead_letters"] == 1
    assert outbox_count(router, "src:1") == 0


def test_cli_tenants_drop(make: Callable[..., Router], capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    add(router, "acct:1", "a")
    add(router, "acct:2", "b")
    path = str(router.locate("acct:1").path)
    code, out, err = _cli(capsys, "tenants", "drop", "acct:1", "--json", "--root", router.root)
    assert code == 0, err
    assert json.loads(out) == {"dropped": "acct:1"}
    assert not os.path.exists(path) and not os.path.exists(path + "-wal") and not os.path.exists(path + "-shm")
    code, out, err = _cli(capsys, "tenants", "--json", "--root", router.root)
    assert code == 0
    assert [json.loads(line)["key"] for line in out.splitlines()] == ["acct:2"]
    code, out, err = _cli(capsys, "tenants", "drop", "acct:1", "--root", router.root)
    assert code == 2 and "acct:1" in err and "Traceback" not in err
    assert not router.exists("acct:1") and items(router, "acct:2") == ["b"]


# -- export and import ---------------------------------------------------------------------------------------


def test_export_writes_a_standalone_private_sqlite_file(make: Callable[..., Router], tmp_path: Path,
                                                        umask022: None) -> None:
    router = make()
    add(router, "acct:1", "one", "two")
    exports = tmp_path / "exports"
    exports.mkdir(mode=0o700)
    target = exports / "acct1.db"
    info = router.export("acct:1", target)
    assert info["key"] == "acct:1" and info["file"] == os.fspath(target)
    assert info["size"] == os.path.getsize(target)
    assert mode(target) == 0o600
    assert sorted(os.listdir(exports)) == ["acct1.db"]  # no -wal, -journal or temporary left
    conn = apsw.Connection(os.fspath(target), flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT key FROM _shardlite_meta").fetchall() == [("acct:1",)]
        assert conn.execute("SELECT body FROM items ORDER BY id").fetchall() == [("one",), ("two",)]
    finally:
        conn.close()

    before = target.read_bytes()
    with pytest.raises(ConfigurationError):
        router.export("acct:1", target)  # never overwrites
    assert target.read_bytes() == before
    with pytest.raises(UnknownTenant):
        router.export("acct:404", exports / "missing.db")
    assert not (exports / "missing.db").exists()
    assert not router.exists("acct:404")
    assert items(router, "acct:1") == ["one", "two"]  # the live tenant is untouched


def test_export_leaves_the_target_directory_mode_alone(make: Callable[..., Router], tmp_path: Path,
                                                       umask022: None) -> None:
    router = make()
    add(router, "acct:1", "one")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    router.export("acct:1", shared / "acct1.db")
    assert mode(shared / "acct1.db") == 0o600
    assert mode(shared) == 0o755


def test_import_creates_a_new_tenant_and_never_replaces_a_live_one_without_force(
        make: Callable[..., Router], tmp_path: Path, umask022: None) -> None:
    router = make(nodes=["n1", "n2"])
    add(router, "acct:1", "one", "two")
    exported = tmp_path / "acct1.db"
    router.export("acct:1", exported)
    original = (router.locate("acct:1"), meta(router, "acct:1"))

    location = router.import_(exported, "acct:2")
    assert location == router.locate("acct:2")
    assert location.state == "active" and location.generation > original[0].generation
    assert items(router, "acct:2") == ["one", "two"]
    stored_key, incarnation = meta(router, "acct:2")
    assert stored_key == "acct:2" and incarnation != original[1][1]
    assert (router.locate("acct:1"), meta(router, "acct:1")) == original
    path = str(location.path)
    assert mode(path) == 0o600 and mode(os.path.dirname(path)) == 0o700
    assert sorted(os.listdir(tmp_path)) == ["acct1.db", "data"]  # the source file is left as it was

    add(router, "acct:2", "three")
    with pytest.raises(ConfigurationError, match="force"):
        router.import_(exported, "acct:2")
    assert items(router, "acct:2") == ["one", "two", "three"] and router.locate("acct:2") == location

    replaced = router.import_(exported, "acct:2", force=True)
    assert replaced.generation > location.generation and replaced.path != location.path
    assert items(router, "acct:2") == ["one", "two"]
    assert meta(router, "acct:2")[1] not in (incarnation, original[1][1])
    for suffix in ("", "-wal", "-shm"):
        assert not os.path.exists(path + suffix)

    # importing over a dropped key needs no force
    router.drop("acct:2")
    assert router.import_(exported, "acct:2").generation > replaced.generation
    assert items(router, "acct:2") == ["one", "two"]


def test_import_refuses_files_that_are_not_tenants(make: Callable[..., Router], tmp_path: Path) -> None:
    router = make()
    add(router, "acct:1", "one")
    plain = tmp_path / "plain.db"
    conn = apsw.Connection(os.fspath(plain))
    conn.execute("CREATE TABLE x(a); INSERT INTO x VALUES (1)")
    conn.close()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    files_before = node_files(router)
    for bad in (plain, garbage):
        with pytest.raises(IdentityMismatch):
            router.import_(bad, "acct:new")
        with pytest.raises(IdentityMismatch):
            router.import_(bad, "acct:1", force=True)
    assert not router.exists("acct:new")
    assert items(router, "acct:1") == ["one"]
    assert node_files(router) == files_before


def test_cli_import_of_a_missing_file_is_a_clean_error(make: Callable[..., Router], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    code, out, err = _cli(capsys, "tenants", "import", os.fspath(tmp_path / "nothing-here.db"), "acct:new",
                          "--root", router.root)
    assert code == 2 and "nothing-here.db" in err
    assert not router.exists("acct:new")


def test_import_keeps_outbox_events_only_for_the_same_key(make: Callable[..., Router], tmp_path: Path) -> None:
    counter = Counter()
    router = make()
    router.handler("note")(counter)
    with router.transaction("src:1") as tx:
        tx.execute("INSERT INTO items(body) VALUES ('x')")
        for n in range(3):
            tx.emit("dst:1", "note", {"n": n})
    exported = tmp_path / "src1.db"
    router.export("src:1", exported)
    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 3

    router.import_(exported, "src:copy", keep_events=True)  # another key: the original's events are not carried
    assert outbox_count(router, "src:copy") == 0
    router.import_(exported, "src:1", force=True)  # by default an imported file brings no pending event
    assert outbox_count(router, "src:1") == 0
    router.import_(exported, "src:1", force=True, keep_events=True)  # the same key, asked: carried, same identity
    assert outbox_count(router, "src:1") == 3
    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 3  # the destination had applied them already
    assert len(router.query("dst:1", "SELECT n FROM applied")) == 3
    assert outbox_count(router, "src:1") == 0


def test_cli_tenants_export_and_import(make: Callable[..., Router], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    add(router, "acct:1", "one")
    target = os.fspath(tmp_path / "acct1.db")
    code, out, err = _cli(capsys, "tenants", "export", "acct:1", target, "--json", "--root", router.root)
    assert code == 0, err
    info = json.loads(out)
    assert info["key"] == "acct:1" and info["file"] == target and info["size"] == os.path.getsize(target)
    code, out, err = _cli(capsys, "tenants", "export", "acct:1", target, "--root", router.root)
    assert code == 2 and "Traceback" not in err

    code, out, err = _cli(capsys, "tenants", "import", target, "acct:9", "--json", "--root", router.root)
    assert code == 0, err
    imported = json.loads(out)
    assert imported["imported"] == "acct:9" and imported["path"] == router.locate("acct:9").path
    assert items(router, "acct:9") == ["one"]
    add(router, "acct:9", "two")
    code, out, err = _cli(capsys, "tenants", "import", target, "acct:9", "--root", router.root)
    assert code == 2 and "force" in err
    assert items(router, "acct:9") == ["one", "two"]
    code, out, err = _cli(capsys, "tenants", "import", target, "acct:9", "--force", "--json", "--root", router.root)
    assert code == 0, err
    assert items(router, "acct:9") == ["one"]


# -- stats, status --json and Prometheus -------------------------------------------------------------------------


def test_stats_reports_tenants_bytes_connections_versions_relay_and_rebalance(make: Callable[..., Router]) -> None:
    router = make(nodes=["n1", "n2"], max_open=4)
    assert router.stats()["open_connections"] == 0
    keys = [f"acct:{i}" for i in range(10)]
    for key in keys[:3]:
        add(router, key, "x" * 1000)
    assert router.stats()["open_connections"] == 3
    for key in keys[3:]:
        add(router, key, "y")
        items(router, key)
    stats = router.stats()
    assert 1 <= stats["open_connections"] <= 4  # bounded by max_open, this router's own
    assert make("data").stats()["open_connections"] == 0  # another router: its own connections only

    per_node: dict[str, int] = {"n1": 0, "n2": 0}
    sizes: dict[str, int] = {"n1": 0, "n2": 0}
    for key in keys:
        location = router.locate(key)
        per_node[location.node] += 1
        sizes[location.node] += os.path.getsize(str(location.path))
    assert stats["tenants_per_node"] == per_node
    for node in ("n1", "n2"):
        assert stats["bytes_per_node"][node] >= sizes[node] > 0
    assert stats["schema_versions"] == {len(SCHEMA): 10}
    assert {n["name"] for n in stats["nodes"]} == {"n1", "n2"}
    assert stats["relay"] == {"pending": 0, "lag_seconds": 0.0, "dead_letters": 0, "topics": {}}
    assert stats["rebalance"]["state"] is None

    with router.transaction("acct:0") as tx:
        for n in range(3):
            tx.emit("acct:1", "note", {"n": n})
    relay = router.stats()["relay"]
    assert relay["pending"] == 3 and relay["topics"] == {"note": 3} and relay["lag_seconds"] >= 0
    router.handler("note")(Counter())
    router.relay.drain(timeout=DEADLINE)
    assert router.stats()["relay"]["pending"] == 0

    router.nodes.add("n3")
    assert router.stats()["bytes_per_node"]["n3"] == 0 and router.stats()["tenants_per_node"]["n3"] == 0
    plan_id, plan = router.rebalance.plan()
    rebalance = router.stats()["rebalance"]
    assert rebalance["plan"] == plan_id and rebalance["state"] == "planned"
    assert rebalance["steps"] == {"pending": len(plan.moves)} and plan.moves
    router.rebalance.apply()
    rebalance = router.stats()["rebalance"]
    assert rebalance["state"] == "done" and rebalance["steps"] == {"done": len(plan.moves)}
    assert router.stats()["tenants_per_node"]["n3"] == len(plan.moves)
    assert router.stats()["bytes_per_node"]["n3"] > 0


def test_cli_status_json_prints_the_stats(make: Callable[..., Router], capsys: pytest.CaptureFixture[str]) -> None:
    router = make(nodes=["n1", "n2"])
    for i in range(6):
        add(router, f"acct:{i}", "x")
    with router.transaction("acct:0") as tx:
        tx.emit("acct:1", "note", {})
    code, out, err = _cli(capsys, "status", "--json", "--root", router.root)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 1
    printed = json.loads(lines[0])
    stats = json.loads(json.dumps(router.stats()))  # the same normalisation (int keys become strings)
    for field in ("root", "nodes", "tenants_per_node", "schema_versions", "bytes_per_node", "rebalance",
                  "synchronous"):
        assert printed[field] == stats[field], field
    assert printed["open_connections"] == 0  # the CLI process's own router opened none
    assert printed["relay"]["pending"] == 1 and printed["relay"]["topics"] == {"note": 1}
    assert printed["relay"]["lag_seconds"] >= 0

    code, out, err = _cli(capsys, "status", "--root", router.root)
    assert code == 0 and "n1" in out and "n2" in out and "relay" in out


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? (\S+)$')


def _parse_prometheus(text: str) -> dict[str, float]:
    assert text.endswith("\n")
    typed: set[str] = set()
    helped: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            helped.add(line.split()[2])
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter"), line
            typed.add(name)
        else:
            match = _SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            assert name in typed and name in helped, f"{name} has no TYPE/HELP before its samples"
            series = line.rsplit(" ", 1)[0]
            assert series not in samples, f"duplicate series {series}"
            samples[series] = float(match.group(4))
    return samples


def test_prometheus_text_and_wsgi_app(make: Callable[..., Router]) -> None:
    router = make(nodes=["n1", "n2"])
    for i in range(5):
        add(router, f"acct:{i}", "x")
    with router.transaction("acct:0") as tx:
        tx.emit("acct:1", "note", {})
        tx.emit("acct:2", "note", {})
    router.stats()  # reading the relay's status opens the flagged source: warm it, so both calls agree
    samples = _parse_prometheus(prometheus_text(router))
    stats = router.stats()
    for node, count in stats["tenants_per_node"].items():
        assert samples[f'shardlite_tenants{{node="{node}"}}'] == count
        assert samples[f'shardlite_node_bytes{{node="{node}"}}'] > 0
    assert sum(v for k, v in samples.items() if k.startswith("shardlite_tenants{")) == 5
    assert samples["shardlite_open_connections"] == stats["open_connections"] > 0
    assert samples[f'shardlite_schema_tenants{{version="{len(SCHEMA)}"}}'] == 5
    assert samples["shardlite_relay_pending"] == 2
    assert samples["shardlite_relay_lag_seconds"] >= 0
    assert samples["shardlite_relay_dead_letters"] == 0

    app = wsgi_app(router)
    calls: list[tuple[str, list[tuple[str, str]]]] = []
    body = b"".join(app({"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics"},
                        lambda status, headers: calls.append((status, headers))))
    assert len(calls) == 1
    status, headers = calls[0]
    assert status == "200 OK"
    header = {k.lower(): v for k, v in headers}
    assert header["content-type"].startswith("text/plain")
    assert int(header["content-length"]) == len(body)
    served = _parse_prometheus(body.decode())
    assert set(served) == set(samples)
    assert served["shardlite_relay_pending"] == 2


def test_a_node_holding_only_tombstones_can_be_removed(make_router: Callable[..., Router]) -> None:
    """Gap F1: draining and removing a node whose only tenants were dropped failed with a raw
    ``apsw.ConstraintError`` (the tombstones' foreign key). The tombstone now moves to a remaining node:
    the key keeps its history (a re-creation gets the next epoch and a new generation)."""
    router = make_router(nodes=["n1", "n2"], schema=["CREATE TABLE t(v)"])
    key = next(k for k in (f"t:{i}" for i in range(1000)) if router.locate(k).node == "n2")
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO t VALUES (1)")
    first = router.locate(key)
    router.drop(key)
    router.nodes.drain("n2")
    router.nodes.remove("n2")
    assert [n.name for n in router.nodes.list()] == ["n1"]
    with router.transaction(key) as tx:
        assert tx.execute("SELECT count(*) FROM t").fetchall() == [(0,)]
    again = router.locate(key)
    assert (again.node, again.epoch) == ("n1", first.epoch + 1) and again.generation > first.generation
