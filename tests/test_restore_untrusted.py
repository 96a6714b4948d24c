"""Backups and manifests are untrusted (rule 14): a restore validates the whole manifest and every copy it
restores before anything is registered, and never reads or changes a file outside the backup.

A victim root sits next to the backup: a closed data root whose tenants still have their ``-wal`` (as a
closed Router leaves them). Each crafted manifest points at it (absolute path, ``..``, a symlinked copy
or folder) or is malformed (wrong digest, bad keys, wrong types, not JSON); each is refused whole, with
one line on the CLI, while nothing is registered in the restoring root, and the victim's files (names,
sizes, modification times, ``-wal`` presence) and the backup directory stay exactly as they were.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows, router_factory, run_cli

from shardlite import ConfigurationError, Router, ShardliteError
from shardlite.core.keys import key_digest
from shardlite.services import backup as backup_mod

SCHEMA = ["CREATE TABLE ledger(id INTEGER PRIMARY KEY, note TEXT)"]
GLOBAL_SCHEMA = ["CREATE TABLE plans(name TEXT PRIMARY KEY, price INTEGER)"]
KEYS = ["acct:0", "acct:1", "acct:2"]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    yield from router_factory(tmp_path, SCHEMA)


def ledger(router: Router, key: str) -> list[str]:
    return [str(r[0]) for r in router.query(key, "SELECT note FROM ledger ORDER BY id")]


def tree(top: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``top``: relative path -> (inode, size, mtime)."""
    out = {}
    for dirpath, _, names in os.walk(top):
        for name in names:
            info = os.lstat(os.path.join(dirpath, name))
            out[os.path.relpath(os.path.join(dirpath, name), top)] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return out


class Scene:
    """A backup of three tenants, a victim root beside it, and a fresh root to restore into."""

    def __init__(self, make: Callable[..., Router], tmp_path: Path) -> None:
        source = make("source")
        for i, key in enumerate(KEYS):
            with source.transaction(key) as tx:
                tx.execute("INSERT INTO ledger(note) VALUES (?)", (f"backed up {i}",))
        self.dest = tmp_path / "backup"
        self.manifest = source.backup(self.dest)
        source.close()
        victim = make("victim")
        with victim.transaction("acct:v") as tx:
            tx.execute("INSERT INTO ledger(note) VALUES ('the victim''s live data')")
        self.victim_file = Path(str(victim.locate("acct:v").path))
        self.victim_root = Path(victim.root)
        victim.close()
        assert Path(f"{self.victim_file}-wal").exists()  # a closed root keeps its logs
        self.victim_before = tree(self.victim_root)
        self.victim_sum = backup_mod.file_checksum(os.fspath(self.victim_file))
        self.fresh = make("fresh")
        self.generations = self.fresh._store.meta.globaldb.read("SELECT count(*) FROM _shardlite_generations")

    def write(self, manifest: Any) -> None:
        text = manifest if isinstance(manifest, (str, bytes)) else json.dumps(manifest)
        data = text.encode("utf-8") if isinstance(text, str) else text
        (self.dest / "manifest.json").write_bytes(data)
        self.backup_before = tree(self.dest)

    def copy(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.manifest))

    def unchanged(self) -> None:
        assert list(self.fresh.tenants()) == []
        assert self.fresh._store.meta.globaldb.read("SELECT count(*) FROM _shardlite_generations") == self.generations
        nodes = [n["path"] for n in self.fresh.status()["nodes"]]
        assert [f for n in nodes for f in tree(Path(n))] == []
        assert tree(self.victim_root) == self.victim_before
        assert tree(self.dest) == self.backup_before

    def refused(self, error: type[Exception] = ShardliteError, match: str = "", **kwargs: Any) -> None:
        with pytest.raises(error, match=match):
            self.fresh.restore(self.dest, **kwargs)
        self.unchanged()


@pytest.fixture
def scene(make: Callable[..., Router], tmp_path: Path) -> Scene:
    return Scene(make, tmp_path)


def place(scene: Scene, key: str, source: Path) -> dict[str, Any]:
    """Put a copy of ``source`` where a backup would keep ``key``'s copy; return the entry naming it."""
    checksum = backup_mod.file_checksum(os.fspath(source))
    digest = key_digest(key)
    rel = f"tenants/{digest[:2]}/{digest}.{checksum}.db"
    (scene.dest / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, scene.dest / rel)
    entry = dict(scene.manifest["tenants"]["acct:1"])
    entry.update(file=rel, checksum=checksum)
    return entry


# -- paths ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["absolute", "dotdot", "dotdot inside tenants"])
def test_a_file_outside_the_backup_is_never_read_nor_changed(scene: Scene, how: str) -> None:
    manifest = scene.copy()
    entry = manifest["tenants"]["acct:1"]
    relative = os.path.relpath(scene.victim_file, scene.dest)
    entry["file"] = {"absolute": os.fspath(scene.victim_file), "dotdot": relative,
                     "dotdot inside tenants": "tenants/../" + relative}[how]
    entry["checksum"] = scene.victim_sum
    scene.write(manifest)
    scene.refused(ConfigurationError, "tenants\\['acct:1'\\].file")
    scene.refused(ConfigurationError, "file", keys=["acct:0"])  # refused whole, even for another key
    for name in ("global", "app_global"):
        manifest = scene.copy()
        manifest[name] = {"file": os.fspath(scene.victim_root / f"{name}.db"), "checksum": scene.victim_sum}
        scene.write(manifest)
        with pytest.raises(ConfigurationError, match=f"{name}.file"):
            backup_mod.restore_globals(scene.fresh._store, os.fspath(scene.dest))
        scene.unchanged()


def test_symlinks_in_the_backup_are_refused(scene: Scene, tmp_path: Path) -> None:
    # a copy's name holding a symlink to the victim's live file
    manifest = scene.copy()
    digest = key_digest("acct:1")
    rel = f"tenants/{digest[:2]}/{digest}.{scene.victim_sum}.db"
    os.symlink(scene.victim_file, scene.dest / rel)
    manifest["tenants"]["acct:1"].update(file=rel, checksum=scene.victim_sum)
    scene.write(manifest)
    scene.refused(ShardliteError, "symlink")
    os.unlink(scene.dest / rel)
    # a folder of the backup replaced by a symlink to a folder elsewhere
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(scene.dest / "tenants" / digest[:2], elsewhere)
    shutil.rmtree(scene.dest / "tenants" / digest[:2])
    os.symlink(elsewhere, scene.dest / "tenants" / digest[:2])
    scene.write(scene.manifest)
    scene.refused(ShardliteError, "symlink", keys=["acct:1"])
    # the manifest itself as a symlink
    os.unlink(scene.dest / "tenants" / digest[:2])
    shutil.copytree(elsewhere, scene.dest / "tenants" / digest[:2])
    real = tmp_path / "manifest-elsewhere.json"
    real.write_text(json.dumps(scene.manifest))
    (scene.dest / "manifest.json").unlink()
    os.symlink(real, scene.dest / "manifest.json")
    scene.backup_before = tree(scene.dest)
    scene.refused(ConfigurationError, "regular file|symlink|cannot be read")


# -- keys and digests -----------------------------------------------------------------------------------------------


def test_an_entry_naming_another_tenants_copy_is_refused(scene: Scene) -> None:
    manifest = scene.copy()
    manifest["tenants"]["acct:1"] = dict(manifest["tenants"]["acct:2"])  # acct:2's file under acct:1's key
    scene.write(manifest)
    scene.refused(ConfigurationError, "tenants\\['acct:1'\\].file")
    # a copy named by the right digest that holds another tenant
    manifest = scene.copy()
    manifest["tenants"]["acct:1"] = place(scene, "acct:1", scene.dest / scene.manifest["tenants"]["acct:2"]["file"])
    scene.write(manifest)
    scene.refused(ShardliteError, "holds tenant 'acct:2', not 'acct:1'")


@pytest.mark.parametrize("key", ["acct:\u202e1", "acct:e\u0301", "acct:\x00", ""], ids=["RLO", "NFD", "NUL", "empty"])
def test_a_bad_key_refuses_the_whole_manifest(scene: Scene, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = scene.copy()
    source = scene.dest / scene.manifest["tenants"]["acct:1"]["file"]
    entry = place(scene, key, source) if key else dict(manifest["tenants"]["acct:1"])
    manifest["tenants"][key] = entry  # a valid copy, correctly named, under a bad key
    scene.write(manifest)
    scene.refused(ConfigurationError, "key")
    scene.refused(ConfigurationError, "key", keys=["acct:0"])
    code, out, err = run_cli(capsys, "restore", os.fspath(scene.dest), "--root", scene.fresh.root)
    assert code == 2 and "key" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    scene.unchanged()


def test_every_target_prefix_needs_a_schema_before_anything_is_registered(make: Callable[..., Router],
                                                                          tmp_path: Path) -> None:
    source = make("source")
    for key in ("acct:1", "acct:2", "zzz:1"):
        with source.transaction(key) as tx:
            tx.execute("INSERT INTO ledger(note) VALUES ('x')")
    source.backup(tmp_path / "backup")
    fresh = make("fresh", schema={"acct": SCHEMA})  # no schema for the prefix "zzz"
    with pytest.raises(ConfigurationError, match="zzz"):
        fresh.restore(tmp_path / "backup")
    assert list(fresh.tenants()) == []
    with pytest.raises(ConfigurationError, match="zzz"):
        fresh.restore(tmp_path / "backup", keys=["acct:1"], as_key="zzz:9")
    assert list(fresh.tenants()) == []
    assert sorted(fresh.restore(tmp_path / "backup", keys=["acct:1", "acct:2"])) == ["acct:1", "acct:2"]


# -- types and syntax -------------------------------------------------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(manifest: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target = manifest
        for part in parents:
            target = target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return change


_DELETE = object()
TYPE_CHANGES = {
    "generation as text": ("tenants/acct:1/generation", "1"),
    "generation as bool": ("tenants/acct:1/generation", True),
    "negative size": ("tenants/acct:1/size", -1),
    "float size": ("tenants/acct:1/size", 1.5),
    "checksum as int": ("tenants/acct:1/checksum", 123),
    "checksum upper case": ("tenants/acct:1/checksum", "A" * 32),
    "node missing": ("tenants/acct:1/node", _DELETE),
    "an extra field": ("tenants/acct:1/evil", "x"),
    "short signature": ("tenants/acct:1/signature", [1, 2, 3, 4]),
    "signature of text": ("tenants/acct:1/signature", ["1", 2, 3, 4, 5]),
    "entry not an object": ("tenants/acct:1", ["tenants/x.db"]),
    "tenants a list": ("tenants", []),
    "format as text": ("format", "1"),
    "format 2": ("format", 2),
    "format missing": ("format", _DELETE),
    "global missing": ("global", _DELETE),
    "global file renamed": ("global/file", "global.db"),
    "app_global file renamed": ("app_global/file", "app_global.db"),
    "app_global file in tenants": ("app_global/file", "tenants/00/app_global.db"),
    "app_global not an object": ("app_global", "app_global.db"),
    "root not text": ("root", 5),
    "unknown top field": ("extra", {}),
}


@pytest.mark.parametrize("change", sorted(TYPE_CHANGES))
def test_a_manifest_of_the_wrong_shape_is_refused_whole(scene: Scene, change: str) -> None:
    manifest = scene.copy()
    _set(*TYPE_CHANGES[change])(manifest)
    scene.write(manifest)
    scene.refused(ConfigurationError, "not a valid backup manifest")
    scene.refused(ConfigurationError, "not a valid backup manifest", keys=["acct:0"])


NOT_JSON = {
    "empty": b"",
    "truncated": b'{"format": 1, "tenants": {',
    "text": b"not json at all",
    "not utf-8": b"\xff\xfe\x00{",
    "a list": b"[]",
    "NaN": b'{"format": 1, "created": NaN, "tenants": {}, "global": {}}',
    "duplicate field": b'{"format": 1, "format": 1, "tenants": {}, "global": {}}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
}


@pytest.mark.parametrize("what", sorted(NOT_JSON))
def test_a_manifest_that_is_not_json_is_refused_with_one_line(scene: Scene, what: str,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    scene.write(NOT_JSON[what])
    scene.refused(ConfigurationError, "not a valid backup manifest")
    code, out, err = run_cli(capsys, "restore", os.fspath(scene.dest), "--globals", "--root", scene.fresh.root)
    assert code == 2 and "not a valid backup manifest" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    scene.unchanged()


def test_a_damaged_destination_manifest_stops_a_backup_before_it_writes(scene: Scene, make: Callable[..., Router],
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    scene.write(NOT_JSON["truncated"])
    source = make("source")
    with pytest.raises(ConfigurationError, match="not a valid backup manifest"):
        source.backup(scene.dest)
    assert tree(scene.dest) == scene.backup_before
    code, _, err = run_cli(capsys, "backup", os.fspath(scene.dest), "--root", source.root)
    assert code == 2 and "move it away" in err and "Traceback" not in err
    assert tree(scene.dest) == scene.backup_before


# -- contents --------------------------------------------------------------------------------------------------------


def test_a_copy_with_a_crafted_schema_is_refused_before_anything_is_registered(scene: Scene, tmp_path: Path) -> None:
    crafted = tmp_path / "crafted.db"
    shutil.copyfile(scene.dest / scene.manifest["tenants"]["acct:2"]["file"], crafted)
    conn = apsw.Connection(os.fspath(crafted))
    for _ in conn.execute("CREATE TABLE loot(p); CREATE TRIGGER spy AFTER INSERT ON _shardlite_feed "
                          "BEGIN INSERT INTO loot VALUES (new.payload); END"):
        pass
    conn.close()
    manifest = scene.copy()
    manifest["tenants"]["acct:2"] = place(scene, "acct:2", crafted)
    scene.write(manifest)
    scene.refused(ShardliteError, "trigger spy on _shardlite_feed")  # acct:0 and acct:1 were fine: not restored


def test_a_global_copy_touching_internal_tables_is_refused(make: Callable[..., Router], tmp_path: Path) -> None:
    source = make("source", global_schema=GLOBAL_SCHEMA)
    source.accounts.register("a@example.org", name="A")
    dest = tmp_path / "backup"
    manifest = source.backup(dest)
    source.close()
    crafted = dest / manifest["global"]["file"]
    conn = apsw.Connection(os.fspath(crafted))
    for _ in conn.execute("CREATE TABLE steal(account INTEGER REFERENCES _shardlite_accounts(id))"):
        pass
    conn.close()
    checksum = backup_mod.file_checksum(os.fspath(crafted))
    os.rename(crafted, dest / f"global.{checksum}.db")
    manifest["global"] = {"file": f"global.{checksum}.db", "checksum": checksum}
    (dest / "manifest.json").write_text(json.dumps(manifest))
    fresh = make("fresh", global_schema=GLOBAL_SCHEMA)
    with pytest.raises(ShardliteError, match="table steal references _shardlite_accounts"):
        backup_mod.restore_globals(fresh._store, os.fspath(dest))
    assert fresh.accounts.by_email("a@example.org") is None
    assert fresh.globals.query("SELECT name FROM sqlite_schema WHERE name = 'steal'") == []


def test_a_restore_never_writes_into_the_backup_directory(scene: Scene) -> None:
    scene.write(scene.manifest)
    assert sorted(scene.fresh.restore(scene.dest)) == KEYS
    assert tree(scene.dest) == scene.backup_before  # no -journal, -wal or -shm, nothing rewritten
    assert [ledger(scene.fresh, k) for k in KEYS] == [[f"backed up {i}"] for i in range(3)]
    assert tree(scene.victim_root) == scene.victim_before


def test_events_carried_by_a_restore_are_validated(scene: Scene, tmp_path: Path) -> None:
    crafted = tmp_path / "events.db"
    shutil.copyfile(scene.dest / scene.manifest["tenants"]["acct:1"]["file"], crafted)
    conn = apsw.Connection(os.fspath(crafted))
    conn.execute("INSERT INTO _shardlite_outbox(seq, dest, topic, payload, created) "
                 "VALUES (7, 'acct:\u202evictim', 'note', '{}', 0)")
    conn.close()
    manifest = scene.copy()
    manifest["tenants"]["acct:1"] = place(scene, "acct:1", crafted)
    scene.write(manifest)
    scene.refused(ShardliteError, "row 1 of _shardlite_outbox is invalid.*U\\+202E")
    # under another key the events are dropped, so the copy restores (its numbers are still kept)
    assert scene.fresh.restore(scene.dest, keys=["acct:1"], as_key="acct:9") == ["acct:9"]
    assert internal_rows(scene.fresh, "acct:9", "SELECT count(*) FROM _shardlite_outbox") == [(0,)]
    assert internal_rows(scene.fresh, "acct:9", "SELECT last_seq FROM _shardlite_relay") == [(7,)]


@pytest.mark.parametrize("sql", ["CREATE TABLE plans(a); DROP TABLE marker", "CREATE TABLE plans(a); CREATE TABLE b(c)",
                                 "CREATE TABLE other(a)", "DELETE FROM marker"])
def test_an_app_global_table_is_created_only_from_one_create_table_statement(sql: str) -> None:
    """The app's global tables missing from the live DB are created from the copy's definitions: each must
    be exactly one CREATE TABLE of that name (SQLite itself refuses to load most other texts)."""
    from shardlite.meta.sqlite.app_globals import _checked

    scratch = apsw.Connection(":memory:")
    try:
        scratch.execute("CREATE TABLE marker(x); INSERT INTO marker VALUES (1)")
        with pytest.raises(ShardliteError, match="not one CREATE TABLE"):
            _checked(scratch, "table", "plans", sql, "copy")
        assert scratch.execute("SELECT name FROM sqlite_schema").fetchall() == [("marker",)]
        assert scratch.execute("SELECT x FROM marker").fetchall() == [(1,)]  # nothing of it ran, or it was undone
        assert _checked(scratch, "table", "plans", "CREATE TABLE plans(a UNIQUE, b REFERENCES elsewhere(x))", "copy")
    finally:
        scratch.close()
