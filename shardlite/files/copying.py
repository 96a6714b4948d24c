"""Copies of tenant files through SQLite (rules: copies go through SQLite and are fsynced before anything routes to
them), and how they are verified.

Copies never use ``cp`` or ``open()`` on a live file: they go through SQLite's online backup API from a
*trusted* connection that user SQL never reaches (tenant connections refuse ATTACH, which would also refuse
``VACUUM INTO``). Trusted connections fire no trigger and expand no view (:func:`inert`): a file's schema
cannot add effects to a copy, a check or the fence. The destination is created 0600 before SQLite opens
it and fsynced (file and directory) before anything routes to it.

Verification comes in two strengths:

* fully, before a move's fence: ``integrity_check`` of the copy, per-table row counts (:func:`row_counts`)
  and a content digest of the whole database image (:func:`page_digest`), both equal to the source's
  pinned snapshot;
* cheaply, under the fence: the page digest alone.

:func:`page_digest` hashes the image as SQLite serializes it (xxh3-128), masking the header fields that
a backup legitimately rewrites; a backup is page-exact, so equal digests mean equal content.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import apsw
import xxhash

from .engine import create_private_file, fsync_dir, fsync_path, set_busy_timeout

__all__ = ["write_locked", "open_trusted", "open_source", "inert", "backup_into", "row_counts", "page_digest",
           "integrity_ok", "fsync_file_and_dir", "remove_db_files"]

# Header bytes a backup rewrites on the destination: file change counter (24..27), schema cookie (40..43:
# set to the destination's old cookie + 1 so its readers reload) and the version-valid-for number (92..95).
_VOLATILE_HEADER = ((24, 28), (40, 44), (92, 96))


def open_trusted(path: str, *, create: bool = False, busy_timeout_ms: int = 5000) -> apsw.Connection:
    """A connection for copying and verifying: no authorizer (never handed to user code), and no schema
    object of the file's runs on it (:func:`inert`)."""
    if create:
        create_private_file(path)
    flags = apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW
    conn = apsw.Connection(path, flags=flags)
    try:
        inert(conn)
        set_busy_timeout(conn, busy_timeout_ms)
    except BaseException:
        conn.close()
        raise
    return conn


def inert(conn: apsw.Connection) -> apsw.Connection:
    """Make ``conn`` run nothing the file's schema defines: triggers never fire and views never expand
    (a statement on a view fails), functions in the schema must be innocuous (trusted_schema off), and
    the SQL that corrupts files on purpose is refused (defensive). shardlite's own statements on a file
    (copies, checks, the fence, the rebuild of its tables) then do exactly what they say, whatever a
    file's schema holds. Returns ``conn``."""
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_TRIGGER, 0)
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_VIEW, 0)
    conn.config(apsw.SQLITE_DBCONFIG_TRUSTED_SCHEMA, 0)
    conn.config(apsw.SQLITE_DBCONFIG_DEFENSIVE, 1)
    conn.config(apsw.SQLITE_DBCONFIG_ENABLE_LOAD_EXTENSION, 0)
    return conn


def open_source(path: str, *, busy_timeout_ms: int = 5000) -> apsw.Connection:
    """A trusted connection to a live file (a tenant, the global DB) to copy or fence it, which leaves the
    log as it found it: no checkpoint of the WAL into the file on close (a fsynced write of the live
    file, ~0.9 ms for a small tenant; tenant connections close the same way, engine.py), and none after
    its own commits (a fence, a lifted fence) either: the log of a replicated tenant is checkpointed only
    by its replicator, after capturing it (nothing is checkpointed away before it is captured), and an
    unreplicated tenant's own writers fold the log in at their next commit."""
    conn = open_trusted(path, busy_timeout_ms=busy_timeout_ms)
    conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
    conn.wal_autocheckpoint(0)
    return conn


@contextmanager
def write_locked(path: str, *, busy_timeout_ms: int, busy: Callable[[apsw.BusyError], BaseException],
                 wal_hook: Callable[[apsw.Connection, str, int], int] | None = None) -> Iterator[apsw.Connection]:
    """One of shardlite's own write transactions on a live file (the fence of a move, a drop or a
    restore): an inert trusted connection (:func:`open_source`) inside ``BEGIN IMMEDIATE``, committed
    when the block ends normally, rolled back when it raises (a block may roll back itself), closed
    either way. ``busy(exc)`` is what to raise when the file stays locked past ``busy_timeout_ms``.
    ``wal_hook``: the connection's WAL hook (a replicated root's notes: ``Store.note_hook``)."""
    conn = open_source(path, busy_timeout_ms=busy_timeout_ms)
    if wal_hook is not None:
        conn.set_wal_hook(wal_hook)
    try:
        try:
            conn.execute("BEGIN IMMEDIATE")
        except apsw.BusyError as exc:
            raise busy(exc) from exc
        try:
            yield conn
            if not conn.get_autocommit():
                conn.execute("COMMIT")
        except BaseException:
            if not conn.get_autocommit():
                conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


def backup_into(dest: apsw.Connection, source: apsw.Connection) -> None:
    """Copy ``source`` into ``dest`` in one backup step (pages=-1: one consistent snapshot that does
    not restart when the source is written meanwhile)."""
    with dest.backup("main", source, "main") as backup:
        backup.step(-1)


def _tables(conn: apsw.Connection) -> list[tuple[str, bool]]:
    rows = conn.execute("SELECT name, sql FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
                        "ORDER BY name").fetchall()
    return [(str(name), "WITHOUT ROWID" in str(sql or "").upper()) for name, sql in rows]


def row_counts(conn: apsw.Connection) -> dict[str, int]:
    """``{table: rows}`` for every table of ``conn`` (call it inside a transaction to pin the snapshot)."""
    result: dict[str, int] = {}
    for name, _ in _tables(conn):
        quoted = '"' + name.replace('"', '""') + '"'
        found: Any = conn.execute(f"SELECT count(*) FROM {quoted}").fetchall()[0][0]
        result[name] = int(found)
    return result


def page_digest(conn: apsw.Connection) -> str:
    """xxh3-128 of the serialized database image, masking header fields a backup rewrites."""
    image = conn.serialize("main")
    if image is None:
        return ""
    digest = xxhash.xxh3_128()
    start = 0
    for low, high in _VOLATILE_HEADER:
        digest.update(image[start:low])
        start = high
    digest.update(image[start:])
    return digest.hexdigest()


def integrity_ok(conn: apsw.Connection) -> bool:
    rows = conn.execute("PRAGMA integrity_check").fetchall()
    return rows == [("ok",)]


def fsync_file_and_dir(path: str) -> None:
    fsync_path(path)
    fsync_dir(os.path.dirname(path))


def remove_db_files(path: str) -> None:
    """Delete a database file with its -wal and -shm (missing ones are fine)."""
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass


@contextmanager
def read_snapshot(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """Pin one read snapshot of ``conn`` for the block (a backup from ``conn`` inside it uses it too)."""
    conn.execute("BEGIN")
    try:
        conn.execute("SELECT count(*) FROM sqlite_schema").fetchall()
        yield conn
    finally:
        conn.execute("COMMIT")
