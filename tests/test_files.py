"""Private files (rule 6) and the identity check (rule 3). Files are inspected with APSW only.

Directories shardlite creates are 0700; directories that already exist (a root, a node path) keep their
mode, with a :class:`~shardlite.files.engine.DirectoryModeWarning` when they are open to others."""

from __future__ import annotations

import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterator
from typing import Any

import apsw
import pytest

from shardlite import DirectoryModeWarning, IdentityMismatch, Router, ShardliteError
from shardlite.files.engine import ensure_private_dir

SCHEMA = ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _all_entries(top: str) -> tuple[list[str], list[str]]:
    dirs, files = [top], []
    for dirpath, dirnames, filenames in os.walk(top):
        dirs += [os.path.join(dirpath, d) for d in dirnames]
        files += [os.path.join(dirpath, f) for f in filenames]
    return dirs, files


@pytest.mark.parametrize("umask", [0o000, 0o022], indirect=True, ids=["umask000", "umask022"])
def test_directories_0700_and_db_files_0600_while_open(make_router: Any, root: str, umask: int) -> None:
    router = make_router(nodes=["n1", "n2"], schema=SCHEMA)
    keys = [f"user:{i}" for i in range(12)]
    for key in keys:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('x')")
        assert router.query(key, "SELECT count(*) FROM notes") == [(1,)]
    assert {router.locate(k).node for k in keys} == {"n1", "n2"}

    # while the router is open, the WAL and SHM files exist and are private too
    for base in [os.path.join(root, "global.db")] + [str(router.locate(k).path) for k in keys]:
        for suffix in ("", "-wal", "-shm"):
            assert os.path.exists(base + suffix), base + suffix
            assert mode(base + suffix) == 0o600, (base + suffix, oct(mode(base + suffix)))

    dirs, files = _all_entries(root)
    assert mode(root) == 0o700
    for node in ("n1", "n2"):
        assert mode(os.path.join(root, node)) == 0o700
    for d in dirs:
        assert mode(d) == 0o700, (d, oct(mode(d)))
    assert files
    for f in files:
        assert mode(f) == 0o600, (f, oct(mode(f)))

    router.close()
    dirs, files = _all_entries(root)
    for f in files:
        assert mode(f) == 0o600, (f, oct(mode(f)))
    for d in dirs:
        assert mode(d) == 0o700


def test_recreated_tenant_file_is_private(make_router: Any) -> None:
    old = os.umask(0)
    try:
        router = make_router(schema=SCHEMA)
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('a')")
        router.drop("user:1")
        with router.transaction("user:1") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('b')")
        path = str(router.locate("user:1").path)
        for suffix in ("", "-wal", "-shm"):
            assert mode(path + suffix) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("existing", [0o1777, 0o2775, 0o755], ids=oct)
def test_an_existing_root_keeps_its_mode_with_a_warning_when_open(make_router: Any, root: str, tmp_path: Any,
                                                                  existing: int) -> None:
    """Directories shardlite did not create keep every mode bit (sticky, setgid, group write): it warns
    when one is open to others and never chmods it; what it creates inside is 0700."""
    os.makedirs(root)
    os.chmod(root, existing)
    with pytest.warns(DirectoryModeWarning, match=re.escape(root)):
        router = make_router()
    with router.transaction("user:1"):
        pass
    assert mode(root) == existing
    assert mode(os.path.join(root, "n1")) == 0o700
    node = str(tmp_path / "node2")
    os.makedirs(node)
    os.chmod(node, existing)
    with pytest.warns(DirectoryModeWarning, match=re.escape(node)):
        router.nodes.add("n2", path=node)
    assert mode(node) == existing
    router.close()
    with pytest.warns(DirectoryModeWarning):
        make_router().close()  # every open warns again; the mode is still left alone
    assert mode(root) == existing and mode(node) == existing


@pytest.mark.parametrize("existing", [0o700, 0o750, 0o710], ids=oct)
def test_an_existing_private_root_gives_no_warning(make_router: Any, root: str, existing: int) -> None:
    os.makedirs(root)
    os.chmod(root, existing)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DirectoryModeWarning)
        router = make_router()
        with router.transaction("user:1"):
            pass
    assert mode(root) == existing


def test_missing_parents_are_created_0700_and_existing_ones_left_alone(tmp_path: Any) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o2775)
    old = os.umask(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DirectoryModeWarning)  # the parent is not the target: no warning
            created = ensure_private_dir(os.fspath(shared / "a" / "b"))
    finally:
        os.umask(old)
    assert created == [os.fspath(shared / "a"), os.fspath(shared / "a" / "b")]
    assert (mode(os.fspath(shared / "a")), mode(os.fspath(shared / "a" / "b"))) == (0o700, 0o700)
    assert mode(os.fspath(shared)) == 0o2775
    with pytest.warns(DirectoryModeWarning):
        assert ensure_private_dir(os.fspath(shared)) == []
    assert mode(os.fspath(shared)) == 0o2775


# -- identity ---------------------------------------------------------------------------------------------------


def _backup(src_path: str, dst_path: str) -> None:
    """Copy ``src_path`` over ``dst_path`` through SQLite's backup API (APSW), never open()/cp."""
    src = apsw.Connection(src_path, flags=apsw.SQLITE_OPEN_READONLY)
    dst = apsw.Connection(dst_path)
    try:
        with dst.backup("main", src, "main") as backup:
            backup.step(-1)
    finally:
        dst.close()
        src.close()


def _meta(path: str) -> tuple[str, str]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        rows = conn.execute("SELECT key, incarnation FROM _shardlite_meta WHERE id = 1").fetchall()
    finally:
        conn.close()
    assert len(rows) == 1
    return str(rows[0][0]), str(rows[0][1])


def _make_two(root: str) -> tuple[str, str]:
    with Router(root, schema=SCHEMA) as router:
        for key in ("user:a", "user:b"):
            with router.transaction(key) as tx:
                tx.execute("INSERT INTO notes(body) VALUES (?)", (f"note of {key}",))
        return str(router.locate("user:a").path), str(router.locate("user:b").path)


def test_tenant_file_stores_its_canonical_key(make_router: Any) -> None:
    router = make_router(schema=SCHEMA)
    with router.transaction("user:e\u0301mile") as tx:  # decomposed on the way in
        tx.execute("INSERT INTO notes(body) VALUES ('x')")
    path = str(router.locate("user:\u00e9mile").path)
    router.close()
    key, incarnation = _meta(path)
    assert key == "user:\u00e9mile"
    assert re.fullmatch(r"[0-9a-f]{32}", incarnation)
    with open(path, "rb") as f:  # closed, checkpointed file: the key is in the file's own bytes
        assert "user:\u00e9mile".encode() in f.read()


def test_incarnations_differ_between_tenants(root: str) -> None:
    a_path, b_path = _make_two(root)
    assert _meta(a_path)[1] != _meta(b_path)[1]


def test_swapped_file_is_refused_with_identity_mismatch(make_router: Any, root: str) -> None:
    a_path, b_path = _make_two(root)
    _backup(a_path, b_path)  # router closed: B's path now holds A's bytes
    assert _meta(b_path)[0] == "user:a"

    router = make_router(schema=SCHEMA)
    with pytest.raises(IdentityMismatch):
        router.query("user:b", "SELECT body FROM notes")
    with pytest.raises(IdentityMismatch):
        with router.transaction("user:b") as tx:
            tx.execute("INSERT INTO notes(body) VALUES ('must not land')")
    with pytest.raises(IdentityMismatch):
        router.run("user:b", lambda tx: tx.execute("INSERT INTO notes(body) VALUES ('nor this')"))
    # A is unaffected, and the refused opens wrote nothing into the swapped file
    assert router.query("user:a", "SELECT body FROM notes") == [("note of user:a",)]
    router.close()
    conn = apsw.Connection(b_path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        assert conn.execute("SELECT body FROM notes").fetchall() == [("note of user:a",)]
    finally:
        conn.close()
    assert _meta(b_path)[0] == "user:a"


def test_file_of_an_old_incarnation_is_refused(make_router: Any, root: str, tmp_path: Any) -> None:
    router = make_router(schema=SCHEMA)
    with router.transaction("user:b") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('first life')")
    old_copy = str(tmp_path / "old-b.db")
    _backup(str(router.locate("user:b").path), old_copy)
    router.drop("user:b")
    with router.transaction("user:b") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('second life')")
    new_path = str(router.locate("user:b").path)
    router.close()

    _backup(old_copy, new_path)  # a hand "restore" of the previous incarnation over the live path
    assert _meta(new_path)[0] == "user:b"
    router = make_router(schema=SCHEMA)
    with pytest.raises(IdentityMismatch):
        router.query("user:b", "SELECT body FROM notes")
    with pytest.raises(IdentityMismatch):
        with router.transaction("user:b"):
            pass


def test_non_shardlite_database_at_a_tenant_path_is_refused(make_router: Any, root: str, tmp_path: Any) -> None:
    _, b_path = _make_two(root)
    plain = str(tmp_path / "plain.db")
    conn = apsw.Connection(plain)
    conn.execute("CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT); INSERT INTO notes(body) VALUES ('alien')")
    conn.close()
    _backup(plain, b_path)
    router = make_router(schema=SCHEMA)
    with pytest.raises(IdentityMismatch):
        router.query("user:b", "SELECT body FROM notes")


def test_missing_tenant_file_is_an_error_not_a_silent_recreate(make_router: Any, root: str) -> None:
    _, b_path = _make_two(root)
    moved_away = b_path + ".away"
    shutil.move(b_path, moved_away)  # router closed: not a live file
    router = make_router(schema=SCHEMA)
    with pytest.raises(ShardliteError, match="missing"):
        router.query("user:b", "SELECT body FROM notes")
    with pytest.raises(ShardliteError, match="missing"):
        with router.transaction("user:b"):
            pass
    assert not os.path.exists(b_path), "a missing tenant file must not be silently re-created empty"
