"""Tenant files: atomic creation from a template, and opening with the identity check (rules 3, 6, 7).

Creation never leaves a half-made tenant: the template (shardlite's tables plus the app's whole schema,
built once per process and prefix in memory) is personalised with the key and a fresh incarnation id,
serialized by SQLite, written to a private temporary name in the node directory, optionally fsynced, and
*linked* into place, with a seed ``-wal`` written just before it (:mod:`shardlite.files.seedwal`: the first
commit then skips SQLite's WAL-header fsync). ``link`` fails when the name exists, so two writers can never
both create one path, and the name carries a catalog-issued generation that is never reused.

Opening refuses a file whose stored key (or incarnation, when the catalog knows it) differs from the one
requested: a swapped, misplaced or hand-restored file is never served as another tenant.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence

import apsw

from ..errors import ConfigurationError, IdentityMismatch
from .authorizer import INTERNAL_SQL, Guard
from .engine import Settings, ensure_private_dir, fsync_dir, open_connection
from .sanitize import foreign_references, tenant_objects
from .schema import INTERNAL_STEPS, INTERNAL_VERSION, Step, read_versions, run_step, upgrade
from .seedwal import SeedWal

__all__ = ["build_template", "Personaliser", "write_new_file", "open_tenant", "FileIdentity"]

_WAL_HEADER_OFFSETS = (18, 19)  # file format write/read version: 2 means WAL (what journal_mode=WAL writes)


def build_template(steps: Sequence[Step]) -> bytes:
    """Serialized bytes of a fresh tenant database with shardlite's tables and the app's ``steps``.
    :class:`ConfigurationError` when the steps create objects that reference shardlite's tables."""
    mem = apsw.Connection(":memory:")
    try:
        mem.execute("BEGIN")
        for version_steps in INTERNAL_STEPS:
            for sql in version_steps:
                run_step(mem, sql)
        mem.execute("UPDATE _shardlite_meta SET internal_version = ?", (INTERNAL_VERSION,))
        for step in steps:
            run_step(mem, step)
        found = foreign_references(mem, "main", internal=tenant_objects())
        if found:
            raise ConfigurationError(f"the schema's steps create objects that reference shardlite's own tables "
                                     f"({'; '.join(found)}): the _shardlite_* tables are not part of the app's schema")
        mem.execute(f"PRAGMA user_version = {len(steps)}")
        mem.execute("COMMIT")
        return bytes(mem.serialize("main"))
    finally:
        mem.close()


class Personaliser:
    """A template kept open in memory, personalised for every new tenant (``key`` and ``incarnation``
    stored in ``_shardlite_meta``, the image in WAL format): one UPDATE of the identity row and one
    serialization, instead of loading the image and parsing its schema each time.
    Thread-safe. Only the identity row changes between tenants, so every image is the template plus the
    key, the incarnation and the creation time.

    Calling it returns the image and its seed WAL (``None`` when the image does not fit the seed, which
    is then left to SQLite)."""

    def __init__(self, template: bytes) -> None:
        self._lock = threading.Lock()
        self._mem = apsw.Connection(":memory:")
        self._mem.deserialize("main", template)
        self._seed = SeedWal(_in_wal_format(template))

    def __call__(self, key: str, incarnation: str) -> tuple[bytes, bytes | None]:
        with self._lock:
            self._mem.execute("UPDATE _shardlite_meta SET key = ?, incarnation = ?, created = ? WHERE id = 1",
                              (key, incarnation, time.time()))
            data = _in_wal_format(self._mem.serialize("main"))
        return data, self._seed.for_image(data)

    def close(self) -> None:
        self._mem.close()


def _in_wal_format(image: bytes) -> bytes:
    data = bytearray(image)
    for offset in _WAL_HEADER_OFFSETS:
        data[offset] = 2
    return bytes(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _create_exclusive(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


def write_new_file(path: str, data: bytes, *, fsync: bool, wal: bytes | None = None) -> None:
    """Create ``path`` (mode 0600) holding ``data``, atomically; FileExistsError if it exists.

    ``wal`` (a seed WAL for ``data``) is written to ``path-wal`` before ``path`` is linked, so no
    connection ever sees the database without it; it is not fsynced even when ``fsync`` is set (its one
    frame repeats a page the file already holds, so losing it loses nothing). Paths carry a generation
    that is never reused, so ``path`` never exists; if it does, nothing is written (a seed must never
    reach another database). On any failure neither file is left behind.
    """
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        ensure_private_dir(directory)
        if fsync:
            fsync_dir(os.path.dirname(directory))
    if os.path.lexists(path):
        raise FileExistsError(errno.EEXIST, "tenant file exists", path)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = _create_exclusive(tmp)
    wal_written = False
    try:
        try:
            _write_all(fd, data)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if wal is not None:
            wal_fd = _create_exclusive(path + "-wal")
            wal_written = True
            try:
                _write_all(wal_fd, wal)
            finally:
                os.close(wal_fd)
        os.link(tmp, path)
    except BaseException:
        if wal_written:
            os.unlink(path + "-wal")
        raise
    finally:
        os.unlink(tmp)
    if fsync:
        fsync_dir(directory)


class FileIdentity:
    """What an opened tenant file says about itself."""

    __slots__ = ("key", "incarnation", "internal_version", "app_version", "retired")

    def __init__(self, key: str, incarnation: str, internal_version: int, app_version: int, retired: str | None):
        self.key, self.incarnation, self.retired = key, incarnation, retired
        self.internal_version, self.app_version = internal_version, app_version


def _identity(conn: apsw.Connection) -> FileIdentity:
    rows = conn.execute("SELECT key, incarnation, retired FROM _shardlite_meta WHERE id = 1").fetchall()
    if not rows:
        raise IdentityMismatch("the file has no shardlite identity row")
    internal, app = read_versions(conn)
    key, incarnation, retired = rows[0]
    return FileIdentity(str(key), str(incarnation), internal, app, None if retired is None else str(retired))


def open_tenant(
    path: str,
    *,
    key: str,
    incarnation: str | None,
    settings: Settings,
    steps: Sequence[Step],
    read_only: bool,
    wal_hook: Callable[[apsw.Connection, str, int], int] | None = None,
) -> tuple[apsw.Connection, Guard, FileIdentity]:
    """Open an existing tenant file, check its identity, and bring its schema up to date.

    ``wal_hook``, when given, is installed before anything is read or migrated, so it sees every commit of
    the connection (the migration's too) and SQLite's autocheckpoint never runs on it (a WAL hook replaces
    it): what the connections of a replicated root need (:mod:`shardlite.files.noteswriter`).

    Raises ``apsw.CantOpenError`` when the file does not exist (it is never created here),
    :class:`IdentityMismatch` when it belongs to another key or incarnation. A retired file (moved or
    dropped) is returned as is, without migrating; the caller re-resolves.
    """
    guard = Guard(member_savepoints=not read_only)
    guard.trusted = True  # shardlite's own statements while opening; user SQL only after we return
    conn = open_connection(path, settings, create=False, authorizer=guard)
    try:
        if wal_hook is not None:
            conn.set_wal_hook(wal_hook)
        try:
            ident = _identity(conn)
        except apsw.SQLError as exc:
            raise IdentityMismatch(f"{path} is not a shardlite tenant file ({exc})") from exc
        if ident.key != key:
            raise IdentityMismatch(f"{path} belongs to tenant {ident.key!r}, not {key!r}: refusing to open it")
        if incarnation is not None and ident.incarnation != incarnation:
            raise IdentityMismatch(
                f"{path} holds incarnation {ident.incarnation} of {key!r} but the catalog expects {incarnation}"
            )
        if ident.retired is None and (ident.internal_version < INTERNAL_VERSION or ident.app_version < len(steps)):
            ident = _migrate(conn, steps)
        if read_only:
            conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    guard.trusted = False
    return conn, guard, ident


def _migrate(conn: apsw.Connection, steps: Sequence[Step]) -> FileIdentity:
    """Upgrade in one BEGIN IMMEDIATE transaction (the caller's guard is in trusted mode)."""
    conn.execute(INTERNAL_SQL + "BEGIN IMMEDIATE")
    try:
        ident = _identity(conn)  # re-read under the write lock: another process may have migrated
        if ident.retired is None:
            upgrade(conn, steps, internal_from=ident.internal_version, app_from=ident.app_version)
        conn.execute(INTERNAL_SQL + "COMMIT")
    except BaseException:
        if not conn.get_autocommit():
            conn.execute(INTERNAL_SQL + "ROLLBACK")
        raise
    return _identity(conn)
