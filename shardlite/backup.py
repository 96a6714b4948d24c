"""Backup and restore of a whole data root or single tenants; tenant export and import.

Backup (``router.backup(dest, keys=None, parallel=4)``, ``shardlite backup DEST``) copies every tenant and
the global DB through SQLite while the application keeps writing (each file is one consistent snapshot; the
set is not one global snapshot: each tenant is consistent on its own, as tenants are independent), up to
``parallel`` copies at once. The destination holds ``manifest.json`` (key, node, schema version, size,
xxh3-128 checksum of the copied file, and the source file's stat signature), ``global.<checksum>.db`` and
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

Restore (``router.restore(src, keys=None, as_key=None, force=False)``, ``shardlite restore SRC``) verifies
checksums, then brings each tenant back as a *new* tenant file: a new generation and a new incarnation
(brief §4, Identity). It never overwrites a live tenant without ``force``; with it, the live file is
fenced (retired) first. Outbox events carried in the copy keep their original incarnation, so a
destination that already applied them does not apply them again; restoring under another key
(``as_key``) drops them (they were the original tenant's events).

Export and import move one tenant in or out as a standalone SQLite file with the same rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

import apsw
import xxhash

from .catalog import TenantRecord
from .copying import backup_into, fsync_file_and_dir, integrity_ok, open_source, open_trusted, remove_db_files
from .engine import ensure_private_dir, fsync_dir, fsync_path, sync_filesystem
from .errors import ConfigurationError, IdentityMismatch, ShardliteError, UnknownTenant
from .keys import canonical, key_digest, prefix_of
from .lifecycle import fence_file
from .placement import tenant_relpath
from .schema import INTERNAL_VERSION, REMEMBER_LAST_SEQ, upgrade
from .store import Store

__all__ = ["backup", "restore", "export_tenant", "import_tenant", "file_checksum", "MANIFEST"]

MANIFEST = "manifest.json"


def file_checksum(path: str) -> str:
    digest = xxhash.xxh3_128()
    with open(path, "rb") as handle:  # a closed, standalone copy: reading its bytes is fine
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
# The files a backup writes into its destination, and nothing else (the sweep removes only these).
_OURS = re.compile(r"(?:[0-9a-f]{32}(?:\.[0-9a-f]{32})?\.db|(?:app_)?global(?:\.[0-9a-f]{32})?\.db"
                   r"|\.(?:[0-9a-f]{32}|global)\.tmp-[0-9a-f]{8})")


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


@contextlib.contextmanager
def _locked(directory: str, *, shared: bool) -> Iterator[None]:
    """Hold a lock on ``directory`` for the block: exclusive for a backup writing into it, shared for a
    restore reading from it (so a backup's sweep never removes a file a restore is about to read)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigurationError(f"{directory} is in use by another backup or restore; retry after it"
                                     ) from None
        yield
    finally:
        os.close(fd)


def _sweep(dest: str, manifest: dict[str, Any]) -> None:
    """After the manifest is durable: remove the copies it no longer names (superseded by this run) and
    temporaries an interrupted run left behind; only names a backup writes."""
    keep = {entry["file"] for entry in manifest["tenants"].values()} | {manifest["global"]["file"]}
    if "app_global" in manifest:
        keep.add(manifest["app_global"]["file"])
    candidates = [name for name in os.listdir(dest) if _OURS.fullmatch(name)]
    tenants = os.path.join(dest, "tenants")
    if os.path.isdir(tenants):
        for sub in os.listdir(tenants):
            folder = os.path.join(tenants, sub)
            if len(sub) == 2 and os.path.isdir(folder):
                candidates += [f"tenants/{sub}/{name}" for name in os.listdir(folder) if _OURS.fullmatch(name)]
    for rel in candidates:
        if rel not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(dest, rel))


def _load_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)  # type: ignore[no-any-return]


def backup(store: Store, dest: str, *, keys: Iterable[object] | None = None,
           progress: Callable[[str, bool], None] | None = None, parallel: int = PARALLEL) -> dict[str, Any]:
    """Back up tenants (all, or ``keys``) and the global DB into ``dest``; returns the manifest.

    Up to ``parallel`` copies run at once. Every copy is made durable (one filesystem sync) before the
    manifest that names it is written; copies the new manifest no longer names are removed after it."""
    if parallel < 1:
        raise ConfigurationError("parallel must be at least 1")
    dest = os.path.abspath(dest)
    if os.path.commonpath([dest, store.root]) == store.root:
        raise ConfigurationError("the backup destination may not be inside the data root")
    ensure_private_dir(dest)
    with _locked(dest, shared=False):
        return _backup_locked(store, dest, keys, progress, parallel)


def _backup_locked(store: Store, dest: str, keys: Iterable[object] | None,
                   progress: Callable[[str, bool], None] | None, parallel: int) -> dict[str, Any]:
    before = _load_manifest(dest)
    previous = before.get("tenants", {})
    durable_names = {os.path.join(dest, entry["file"]) for entry in previous.values()}
    for name in ("global", "app_global"):
        if name in before:
            durable_names.add(os.path.join(dest, before[name]["file"]))
    records: list[TenantRecord]
    if keys is None:
        records = list(store.catalog.iter_tenants())
    else:
        records = []
        for key in keys:
            record = store.catalog.lookup(canonical(key))
            if record is None or record.state not in ("active", "moving"):
                raise UnknownTenant(f"tenant {canonical(key)!r} does not exist")
            records.append(record)
    entries: dict[str, Any] = dict(previous) if keys is not None else {}
    skipped = 0
    todo: list[_Todo] = []
    directories = {dest}
    for record in records:
        path = store.path_of(record)
        digest = key_digest(record.key)
        signature = _signature(path, record.generation)
        old = previous.get(record.key)
        if old is not None and old.get("signature") == signature and os.path.exists(os.path.join(dest, old["file"])):
            entries[record.key] = old
            skipped += 1
            if progress is not None:
                progress(record.key, False)
            continue
        folder = f"tenants/{digest[:2]}"
        if os.path.join(dest, folder) not in directories:
            ensure_private_dir(os.path.join(dest, folder))
            directories.add(os.path.join(dest, folder))
        todo.append((record, path, folder, signature))
    written: list[str] = []
    copied = 0
    for record, folder, signature, (name, checksum, size) in _copies(store, dest, todo, parallel, durable_names):
        copied += 1
        entries[record.key] = {"file": f"{folder}/{name}", "node": record.node, "generation": record.generation,
                               "incarnation": record.incarnation, "schema_version": record.schema_version,
                               "size": size, "checksum": checksum, "signature": signature}
        written.append(os.path.join(dest, folder, name))
        if progress is not None:
            progress(record.key, True)
    global_name, global_checksum, _ = _copy_into(store.globaldb.path, dest, "global", durable_names)
    written.append(os.path.join(dest, global_name))
    app_name, app_checksum, _ = _copy_into(store.appdb.path, dest, "app_global", durable_names)
    written.append(os.path.join(dest, app_name))
    _make_durable(written, directories)  # every copy is durable before the manifest names it
    manifest = {"format": 1, "created": time.time(), "root": store.root, "tenants": entries,
                "global": {"file": global_name, "checksum": global_checksum},
                "app_global": {"file": app_name, "checksum": app_checksum},
                "copied": copied, "skipped": skipped}
    temp = os.path.join(dest, f".{MANIFEST}.tmp")
    # one line per tenant, so the file stays readable; json's indent= would take its slow pure-Python path
    body = ",\n".join(f" {json.dumps(key)}: {json.dumps(entry, sort_keys=True)}" for key, entry in
                       sorted(entries.items()))
    head = json.dumps({k: v for k, v in manifest.items() if k != "tenants"}, sort_keys=True)
    text = f'{head[:-1]}, "tenants": {{\n{body}\n}}}}\n' if entries else f'{head[:-1]}, "tenants": {{}}}}\n'
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temp, 0o600)
    os.replace(temp, os.path.join(dest, MANIFEST))
    fsync_dir(dest)
    _sweep(dest, manifest)
    return manifest


_Todo = tuple[TenantRecord, str, str, list[int]]  # record, live path, folder in the backup, signature
_Copied = tuple[TenantRecord, str, list[int], tuple[str, str, int]]  # record, folder, signature, copy


def _copies(store: Store, dest: str, todo: list[_Todo], parallel: int,
            durable_names: set[str]) -> Iterator[_Copied]:
    """The copies of ``todo`` as they finish (``parallel`` at once; one runs inline), each with the record
    and signature it was taken at. A tenant dropped since the catalog was read is left out; one moved
    meanwhile is copied from its new home. The first failure cancels the copies not started and is
    raised."""
    def copy(item: _Todo) -> _Copied | None:
        record, path, folder, signature = item
        target, stem = os.path.join(dest, folder), key_digest(record.key)
        try:
            return record, folder, signature, _copy_into(path, target, stem, durable_names)
        except apsw.CantOpenError:
            now = store.catalog.lookup(record.key)
            if now is None or now.state not in ("active", "moving"):
                return None  # dropped meanwhile: not part of this backup
            if now.generation == record.generation:
                raise
            path = store.path_of(now)  # moved meanwhile: its file has a new name
            signature = _signature(path, now.generation)
            return now, folder, signature, _copy_into(path, target, stem, durable_names)

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


def _bring_in(store: Store, source_file: str, key: str, *, purpose: str, keep_outbox: bool,
              force: bool) -> TenantRecord:
    """Install ``source_file`` (a standalone tenant copy) as tenant ``key``: new generation, incarnation."""
    if not os.path.isfile(source_file):
        raise ConfigurationError(f"{source_file} does not exist or is not a file")
    existing = store.catalog.lookup(key)
    if existing is not None and existing.state in ("active", "moving", "dropping") and not force:
        raise ConfigurationError(f"tenant {key!r} exists; pass force=True (--force) to replace it")
    if existing is not None and existing.state == "moving":
        raise ConfigurationError(f"tenant {key!r} is being moved; retry after the rebalance")
    probe = open_trusted(source_file)
    try:
        if not integrity_ok(probe):
            raise ShardliteError(f"{source_file} fails integrity_check")
        rows = probe.execute("SELECT key, incarnation FROM _shardlite_meta WHERE id = 1").fetchall()
    except Exception as exc:
        if isinstance(exc, ShardliteError):
            raise
        raise IdentityMismatch(f"{source_file} is not a shardlite tenant file ({exc})") from exc
    finally:
        probe.close()
    if not rows:
        raise IdentityMismatch(f"{source_file} is not a shardlite tenant file")
    old_key, old_incarnation = str(rows[0][0]), str(rows[0][1])
    node = existing.node if existing is not None and existing.state != "dropped" else store.propose(key)
    generation = store.catalog.allocate_generation(key, node, purpose)
    incarnation = secrets.token_hex(16)
    path = os.path.join(store.node_path(node), tenant_relpath(key, generation))
    temp = path + ".incoming"
    ensure_private_dir(os.path.dirname(path))
    remove_db_files(temp)
    source = open_trusted(source_file)
    try:
        dest = open_trusted(temp, create=True)
        try:
            backup_into(dest, source)
            dest.execute("PRAGMA journal_mode=WAL").fetchall()
            dest.execute("BEGIN IMMEDIATE")
            internal, app = _versions(dest)
            upgrade(dest, (), internal_from=internal, app_from=app)
            dest.execute("UPDATE _shardlite_meta SET key = ?, incarnation = ?, retired = NULL WHERE id = 1",
                         (key, incarnation))
            if keep_outbox and old_key == key:
                dest.execute("UPDATE _shardlite_outbox SET origin = coalesce(origin, ?)", (old_incarnation,))
            else:
                dest.execute(REMEMBER_LAST_SEQ)  # a new incarnation anyway; numbers still never go back
                dest.execute("DELETE FROM _shardlite_outbox")
            dest.execute("UPDATE _shardlite_relay SET claimed_by = NULL, claimed_until = 0")
            dest.execute("COMMIT")
            dest.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            dest.close()
    finally:
        source.close()
    fsync_file_and_dir(temp)
    os.link(temp, path)
    os.unlink(temp)
    fsync_dir(os.path.dirname(path))
    if existing is not None and existing.state in ("active", "dropping"):
        fence_file(store, existing, store.path_of(existing), "replaced")
        store.catalog.flip(key, from_generation=existing.generation, node=node, generation=generation,
                           incarnation=incarnation)
        remove_db_files(store.path_of(existing))
    else:
        store.catalog.register(key, node, generation, incarnation, _app_version(path))
    store.forget(key)
    record = store.catalog.lookup(key)
    assert record is not None
    has_events = store.read_internal(key, "SELECT 1 FROM _shardlite_outbox LIMIT 1")
    if has_events:
        store.catalog.flag_pending(key)
    return record


def _versions(conn: Any) -> tuple[int, int]:
    internal = conn.execute("SELECT internal_version FROM _shardlite_meta WHERE id = 1").fetchall()
    app = conn.execute("PRAGMA user_version").fetchall()
    return int(internal[0][0]) if internal else INTERNAL_VERSION, int(app[0][0])


def _app_version(path: str) -> int:
    conn = open_trusted(path)
    try:
        version: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
        return int(version)
    finally:
        conn.close()


def _backup_dir(src: str) -> tuple[str, dict[str, Any]]:
    src = os.path.abspath(src)
    manifest = _load_manifest(src) if os.path.isdir(src) else {}
    if not manifest:
        raise ConfigurationError(f"{src} holds no {MANIFEST}")
    return src, manifest


def restore(store: Store, src: str, *, keys: Iterable[object] | None = None, as_key: object | None = None,
            force: bool = False, progress: Callable[[str], None] | None = None) -> list[str]:
    """Restore tenants from a backup directory (checksums verified first); returns the restored keys.
    Holds a shared lock on the directory: a backup into it waits its turn (it is refused meanwhile)."""
    src, _ = _backup_dir(src)
    with _locked(src, shared=True):
        return _restore(store, *_backup_dir(src), keys, as_key, force, progress)


def _restore(store: Store, src: str, manifest: dict[str, Any], keys: Iterable[object] | None,
             as_key: object | None, force: bool, progress: Callable[[str], None] | None) -> list[str]:
    entries: dict[str, Any] = manifest["tenants"]
    wanted = list(entries) if keys is None else [canonical(k) for k in keys]
    if as_key is not None and len(wanted) != 1:
        raise ConfigurationError("as_key (--as) restores exactly one tenant (--key)")
    for key in wanted:
        if key not in entries:
            raise UnknownTenant(f"the backup holds no tenant {key!r}")
        entry = entries[key]
        if file_checksum(os.path.join(src, entry["file"])) != entry["checksum"]:
            raise ShardliteError(f"checksum mismatch for {key!r} in {src}: the backup is damaged")
    if not force:
        for key in wanted:
            target = canonical(as_key) if as_key is not None else key
            record = store.catalog.lookup(target)
            if record is not None and record.state in ("active", "moving"):
                raise ConfigurationError(f"tenant {target!r} exists; pass force=True (--force) to replace it")
    restored = []
    for key in wanted:
        target = canonical(as_key) if as_key is not None else key
        store.spec.steps_for(prefix_of(target))
        _bring_in(store, os.path.join(src, entries[key]["file"]), target, purpose="restore",
                  keep_outbox=as_key is None, force=force)
        restored.append(target)
        if progress is not None:
            progress(target)
    return restored


def restore_globals(store: Store, src: str) -> None:
    """Copy the backup's accounts, sessions and app global tables into an empty root's global DB."""
    src, _ = _backup_dir(src)
    with _locked(src, shared=True):
        _restore_globals(store, *_backup_dir(src))


def _restore_globals(store: Store, src: str, manifest: dict[str, Any]) -> None:
    """Accounts, credentials and sessions from the backup's copy of global.db; the app's global tables
    from its copy of app_global.db (backups made before the app's tables had a file of their own hold
    them in the global copy)."""
    copies = {}
    for name in ("global", "app_global"):
        if name in manifest:
            path = os.path.join(src, manifest[name]["file"])
            if file_checksum(path) != manifest[name]["checksum"]:
                raise ShardliteError(f"checksum mismatch for the backup's {name}.db")
            copies[name] = path
    if any(True for _ in store.catalog.iter_tenants()):
        raise ConfigurationError("restoring the global DB needs an empty data root")
    own = ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions")
    _copy_tables(copies["global"], store.globaldb, lambda t: t in own)
    app_copy = copies.get("app_global", copies["global"])
    _copy_tables(app_copy, store.appdb, lambda t: not t.startswith("_shardlite"))
    source = open_trusted(app_copy)
    try:
        version: list[Any] = (source.execute("PRAGMA user_version") if "app_global" in copies else source.execute(
            "SELECT value FROM _shardlite_catalog_meta WHERE name = 'app_global_version'")).fetchall()
    finally:
        source.close()
    if version:  # the app's global schema came along: so did its version
        with store.appdb.write() as conn:
            conn.execute(f"PRAGMA user_version = {int(version[0][0])}")


def _copy_tables(path: str, db: Any, wanted: Callable[[str], bool]) -> None:
    """Copy the tables of the SQLite file at ``path`` for which ``wanted(name)`` holds into ``db`` (a
    GlobalDB), creating those it lacks; rows replace rows with the same key."""
    source = open_trusted(path)
    try:
        tables = [str(r[0]) for r in source.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'").fetchall()]
        with db.write() as conn:
            for table in tables:
                if not wanted(table):
                    continue
                sql = str(source.execute("SELECT sql FROM sqlite_schema WHERE name = ?", (table,)).fetchall()[0][0])
                exists = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?", (table,)).fetchall()
                if not exists:
                    conn.execute(sql)
                rows = source.execute(f"SELECT * FROM {_quote(table)}").fetchall()
                if rows:
                    marks = ", ".join("?" for _ in rows[0])
                    conn.executemany(f"INSERT OR REPLACE INTO {_quote(table)} VALUES ({marks})", rows)
    finally:
        source.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def export_tenant(store: Store, key: object, path: str) -> dict[str, Any]:
    """Write ``key``'s tenant to ``path`` as a standalone SQLite file (mode 0600)."""
    canon = canonical(key)
    record = store.catalog.lookup(canon)
    if record is None or record.state not in ("active", "moving"):
        raise UnknownTenant(f"tenant {canon!r} does not exist")
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ConfigurationError(f"{path} exists; refusing to overwrite it")
    checksum = _copy_standalone(store.path_of(record), path)
    return {"key": canon, "file": path, "size": os.path.getsize(path), "checksum": checksum}


def import_tenant(store: Store, path: str, key: object, *, force: bool = False) -> TenantRecord:
    """Create tenant ``key`` from an exported file (new generation and incarnation). Its pending outbox
    events are kept when the file was exported from the same key, dropped otherwise."""
    canon = canonical(key)
    store.spec.steps_for(prefix_of(canon))
    return _bring_in(store, os.path.abspath(path), canon, purpose="import", keep_outbox=True, force=force)
