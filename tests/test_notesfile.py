"""The replicator's notes reader (``shardlite.files.notesfile``): notes files are untrusted input. A bad magic,
a key that is not UTF-8 or not a canonical key, a symlink, a FIFO, a huge file, a notes directory that is a
link: skipped with a logged warning, never a crash, never a read outside the node's notes directory."""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardlite.core import notes
from shardlite.files import notesfile
from shardlite.files.noteswriter import NotesWriter, notes_dir

NAME = "123-0123456789abcdef.notes"


def make_node(tmp_path: Path) -> tuple[str, str]:
    node = tmp_path / "n1"
    directory = Path(notes_dir(os.fspath(node)))
    directory.mkdir(parents=True, mode=0o700)
    return os.fspath(node), os.fspath(directory)


def put(directory: str, name: str, data: bytes) -> None:
    with open(os.path.join(directory, name), "wb") as f:
        f.write(data)


def test_reads_whole_notes_from_an_offset_and_leaves_a_torn_tail(tmp_path: Path) -> None:
    node, directory = make_node(tmp_path)
    first = [notes.encode("user:1", 3, 10), notes.encode("dm:a:b", 5, 11)]
    put(directory, NAME, notes.MAGIC + b"".join(first) + notes.encode("user:2", 7, 12)[:9])
    read = notesfile.read_notes(node, NAME)
    assert [n.key for n in read.notes] == ["user:1", "dm:a:b"] and not read.bad
    assert read.dead and read.finished  # nobody holds it: a dead writer's, read to its end
    with open(os.path.join(directory, NAME), "ab") as f:  # the torn note completed, one more after it
        f.write(notes.encode("user:2", 7, 12)[9:] + notes.encode("user:3", 8, 13))
    later = notesfile.read_notes(node, NAME, read.offset)
    assert later.notes == [notes.Note("user:2", 7, 12), notes.Note("user:3", 8, 13)]
    assert notesfile.read_notes(node, NAME, later.offset).notes == []
    small = notesfile.read_notes(node, NAME, 0, max_bytes=20)  # bounded reads: whole notes only
    assert [n.key for n in small.notes] == ["user:1"] and not small.finished


def test_a_locked_file_is_a_live_writers(tmp_path: Path) -> None:
    node, directory = make_node(tmp_path)
    put(directory, NAME, notes.MAGIC + notes.encode("user:1", 1, 1))
    fd = os.open(os.path.join(directory, NAME), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        read = notesfile.read_notes(node, NAME)
        assert not read.dead and not read.finished and len(read.notes) == 1
    finally:
        os.close(fd)
    assert notesfile.read_notes(node, NAME).dead


def test_the_writer_and_the_reader_agree(tmp_path: Path) -> None:
    node = os.fspath(tmp_path / "n1")
    writer = NotesWriter()
    try:
        for i in range(100):
            writer.note(node, f"user:{i}", i + 1)
        (name,) = notesfile.list_notes(node)
        read = notesfile.read_notes(node, name)
        assert [n.key for n in read.notes] == [f"user:{i}" for i in range(100)] and not read.dead
        assert [n for n in os.listdir(notes_dir(node)) if not n.endswith(".notes")] == []  # no temp left
    finally:
        writer.close()
    read = notesfile.read_notes(node, name, read.offset)
    assert read.notes == [] and read.dead and read.finished


@pytest.mark.parametrize(("label", "data", "good"), [
    ("bad magic", b"NOTNOTES" + notes.encode("user:1", 1, 1), 0),
    ("empty", b"", 0),
    ("not UTF-8", notes.MAGIC + notes.encode("user:1", 1, 1) + b"\x00\x02\x00\x00\x00\x01" + b"\0" * 8 + b"\xff\xfe",
     1),
    ("invalid key", notes.MAGIC + notes.encode("user:1", 1, 1) + notes.encode("a\x00b", 1, 1), 1),
    ("not canonical", notes.MAGIC + notes.encode(" lead", 1, 1), 0),
    ("too long a key", notes.MAGIC + notes.encode("k" * 600, 1, 1), 0),
])
def test_damaged_files_are_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, label: str,
                                                  data: bytes, good: int) -> None:
    node, directory = make_node(tmp_path)
    put(directory, NAME, data)
    with caplog.at_level(logging.WARNING, logger="shardlite.replication"):
        read = notesfile.read_notes(node, NAME)
    assert read.bad and not read.finished and len(read.notes) == good, label
    assert "skipping change notes file" in caplog.text


def test_links_fifos_huge_files_and_odd_names_are_never_read(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    node, directory = make_node(tmp_path)
    outside = tmp_path / "outside.notes"
    outside.write_bytes(notes.MAGIC + notes.encode("user:secret", 1, 1))
    os.symlink(outside, os.path.join(directory, NAME))
    fifo = "124-0123456789abcdef.notes"
    os.mkfifo(os.path.join(directory, fifo))
    huge = "125-0123456789abcdef.notes"
    with open(os.path.join(directory, huge), "wb") as f:
        f.write(notes.MAGIC)
        f.truncate(notesfile.MAX_FILE_BYTES + 1)  # sparse
    put(directory, "other.txt", notes.MAGIC)
    put(directory, ".126-0123456789abcdef.notes.tmp", notes.MAGIC)
    assert notesfile.list_notes(node) == [NAME, fifo, huge]
    with caplog.at_level(logging.WARNING, logger="shardlite.replication"):
        for name in (NAME, fifo, huge, "../outside.notes", "other.txt"):
            read = notesfile.read_notes(node, name)
            assert read.bad and read.notes == [], name
    assert caplog.text.count("skipping change notes file") == 5
    with pytest.raises(ValueError):
        notesfile.remove(node, "../outside.notes")
    assert outside.exists()


def test_a_linked_notes_directory_is_not_followed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / NAME).write_bytes(notes.MAGIC + notes.encode("user:1", 1, 1))
    node = tmp_path / "n1"
    (node / ".replica").mkdir(parents=True)
    os.symlink(elsewhere, node / ".replica" / "notes")
    with caplog.at_level(logging.WARNING, logger="shardlite.replication"):
        assert notesfile.list_notes(os.fspath(node)) == []
        assert notesfile.read_notes(os.fspath(node), NAME).notes == []
    assert "not a plain directory" in caplog.text
    other = tmp_path / "n2"
    other.mkdir()
    os.symlink(elsewhere, other / ".replica")
    assert notesfile.list_notes(os.fspath(other)) == []
    assert notesfile.list_notes(os.fspath(tmp_path / "missing")) == []


_POSIX_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a POSIX record lock, what SQLite takes on its files
try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    print("flock granted")
except BlockingIOError:
    print("flock refused")
"""


def test_flock_and_posix_record_locks_do_not_interact(tmp_path: Path) -> None:
    """The liveness lock of a notes file is a ``flock``; SQLite's locks are POSIX record locks (``fcntl``). On
    Linux the two families never see each other: a process holding one does not block the other kind,
    while a second ``flock`` is refused as the reader's liveness test needs."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        out = subprocess.run([sys.executable, "-c", _POSIX_LOCK, os.fspath(path)], capture_output=True, text=True,
                             check=True).stdout
        assert out.strip() == "flock refused"  # the POSIX lock was granted beside our flock; the flock was not
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.lockf(fd, fcntl.LOCK_EX)  # now we hold a POSIX lock: another process's flock is still granted
        probe = "import fcntl,os,sys; fd=os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX|fcntl.LOCK_NB)"
        assert subprocess.run([sys.executable, "-c", probe, os.fspath(path)]).returncode == 0
    finally:
        os.close(fd)


def test_the_hook_composes_with_another_wal_hook_and_never_raises(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    import apsw

    from shardlite.files.checkpoints import WalWatch

    node = os.fspath(tmp_path / "n1")
    writer = NotesWriter()
    try:
        watch = WalWatch()
        hook = writer.hook(node, "user:1", then=watch)
        assert hook(None, "main", 7) == apsw.SQLITE_OK  # type: ignore[arg-type]
        assert watch.frames == 7
        with caplog.at_level(logging.WARNING, logger="shardlite.replication"):
            assert hook(None, "main", 1 << 40) == apsw.SQLITE_OK  # type: ignore[arg-type]  # logged, not raised
        assert "could not write a change note" in caplog.text
        (name,) = notesfile.list_notes(node)
        assert notesfile.read_notes(node, name).notes == [notes.Note("user:1", 7, notesfile.read_notes(
            node, name).notes[0].time_ns)]
    finally:
        writer.close()


def test_unfinished_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    node, directory = make_node(tmp_path)
    dead, live = ".7-0123456789abcdef.notes.tmp", ".8-0123456789abcdef.notes.tmp"
    put(directory, dead, b"SLN")
    put(directory, live, b"")
    put(directory, ".other.tmp", b"")
    fd = os.open(os.path.join(directory, live), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert notesfile.remove_stale_temps(node) == 1
    finally:
        os.close(fd)
    assert sorted(os.listdir(directory)) == [live, ".other.tmp"]
    assert notesfile.remove_stale_temps(os.fspath(tmp_path / "missing")) == 0
