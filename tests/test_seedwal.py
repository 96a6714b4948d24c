"""The seed WAL of new tenant files (shardlite/seedwal.py): the first commit appends to it instead of
starting a fresh WAL (whose header SQLite fsyncs), and nothing about the file's contents changes."""

from __future__ import annotations

import os
from typing import Any

import apsw
import pytest

from shardlite.files.seedwal import SeedWal, page_size_of
from shardlite.files.tenant import Personaliser, build_template, write_new_file

SCHEMA = ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)", "CREATE INDEX notes_body ON notes(body)"]


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def wal_header(path: str) -> bytes:
    with open(path + "-wal", "rb") as f:
        return f.read(32)


def frames(path: str, page: int) -> int:
    size = os.path.getsize(path + "-wal")
    assert (size - 32) % (24 + page) == 0, "the WAL holds whole frames"
    return (size - 32) // (24 + page)


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
def test_first_commit_appends_to_the_seed_instead_of_starting_a_wal(make_router: Any, synchronous: str) -> None:
    router = make_router(schema=SCHEMA, synchronous=synchronous)
    paths = []
    for key in ("org:a", "org:b"):
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO notes(body) VALUES (?)", (key,))
        paths.append(str(router.locate(key).path))
    page = page_size_of(read(paths[0]))
    # SQLite gives every WAL it starts fresh random salts; two tenants whose WALs share one header were
    # both appended to the same seed (so SQLite never rewrote, nor fsynced, a WAL header for them)
    assert wal_header(paths[0]) == wal_header(paths[1])
    for path in paths:
        assert frames(path, page) >= 2  # the seed's frame and the first commit's
        with open(path + "-wal", "rb") as f:
            f.seek(32)
            assert int.from_bytes(f.read(4), "big") == 1  # the seed frame holds page 1


def test_seeded_tenant_survives_checkpoint_and_reopen(make_router: Any, root: str) -> None:
    router = make_router(schema=SCHEMA)
    with router.transaction("org:c") as tx:
        tx.executemany("INSERT INTO notes(body) VALUES (?)", [(f"n{i}",) for i in range(50)])
    path = str(router.locate("org:c").path)
    router.close()
    conn = apsw.Connection(path)
    try:
        assert conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()[0][0] == 0
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT key FROM _shardlite_meta").fetchall() == [("org:c",)]
    finally:
        conn.close()
    again = make_router(root, schema=SCHEMA)  # opens with the identity check, on the checkpointed file
    assert again.query("org:c", "SELECT count(*) FROM notes")[0][0] == 50


def test_seed_only_for_images_it_was_made_from() -> None:
    template = build_template(SCHEMA)
    personalise = Personaliser(template)
    image, seed = personalise("org:x", "ab" * 16)
    assert seed is not None and len(seed) == 32 + 24 + page_size_of(image)
    other_image, other_seed = personalise("org:y", "cd" * 16)
    assert other_seed == seed  # same page 1 and length: the same seed serves every tenant of the template
    different, _ = Personaliser(build_template(SCHEMA + ["CREATE TABLE extra(x)"]))("org:z", "ef" * 16)
    assert SeedWal(image).for_image(different) is None  # another schema: another page 1
    assert SeedWal(image).for_image(image + bytes(page_size_of(image))) is None  # another length
    long_key, long_seed = personalise("org:" + "k" * 5000, "01" * 16)  # the identity row spills: the file grows
    assert len(long_key) != len(image) and long_seed is None


@pytest.mark.parametrize("keep", [0, 20, 32, 40, 56 + 100, 56 + 4095, None])
def test_torn_seed_is_harmless(tmp_path: Any, keep: int | None) -> None:
    """A crash can leave any prefix of the (never fsynced) seed: the tenant reads the same either way."""
    image, seed = Personaliser(build_template(SCHEMA))("org:t", "12" * 16)
    assert seed is not None
    path = os.fspath(tmp_path / "t.db")
    write_new_file(path, image, fsync=False, wal=seed if keep is None else seed[:keep])
    conn = apsw.Connection(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert conn.execute("SELECT key, incarnation FROM _shardlite_meta").fetchall() == [("org:t", "12" * 16)]
        conn.execute("INSERT INTO notes(body) VALUES ('after')")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("SELECT body FROM notes").fetchall() == [("after",)]
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def test_existing_wal_or_file_is_never_overwritten(tmp_path: Any) -> None:
    image, seed = Personaliser(build_template(SCHEMA))("org:e", "34" * 16)
    path = os.fspath(tmp_path / "e.db")
    with open(path + "-wal", "wb") as f:
        f.write(b"someone else's wal")
    with pytest.raises(FileExistsError):
        write_new_file(path, image, fsync=False, wal=seed)
    assert read(path + "-wal") == b"someone else's wal"
    assert sorted(os.listdir(tmp_path)) == ["e.db-wal"]  # no database, no temporary file
    os.unlink(path + "-wal")
    with open(path, "wb") as f:
        f.write(b"a database")
    with pytest.raises(FileExistsError):
        write_new_file(path, image, fsync=False, wal=seed)
    assert sorted(os.listdir(tmp_path)) == ["e.db"]  # no seed next to a file that is not ours
    assert os.stat(path).st_size == len(b"a database")


def test_seed_wal_is_private(make_router: Any) -> None:
    router = make_router(schema=SCHEMA)
    with router.transaction("org:m") as tx:
        tx.execute("INSERT INTO notes(body) VALUES ('x')")
    path = str(router.locate("org:m").path)
    assert os.stat(path + "-wal").st_mode & 0o777 == 0o600
