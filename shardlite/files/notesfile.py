"""The reader side of change notes, for a node's replicator: which notes files a node holds, the whole new
notes of one from an offset, and whether its writer is dead (:mod:`shardlite.files.noteswriter` writes them;
:mod:`shardlite.core.notes` is the format).

The caller keeps one offset per file (0 before the first read) and calls :func:`read_notes` again with the
offset it returned; a torn last note (a writer in the middle of one, or killed there) is left for later.
A file whose writer is dead (nobody holds its ``flock``) is complete: once a read that found it dead has
reached its end, the caller may :func:`remove` it. Deadness is decided *before* the read, so a writer that
appended and then died between the two cannot leave notes behind a removal.

Notes files are untrusted input, like a backup: anyone who can write the node directory can put bytes
there. So every file is opened relative to the notes directory's own descriptor, which is reached from
the node directory without following a symlink (``.replica`` or ``notes`` being a link is refused), and
with ``O_NOFOLLOW | O_NONBLOCK``; names must look like a writer's (``<pid>-<16 hex>.notes``); only regular
files are read; a file larger than :data:`MAX_FILE_BYTES` (writers roll theirs over at
:data:`~shardlite.files.noteswriter.ROLL_BYTES`), a wrong magic, a key that is not UTF-8 or not a canonical
shardlite key (:func:`shardlite.core.keys.canonical`): the file is reported ``bad`` (with the whole notes
before the damage) and a warning is logged; nothing raises, and each read takes at most ``max_bytes``.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
from typing import NamedTuple

from ..core import notes
from ..core.keys import canonical
from ..errors import InvalidKey
from .noteswriter import NOTES_SUFFIX
from .rawio import pread_all

__all__ = ["NotesRead", "list_notes", "read_notes", "remove", "remove_stale_temps", "MAX_FILE_BYTES", "READ_BYTES"]

log = logging.getLogger("shardlite.replication")

#: A notes file larger than this is not a writer's (they roll over far earlier): skipped as damaged.
MAX_FILE_BYTES = 1 << 30
#: What one :func:`read_notes` reads at most, by default.
READ_BYTES = 4 << 20

_NAME = re.compile(r"[0-9]{1,10}-[0-9a-f]{16}" + re.escape(NOTES_SUFFIX))
_TEMP = re.compile(r"\.[0-9]{1,10}-[0-9a-f]{16}" + re.escape(NOTES_SUFFIX) + r"\.tmp")
_MAGIC_SIZE = len(notes.MAGIC)
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class NotesRead(NamedTuple):
    """What one read of one notes file found."""

    notes: list[notes.Note]  #: the whole notes after ``offset`` (in the order they were written)
    offset: int  #: where the next read starts (the end of the last whole note read)
    dead: bool  #: nobody held the file's lock when the read began: its writer is gone
    finished: bool  #: dead and read to its end (a torn last note will never be completed): remove it
    bad: bool  #: the file is not a writer's notes file (wrong magic, a bad key, a huge file): skip it


def _warn(node_path: str, name: str, why: str) -> None:
    log.warning("skipping change notes file %r in %s: %s", name[:80], node_path, why)


def _notes_dir_fd(node_path: str) -> int | None:
    """A descriptor of ``<node>/.replica/notes``, reached without following links; None when missing."""
    try:
        node = os.open(node_path, _DIR_FLAGS)
    except FileNotFoundError:
        return None
    try:
        try:
            replica = os.open(".replica", _DIR_FLAGS, dir_fd=node)
        except FileNotFoundError:
            return None
        try:
            return os.open("notes", _DIR_FLAGS, dir_fd=replica)
        except FileNotFoundError:
            return None
        finally:
            os.close(replica)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            log.warning("%s/.replica/notes is not a plain directory (a symlink?): its notes are not read", node_path)
            return None
        raise
    finally:
        os.close(node)


def list_notes(node_path: str) -> list[str]:
    """The names of the notes files in ``node_path`` (sorted), those that look like a writer's; other
    entries are ignored (a writer's unfinished ``.<name>.tmp`` included: :func:`remove_stale_temps`)."""
    dfd = _notes_dir_fd(node_path)
    if dfd is None:
        return []
    try:
        return sorted(name for name in os.listdir(dfd) if _NAME.fullmatch(name))
    finally:
        os.close(dfd)


def _valid_prefix(found: list[notes.Note]) -> tuple[list[notes.Note], str | None]:
    """``found`` up to its first note whose key is not a canonical key, and why it stopped (None: all good)."""
    for i, note in enumerate(found):
        try:
            if canonical(note.key) != note.key:
                return found[:i], f"note {i} holds a key that is not canonical"
        except InvalidKey:
            return found[:i], f"note {i} holds an invalid key"
    return found, None


def read_notes(node_path: str, name: str, offset: int = 0, *, max_bytes: int = READ_BYTES) -> NotesRead:
    """The whole notes of ``name`` (from :func:`list_notes`) in ``node_path`` from ``offset`` (0: the file's
    start), reading at most ``max_bytes``. A file that vanished reads as dead and finished with no notes."""
    if not _NAME.fullmatch(name):
        _warn(node_path, name, "not a notes file name")
        return NotesRead([], offset, False, False, True)
    dfd = _notes_dir_fd(node_path)
    if dfd is None:
        return NotesRead([], offset, True, True, False)
    try:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
        except FileNotFoundError:
            return NotesRead([], offset, True, True, False)
        except OSError as exc:  # ELOOP: a symlink
            _warn(node_path, name, f"cannot be opened as a plain file ({exc.strerror})")
            return NotesRead([], offset, False, False, True)
    finally:
        os.close(dfd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            _warn(node_path, name, "not a regular file")
            return NotesRead([], offset, False, False, True)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # taken: no writer holds it (released by the close)
            dead = True
        except BlockingIOError:
            dead = False
        size = os.fstat(fd).st_size  # after the lock: a dead writer's file no longer grows
        if size > MAX_FILE_BYTES:
            _warn(node_path, name, f"{size} bytes, more than a writer ever writes")
            return NotesRead([], offset, dead, False, True)
        if pread_all(fd, _MAGIC_SIZE, 0) != notes.MAGIC:
            _warn(node_path, name, "it does not start with the notes magic")
            return NotesRead([], offset, dead, False, True)
        start = max(offset, _MAGIC_SIZE)
        data = pread_all(fd, max(0, min(size - start, max_bytes)), start)
        try:
            found, used = notes.decode(data)
            why = None
        except ValueError:  # a key that is not UTF-8: the notes before it
            found, used = _decode_until_bad(data)
            why = "a note's key is not UTF-8"
        good, bad_key = _valid_prefix(found)
        why = why or bad_key
        if why is not None:
            _warn(node_path, name, why)
            return NotesRead(good, start + sum(_size(n) for n in good), dead, False, True)
        # decode stops only before a torn note: a dead writer's file read to its end is complete
        return NotesRead(found, start + used, dead, dead and start + len(data) >= size, False)
    finally:
        os.close(fd)


_HEAD_SIZE = len(notes.encode("", 0, 0))


def _size(note: notes.Note) -> int:
    return _HEAD_SIZE + len(note.key.encode("utf-8"))


def _decode_until_bad(data: bytes) -> tuple[list[notes.Note], int]:
    """The whole notes before the first one whose key is not UTF-8."""
    found: list[notes.Note] = []
    at = 0
    view = memoryview(data)
    while at + _HEAD_SIZE <= len(view):
        end = at + _HEAD_SIZE + int.from_bytes(view[at:at + 2], "big")
        if end > len(view):
            break
        try:
            got, _ = notes.decode(view[at:end])
        except ValueError:
            break
        found.extend(got)
        at = end
    return found, at


def remove(node_path: str, name: str) -> None:
    """Delete the notes file ``name`` (a dead writer's, read to its end); a missing one is fine."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"not a notes file name: {name[:80]!r}")
    dfd = _notes_dir_fd(node_path)
    if dfd is None:
        return
    try:
        os.unlink(name, dir_fd=dfd)
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)


def remove_stale_temps(node_path: str) -> int:
    """Delete the unfinished notes files (``.<name>.tmp``) of writers that died while making them (nobody
    holds their lock); a live writer's, locked for the moment it takes to finish it, is left. Returns how
    many were removed."""
    dfd = _notes_dir_fd(node_path)
    if dfd is None:
        return 0
    removed = 0
    try:
        for name in os.listdir(dfd):
            if not _TEMP.fullmatch(name):
                continue
            try:
                fd = os.open(name, _FILE_FLAGS, dir_fd=dfd)
            except OSError:
                continue  # gone meanwhile (renamed by its writer), or not a plain file: left alone
            try:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its writer is finishing it
                try:
                    os.unlink(name, dir_fd=dfd)
                    removed += 1
                except FileNotFoundError:
                    pass
            finally:
                os.close(fd)
    finally:
        os.close(dfd)
    return removed
