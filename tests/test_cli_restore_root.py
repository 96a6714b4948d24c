"""`shardlite restore BACKUP --root NEW` into a root that does not exist yet (or is empty): the backup's
node layout, the global data and every tenant come back; a crafted node list is refused before anything
is made; a failed restore takes back what it made; a live root keeps its nodes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_cli import EMAIL
from helpers_rebalance import gread
from helpers_routers import run_cli

from shardlite import Router
from shardlite.manifest import file_checksum, global_file
from shardlite.restore import RootRestore, restore_root
from shardlite.restore_layout import root_state

SCHEMA = ["CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"]
GLOBAL = ["CREATE TABLE plans(name TEXT PRIMARY KEY, price INTEGER)"]
PASSWORD = "correct horse battery staple"
KEYS = [f"acct:{i}" for i in range(16)]


class Old:
    """A root with four nodes (one inside a subdirectory, one on another 'disk' outside the root, one
    draining), tenants, an account with a session and an app table, backed up; then removed."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "old"
        self.disk = tmp_path / "disk2"
        self.backup = tmp_path / "backup"
        with Router(self.root, nodes=["n1", "n2"], schema=SCHEMA, global_schema=GLOBAL) as router:
            router.nodes.add("deep", path=os.fspath(self.root / "disks" / "deep"))
            router.nodes.add("ext", path=os.fspath(self.disk / "ext"), weight=3)
            for key in KEYS:
                with router.transaction(key) as tx:
                    tx.execute("INSERT INTO t(v) VALUES (?)", (f"{key} row",))
            uid = router.accounts.register(EMAIL, password=PASSWORD, name="Someone")
            self.token = router.sessions.create(uid, ttl=3600)
            with router.globals.transaction() as tx:
                tx.execute("INSERT INTO plans VALUES ('pro', 12)")
            router.nodes.drain("n2")  # its tenants stay there until a rebalance
            self.placement = {key: router.locate(key).node for key in KEYS}
            self.contents = contents(router)
            router.backup(self.backup)
        assert {"n1", "n2", "deep", "ext"} <= set(self.placement.values()), "spread the tenants over every node"

    def lose(self) -> None:
        """The old machine is gone."""
        shutil.rmtree(self.root)
        shutil.rmtree(self.disk)


def contents(router: Router) -> dict[str, list[tuple[Any, ...]]]:
    return {key: router.query(key, "SELECT id, v FROM t ORDER BY id") for key in router.tenants()}


@pytest.fixture
def old(tmp_path: Path) -> Old:
    return Old(tmp_path)


def nodes_of(root: Path) -> dict[str, tuple[str, int, str]]:
    """name -> (path as the catalog stores it, weight, state), read directly from global.db."""
    return {name: (path, weight, state) for name, path, weight, state in
            gread(os.fspath(root), "SELECT name, path, weight, state FROM _shardlite_nodes")}


def test_a_lost_root_comes_back_whole_in_a_new_place(old: Old, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    old.lose()
    new = tmp_path / "srv" / "new"
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["created"] is True and report["root"] == os.fspath(new)
    assert sorted(report["restored"]) == sorted(KEYS)
    assert {n["name"]: (n["path"], n["weight"], n["state"], n["was"]) for n in report["nodes"]} == {
        "n1": (os.fspath(new / "n1"), 1, "active", "n1"),
        "n2": (os.fspath(new / "n2"), 1, "draining", "n2"),
        "deep": (os.fspath(new / "disks" / "deep"), 1, "active", os.path.join("disks", "deep")),
        "ext": (os.fspath(new / "ext"), 3, "active", os.fspath(old.disk / "ext")),  # off the old root
    }
    assert report["globals"] == {"_shardlite_accounts": 1, "_shardlite_credentials": 1, "_shardlite_sessions": 1,
                                 "plans": 1}
    assert nodes_of(new) == {"n1": ("n1", 1, "active"), "n2": ("n2", 1, "draining"),
                             "deep": (os.path.join("disks", "deep"), 1, "active"), "ext": ("ext", 3, "active")}
    assert not old.disk.exists() and not old.root.exists()

    with Router(new, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert contents(router) == old.contents
        for key in KEYS:  # on its node of the backup, except those of the draining node
            node = router.locate(key).node
            assert node == old.placement[key] if old.placement[key] != "n2" else node != "n2"
        uid = router.accounts.authenticate(EMAIL, PASSWORD)
        session = router.sessions.resolve(old.token)
        assert session is not None and session.account_id == uid
        assert router.globals.query("SELECT name, price FROM plans") == [("pro", 12)]
        with router.transaction("acct:0") as tx:  # and it takes writes
            tx.execute("INSERT INTO t(v) VALUES ('after')")
    assert (os.stat(new / "ext").st_mode & 0o777) == 0o700


def test_node_paths_put_nodes_elsewhere_and_the_human_report_says_where(
        old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one table row per node, paths unfolded
    old.lose()
    new, disk3 = tmp_path / "new", tmp_path / "disk3"
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new),
                             "--node-path", f"ext={disk3 / 'ext'}", "--node-path", f"n1={new / 'first'}")
    assert code == 0, err
    stored = nodes_of(new)
    assert stored["ext"] == (os.fspath(disk3 / "ext"), 3, "active") and stored["n1"] == ("first", 1, "active")
    assert f"created data root {new} with the backup's node layout (4 nodes)" in out
    assert os.fspath(disk3 / "ext") in out and f"restored {len(KEYS)} tenants" in out
    assert "restored the global data (rows: accounts 1, credentials 1, sessions 1, app table plans 1)" in out
    with Router(new, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert contents(router) == old.contents
        assert any(router.locate(key).path.startswith(os.fspath(disk3)) for key in KEYS)


def test_one_key_into_a_new_root_brings_the_layout_and_the_global_data(
        old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = tmp_path / "new"
    done = restore_root(os.fspath(old.backup), os.fspath(new), keys=["acct:3"])
    assert isinstance(done, RootRestore) and done.tenants == ["acct:3"] and done.globals["_shardlite_accounts"] == 1
    with Router(new, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert list(router.tenants()) == ["acct:3"] and contents(router) == {"acct:3": old.contents["acct:3"]}


def test_an_empty_root_is_filled_and_a_live_one_keeps_its_nodes(old: Old, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    code, _, err = run_cli(capsys, "init", "--root", os.fspath(empty))
    assert code == 0, err
    assert root_state(os.fspath(empty)) == "empty"
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(empty), "--json")
    assert code == 0, err
    assert json.loads(out)["created"] is False
    assert set(nodes_of(empty)) == {"n1", "n2", "deep", "ext"} and (empty / "ext").is_dir()
    with Router(empty, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert contents(router) == old.contents

    live = tmp_path / "live"
    with Router(live, nodes=["a", "b"], schema=SCHEMA) as router:
        with router.transaction("other:1") as tx:
            tx.execute("INSERT INTO t(v) VALUES ('mine')")
    assert root_state(os.fspath(live)) == "live"
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(live), "--node-path",
                           "n1=/tmp/x")
    assert code == 2 and "--node-path applies to a new root" in err
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(live), "--json")
    assert code == 0, err
    assert sorted(json.loads(out)["restored"]) == sorted(KEYS)
    assert set(nodes_of(live)) == {"a", "b"}  # today's behaviour: the live root's own nodes
    with Router(live, schema=SCHEMA) as router:
        assert router.query("other:1", "SELECT v FROM t") == [("mine",)]
        assert router.accounts.by_email(EMAIL) is None  # global data only with --globals (into no tenants)


# -- a crafted node list ----------------------------------------------------------------------------------------


def craft_global(backup: Path, *statements: str) -> None:
    """Run ``statements`` on the backup's global copy (CHECK constraints off) and give it the name and
    checksum a backup would: only the node list is wrong, never the manifest."""
    manifest = json.loads((backup / "manifest.json").read_text())
    path = backup / manifest["global"]["file"]
    conn = apsw.Connection(os.fspath(path))
    try:
        conn.execute("PRAGMA ignore_check_constraints = 1")
        for sql in statements:
            conn.execute(sql)
    finally:
        conn.close()
    checksum = file_checksum(os.fspath(path))
    path.rename(backup / global_file(checksum))
    manifest["global"] = {"file": global_file(checksum), "checksum": checksum}
    (backup / "manifest.json").write_text(json.dumps(manifest))


REFUSED = {
    "overlapping nodes": (["UPDATE _shardlite_nodes SET path = 'n1/inner' WHERE name = 'n2'"], "overlap"),
    "a node on the root's own files": (["UPDATE _shardlite_nodes SET path = 'global.db' WHERE name = 'n1'"],
                                       "own files"),
    "a name with a newline": (["UPDATE _shardlite_nodes SET name = 'n1' || char(10) WHERE name = 'n1'"],
                              "not a node name"),
    "a name with markup": (["UPDATE _shardlite_nodes SET name = '[bold]x' WHERE name = 'n1'"], "not a node name"),
    "a path with an escape": (["UPDATE _shardlite_nodes SET path = 'n1' || char(27) || '[2J' WHERE name = 'n1'"],
                              "the path"),
    "weight 0": (["UPDATE _shardlite_nodes SET weight = 0 WHERE name = 'n1'"], "integrity_check"),  # CHECK
    "a text weight": (["UPDATE _shardlite_nodes SET weight = 'heavy' WHERE name = 'n1'"], "weight"),
    "a huge weight": (["UPDATE _shardlite_nodes SET weight = 1 << 40 WHERE name = 'n1'"], "weight"),
    "an unknown state": (["UPDATE _shardlite_nodes SET state = 'gone' WHERE name = 'n1'"], "integrity_check"),
    "no active node": (["UPDATE _shardlite_nodes SET state = 'draining'"], "no active node"),
    "no node list": (["DROP TABLE _shardlite_nodes"], "node list"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_crafted_node_list_is_refused_before_anything_is_made(case: str, old: Old, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    statements, said = REFUSED[case]
    craft_global(old.backup, *statements)
    new = tmp_path / "new"
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new))
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and said in err, err
    assert "Traceback" not in err and "\x1b" not in err
    assert not new.exists()


@pytest.mark.parametrize("path", ["../../escaped", "/etc/shardlite-node", "{old}/n1"])
def test_a_node_path_off_the_old_root_lands_under_the_new_root(path: str, old: Old, tmp_path: Path) -> None:
    craft_global(old.backup, f"UPDATE _shardlite_nodes SET path = '{path.format(old=old.root)}' WHERE name = 'n1'")
    new = tmp_path / "new"
    done = restore_root(os.fspath(old.backup), os.fspath(new))
    assert {plan.name: plan.path for plan in done.nodes}["n1"] == os.fspath(new / "n1")
    assert not (tmp_path / "escaped").exists() and not os.path.exists("/etc/shardlite-node")


@pytest.mark.parametrize("node_path, said", [
    ("nope={tmp}/x", "has no node 'nope'"),
    ("ext", "NAME=DIR"),
    ("n1={tmp}", "holds the data root"),
    ("n1={backup}/inside", "overlaps the backup"),
    ("n1={tmp}/file", "not a directory"),
])
def test_bad_node_paths_are_refused_before_anything_is_made(node_path: str, said: str, old: Old, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a directory")
    new = tmp_path / "new"
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new), "--node-path",
                             node_path.format(tmp=tmp_path, backup=old.backup))
    assert code == 2 and said in err and len(err.splitlines()) == 1, err
    assert not new.exists()


def test_a_root_overlapping_the_backup_is_refused(old: Old, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(old.backup / "new"))
    assert code == 2 and "overlap" in err
    assert not (old.backup / "new").exists()


# -- failures take back what they made ------------------------------------------------------------------------


def damage_a_copy(backup: Path) -> None:
    manifest = json.loads((backup / "manifest.json").read_text())
    copy = backup / manifest["tenants"]["acct:7"]["file"]
    data = bytearray(copy.read_bytes())
    data[len(data) // 2] ^= 0x01
    copy.write_bytes(bytes(data))


def test_a_failed_restore_removes_the_new_root_and_the_node_directories_it_made(
        old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    damage_a_copy(old.backup)
    new, disk3 = tmp_path / "new", tmp_path / "disk3"
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new), "--node-path",
                           f"ext={disk3 / 'deeper' / 'ext'}")
    assert code == 2 and "checksum" in err and len(err.splitlines()) == 1
    assert not new.exists() and not disk3.exists()

    existing = tmp_path / "existing"  # an existing directory that is no root yet: it stays, emptied of ours
    existing.mkdir(mode=0o700)
    (existing / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(existing))
    assert code == 2 and "checksum" in err
    assert sorted(os.listdir(existing)) == ["notes.txt"]


def test_a_failed_restore_leaves_an_empty_root_empty(old: Old, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    with Router(empty, global_schema=GLOBAL):
        pass
    good = tmp_path / "good-backup"
    shutil.copytree(old.backup, good)
    damage_a_copy(old.backup)
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(empty))
    assert code == 2 and "checksum" in err
    assert root_state(os.fspath(empty)) == "empty"
    assert nodes_of(empty) == {"n1": ("n1", 1, "active")} and sorted(os.listdir(empty / "n1")) == []
    assert not (empty / "ext").exists() and not (empty / "disks").exists()
    code, out, err = run_cli(capsys, "restore", os.fspath(good), "--root", os.fspath(empty), "--json")
    assert code == 0, err
    with Router(empty, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert contents(router) == old.contents and router.accounts.by_email(EMAIL) is not None


def test_a_bad_manifest_makes_nothing(old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (old.backup / "manifest.json").write_text('{"format": 1, "tenants": {}, "global": {"file": "x"')
    new = tmp_path / "new"
    code, out, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new))
    assert code == 2 and "not a valid backup manifest" in err and len(err.splitlines()) == 1
    assert not new.exists()
