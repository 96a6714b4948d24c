"""Backup of a whole data root or single tenants, and tenant export (restore and import: :mod:`.restore`).

Backup (``router.backup(dest, keys=None, parallel=4)``, ``shardlite backup DEST``) copies every tenant and
the global DB through SQLite while the application keeps writing (each file is one consistent snapshot; the
set is not one global snapshot: each tenant is consistent on its own, as tenants are independent), up to
``parallel`` copies at once. The destination holds ``manifest.json`` (key, node, schema version, size,
xxh3-128 checksum of the copied file, and the source file's stat signature), ``global.<checksum>.db``,
``app_global.<checksum>.db`` (the app's own global tables) and
``tenants/<2 hex>/<digest>.<checksum>.db``. Copies are standalone files (rollback journal mode), mode 0600.
They are made durable together (one ``syncfs`` of the destination's filesystem, or an fsync of each file
where there is none) before the manifest that names them is written and fsynced; their names carry their
checksum, so a new copy never replaces a file the previous manifest names and a backup interrupted at any
point leaves the previous one whole. Once the new manifest is durable, the copies it no longer names are
removed. An incremental run skips a tenant whose file signature (generation, size and modification time
of the file and its WAL) is unchanged since the previous manifest in the same destination: any commit
rewrites the WAL, a checkpoint rewrites the file. A backup holds an exclusive lock on the destination and
a restore a shared one: a second backup into the same place, or one into a directory being restored
from, is refused with :class:`~shardlite.ConfigurationError`.

A backup that fails (a full destination, an unreadable tenant) removes what it wrote: the copies and
directories of this run, never a file the previous manifest names, and raises a
:class:`~shardlite.ShardliteError` naming the destination and the cause. The destination's previous
manifest is untrusted like any other (:mod:`shardlite.services.manifest`): one that is not what a backup writes is
refused before anything is written.

Restore and import live in :mod:`shardlite.services.restore` (re-exported here); export writes one tenant to a
standalone SQLite file the same way a backup copies it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import apsw
import xxhash

from ..core.keys import canonical, key_digest
from ..errors import BackupFailed, ConfigurationError, UnknownTenant
from ..files.catalog import TenantRecord
from ..files.copying import backup_into, open_source, open_trusted
from ..files.engine import ensure_private_dir, fsync_dir, fsync_path, sync_filesystem
from ..front.store import Store
from .manifest import FORMAT, MANIFEST, OURS, file_checksum, load
from .manifest import locked as _locked
from .restore import import_tenant, restore, restore_globals

__all__ = ["backup", "restore", "restore_globals", "export_tenant", "import_tenant", "file_checksum", "MANIFEST",
           "BackupFailed"]


def _signature(path: str, generation: int) -> list[int]:
    sig = [generation]
    for suffix in ("", "-wal"):
        try:
            st = os.stat(path + suffix)
            sig += [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            sig += [0, 0]
    return sig


#: Tenants up to this size (file plus WAL) are copied through ``sqlite3_serialize`` into memory and
#: written out in one go; larger ones page by page through the backup API.
SERIALIZE_LIMIT = 64 * 1024 * 1024
#: Bytes 18 and 19 of the header: file format write/read version, 1 for a rollback-journal file.
_HEADER_SPLIT = (18, 20)
_ROLLBACK_VERSIONS = b"\x01\x01"
#: Copies running at once in a backup by default (each holds at most one SERIALIZE_LIMIT image in memory).
#: Opening a cold tenant (SQLite creating and removing its -wal and -shm, mapping the -shm) dominates a
#: small copy and does not scale with threads here: on a 2-core VM, 200 tenants of 57 KB took 74-80 ms
#: inline and 103-105 ms with 2 or 4 threads. ``parallel`` > 1 is for storage where copies wait on I/O.
PARALLEL = 1


def _serialized(source: apsw.Connection) -> tuple[list[bytes | memoryview], str, int]:
    """SQLite's image of ``source`` (every page read through the pager in one read transaction, the WAL
    included: a consistent snapshot) as the parts of a standalone file, its header marked rollback-journal
    without copying the image: (parts, checksum, size)."""
    image = source.serialize("main") or b""
    view = memoryview(image)
    low, high = _HEADER_SPLIT
    parts: list[bytes | memoryview] = [view[:low], _ROLLBACK_VERSIONS, view[high:]] if len(image) > high else [view]
    digest = xxhash.xxh3_128()
    for part in parts:
        digest.update(part)
    return parts, digest.hexdigest(), len(image)


def standalone_image(path: str) -> bytes:
    """A consistent standalone (rollback-journal) image of the SQLite file ``path``, read through SQLite in
    one read transaction (what a backup copies of a small file)."""
    source = open_source(path)
    try:
        parts, _checksum, _size = _serialized(source)
    finally:
        source.close()
    return b"".join(parts)


def _snapshot_into(source_path: str, temp: str, *, durable: bool) -> tuple[str, int]:
    """Write a standalone (rollback-journal) snapshot of ``source_path`` to the new file ``temp`` (0600);
    return its checksum and size. ``durable``: fsynced before returning; otherwise the caller makes it
    durable (one filesystem sync for a whole backup).

    Both ways of copying go through SQLite (rule 7): a small file is serialized by SQLite
    (:func:`_serialized`); a large one goes page by page through the backup API."""
    source = open_source(source_path)
    try:
        if _size_with_wal(source_path) <= SERIALIZE_LIMIT:
            parts, checksum, size = _serialized(source)
            _write_private(temp, parts, durable=durable)
            return checksum, size
        dest = open_trusted(temp, create=True)
        try:
            dest.execute("PRAGMA synchronous=OFF")  # a scratch file until made durable by the caller
            backup_into(dest, source)
            dest.execute("PRAGMA journal_mode=DELETE").fetchall()
        finally:
            dest.close()
    finally:
        source.close()
    if durable:
        fsync_path(temp)
    return file_checksum(temp), os.path.getsize(temp)


def _copy_standalone(source_path: str, dest_path: str) -> str:
    """A durable standalone copy of ``source_path`` at ``dest_path`` (written aside, fsynced, renamed into
    place, directory fsynced); its checksum. The directory must exist (an export into the user's own
    folder is left as it is)."""
    directory = os.path.dirname(dest_path)
    if not os.path.isdir(directory):
        raise ConfigurationError(f"no directory {directory} to export into")
    temp = f"{dest_path}.tmp-{secrets.token_hex(4)}"
    checksum, _ = _snapshot_into(source_path, temp, durable=True)
    os.replace(temp, dest_path)
    fsync_dir(directory)
    return checksum


def _copy_into(source_path: str, directory: str, stem: str, durable_names: set[str]) -> tuple[str, str, int]:
    """Copy ``source_path`` into ``directory`` as ``<stem>.<checksum>.db``, not yet durable: (name,
    checksum, size). Content-addressed names mean a new copy never replaces a file the previous manifest
    names, so a backup interrupted at any point leaves the previous one whole. A file of that name that
    the previous manifest names (``durable_names``, paths in ``directory``) holds the same content,
    durably, and is kept; any other (left by an interrupted run, maybe torn) is written over."""
    if _size_with_wal(source_path) > SERIALIZE_LIMIT:
        temp = os.path.join(directory, f".{stem}.tmp-{secrets.token_hex(4)}")
        try:
            checksum, size = _snapshot_into(source_path, temp, durable=False)
            final = os.path.join(directory, f"{stem}.{checksum}.db")
            if final in durable_names:
                os.unlink(temp)
            else:
                os.replace(temp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return os.path.basename(final), checksum, size
    source = open_source(source_path)
    try:
        parts, checksum, size = _serialized(source)
    finally:
        source.close()
    final = os.path.join(directory, f"{stem}.{checksum}.db")
    if final not in durable_names:
        _write_private(final, parts, durable=False, replace=True)
    return os.path.basename(final), checksum, size


def _size_with_wal(path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.path.getsize(path + suffix)
        except FileNotFoundError:
            pass
    return total


def _write_private(path: str, parts: list[Any], *, durable: bool = True, replace: bool = False) -> None:
    """Write the concatenation of ``parts`` (bytes-like) to a file of mode 0600: a new one, or with
    ``replace`` one of ours that may be there (truncated first); fsynced when ``durable``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        todo = [memoryview(p).cast("B") for p in parts if len(p)]
        while todo:
            written = os.writev(fd, todo)
            while todo and written >= len(todo[0]):
                written -= len(todo[0])
                todo.pop(0)
            if todo and written:
                todo[0] = todo[0][written:]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)


def _make_durable(files: list[str], directories: set[str]) -> None:
    """Make ``files`` and the entries of ``directories`` durable: one ``syncfs`` per filesystem they are
    on, or (where there is none) an fsync of each file and each directory."""
    devices: dict[int, str] = {}
    for directory in directories:
        devices.setdefault(os.stat(directory).st_dev, directory)
    if all(sync_filesystem(directory) for directory in devices.values()):
        return
    for path in files:
        fsync_path(path)
    for directory in sorted(directories):
        fsync_dir(directory)


_KEEP_PREVIOUS = "nothing was written; move it away or back up into another directory"


def _names(manifest: dict[str, Any] | None) -> set[str]:
    """The files ``manifest`` names, relative to its directory."""
    if not manifest:
        return set()
    names = {entry["file"] for entry in manifest["tenants"].values()} | {manifest["global"]["file"]}
    if "app_global" in manifest:
        names.add(manifest["app_global"]["file"])
    return names


def _sweep(dest: str, keep: set[str]) -> None:
    """Remove the files a backup writes (:data:`~shardlite.services.manifest.OURS` names, at the top and in real
    ``tenants/<2 hex>/`` directories, never through a symlink) that ``keep`` does not name."""
    candidates = [name for name in os.listdir(dest) if OURS.fullmatch(name)]
    tenants = os.path.join(dest, "tenants")
    if os.path.isdir(tenants) and not os.path.islink(tenants):
        for sub in os.listdir(tenants):
            folder = os.path.join(tenants, sub)
            if len(sub) == 2 and os.path.isdir(folder) and not os.path.islink(folder):
                candidates += [f"tenants/{sub}/{name}" for name in os.listdir(folder) if OURS.fullmatch(name)]
    for rel in candidates:
        if rel not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dest, rel))


def _undo(dest: str, keep: set[str], created: list[str]) -> None:
    """After a failed run: remove what it wrote (every file of ours that ``keep``, the manifest on disk,
    does not name, its manifest temporary) and the directories it created, when empty. Best effort:
    the failure being reported matters more than one of these."""
    with contextlib.suppress(OSError):
        _sweep(dest, keep)
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(dest, f".{MANIFEST}.tmp"))
    for directory in reversed(created):
        with contextlib.suppress(OSError):
            os.rmdir(directory)  # only an empty one goes


def _failure(dest: str, exc: BaseException, during: str = "") -> BackupFailed:
    """The one-line error of a run that failed (``during`` says at what), with what to do."""
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    full = isinstance(exc, apsw.FullError) or (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
    advice = "free space there (or choose another destination)" if full else "fix the cause"
    return BackupFailed(f"backup into {dest} failed{during}: {cause}. What this run wrote was removed and any "
                        f"previous backup there is whole; {advice} and run the backup again")


def backup(store: Store, dest: str, *, keys: Iterable[object] | None = None,
           progress: Callable[[str, bool], None] | None = None, parallel: int = PARALLEL) -> dict[str, Any]:
    """Back up tenants (all, or ``keys``) and the global DB into ``dest``; returns the manifest.

    Up to ``parallel`` copies run at once. Every copy is made durable (one filesystem sync) before the
    manifest that names it is written; copies the new manifest no longer names are removed after it.
    Raises :class:`BackupFailed` when the run cannot finish (what it wrote is removed, the previous backup
    in ``dest`` stays whole) and :class:`~shardlite.ConfigurationError` when ``dest`` holds a manifest that
    is not a backup's (nothing is written)."""
    if parallel < 1:
        raise ConfigurationError("parallel must be at least 1")
    dest = os.path.abspath(dest)
    if os.path.commonpath([dest, store.root]) == store.root:
        raise ConfigurationError("the backup destination may not be inside the data root: choose a directory "
                                 "outside it (ideally on another disk)")
    created: list[str] = []
    try:
        created += ensure_private_dir(dest)
        with _locked(dest, shared=False):
            return _backup_locked(store, dest, keys, progress, parallel, created)
    except BaseException as exc:
        for directory in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only an empty one goes
        if isinstance(exc, (OSError, apsw.Error)):
            raise _failure(dest, exc) from exc
        raise


def _backup_locked(store: Store, dest: str, keys: Iterable[object] | None,
                   progress: Callable[[str, bool], None] | None, parallel: int, created: list[str]) -> dict[str, Any]:
    before = load(dest, what_to_do=_KEEP_PREVIOUS)
    on_disk = _names(before)
    previous: dict[str, Any] = before["tenants"] if before else {}
    durable_names = {os.path.join(dest, name) for name in on_disk}
    records: list[TenantRecord]
    if keys is None:
        records = list(store.meta.tenants.iter_tenants())
    else:
        records = []
        for key in keys:
            record = store.meta.tenants.lookup(canonical(key))
            if record is None or record.state not in ("active", "moving"):
                raise UnknownTenant.for_key(canonical(key))
            records.append(record)
    try:
        manifest = _write_backup(store, dest, records, previous, keys is not None, progress, parallel,
                                 durable_names, created)
    except BaseException:
        _undo(dest, on_disk, created)
        raise
    try:  # the new manifest replaced the previous one: from here on, it is the one to keep
        fsync_dir(dest)
        _sweep(dest, _names(manifest))
    except OSError as exc:
        raise BackupFailed(f"backup into {dest} wrote its manifest but could not finish ({exc.strerror or exc}); "
                           "run the backup again") from exc
    return manifest


def _write_backup(store: Store, dest: str, records: list[TenantRecord], previous: dict[str, Any], partial: bool,
                  progress: Callable[[str, bool], None] | None, parallel: int, durable_names: set[str],
                  created: list[str]) -> dict[str, Any]:
    """Copy what changed, make it durable, write the manifest; returns it once it has replaced the
    previous one (not yet fsynced in its directory)."""
    entries: dict[str, Any] = dict(previous) if partial else {}
    skipped = 0
    todo: list[_Todo] = []
    directories = {dest}
    for record in records:
        path = store.path_of(record)
        digest = key_digest(record.key)
        signature = _signature(path, record.generation)
        old = previous.get(record.key)
        if old is not None and old["signature"] == signature and os.path.exists(os.path.join(dest, old["file"])):
            entries[record.key] = old
            skipped += 1
            if progress is not None:
                progress(record.key, False)
            continue
        folder = f"tenants/{digest[:2]}"
        if os.path.join(dest, folder) not in directories:
            created += ensure_private_dir(os.path.join(dest, folder))
            directories.add(os.path.join(dest, folder))
        todo.append((record, path, folder, signature))
    written: list[str] = []
    copied = 0
    copies = _copies(store, dest, todo, parallel, durable_names)
    try:
        for record, folder, signature, (name, checksum, size) in copies:
            if store.closed:  # AsyncRouter.aclose() (or Router.close() from another thread) during the backup
                raise BackupFailed(f"the router was closed during the backup into {dest}; the previous backup "
                                   "there stays whole: run the backup again")
            copied += 1
            entries[record.key] = {"file": f"{folder}/{name}", "node": record.node,
                                   "generation": record.generation, "incarnation": record.incarnation,
                                   "schema_version": record.schema_version, "size": size, "checksum": checksum,
                                   "signature": signature}
            written.append(os.path.join(dest, folder, name))
            if progress is not None:
                progress(record.key, True)
    finally:
        copies.close()  # no copy still running on a worker thread once this returns or raises
    with store.meta.export_global(dest) as global_path:
        global_name, global_checksum, _ = _copy_into(global_path, dest, "global", durable_names)
    written.append(os.path.join(dest, global_name))
    app_name, app_checksum, _ = _copy_into(store.meta.app_global_path, dest, "app_global", durable_names)
    written.append(os.path.join(dest, app_name))
    _make_durable(written, directories)  # every copy is durable before the manifest names it
    manifest = {"format": FORMAT, "created": time.time(), "root": store.root, "tenants": entries,
                "global": {"file": global_name, "checksum": global_checksum},
                "app_global": {"file": app_name, "checksum": app_checksum},
                "copied": copied, "skipped": skipped}
    temp = os.path.join(dest, f".{MANIFEST}.tmp")
    # one line per tenant, so the file stays readable; json's indent= would take its slow pure-Python path
    body = ",\n".join(f" {json.dumps(key)}: {json.dumps(entry, sort_keys=True)}" for key, entry in
                       sorted(entries.items()))
    head = json.dumps({k: v for k, v in manifest.items() if k != "tenants"}, sort_keys=True)
    text = f'{head[:-1]}, "tenants": {{\n{body}\n}}}}\n' if entries else f'{head[:-1]}, "tenants": {{}}}}\n'
    _write_private(temp, [text.encode("utf-8")], durable=True, replace=True)
    os.replace(temp, os.path.join(dest, MANIFEST))
    return manifest

_Todo = tuple[TenantRecord, str, str, list[int]]  # record, live path, folder in the backup, signature
_Copied = tuple[TenantRecord, str, list[int], tuple[str, str, int]]  # record, folder, signature, copy


def _copies(store: Store, dest: str, todo: list[_Todo], parallel: int,
            durable_names: set[str]) -> Generator[_Copied, None, None]:
    """The copies of ``todo`` as they finish (``parallel`` at once; one runs inline), each with the record
    and signature it was taken at. A tenant dropped since the catalog was read is left out; one moved
    meanwhile is copied from its new home. The first failure cancels the copies not started and is
    raised."""
    def copy_one(item: _Todo) -> _Copied | None:
        record, path, folder, signature = item
        target, stem = os.path.join(dest, folder), key_digest(record.key)
        try:
            return record, folder, signature, _copy_into(path, target, stem, durable_names)
        except apsw.CantOpenError:
            now = store.meta.tenants.lookup(record.key)
            if now is None or now.state not in ("active", "moving"):
                return None  # dropped meanwhile: not part of this backup
            if now.generation == record.generation:
                raise
            path = store.path_of(now)  # moved meanwhile: its file has a new name
            signature = _signature(path, now.generation)
            return now, folder, signature, _copy_into(path, target, stem, durable_names)

    def copy(item: _Todo) -> _Copied | None:
        try:
            return copy_one(item)
        except (OSError, apsw.Error) as exc:
            raise _failure(dest, exc, f" copying {item[0].key!r}") from exc

    if parallel == 1 or len(todo) < 2:
        for item in todo:
            done = copy(item)
            if done is not None:
                yield done
        return
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="shardlite-backup") as pool:
        futures = [pool.submit(copy, item) for item in todo]
        try:
            for future in as_completed(futures):
                done = future.result()
                if done is not None:
                    yield done
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise


def export_tenant(store: Store, key: object, path: str) -> dict[str, Any]:
    """Write ``key``'s tenant to ``path`` as a standalone SQLite file (mode 0600)."""
    canon = canonical(key)
    record = store.meta.tenants.lookup(canon)
    if record is None or record.state not in ("active", "moving"):
        raise UnknownTenant.for_key(canon)
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ConfigurationError(f"{path} exists; refusing to overwrite it")
    checksum = _copy_standalone(store.path_of(record), path)
    return {"key": canon, "file": path, "size": os.path.getsize(path), "checksum": checksum}
