"""Backup and restore (``shardlite.services.backup``; brief §4 CLI ``backup DEST`` / ``restore SRC``; rules 6, 7, 12).

* a backup taken while two processes keep writing, restored into a fresh root: every write acknowledged
  before the backup started is present (in the right tenant, exactly once), nothing that was never written
  appears, and every file of the new root and of the backup passes ``PRAGMA integrity_check``;
* an incremental backup into the same destination copies only the tenants that changed;
* a damaged backup (one byte flipped in a copied tenant file) is refused with a checksum error and changes
  nothing;
* a restored tenant gets a new generation and a new incarnation; restore never overwrites a live tenant
  without ``force``; a process still holding the old location writes into the restored file;
* ``--as NEWKEY`` creates a new tenant, leaves the old one untouched and carries no outbox events;
* outbox events carried by a same-key restore keep their identity: a destination that already applied
  them does not apply them again;
* files keep their private modes (copies and restored files 0600, directories 0700).

Files are inspected with APSW only (never the stdlib ``sqlite3``: brief §3).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows, router_factory, run_cli

from shardlite import ConfigurationError, Router, ShardliteError, UnknownTenant
from shardlite.core.keys import key_digest
from shardlite.core.outbox import Event
from shardlite.meta.choose import ENV_VAR
from shardlite.services import backup as backup_mod

SCHEMA = [
    "CREATE TABLE ledger(id INTEGER PRIMARY KEY, writer INTEGER NOT NULL, pad BLOB)",
    "CREATE TABLE applied(n INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL, payload TEXT NOT NULL)",
]
GLOBAL_SCHEMA = ["CREATE TABLE plans(name TEXT PRIMARY KEY, price INTEGER)"]
DEADLINE = 60.0  # generous bound for waiting loops; never a timing assertion

WRITER = r"""
import os
import random
import sys

from shardlite import Router

root, writer, tenants, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
router = Router(root, schema={schema!r})
rng = random.Random(writer)
n = 0
try:
    while not os.path.exists(stop) and n < 2_000_000:
        n += 1
        ident = writer * 1_000_000_000 + n  # increasing per writer, unique across writers
        key = f"acct:{{rng.randrange(tenants)}}"
        router.run(key, lambda tx: tx.execute(
            "INSERT INTO ledger(id, writer, pad) VALUES (?, ?, randomblob(512))", (ident, writer)))
        sys.stdout.write(f"{{ident}} {{key}}\n")  # acknowledged: printed only after the commit returned
        sys.stdout.flush()
finally:
    router.close()
"""


def seeded(make: Callable[..., Router], count: int, **kwargs: Any) -> tuple[Router, list[str]]:
    """A router whose tenants ``acct:0`` ... hold one ledger row each, its id the tenant's index."""
    router = make(**kwargs)
    keys = [f"acct:{i}" for i in range(count)]
    for i, key in enumerate(keys):
        add(router, key, i)
    return router, keys


def files_in(dest: Path) -> list[str]:
    """Every file under ``dest``, relative to it, sorted."""
    return sorted(os.path.relpath(f, dest) for f in walk(dest)[1])


def backup_files(manifest: dict[str, Any], *others: str) -> list[str]:
    """What a backup directory should hold: the manifest, the files it names, and ``others``, sorted."""
    return sorted(["manifest.json", manifest["global"]["file"], manifest["app_global"]["file"],
                   *(e["file"] for e in manifest["tenants"].values()), *others])


def mode(path: str | os.PathLike[str]) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def walk(top: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    dirs, files = [os.fspath(top)], []
    for dirpath, dirnames, filenames in os.walk(top):
        dirs += [os.path.join(dirpath, d) for d in dirnames]
        files += [os.path.join(dirpath, f) for f in filenames]
    return dirs, files


def integrity(path: str) -> list[Any]:
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


def meta(router: Router, key: str) -> tuple[str, str]:
    """(stored key, incarnation) as the tenant file itself says (user SQL may read ``_shardlite_*``)."""
    rows = internal_rows(router, key, "SELECT key, incarnation FROM _shardlite_meta")
    return str(rows[0][0]), str(rows[0][1])


def outbox_count(router: Router, key: str) -> int:
    return int(internal_rows(router, key, "SELECT count(*) FROM _shardlite_outbox")[0][0])


def ledger(router: Router, key: str) -> list[int]:
    return [int(r[0]) for r in router.query(key, "SELECT id FROM ledger ORDER BY id")]


def add(router: Router, key: str, *idents: int) -> None:
    with router.transaction(key) as tx:
        for ident in idents:
            tx.execute("INSERT INTO ledger(id, writer) VALUES (?, 0)", (ident,))


def node_files(router: Router) -> list[str]:
    out: list[str] = []
    for node in router.status()["nodes"]:
        out += walk(node["path"])[1]
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
    """A relay handler that records each application in the destination and in memory."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, tx: Any, event: Event) -> None:
        tx.execute("INSERT INTO applied(event_id, payload) VALUES (?, ?)", (event.id, json.dumps(event.payload)))
        self.seen.append(event.id)


def applied(router: Router, key: str) -> list[str]:
    return [str(r[0]) for r in router.query(key, "SELECT event_id FROM applied ORDER BY n")]


# -- backup while two processes write --------------------------------------------------------------------------


class Acks:
    """Reads a writer's stdout on a thread: the ids it acknowledged so far (and their tenant)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lock = threading.Lock()
        self.ids: dict[int, str] = {}
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ident, key = line.split()
            with self.lock:
                self.ids[int(ident)] = key

    def snapshot(self) -> dict[int, str]:
        with self.lock:
            return dict(self.ids)

    def count(self) -> int:
        with self.lock:
            return len(self.ids)


def _wait(condition: Callable[[], bool], what: str, procs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        for proc in procs:
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.fail(f"writer {proc.pid} exited ({proc.returncode}) while waiting for {what}: "
                            f"{proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.slow
@pytest.mark.usefixtures("any_meta")  # both metadata backends (issue 15)
def test_backup_while_two_processes_write_then_restore_into_a_fresh_root(make: Callable[..., Router],
                                                                          tmp_path: Path,
                                                                          second_meta: str | None) -> None:
    tenants = 24
    router = make()
    for i in range(tenants):  # every tenant exists before the writers start
        add(router, f"acct:{i}", -1 - i)
    uid = router.accounts.register("Owner@Example.com", password="correct horse battery", name="Owner")
    token = router.sessions.create(uid, ttl=3600)

    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(schema=SCHEMA))
    stop = tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, os.fspath(script), router.root, str(w), str(tenants), os.fspath(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2)]
    readers = [Acks(p) for p in procs]
    dest = tmp_path / "backup"
    try:
        _wait(lambda: all(r.count() >= 30 for r in readers), "both writers to acknowledge writes", procs)

        before: dict[int, str] = {}
        for reader in readers:  # acknowledged before the backup starts
            before |= reader.snapshot()

        # keep them writing *during* the backup: every few tenants copied, wait until both writers have
        # acknowledged more (a synchronisation, not a timing assertion)
        marks = [r.count() for r in readers]
        copied: list[str] = []

        def progress(key: str, was_copied: bool) -> None:
            copied.append(key)
            if len(copied) % 6 == 0:
                _wait(lambda: all(r.count() > m for r, m in zip(readers, marks, strict=True)),
                      "writes during the backup", procs)
                marks[:] = [r.count() for r in readers]

        manifest = backup_mod.backup(router._store, os.fspath(dest), progress=progress)
        assert len(copied) >= tenants
        assert manifest["copied"] == len(manifest["tenants"]) >= tenants
    finally:
        stop.touch()
        for proc in procs:
            try:
                proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in readers:
            reader.thread.join(timeout=DEADLINE)
    for proc in procs:
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        if proc.stderr is not None:
            proc.stderr.close()
        if proc.stdout is not None:
            proc.stdout.close()
    everything: dict[int, str] = {}
    for reader in readers:
        everything |= reader.snapshot()
    assert len(everything) > len(before)  # they went on writing after the snapshot
    router.close()

    fresh = make("fresh", meta=second_meta)  # the same keys and accounts: a key space of its own
    backup_mod.restore_globals(fresh._store, os.fspath(dest))
    restored = fresh.restore(dest)
    assert sorted(restored) == sorted(manifest["tenants"]) == sorted(f"acct:{i}" for i in range(tenants))

    found: dict[int, str] = {}
    for key in fresh.tenants():
        for ident in ledger(fresh, key):
            assert ident not in found, f"id {ident} present twice"
            found[ident] = key
    missing = {i: k for i, k in before.items() if found.get(i) != k}
    assert not missing, f"{len(missing)} acknowledged writes lost or misplaced, e.g. {list(missing.items())[:5]}"
    seeds = {-1 - i: f"acct:{i}" for i in range(tenants)}
    assert all(found[i] == k for i, k in seeds.items())
    phantom = {i: k for i, k in found.items() if i not in seeds and everything.get(i) != k}
    assert not phantom, f"ids never acknowledged: {list(phantom.items())[:5]}"

    # the global DB came back too (accounts and sessions)
    account = fresh.accounts.by_email("owner@example.com")
    assert account is not None and account.id == uid
    assert fresh.accounts.authenticate("OWNER@example.com", "correct horse battery") == uid
    session = fresh.sessions.resolve(token)
    assert session is not None and session.account_id == uid
    fresh.close()

    # every file passes integrity_check: the new root and the backup
    db_files = [f for f in walk(fresh.root)[1] if f.endswith(".db")]
    embedded = os.path.exists(os.path.join(fresh.root, "global.db"))  # absent with PostgreSQL metadata
    assert len(db_files) == tenants + 1 + embedded  # the tenants, app_global.db (and global.db)
    backup_files = [f for f in walk(dest)[1] if f.endswith(".db")]
    assert len(backup_files) == tenants + 2
    for path in db_files + backup_files:
        assert integrity(path) == [("ok",)], path


# -- incremental -------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_incremental_backup_copies_only_changed_tenants(make: Callable[..., Router], tmp_path: Path,
                                                       second_meta: str | None) -> None:
    router, keys = seeded(make, 10)
    dest = tmp_path / "backup"

    def copies(manifest: dict[str, Any]) -> dict[str, tuple[int, int]]:
        return {k: (os.stat(dest / e["file"]).st_ino, os.stat(dest / e["file"]).st_mtime_ns)
                for k, e in manifest["tenants"].items()}

    first = router.backup(dest)
    assert (first["copied"], first["skipped"]) == (10, 0)
    assert sorted(first["tenants"]) == keys
    files1 = copies(first)

    second = router.backup(dest)
    assert (second["copied"], second["skipped"]) == (0, 10)
    assert second["tenants"] == first["tenants"]
    assert copies(second) == files1  # not rewritten

    for key in keys:  # reads are not changes
        assert ledger(router, key)
    changed = [keys[2], keys[5], keys[7]]
    for key in changed:
        add(router, key, 100 + keys.index(key))
    third = router.backup(dest)
    assert (third["copied"], third["skipped"]) == (3, 7)
    files3 = copies(third)
    for key in keys:
        if key in changed:
            assert third["tenants"][key]["checksum"] != first["tenants"][key]["checksum"]
        else:
            assert files3[key] == files1[key]
            assert third["tenants"][key] == first["tenants"][key]

    # a new tenant is copied; a dropped one leaves the manifest; a restored one (new generation) is copied
    add(router, "acct:new", 1000)
    router.drop(keys[0])
    fourth = router.backup(dest)
    assert (fourth["copied"], fourth["skipped"]) == (1, 9)
    assert keys[0] not in fourth["tenants"] and "acct:new" in fourth["tenants"]
    router.restore(dest, keys=[keys[1]], force=True)
    fifth = router.backup(dest)
    assert (fifth["copied"], fifth["skipped"]) == (1, 9)

    # the incrementally maintained backup restores to exactly the live data
    fresh = make("fresh", meta=second_meta)  # the same keys: a key space of its own
    fresh.restore(dest)
    assert sorted(fresh.tenants()) == sorted(router.tenants())
    for key in router.tenants():
        assert ledger(fresh, key) == ledger(router, key)


def test_backup_of_one_tenant_keeps_the_rest_of_the_manifest(make: Callable[..., Router], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    for i in range(3):
        add(router, f"acct:{i}", i)
    dest = tmp_path / "backup"
    router.backup(dest)
    add(router, "acct:1", 11)
    one = router.backup(dest, keys=["acct:1"])
    assert one["copied"] == 1 and sorted(one["tenants"]) == ["acct:0", "acct:1", "acct:2"]
    with pytest.raises(UnknownTenant):
        router.backup(dest, keys=["acct:404"])
    add(router, "acct:2", 12)
    code, out, err = _cli(capsys, "backup", os.fspath(dest), "--key", "acct:2", "--json", "--root", router.root)
    assert code == 0, err
    assert json.loads(out) == {"dest": os.fspath(dest), "tenants": 3, "copied": 1, "skipped_unchanged": 0}
    fresh = make("fresh")
    fresh.restore(dest)
    assert [ledger(fresh, f"acct:{i}") for i in range(3)] == [[0], [1, 11], [2, 12]]
    with pytest.raises(ConfigurationError):
        router.backup(os.path.join(router.root, "inside"))
    assert not os.path.exists(os.path.join(router.root, "inside"))


# -- what a backup holds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["serialized", "backup API"])
def test_backup_copies_are_standalone_verified_and_private(make: Callable[..., Router], tmp_path: Path,
                                                           umask022: None, monkeypatch: pytest.MonkeyPatch,
                                                           path: str) -> None:
    # small files are serialized by SQLite and written out; big ones go through the backup API: both
    # must give the same kind of copy
    if path == "backup API":
        monkeypatch.setattr(backup_mod, "SERIALIZE_LIMIT", 0)
    router, keys = seeded(make, 6, nodes=["n1", "n2"])
    dest = tmp_path / "backup"
    manifest = router.backup(dest)
    on_disk = json.loads((dest / "manifest.json").read_text())
    assert on_disk["tenants"] == manifest["tenants"]
    assert mode(dest) == 0o700
    assert mode(dest / "manifest.json") == 0o600
    global_copy = dest / manifest["global"]["file"]
    assert re.fullmatch(r"global\.[0-9a-f]{32}\.db", manifest["global"]["file"])
    assert mode(global_copy) == 0o600
    assert backup_mod.file_checksum(os.fspath(global_copy)) == manifest["global"]["checksum"]
    for key in keys:
        entry = manifest["tenants"][key]
        path = dest / entry["file"]
        assert mode(path) == 0o600
        assert mode(path.parent) == 0o700
        assert entry["node"] == router.locate(key).node
        assert entry["generation"] == router.locate(key).generation
        assert entry["size"] == os.path.getsize(path)
        assert entry["checksum"] == backup_mod.file_checksum(os.fspath(path))
        assert not os.path.exists(f"{path}-wal") and not os.path.exists(f"{path}-journal")
        conn = apsw.Connection(os.fspath(path), flags=apsw.SQLITE_OPEN_READONLY)
        try:
            assert conn.execute("PRAGMA journal_mode").fetchall() == [("delete",)]
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert conn.execute("SELECT key FROM _shardlite_meta").fetchall() == [(key,)]
            assert conn.execute("SELECT id FROM ledger").fetchall() == [(keys.index(key),)]
        finally:
            conn.close()
    # nothing but the manifest, the global DB and the tenant copies (no temporaries left behind)
    assert sorted(manifest["tenants"]) == sorted(keys)
    assert files_in(dest) == backup_files(manifest)
    for key in keys:  # named by the key's digest and the copy's checksum
        assert manifest["tenants"][key]["file"] == (f"tenants/{key_digest(key)[:2]}/{key_digest(key)}."
                                                   f"{manifest['tenants'][key]['checksum']}.db")


def test_every_backup_directory_is_0700(make: Callable[..., Router], tmp_path: Path, umask022: None) -> None:
    router = make()
    add(router, "acct:1", 1)
    dest = tmp_path / "backup"
    router.backup(dest)
    assert {d: oct(mode(d)) for d in walk(dest)[0]} == {d: oct(0o700) for d in walk(dest)[0]}


# -- damaged backups ---------------------------------------------------------------------------------------------


def test_damaged_backup_is_refused_and_changes_nothing(make: Callable[..., Router], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    keys = ["acct:a", "acct:b", "acct:c"]
    for i, key in enumerate(keys):
        add(router, key, i, 10 + i)
    dest = tmp_path / "backup"
    manifest = router.backup(dest)
    for key in keys:
        add(router, key, 100 + keys.index(key))  # live data now differs from the backup

    damaged = dest / manifest["tenants"]["acct:c"]["file"]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # a closed, standalone copy: editing its bytes is the point
    damaged.write_bytes(bytes(data))

    before = {k: (router.locate(k), meta(router, k), ledger(router, k)) for k in keys}
    files_before = node_files(router)
    generations = router._store.meta.globaldb.read("SELECT count(*) FROM _shardlite_generations")

    with pytest.raises(ShardliteError, match="checksum"):
        router.restore(dest, force=True)
    with pytest.raises(ShardliteError, match="checksum"):
        router.restore(dest, keys=["acct:c"], as_key="acct:copy")
    code, out, err = _cli(capsys, "restore", os.fspath(dest), "--force", "--root", router.root)
    assert code == 2 and "checksum" in err and "Traceback" not in err

    after = {k: (router.locate(k), meta(router, k), ledger(router, k)) for k in keys}
    assert after == before
    assert not router.exists("acct:copy")
    assert node_files(router) == files_before
    assert router._store.meta.globaldb.read("SELECT count(*) FROM _shardlite_generations") == generations

    fresh = make("fresh")
    with pytest.raises(ShardliteError, match="checksum"):
        fresh.restore(dest)
    assert list(fresh.tenants()) == []

    # the undamaged tenants of the same backup still restore
    assert router.restore(dest, keys=["acct:a"], force=True) == ["acct:a"]
    assert ledger(router, "acct:a") == [0, 10]


# -- identity and live tenants ---------------------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_restore_gives_a_new_generation_and_incarnation_and_never_overwrites_without_force(
        make: Callable[..., Router], tmp_path: Path, umask022: None) -> None:
    router = make(nodes=["n1", "n2"])
    key = "acct:1"
    add(router, key, 1, 2)
    dest = tmp_path / "backup"
    router.backup(dest)
    add(router, key, 3)  # after the backup
    old = router.locate(key)
    old_key, old_incarnation = meta(router, key)
    assert old.path is not None and old_key == key

    other = make()  # another client of the root (as another process would be) with the old location cached
    assert ledger(other, key) == [1, 2, 3]
    add(other, key, 4)

    with pytest.raises(ConfigurationError, match="force"):
        router.restore(dest)
    with pytest.raises(ConfigurationError, match="force"):
        router.restore(dest, keys=[key])
    assert router.locate(key) == old and ledger(router, key) == [1, 2, 3, 4]

    assert router.restore(dest, force=True) == [key]
    new = router.locate(key)
    assert new.state == "active" and new.node == old.node
    assert new.generation > old.generation and new.path != old.path
    assert new.epoch > old.epoch
    for suffix in ("", "-wal", "-shm"):
        assert not os.path.exists(str(old.path) + suffix)
    stored_key, incarnation = meta(router, key)
    assert stored_key == key and incarnation != old_incarnation
    record = router._store.meta.tenants.lookup(key)
    assert record is not None and record.incarnation == incarnation
    assert ledger(router, key) == [1, 2]  # the backup's content; later writes were replaced

    # the client that held the old location finds the fence and writes into the restored file
    add(other, key, 5)
    assert ledger(router, key) == [1, 2, 5]
    assert ledger(other, key) == [1, 2, 5]

    # restoring again: yet another generation and incarnation, no path reused
    router.restore(dest, force=True)
    third = router.locate(key)
    assert third.generation > new.generation and third.path not in (old.path, new.path)
    assert meta(router, key)[1] not in (old_incarnation, incarnation)

    # a dropped tenant is not live: restoring it needs no force
    router.drop(key)
    assert router.restore(dest) == [key]
    assert router.locate(key).generation > third.generation
    assert ledger(router, key) == [1, 2]

    # private modes on the restored files and their directories
    path = str(router.locate(key).path)
    assert mode(path) == 0o600 and mode(os.path.dirname(path)) == 0o700
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            assert mode(path + suffix) == 0o600


@pytest.mark.usefixtures("any_meta")
def test_restore_force_while_a_client_writes_loses_nothing_acknowledged_after_the_fence(
        make: Callable[..., Router], tmp_path: Path) -> None:
    router = make()
    key = "acct:busy"
    add(router, key, *range(1, 6))
    dest = tmp_path / "backup"
    router.backup(dest)

    client = make()  # another client of the root, writing increasing ids while the restore runs
    started: list[int] = []  # ids whose transaction was about to begin
    acked: list[int] = []  # ids whose transaction committed (run() returned)
    stop = threading.Event()
    failure: list[BaseException] = []

    def insert(ident: int) -> Callable[[Any], Any]:
        return lambda tx: tx.execute("INSERT INTO ledger(id, writer) VALUES (?, 1)", (ident,))

    def write() -> None:
        ident = 1000
        try:
            while not stop.is_set():
                ident += 1
                started.append(ident)
                client.run(key, insert(ident))
                acked.append(ident)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failure.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while len(acked) < 20 and not failure and time.monotonic() < deadline:
            time.sleep(0.002)
        router.restore(dest, keys=[key], force=True)
        begun_after = len(started)  # ids from started[begun_after:] began after the restore returned
        while len(acked) < begun_after + 20 and not failure and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        stop.set()
        thread.join(timeout=DEADLINE)
    assert not failure, failure
    assert len(acked) >= begun_after + 20

    present = ledger(router, key)
    assert present[:5] == [1, 2, 3, 4, 5]  # the backup's rows
    survivors = present[5:]
    # every write that began after the restore returned is there, and the writes that survived are exactly a
    # suffix of what was acknowledged: none acknowledged after the fence went into the retired file
    assert survivors == acked[len(acked) - len(survivors):]
    assert set(started[begun_after:]) & set(acked) <= set(survivors)
    assert ledger(client, key) == present


@pytest.mark.usefixtures("any_meta")
def test_restore_into_a_fresh_root_is_private_and_intact(make: Callable[..., Router], tmp_path: Path,
                                                         umask022: None, second_meta: str | None) -> None:
    router, keys = seeded(make, 8, nodes=["n1", "n2"])
    dest = tmp_path / "backup"
    router.backup(dest)
    # other node names: the fresh root's ring places them; the same keys: a key space of its own
    fresh = make("fresh", nodes=["x", "y", "z"], meta=second_meta)
    with pytest.raises(UnknownTenant):
        fresh.restore(dest, keys=["acct:404"])
    assert sorted(fresh.restore(dest)) == keys
    assert {fresh.locate(k).node for k in keys} <= {"x", "y", "z"}
    assert sum(fresh.stats()["tenants_per_node"].values()) == len(keys)
    for key in keys:
        assert ledger(fresh, key) == [keys.index(key)]
        assert meta(fresh, key)[0] == key
        assert meta(fresh, key)[1] != meta(router, key)[1]  # a new incarnation, even in another root
    with pytest.raises(ConfigurationError):  # the global DB goes only into an empty root
        backup_mod.restore_globals(fresh._store, os.fspath(dest))
    fresh.close()
    dirs, files = walk(fresh.root)
    assert {d: oct(mode(d)) for d in dirs} == {d: oct(0o700) for d in dirs}
    assert {f: oct(mode(f)) for f in files} == {f: oct(0o600) for f in files}
    for f in files:
        if f.endswith(".db"):
            assert integrity(f) == [("ok",)], f


# -- restore under another key ---------------------------------------------------------------------------------


def test_restore_as_a_new_key_leaves_the_original_untouched_and_carries_no_events(
        make: Callable[..., Router], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    counter = Counter()
    router = make()
    router.handler("note")(counter)
    with router.transaction("acct:1") as tx:
        tx.execute("INSERT INTO ledger(id, writer) VALUES (1, 0), (2, 0)")
        for n in range(3):
            tx.emit("acct:inbox", "note", {"n": n})
    add(router, "acct:other", 9)
    dest = tmp_path / "backup"
    router.backup(dest)
    original = (router.locate("acct:1"), meta(router, "acct:1"), ledger(router, "acct:1"))
    assert outbox_count(router, "acct:1") == 3

    with pytest.raises(ConfigurationError):
        router.restore(dest, as_key="acct:2")  # --as restores exactly one tenant
    with pytest.raises(ConfigurationError):
        router.restore(dest, keys=["acct:1", "acct:other"], as_key="acct:2")
    assert not router.exists("acct:2")
    assert router.restore(dest, keys=["acct:1"], as_key="acct:2") == ["acct:2"]
    assert ledger(router, "acct:2") == [1, 2]
    stored_key, incarnation = meta(router, "acct:2")
    assert stored_key == "acct:2" and incarnation != original[1][1]
    assert router.locate("acct:2").generation > original[0].generation
    assert outbox_count(router, "acct:2") == 0
    assert (router.locate("acct:1"), meta(router, "acct:1"), ledger(router, "acct:1")) == original
    assert outbox_count(router, "acct:1") == 3

    with pytest.raises(ConfigurationError, match="force"):  # nor over a live tenant under the new key
        router.restore(dest, keys=["acct:1"], as_key="acct:2")

    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 3 and all(i.startswith("acct:1/") for i in counter.seen)
    assert len(applied(router, "acct:inbox")) == 3

    code, out, err = _cli(capsys, "restore", os.fspath(dest), "--key", "acct:1", "--as", "acct:3", "--json",
                          "--root", router.root)
    assert code == 0, err
    assert json.loads(out) == {"restored": ["acct:3"]}
    assert ledger(router, "acct:3") == [1, 2] and outbox_count(router, "acct:3") == 0
    code, out, err = _cli(capsys, "restore", os.fspath(dest), "--as", "acct:4", "--root", router.root)
    assert code == 2 and "--key" in err
    assert not router.exists("acct:4")
    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 3


# -- outbox identity across a same-key restore ---------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_events_carried_by_a_same_key_restore_are_not_applied_twice(make: Callable[..., Router],
                                                                    tmp_path: Path) -> None:
    counter = Counter()
    router = make()
    router.handler("note")(counter)
    with router.transaction("src:1") as tx:
        for n in range(4):
            tx.emit("dst:1", "note", {"n": n})
    dest = tmp_path / "backup"
    router.backup(dest)  # the four events are still pending in the copy
    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 4 and outbox_count(router, "src:1") == 0
    old_incarnation = meta(router, "src:1")[1]

    router.restore(dest, keys=["src:1"], force=True)
    assert meta(router, "src:1")[1] != old_incarnation
    assert outbox_count(router, "src:1") == 4  # carried over, with their original identity
    assert router.stats()["relay"]["pending"] == 4
    stats = router.relay.drain(timeout=DEADLINE)
    assert counter.seen == [f"src:1/{old_incarnation}/{n}" for n in range(1, 5)]
    assert applied(router, "dst:1") == counter.seen
    assert outbox_count(router, "src:1") == 0 and stats.dead == 0
    assert router.stats()["relay"]["pending"] == 0

    # the restored tenant's own new events are new (new incarnation), and are applied
    with router.transaction("src:1") as tx:
        tx.emit("dst:1", "note", {"n": 99})
    router.relay.drain(timeout=DEADLINE)
    new_incarnation = meta(router, "src:1")[1]
    assert counter.seen[4:] == [f"src:1/{new_incarnation}/5"]
    assert len(applied(router, "dst:1")) == 5


def test_emit_drain_backup_cli_restore_force_drain_count_unchanged(make: Callable[..., Router], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    counter = Counter()
    router = make()
    router.handler("note")(counter)
    for n in range(3):
        with router.transaction("src:2") as tx:
            tx.execute("INSERT INTO ledger(id, writer) VALUES (?, 0)", (n,))
            tx.emit("dst:2", "note", {"n": n})
    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 3
    dest = tmp_path / "backup"
    code, out, err = _cli(capsys, "backup", os.fspath(dest), "--json", "--root", router.root)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["copied"] == summary["tenants"] == 2 and summary["skipped_unchanged"] == 0

    code, out, err = _cli(capsys, "restore", os.fspath(dest), "--key", "src:2", "--root", router.root)
    assert code == 2 and "force" in err
    code, out, err = _cli(capsys, "restore", os.fspath(dest), "--key", "src:2", "--force", "--json",
                          "--root", router.root)
    assert code == 0, err
    assert json.loads(out) == {"restored": ["src:2"]}
    router.relay.drain(timeout=DEADLINE)
    assert len(counter.seen) == 3
    assert len(applied(router, "dst:2")) == 3
    assert ledger(router, "src:2") == [0, 1, 2]

    code, out, err = _cli(capsys, "backup", os.fspath(dest), "--json", "--root", router.root)
    assert code == 0 and json.loads(out)["copied"] == 1  # only the restored tenant (new generation)


# -- the global DB ---------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("any_meta")
def test_cli_restore_globals_into_a_fresh_root_with_the_same_schemas(make: Callable[..., Router], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    second_meta: str | None,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    router = make(global_schema=GLOBAL_SCHEMA)
    uid = router.accounts.register("someone@example.org", name="Someone")
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO plans VALUES ('pro', 12)")
    add(router, "acct:1", 1)
    dest = tmp_path / "backup"
    router.backup(dest)

    router.close()
    if second_meta is not None:  # the same keys and accounts: the fresh root's metadata in a database of its own
        monkeypatch.setenv(ENV_VAR, second_meta)
    fresh = make("fresh", global_schema=GLOBAL_SCHEMA)  # the fresh root, made by the app with its schemas
    code, out, err = _cli(capsys, "restore", os.fspath(dest), "--globals", "--json", "--root", fresh.root)
    assert code == 0, err
    report = json.loads(out)  # an empty root: filled whole, nodes and global data included
    assert report["restored"] == ["acct:1"] and report["created"] is False
    assert report["globals"]["_shardlite_accounts"] == 1 and report["globals"]["plans"] == 1
    account = fresh.accounts.by_email("Someone@Example.org")
    assert account is not None and account.id == uid
    assert fresh.globals.query("SELECT name, price FROM plans") == [("pro", 12)]
    assert ledger(fresh, "acct:1") == [1]
    fresh.close()
    again = make("fresh", global_schema=GLOBAL_SCHEMA)  # and it opens again with the app's schemas
    assert again.globals.query("SELECT count(*) FROM plans") == [(1,)]

    # a root with tenants refuses the global DB
    code, _, err = _cli(capsys, "restore", os.fspath(dest), "--globals", "--force", "--root", again.root)
    assert code == 2 and "empty" in err


def test_cli_init_then_restore_globals_then_open_with_the_app_schema(make: Callable[..., Router], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    router = make(global_schema=GLOBAL_SCHEMA)
    with router.globals.transaction() as tx:
        tx.execute("INSERT INTO plans VALUES ('pro', 12)")
    add(router, "acct:1", 1)
    dest = tmp_path / "backup"
    router.backup(dest)

    fresh_root = os.fspath(tmp_path / "fresh")
    code, _, err = _cli(capsys, "init", "--root", fresh_root)
    assert code == 0, err
    code, _, err = _cli(capsys, "restore", os.fspath(dest), "--globals", "--root", fresh_root)
    assert code == 0, err
    fresh = make("fresh", global_schema=GLOBAL_SCHEMA)
    assert fresh.globals.query("SELECT name, price FROM plans") == [("pro", 12)]


# -- durability, supersession and locking -------------------------------------------------------------------------


def _whole(dest: Path) -> dict[str, Any]:
    """The manifest on disk, after checking that every file it names is there with its checksum."""
    manifest = json.loads((dest / "manifest.json").read_text())
    named = [*manifest["tenants"].values(), manifest["global"], manifest["app_global"]]
    for entry in named:
        assert backup_mod.file_checksum(os.fspath(dest / entry["file"])) == entry["checksum"], entry["file"]
    return manifest


def test_superseded_copies_are_removed_after_the_new_manifest(make: Callable[..., Router], tmp_path: Path) -> None:
    router, keys = seeded(make, 6)
    dest = tmp_path / "backup"
    first = router.backup(dest)
    (dest / "notes.txt").write_text("the operator's own file")  # not a name a backup writes: left alone
    (dest / "tenants" / "zz").mkdir()
    add(router, keys[1], 100)
    second = router.backup(dest)
    assert second["copied"] == 1
    assert second["tenants"][keys[1]]["file"] != first["tenants"][keys[1]]["file"]
    assert not (dest / first["tenants"][keys[1]]["file"]).exists()  # superseded: removed
    assert first["global"]["file"] == second["global"]["file"] or not (dest / first["global"]["file"]).exists()
    assert files_in(dest) == backup_files(second, "notes.txt")
    _whole(dest)


def test_an_interrupted_backup_leaves_the_previous_one_whole(make: Callable[..., Router], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    router, keys = seeded(make, 8)
    dest = tmp_path / "backup"
    first = router.backup(dest)
    for i, key in enumerate(keys):
        add(router, key, 100 + i)

    def crash(*_: object) -> None:
        raise OSError("simulated crash before the copies were durable")

    monkeypatch.setattr(backup_mod, "_make_durable", crash)
    with pytest.raises(backup_mod.BackupFailed, match="simulated") as failed:
        router.backup(dest)
    monkeypatch.undo()
    assert isinstance(failed.value.__cause__, OSError)
    assert _whole(dest)["tenants"] == first["tenants"]  # every file the old manifest names is intact
    assert files_in(dest) == backup_files(first)  # and what the failed run wrote is gone
    fresh = make("fresh")
    fresh.restore(dest)
    assert [ledger(fresh, k) for k in keys] == [[i] for i in range(len(keys))]
    third = router.backup(dest)  # the next run copies everything again and sweeps the leftovers
    assert third["copied"] == len(keys)
    assert files_in(dest) == backup_files(third)


KILLED_BACKUP = r"""
import sys

from shardlite import Router

root, dest, run = sys.argv[1], sys.argv[2], int(sys.argv[3])
router = Router(root, schema={schema!r})
n = run * 10_000
while True:
    n += 1
    for i in range(40):
        with router.transaction(f"acct:{{i}}") as tx:
            tx.execute("INSERT INTO ledger(id, writer, pad) VALUES (?, 0, randomblob(2000))", (n * 1000 + i,))
    router.backup(dest, parallel=2)
    print(n, flush=True)
"""


@pytest.mark.usefixtures("any_meta")
def test_a_backup_killed_at_any_moment_leaves_a_whole_manifest(tmp_path: Path) -> None:
    """kill -9 of a process that changes every tenant and backs up, over and over: whenever it dies, the
    manifest on disk names only complete copies (and the next backup sweeps what the dead one left)."""
    script = tmp_path / "backup_loop.py"
    script.write_text(KILLED_BACKUP.format(schema=SCHEMA))
    root, dest = tmp_path / "data", tmp_path / "backup"
    for kill_after in (1, 2, 3):
        proc = subprocess.Popen([sys.executable, os.fspath(script), os.fspath(root), os.fspath(dest),
                                 str(kill_after)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        try:
            for _ in range(kill_after):  # let it finish a few backups, then kill it during the next one
                assert proc.stdout.readline(), "the backup loop died on its own"
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        manifest = _whole(dest)
        assert len(manifest["tenants"]) == 40
    router = Router(os.fspath(root), schema=SCHEMA)
    try:
        final = router.backup(dest)
    finally:
        router.close()
    assert files_in(dest) == backup_files(final)


def test_backup_and_restore_lock_the_backup_directory(make: Callable[..., Router], tmp_path: Path) -> None:
    router = make()
    add(router, "acct:1", 1)
    dest = tmp_path / "backup"
    router.backup(dest)
    with backup_mod._locked(os.fspath(dest), shared=True):  # a restore reading from it
        with pytest.raises(ConfigurationError, match="in use"):
            router.backup(dest)
        fresh = make("fresh")
        assert fresh.restore(dest) == ["acct:1"]  # another restore (shared) is fine
    with backup_mod._locked(os.fspath(dest), shared=False):  # a backup writing into it
        with pytest.raises(ConfigurationError, match="in use"):
            make("other").restore(dest)
    assert router.backup(dest)["skipped"] == 1
    with pytest.raises(ConfigurationError):
        router.backup(dest, parallel=0)
    with pytest.raises(ConfigurationError, match="holds no"):
        router.restore(tmp_path / "nowhere")


@pytest.mark.parametrize("parallel", [1, 4])
def test_without_syncfs_every_copy_is_fsynced_before_the_manifest(make: Callable[..., Router], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  parallel: int) -> None:
    router, keys = seeded(make, 5)
    synced: list[str] = []
    manifest_seen: list[bool] = []
    real_fsync = backup_mod.fsync_path

    def fsync(path: str) -> None:
        synced.append(os.path.relpath(path, dest))
        manifest_seen.append((dest / "manifest.json").exists())
        real_fsync(path)

    dest = tmp_path / "backup"
    monkeypatch.setattr(backup_mod, "sync_filesystem", lambda path: False)
    monkeypatch.setattr(backup_mod, "fsync_path", fsync)
    manifest = router.backup(dest, parallel=parallel)
    assert sorted(synced) == sorted([manifest["global"]["file"], manifest["app_global"]["file"],
                                     *(e["file"] for e in manifest["tenants"].values())])
    assert not any(manifest_seen)  # all before the manifest was written
    _whole(dest)


def test_a_tenant_dropped_or_replaced_during_the_backup(make: Callable[..., Router], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog is read first and the files copied after: a tenant dropped in between is left out of the
    backup, one given a new file in between (here: re-imported) is copied from its new home."""
    router = make()
    keys = ["acct:a", "acct:b", "acct:c"]
    for i, key in enumerate(keys):
        add(router, key, i)
    exported = tmp_path / "b.db"
    router.export("acct:b", exported)
    add(router, "acct:b", 99)  # the live tenant moves on; the export keeps [1]
    real = backup_mod._copy_into
    stems = {key_digest("acct:a"): "drop", key_digest("acct:b"): "replace"}

    def racing(source: str, directory: str, stem: str, durable: set[str]) -> tuple[str, str, int]:
        action = stems.pop(stem, None)
        if action == "drop":
            router.drop("acct:a")
        elif action == "replace":
            router.import_(exported, "acct:b", force=True)  # a new generation; the old file is gone
        return real(source, directory, stem, durable)

    monkeypatch.setattr(backup_mod, "_copy_into", racing)
    manifest = router.backup(tmp_path / "backup")
    monkeypatch.undo()
    assert sorted(manifest["tenants"]) == ["acct:b", "acct:c"] and manifest["copied"] == 2
    assert manifest["tenants"]["acct:b"]["generation"] == router.locate("acct:b").generation
    fresh = make("fresh")
    fresh.restore(tmp_path / "backup")
    assert (ledger(fresh, "acct:b"), ledger(fresh, "acct:c")) == ([1], [2])
    assert not fresh.exists("acct:a")
