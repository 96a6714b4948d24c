"""The writer side of change notes: each process that commits to tenants of a replicated root tells the
node's replicator which tenant committed, how long its log is now, and when (:mod:`shardlite.core.notes`).

Where: one notes file per process and node, ``<node>/.replica/notes/<pid>-<random>.notes`` (the directories
0700, the file 0600), made when the process first commits to a tenant of that node. It appears whole: it
is created under a temporary dot-name, locked, given :data:`~shardlite.core.notes.MAGIC`, then renamed into
place, so a reader never sees a notes file without its magic. Every note is one ``os.write`` of the whole
note on an ``O_APPEND`` descriptor: notes of several threads never interleave, and a process killed in the
middle leaves at most one torn note at the end, which readers leave for later.

Liveness: the process holds ``flock(LOCK_EX)`` on each of its notes files for as long as it lives (the
descriptor stays open); the replicator tells a dead writer's file by taking the lock
(:mod:`shardlite.files.notesfile`). On Linux, ``flock`` locks and the POSIX record locks SQLite uses
(``fcntl``) are separate lock families that never see each other (flock(2): "flock() and fcntl(2) locks do
not interact", checked by ``tests/test_notesfile.py``; NFS is the exception, where ``flock`` is emulated
with ``fcntl`` locks: keep roots on a local file system); and the lock is taken on the notes file only,
never on a tenant's files. This module
never opens a descriptor of a tenant's database or ``-shm`` file: closing one would drop the process's
POSIX locks on it, SQLite's included (docs/replication.md, "the -shm trap").

A file is rolled over once it passes :data:`ROLL_BYTES`: the next note goes to a new file, and the old one
is closed (its lock released, so the replicator reads it to its end and removes it) at the following
roll-over or when the writer closes, never while another thread may still be writing to it.

When: :meth:`NotesWriter.hook` is the WAL hook of a tenant connection. SQLite calls it once after each
commit that wrote to the log, with the log's frame count; installing it also turns SQLite's
autocheckpoint off on that connection (a WAL hook replaces it), which a replicated root needs: its writers
never checkpoint a tenant, the replicator does after capturing (``shardlite.files.walcapture``). A note
that cannot be written (a full disk) is logged and skipped, never turned into an error of a commit that
is already durable: the replicator's sweep of log sizes finds such a tenant (it then gets its capture time
instead of its commit time).

A forked child never writes to its parent's files: it forgets them (closing its copies of the descriptors,
which leaves the parent's ``flock`` in place) and makes its own on its first commit.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import threading
import time
import weakref
from collections.abc import Callable

import apsw

from ..core import notes
from .engine import ensure_private_dir, on_fork_in_child

__all__ = ["NotesWriter", "notes_dir", "NOTES_SUFFIX", "ROLL_BYTES", "WalHook"]

log = logging.getLogger("shardlite.replication")

NOTES_SUFFIX = ".notes"
#: A notes file is rolled over once it is this long (about two million notes).
ROLL_BYTES = 64 << 20

WalHook = Callable[[apsw.Connection, str, int], int]


def notes_dir(node_path: str) -> str:
    """The directory of a node's notes files."""
    return os.path.join(node_path, ".replica", "notes")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class NotesWriter:
    """This process's notes files, one per node directory, made on first use. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}  # node path -> descriptor (O_APPEND, flock held)
        self._paths: dict[str, str] = {}  # node path -> the notes file's path
        self._sizes: dict[str, int] = {}  # node path -> bytes written to its file (roughly: not locked)
        self._rolled: dict[str, int] = {}  # node path -> its file rolled over last, closed at the next roll-over
        self._failed: set[str] = set()  # node paths whose notes failed once (logged once)
        self._closed = False
        _writers.add(self)

    def _create(self, node_path: str) -> tuple[int, str]:
        directory = notes_dir(node_path)
        ensure_private_dir(directory)
        name = f"{os.getpid()}-{secrets.token_hex(8)}{NOTES_SUFFIX}"
        temp = os.path.join(directory, f".{name}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
            _write_all(fd, notes.MAGIC)
            path = os.path.join(directory, name)
            os.rename(temp, path)  # the lock belongs to the file, not to its name
        except BaseException:
            os.close(fd)
            try:
                os.unlink(temp)
            except FileNotFoundError:
                pass
            raise
        return fd, path

    def _fd(self, node_path: str) -> int:
        fd = self._fds.get(node_path)
        if fd is not None:
            return fd
        with self._lock:
            fd = self._fds.get(node_path)
            if fd is None:
                if self._closed:
                    raise OSError("the notes writer is closed")
                fd, self._paths[node_path] = self._create(node_path)
                self._fds[node_path] = fd
            return fd

    def note(self, node_path: str, key: str, frames: int) -> None:
        """Append one note (``key`` committed, leaving ``frames`` frames in its log, now) to this process's
        notes file of ``node_path``: one ``os.write``. Failures are logged (once per node) and swallowed."""
        try:
            data = notes.encode(key, frames, time.time_ns())
        except ValueError as exc:
            self._failure(node_path, key, exc)
            return
        self._append(node_path, data, key)

    def _append(self, node_path: str, data: bytes, key: str) -> None:
        try:
            fd = self._fds.get(node_path)
            if fd is None:
                fd = self._fd(node_path)
            if os.write(fd, data) != len(data):  # a short write on a regular file: the disk is full
                raise OSError("short write of a change note (disk full?)")
            size = self._sizes[node_path] = self._sizes.get(node_path, 0) + len(data)
            if size > ROLL_BYTES:
                self._roll(node_path, fd)
        except OSError as exc:
            self._failure(node_path, key, exc)

    def _failure(self, node_path: str, key: str, exc: Exception) -> None:
        if node_path not in self._failed:
            self._failed.add(node_path)
            log.warning("could not write a change note for tenant %r under %s (%s); the replicator's sweep of log "
                        "sizes will find the commit", key, node_path, exc)

    def _roll(self, node_path: str, fd: int) -> None:
        """The next note of ``node_path`` goes to a new file; ``fd`` is closed at the next roll-over (a
        thread that looked it up just before may still write to it)."""
        with self._lock:
            if self._fds.get(node_path) != fd:
                return  # another thread rolled it
            del self._fds[node_path]
            self._sizes[node_path] = 0
            old = self._rolled.pop(node_path, None)
            self._rolled[node_path] = fd
        if old is not None:
            os.close(old)

    def hook(self, node_path: str, key: str, then: WalHook | None = None) -> WalHook:
        """The WAL hook that notes each commit of tenant ``key`` (in node ``node_path``); ``then``, when
        given, is another WAL hook called after the note (its answer is returned). ``ValueError`` for a key
        a note cannot carry (shardlite's keys always fit)."""
        make, append, now, ok = notes.encoder(key), self._append, time.time_ns, apsw.SQLITE_OK
        failure = self._failure

        def noted(conn: apsw.Connection, dbname: str, frames: int) -> int:
            # runs after the commit is durable: nothing raised here may reach the committer
            try:
                append(node_path, make(frames, now()), key)
            except Exception as exc:  # noqa: BLE001 - a number out of range: logged, the commit stands
                failure(node_path, key, exc)
            return ok

        if then is None:
            return noted
        chained = then

        def noted_then(conn: apsw.Connection, dbname: str, frames: int) -> int:
            noted(conn, dbname, frames)
            return chained(conn, dbname, frames)
        return noted_then

    def files(self) -> dict[str, str]:
        """This process's notes files by node path (for tests and ``status``)."""
        with self._lock:
            return {node: self._paths[node] for node in self._fds}

    def close(self) -> None:
        """Close every notes file (their locks go: the files read as a dead writer's, to be consumed and
        removed by the replicator). Later notes are logged as failures."""
        with self._lock:
            self._closed = True
            fds, self._fds = list(self._fds.values()) + list(self._rolled.values()), {}
            self._rolled = {}
        for fd in fds:
            os.close(fd)

    def _forget_after_fork(self) -> None:
        for fd in list(self._fds.values()) + list(self._rolled.values()):
            try:
                os.close(fd)  # our copy only: the parent's descriptor keeps its flock
            except OSError:
                pass
        self._fds = {}
        self._rolled = {}
        self._sizes = {}
        self._paths = {}
        self._failed = set()
        self._lock = threading.Lock()


_writers: weakref.WeakSet[NotesWriter] = weakref.WeakSet()


def _after_fork() -> None:
    for writer in _writers:
        writer._forget_after_fork()


on_fork_in_child(_after_fork)
