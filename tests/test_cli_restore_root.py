"""`shardlite restore BACKUP --root NEW` into a root that does not exist yet (or is empty): the backup's
node layout, the global data and every tenant come back; a crafted node list is refused before anything
is made; a failed restore takes back what it made; a live root keeps its nodes."""

from __future__ import annotations

import errno
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_cli import EMAIL
from helpers_rebalance import gread
from helpers_routers import run_cli

import shardlite.services.restore
from shardlite import ConfigurationError, Router, ShardliteError
from shardlite.meta.choose import ENV_VAR
from shardlite.services import restore_layout
from shardlite.services.manifest import file_checksum, global_file
from shardlite.services.restore import RootRestore, restore_root
from shardlite.services.restore_layout import root_state

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


@pytest.mark.usefixtures("any_meta")  # both metadata backends (issue 15)
def test_a_lost_root_comes_back_whole_in_a_new_place(old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     second_meta: str | None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    old.lose()
    if second_meta is not None:  # the lost root's metadata is still in its database: the new root gets its own
        monkeypatch.setenv(ENV_VAR, second_meta)
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


# -- what the review of the first version found ------------------------------------------------------------------


def test_a_second_restore_into_the_same_root_is_refused_while_the_first_runs(
        old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The first restore holds the root's lock from before it makes anything until it ends: a second one
    (which would see a new, an empty or, once tenants are in, a live root) is refused with one line instead
    of filling the same root twice or taking back the first one's work."""
    old.lose()
    new = tmp_path / "new"
    first_in, release = threading.Event(), threading.Event()
    outcome: list[Any] = []

    def slow(key: str) -> None:
        first_in.set()
        assert release.wait(60)

    def first() -> None:
        try:
            outcome.append(restore_root(os.fspath(old.backup), os.fspath(new), progress=slow))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert first_in.wait(60)
        assert root_state(os.fspath(new)) == "live"  # a tenant is in: the CLI takes the live-root path
        for extra in ([], ["--force"]):
            code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new), *extra)
            assert code == 2 and "in use by another backup or restore" in err and len(err.splitlines()) == 1
    finally:
        release.set()
        thread.join()
    assert isinstance(outcome[0], RootRestore), outcome
    with Router(new, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert contents(router) == old.contents
        assert [g for (g,) in gread(os.fspath(new), "SELECT count(*) FROM _shardlite_tenants")] == [len(KEYS)]


def test_a_restore_never_removes_what_another_process_put_in_the_root(
        old: Old, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A router (not a restore: it takes no lock) writes into the new root while the restore sets its nodes
    up: the restore stops with one line and leaves the root, with that router's tenant, alone."""
    old.lose()
    new = tmp_path / "new"
    real = restore_layout.install_layout

    def meanwhile(*args: Any, **kwargs: Any) -> None:
        with Router(new, schema=SCHEMA) as other:
            with other.transaction("acct:other") as tx:
                tx.execute("INSERT INTO t(v) VALUES ('not the restore''s')")
        real(*args, **kwargs)

    monkeypatch.setattr(restore_layout, "install_layout", meanwhile)
    with pytest.raises(ConfigurationError, match="got tenants meanwhile"):
        restore_root(os.fspath(old.backup), os.fspath(new))
    monkeypatch.undo()
    with Router(new, schema=SCHEMA) as router:
        assert router.query("acct:other", "SELECT v FROM t") == [("not the restore's",)]


def test_the_app_global_schema_comes_back_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Indexes, views and triggers of the app's global tables come back with the tables and the version,
    so the app (which does not run its applied global_schema steps again) finds them."""
    schema = [*GLOBAL,
              "CREATE INDEX plans_by_price ON plans(price)",
              "CREATE TABLE audit(name TEXT, at INTEGER)",
              "CREATE VIEW cheap AS SELECT name FROM plans WHERE price < 10",
              "CREATE TRIGGER plans_audit AFTER INSERT ON plans BEGIN INSERT INTO audit VALUES (new.name, 1); END"]
    root, backup, new = tmp_path / "old", tmp_path / "backup", tmp_path / "new"
    with Router(root, global_schema=schema) as router:
        with router.globals.transaction() as tx:
            tx.execute("INSERT INTO plans VALUES ('free', 0), ('pro', 12)")
        router.backup(backup)

    def objects(at: Path) -> list[tuple[Any, ...]]:
        conn = apsw.Connection(os.fspath(at / "app_global.db"), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            return conn.execute("SELECT type, name, tbl_name, sql, (SELECT user_version FROM pragma_user_version) "
                                "FROM sqlite_schema ORDER BY name").fetchall()
        finally:
            conn.close()

    code, _, err = run_cli(capsys, "restore", os.fspath(backup), "--root", os.fspath(new))
    assert code == 0, err
    assert objects(new) == objects(root)
    with Router(new, global_schema=schema) as router:
        assert router.globals.query("SELECT name FROM cheap") == [("free",)]
        with router.globals.transaction() as tx:
            tx.execute("INSERT INTO plans VALUES ('team', 30)")
        assert router.globals.query("SELECT name FROM audit ORDER BY name") == [("free",), ("pro",), ("team",)]


def test_a_node_path_holding_files_is_refused(old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pointing a node at another root's node directory (or anything holding files) would mix tenants."""
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "ab").mkdir(parents=True)
    (elsewhere / "ab" / "someone.db").write_text("not ours")
    new = tmp_path / "new"
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new), "--node-path",
                           f"n1={elsewhere}")
    assert code == 2 and "already holds files" in err and len(err.splitlines()) == 1
    assert not new.exists() and (elsewhere / "ab" / "someone.db").read_text() == "not ours"


def test_a_failed_restore_empties_a_node_directory_that_was_there(
        old: Old, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills on the fifth tenant: the new root goes, the existing (empty) node directory stays
    empty, and the message does not claim that anything was kept."""
    empty = tmp_path / "empty-disk"
    empty.mkdir(mode=0o700)
    real, calls = shardlite.services.restore._install, []

    def filling(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(shardlite.services.restore, "_install", filling)
    new = tmp_path / "new"
    with pytest.raises(ShardliteError) as info:
        restore_root(os.fspath(old.backup), os.fspath(new), node_paths={"n1": os.fspath(empty), "ext": os.fspath(
            empty.parent / "ext-disk")})
    assert "No space left on device" in str(info.value) and "taken back" in str(info.value)
    assert "after restoring" not in str(info.value)
    assert not new.exists() and not (empty.parent / "ext-disk").exists()
    assert empty.is_dir() and os.listdir(empty) == []


def test_ctrl_c_during_a_restore_into_a_new_root_says_it_was_taken_back(
        old: Old, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = shardlite.services.restore._install, []

    def interrupted(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(shardlite.services.restore, "_install", interrupted)
    new = tmp_path / "new"
    code, _, err = run_cli(capsys, "restore", os.fspath(old.backup), "--root", os.fspath(new))
    assert code == 130 and "was taken back: run the command again" in err and len(err.splitlines()) == 1
    assert not new.exists()


@pytest.mark.usefixtures("any_meta")  # both metadata backends (issue 15)
def test_a_failed_restore_into_a_new_root_can_be_run_again(
        old: Old, tmp_path: Path, second_meta: str | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restore that fails after registering tenants takes back what it made in the metadata too (on
    PostgreSQL the rows live outside the root, so removing the root is not enough): the same command then
    succeeds and brings every tenant, account and app row back exactly once."""
    old.lose()
    if second_meta is not None:
        monkeypatch.setenv(ENV_VAR, second_meta)
    real, calls = shardlite.services.restore._install, []

    def filling(*args: Any) -> Any:
        calls.append(1)
        if len(calls) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args)

    monkeypatch.setattr(shardlite.services.restore, "_install", filling)
    new = tmp_path / "new"
    with pytest.raises(ShardliteError, match="taken back"):
        restore_root(os.fspath(old.backup), os.fspath(new))
    assert not new.exists()
    monkeypatch.setattr(shardlite.services.restore, "_install", real)
    done = restore_root(os.fspath(old.backup), os.fspath(new))
    assert sorted(done.tenants) == sorted(KEYS)
    with Router(new, schema=SCHEMA, global_schema=GLOBAL) as router:
        assert contents(router) == old.contents
        assert router.accounts.authenticate(EMAIL, PASSWORD) is not None
        assert router.globals.query("SELECT name, price FROM plans") == [("pro", 12)]
