"""The SQLite engine layer: APSW only, the pragmas every connection gets, private files, fsync, fork safety.

Rules enforced here:

* APSW is the only SQLite library shardlite uses; at import it refuses SQLite builds affected by the
  WAL-reset corruption bug (3.7.0 to 3.51.2, fixed in 3.51.3, 3.50.7 and 3.44.6).
* Every connection runs in WAL mode with a documented ``synchronous`` setting (rules: durability is explicit):
  ``NORMAL``
  survives a process crash, ``FULL`` survives power loss. Busy timeout on, foreign keys on, trusted_schema
  off, defensive mode on, extension loading off.
* Directories shardlite creates are 0700 and every database-family file 0600 (rule 6); directories that
  already exist keep their mode (a warning says when one is open to others). SQLite gives the
  ``-wal`` and ``-shm`` files the database file's mode, so creating the main file 0600 ourselves is enough.
* A forked child never uses (nor closes) a connection it inherited: :func:`abandon_after_fork` hooks keep
  those objects alive forever in the child, because closing them would run SQLite's unlock and WAL cleanup
  against locks that belong to the parent.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import stat
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import apsw

from ..errors import (
    ConfigurationError,
    DirectoryModeWarning,
    StorageError,
    StorageFull,
    StorageReadOnly,
    UnsupportedSQLite,
)

__all__ = [
    "Settings",
    "harden",
    "track",
    "SYNCHRONOUS_LEVELS",
    "wal_reset_bug_affected",
    "check_sqlite_version",
    "open_connection",
    "ensure_private_dir",
    "DirectoryModeWarning",
    "warn_if_open",
    "create_private_file",
    "fsync_path",
    "fsync_dir",
    "on_fork_in_child",
    "abandon",
]

SYNCHRONOUS_LEVELS: Final = ("NORMAL", "FULL", "EXTRA")


def wal_reset_bug_affected(version: tuple[int, int, int]) -> bool:
    """True for SQLite versions with the WAL-reset corruption bug (3.7.0 .. 3.51.2 minus the backports)."""
    if version < (3, 7, 0) or version >= (3, 51, 3):
        return False
    major_minor = version[:2]
    if major_minor == (3, 50):
        return version < (3, 50, 7)
    if major_minor == (3, 44):
        return version < (3, 44, 6)
    return True


def check_sqlite_version(version_text: str | None = None) -> tuple[int, int, int]:
    """Raise :class:`UnsupportedSQLite` unless the linked SQLite is free of the WAL-reset bug."""
    text = version_text if version_text is not None else apsw.sqlite_lib_version()
    parts = [int(p) for p in text.split(".")[:3]] + [0, 0, 0]
    version = (parts[0], parts[1], parts[2])
    if wal_reset_bug_affected(version):
        raise UnsupportedSQLite(
            f"SQLite {text} (linked by APSW {apsw.apsw_version()}) has the WAL-reset corruption bug; "
            "install an APSW wheel bundling SQLite >= 3.51.3 (pip install -U apsw)"
        )
    return version


check_sqlite_version()


@dataclass(frozen=True)
class Settings:
    """Engine settings shared by every connection a router opens.

    ``synchronous``: ``"NORMAL"`` (default; an acknowledged write survives a crash of the process, and may
    be lost on power loss) or ``"FULL"``/``"EXTRA"`` (an acknowledged write survives power loss; every commit
    fsyncs). ``busy_timeout_ms``: how long a writer waits for another's lock before :class:`~shardlite.Busy`.
    ``cache_kib``: page cache per tenant connection. ``max_open``: bound on this process's open tenant
    connections. ``statement_timeout``: seconds one statement on a tenant connection may run before it is
    interrupted (:class:`~shardlite.QueryTimeout`; ``None``: never). ``max_rows`` / ``max_result_bytes``: caps
    on what one read (``query``, ``map``, the CLI) returns (:class:`~shardlite.ResultTooLarge`); bytes count
    the values' data (a string's or blob's length, 9 bytes for a number).
    """

    synchronous: str = "NORMAL"
    busy_timeout_ms: int = 5000
    cache_kib: int = 512
    max_open: int = 256
    statement_timeout: float | None = 30.0
    max_rows: int = 100_000
    max_result_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        level = self.synchronous.upper()
        if level not in SYNCHRONOUS_LEVELS:
            raise ConfigurationError(f"synchronous must be one of {SYNCHRONOUS_LEVELS}, not {self.synchronous!r}")
        object.__setattr__(self, "synchronous", level)
        if self.busy_timeout_ms < 0:
            raise ConfigurationError("busy_timeout_ms must be >= 0")
        if self.max_open < 1:
            raise ConfigurationError("max_open must be >= 1")
        if self.cache_kib < 16:
            raise ConfigurationError("cache_kib must be >= 16")
        if self.statement_timeout is not None and not self.statement_timeout > 0:
            raise ConfigurationError("statement_timeout is a number of seconds > 0, or None for no deadline")
        if type(self.max_rows) is not int or self.max_rows < 1:
            raise ConfigurationError("max_rows must be an int >= 1")
        if type(self.max_result_bytes) is not int or not 1024 <= self.max_result_bytes <= 1 << 31:
            raise ConfigurationError("max_result_bytes must be an int from 1024 to 2**31")

    @property
    def deadline(self) -> float:
        """``statement_timeout`` as the progress handler uses it (infinite when there is none)."""
        return float("inf") if self.statement_timeout is None else float(self.statement_timeout)

    @property
    def fsync_files(self) -> bool:
        """Whether files we write outside SQLite (new tenants) are fsynced: yes unless NORMAL."""
        return self.synchronous != "NORMAL"


#: Mode bits that make a directory open to others: group or other write, other read or search.
_OPEN_TO_OTHERS: Final = stat.S_IWGRP | stat.S_IWOTH | stat.S_IROTH | stat.S_IXOTH


def warn_if_open(path: str, *, stacklevel: int = 2) -> bool:
    """Warn (:class:`DirectoryModeWarning`) when the existing directory ``path`` is open to others (group
    or other write, other read or search); True when it warned. The mode is never changed."""
    current = stat.S_IMODE(os.stat(path).st_mode)
    if not current & _OPEN_TO_OTHERS:
        return False
    warnings.warn(DirectoryModeWarning(
        f"{path} has mode {current:04o}: other users can list or change what shardlite keeps there; shardlite "
        f"leaves the mode of directories it did not create alone: tighten it yourself (chmod 0700 {path}) "
        "or use a directory of your own"), stacklevel=stacklevel + 1)
    return True


def ensure_private_dir(path: str) -> list[str]:
    """Make sure ``path`` is a directory, creating it and any missing parents with mode 0700 (whatever the
    umask); return the directories created, outermost first.

    A directory that already exists keeps its mode (a shared parent such as ``/tmp`` or a group-writable
    setgid directory must not lose its bits): when ``path`` itself exists and is open to others,
    :func:`warn_if_open` warns instead."""
    path = os.path.abspath(path)
    missing = []
    probe = path
    while not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    created = []
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue  # made meanwhile by someone else: theirs, left as it is
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask
        created.append(directory)
    if not missing:
        warn_if_open(path, stacklevel=2)
    return created


def create_private_file(path: str) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (before SQLite creates it 0644)."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600)
    os.close(fd)
    if stat.S_IMODE(os.stat(path).st_mode) != 0o600:
        os.chmod(path, 0o600)


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """fsync a directory so that a rename or link inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs_call() -> Callable[[int], int] | None:
    """libc's ``syncfs`` where it reports write-back errors (Linux 5.8 and later), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return None
    if (major, minor) < (5, 8):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int]
    call.restype = ctypes.c_int
    return call


# Python's os module has sync() (every filesystem, and POSIX lets it return early) and fsync() (one file:
# a backup of 10,000 small tenants would wait for 10,000 journal commits); syncfs(2) flushes one
# filesystem and waits, so it is called through ctypes.
_SYNCFS = _syncfs_call()


def sync_filesystem(path: str) -> bool:
    """Make every write to the filesystem holding ``path`` durable (file data, inodes and directory
    entries), with one ``syncfs(2)``. False where that is unavailable: the caller fsyncs file by file."""
    if _SYNCFS is None:
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({path}): {os.strerror(err)}")
    finally:
        os.close(fd)
    return True


# Sleeps of a waiting writer, in seconds: short first, since shardlite's transactions hold a tenant's lock
# for tens of microseconds; SQLite's own busy handler sleeps 1 ms, then 2, 5, 10 ... (its first wait
# alone is twenty such transactions). After the last step, 10 ms sleeps until the timeout.
_BUSY_STEPS = (0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01)
_BUSY_WAITED = tuple(sum(_BUSY_STEPS[:i]) for i in range(len(_BUSY_STEPS)))


def busy_delay(count: int, limit: float) -> float | None:
    """How long a writer that found a lock taken for the ``count``-th time in a row (0 first) sleeps
    before trying again, or None once it has waited ``limit`` seconds in all: the busy handler's schedule."""
    if count < len(_BUSY_STEPS):
        delay, slept = _BUSY_STEPS[count], _BUSY_WAITED[count]
    else:
        delay = _BUSY_STEPS[-1]
        slept = _BUSY_WAITED[-1] + _BUSY_STEPS[-1] + (count - len(_BUSY_STEPS)) * delay
    if slept >= limit:
        return None
    return min(delay, limit - slept)


def set_busy_timeout(conn: apsw.Connection, timeout_ms: int) -> None:
    """Let ``conn`` wait up to ``timeout_ms`` for another connection's lock (0: fail at once), sleeping
    per :func:`busy_delay`. Replaces ``setbusytimeout``, whose handler is SQLite's own."""
    if timeout_ms <= 0:
        conn.setbusytimeout(0)
    else:
        conn.setbusyhandler(_busy_handler(timeout_ms))


@functools.lru_cache(maxsize=64)
def _busy_handler(timeout_ms: int) -> Callable[[int], bool]:
    """The busy handler for one timeout (shared by every connection: it holds no per-connection state)."""
    limit = timeout_ms / 1000

    def wait(count: int) -> bool:
        delay = busy_delay(count, limit)
        if delay is None:
            return False
        time.sleep(delay)
        return True

    return wait


Authorizer = Callable[[int, str | None, str | None, str | None, str | None], int]


def harden(conn: apsw.Connection) -> None:
    """The settings every connection to a shardlite file gets: closing it never checkpoints (the pool evicting
    an idle tenant must not turn into a checkpoint and an fsync: the WAL stays valid on disk), defensive
    mode, untrusted schema, no extensions, no ATTACH."""
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
    conn.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0)
    conn.enable_load_extension(False)
    conn.limit(apsw.SQLITE_LIMIT_ATTACHED, 0)


def open_connection(
    path: str,
    settings: Settings,
    *,
    create: bool = False,
    readonly: bool = False,
    authorizer: Authorizer | None = None,
    cache_kib: int | None = None,
) -> apsw.Connection:
    """Open ``path`` with APSW and apply shardlite's pragmas.

    ``create=False`` never creates a file (a missing file raises ``apsw.CantOpenError``).
    The journal mode is switched to WAL only when the file is not in WAL mode yet.
    """
    if readonly:
        flags = apsw.SQLITE_OPEN_READONLY
    else:
        flags = apsw.SQLITE_OPEN_READWRITE | (apsw.SQLITE_OPEN_CREATE if create else 0)
    flags |= apsw.SQLITE_OPEN_NOFOLLOW | apsw.SQLITE_OPEN_EXRESCODE
    conn = apsw.Connection(path, flags=flags)
    try:
        set_busy_timeout(conn, settings.busy_timeout_ms)
        harden(conn)
        if not readonly:
            _switch_to_wal(conn, settings.busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA synchronous={settings.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA cache_size=-{cache_kib or settings.cache_kib}")
        if authorizer is not None:
            conn.authorizer = authorizer
    except BaseException:
        conn.close()
        raise
    track(conn)
    return conn


def _switch_to_wal(conn: apsw.Connection, timeout: float) -> None:
    """Put the file in WAL mode if it is not. Changing the journal mode needs an exclusive lock and SQLite
    does not run the busy handler for it, so another process initialising the same file at that moment
    (several processes opening a fresh root) is waited out here, within the busy timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode").fetchall()[0][0]
            if str(mode).lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL").fetchall()
            return
        except apsw.BusyError:
            if time.monotonic() + delay > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.05)


# --- fork safety -------------------------------------------------------------------------------------------

_tracked: weakref.WeakSet[apsw.Connection] = weakref.WeakSet()
_tracked_lock = threading.Lock()
_abandoned: list[Any] = []  # inherited objects a child keeps alive forever and never touches
_child_hooks: list[Callable[[], None]] = []


def track(conn: apsw.Connection) -> None:
    """Count ``conn`` among this process's connections that a forked child abandons (never closes)."""
    with _tracked_lock:
        _tracked.add(conn)


def abandon(objects: list[Any]) -> None:
    """In a forked child: keep ``objects`` (SQLite handles of the parent) alive for ever, never used nor
    closed (a close could wait on a mutex a parent thread held at the fork)."""
    _abandoned.extend(objects)


def on_fork_in_child(hook: Callable[[], None]) -> None:
    """Register ``hook`` to run in a forked child (after inherited connections are abandoned)."""
    _child_hooks.append(hook)


def _after_fork_in_child() -> None:
    global _tracked_lock
    _tracked_lock = threading.Lock()
    _abandoned.extend(list(_tracked))
    _tracked.clear()
    for hook in list(_child_hooks):
        hook()


os.register_at_fork(after_in_child=_after_fork_in_child)


def free_bytes(path: str) -> int:
    """Bytes an unprivileged process may still write on the file system holding ``path`` (``OSError`` when
    it cannot be told: the path is missing, say)."""
    found = os.statvfs(path)
    return found.f_bavail * found.f_frsize


# --- storage failures ---------------------------------------------------------------------------------------------

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_READ_ONLY_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})


def storage_error(exc: BaseException, key: str, path: str | None) -> StorageError | None:
    """The shardlite error for a storage failure ``exc`` met while working on tenant ``key`` (file ``path``):
    it names both and says what to do; None when ``exc`` is not a storage failure."""
    where = f"tenant {key!r}" + (f" ({path})" if path else "")
    if isinstance(exc, apsw.FullError) or (isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS):
        return StorageFull(f"{where}: the disk holding it is full; nothing of this transaction was committed: free "
                           "space there, or add a node and move tenants to it (shardlite nodes add, shardlite "
                           "rebalance plan/apply)")
    if (isinstance(exc, (apsw.ReadOnlyError, apsw.PermissionsError))
            or (isinstance(exc, OSError) and exc.errno in _READ_ONLY_ERRNOS)):
        return StorageReadOnly(f"{where}: the file or its directory cannot be written by this process ({exc}); "
                               "nothing was committed: make them writable by this user (mode 0600/0700); the "
                               "router opens the file again by itself on the next write")
    if isinstance(exc, (apsw.IOError, apsw.CorruptError, apsw.NotADBError)) or isinstance(exc, OSError):
        return StorageError(f"{where}: the storage failed ({type(exc).__name__}: {exc}); nothing of this "
                            "transaction was committed: check the disk (dmesg) and the file "
                            "(PRAGMA integrity_check on a copy)")
    return None

