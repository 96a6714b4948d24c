"""A backup that cannot finish leaves the previous one whole and nothing of its own (rule 12), and backup
destinations that already exist keep their mode (rule 6).

The full destination is a real one: a 1 MiB tmpfs mounted for the test (needs root; without it the test
is skipped with a warning saying why, and fails under ``CI=true``). The first backup fits, the second
(every tenant grown) does not: the error is one line naming the destination and the cause, the previous
manifest and every file it names are intact, and no copy, temporary or directory of the failed run is
left.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_fs import tmpfs
from helpers_routers import router_factory, run_cli

from shardlite import DirectoryModeWarning, Router, ShardliteError
from shardlite.services import backup as backup_mod

SCHEMA = ["CREATE TABLE ledger(id INTEGER PRIMARY KEY, pad BLOB)"]
KEYS = [f"acct:{i}" for i in range(4)]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    yield from router_factory(tmp_path, SCHEMA)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted under ``tmp_path`` for the test."""
    with tmpfs(tmp_path / "small", "1m") as mount:
        yield mount


def grow(router: Router, kib: int) -> None:
    for key in KEYS:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO ledger(pad) VALUES (randomblob(?))", (kib * 1024,))


def files_in(top: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), top) for d, _, names in os.walk(top) for f in names)


def dirs_in(top: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), top) for d, names, _ in os.walk(top) for n in names)


def whole(dest: Path) -> dict[str, Any]:
    """The manifest on disk, after checking every file it names against its checksum."""
    manifest: dict[str, Any] = json.loads((dest / "manifest.json").read_text())
    for entry in [*manifest["tenants"].values(), manifest["global"], manifest["app_global"]]:
        assert backup_mod.file_checksum(os.fspath(dest / entry["file"])) == entry["checksum"], entry["file"]
    return manifest


def named(manifest: dict[str, Any]) -> list[str]:
    return sorted(["manifest.json", manifest["global"]["file"], manifest["app_global"]["file"],
                   *(e["file"] for e in manifest["tenants"].values())])


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_backup_into_a_full_destination_removes_what_it_wrote(make: Callable[..., Router], small_fs: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                parallel: int) -> None:
    router = make()
    grow(router, 100)
    dest = small_fs / "backup"
    first = router.backup(dest, parallel=parallel)
    assert sorted(first["tenants"]) == KEYS
    folders = dirs_in(dest)
    grow(router, 200)  # every tenant changed: the next run copies them all, next to the previous copies
    free = os.statvfs(small_fs).f_bavail * os.statvfs(small_fs).f_frsize
    needed = sum(os.path.getsize(f"{router.locate(k).path}{suffix}") for k in KEYS for suffix in ("", "-wal"))
    assert needed > free  # it cannot fit

    with pytest.raises(backup_mod.BackupFailed) as failed:
        router.backup(dest, parallel=parallel)
    message = str(failed.value)
    assert os.fspath(dest) in message and "No space left on device" in message and "\n" not in message
    assert whole(dest) == first  # the previous backup, every file it names intact
    assert files_in(dest) == named(first)  # no partial copy, no temporary
    assert dirs_in(dest) == folders

    code, out, err = run_cli(capsys, "backup", os.fspath(dest), "--root", router.root)
    assert code == 2 and out == "" and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and os.fspath(dest) in err and "free space" in err
    assert files_in(dest) == named(first) and whole(dest) == first

    fresh = make("fresh")  # and the previous backup still restores
    assert sorted(fresh.restore(dest)) == KEYS
    assert all(fresh.query(k, "SELECT count(*) FROM ledger") == [(1,)] for k in KEYS)


def test_a_failed_first_backup_leaves_no_directory_it_made(make: Callable[..., Router], small_fs: Path) -> None:
    router = make()
    grow(router, 400)  # four tenants of 400 KB: more than 1 MiB
    dest = small_fs / "new" / "backup"
    with pytest.raises(ShardliteError, match="No space left on device"):
        router.backup(dest)
    assert os.listdir(small_fs) == []  # neither the destination nor its parent remain


@pytest.mark.parametrize("existing", [0o1777, 0o2775])
def test_an_existing_destination_keeps_its_mode(make: Callable[..., Router], tmp_path: Path, existing: int) -> None:
    router = make()
    grow(router, 1)
    dest = tmp_path / "shared"
    dest.mkdir()
    os.chmod(dest, existing)
    with pytest.warns(DirectoryModeWarning, match=os.fspath(dest)):
        manifest = router.backup(dest)
    assert stat.S_IMODE(os.stat(dest).st_mode) == existing
    for folder in dirs_in(dest):  # what the backup made is private
        assert stat.S_IMODE(os.stat(dest / folder).st_mode) == 0o700
    assert files_in(dest) == named(manifest)
    new = tmp_path / "made" / "here"
    router.backup(new)
    assert [stat.S_IMODE(os.stat(p).st_mode) for p in (new.parent, new)] == [0o700, 0o700]
