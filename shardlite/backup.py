"""Backup and restore of a whole data root or single tenants; tenant export and import.

Backup (``router.backup(dest, keys=None)``, ``shardlite backup DEST``) copies every tenant and the global
DB through SQLite's backup API while the application keeps writing (each file is one consistent snapshot;
the set is not one global snapshot: each tenant is consistent on its own, as tenants are independent). The
destination holds ``manifest.json`` (key, node, schema version, size, xxh3-128 checksum of the copied
file, and the source file's stat signature), ``global.db`` and ``tenants/<2 hex>/<digest>.db``. Copies are
standalone files (rollback journal mode), mode 0600, fsynced. An incremental run skips a tenant whose
file signature (generation, size and modification time of the file and its WAL) is unchanged since the
previous manifest in the same destination: any commit rewrites the WAL, a checkpoint rewrites the file.

Restore (``router.restore(src, keys=None, as_key=None, force=False)``, ``shardlite restore SRC``) verifies
checksums, then brings each tenant back as a *new* tenant file: a new generation and a new incarnation
(brief §4, Identity). It never overwrites a live tenant without ``force``; with it, the live file is
fenced (retired) first. Outbox events carried in the copy keep their original incarnation, so a
destination that already applied them does not apply them again; restoring under another key
(``as_key``) drops them (they were the original tenant's events).

Export and import move one tenant in or out as a standalone SQLite file with the same rules.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import xxhash

from .catalog import TenantRecord
from .copying import backup_into, fsync_file_and_dir, integrity_ok, open_trusted, remove_db_files
from .engine import ensure_private_dir, fsync_dir, fsync_path
from .errors import ConfigurationError, IdentityMismatch, ShardliteError, UnknownTenant
from .keys import canonical, key_digest, prefix_of
from .placement import tenant_relpath
from .schema import INTERNAL_VERSION, upgrade
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
_ROLLBACK_HEADER = ((18, 1), (19, 1))  # file format write/read version 1: a rollback-journal file


def _copy_standalone(source_path: str, dest_path: str, *, private_dir: bool = True,
                     dirty_dirs: set[str] | None = None) -> str:
    """Snapshot ``source_path`` into a standalone (rollback-journal) file at ``dest_path``, fsynced, and
    return the copy's checksum. ``private_dir``: the destination's directory is ours (created 0700);
    otherwise it must exist and is left as it is (an export into the user's own folder). With
    ``dirty_dirs`` the directory fsync is left to the caller (one per directory for a whole backup,
    before its manifest is written).

    Both ways of copying go through SQLite (rule 7): a small file is serialized by SQLite (every page
    read through the pager inside one read transaction, the WAL included: a consistent snapshot) and the
    image written to a private scratch file; a large one goes page by page through the backup API."""
    temp = f"{dest_path}.tmp-{secrets.token_hex(4)}"
    if private_dir:
        ensure_private_dir(os.path.dirname(dest_path))
    elif not os.path.isdir(os.path.dirname(dest_path)):
        raise ConfigurationError(f"no directory {os.path.dirname(dest_path)} to export into")
    source = open_trusted(source_path)
    try:
        if _size_with_wal(source_path) <= SERIALIZE_LIMIT:
            image = bytearray(source.serialize("main") or b"")
            for offset, value in _ROLLBACK_HEADER:
                if len(image) > offset:
                    image[offset] = value
            checksum = _write_private(temp, image)
        else:
            dest = open_trusted(temp, create=True)
            try:
                dest.execute("PRAGMA synchronous=OFF")  # a scratch file until fsynced and renamed below
                backup_into(dest, source)
                dest.execute("PRAGMA journal_mode=DELETE").fetchall()
            finally:
                dest.close()
            fsync_path(temp)
            checksum = file_checksum(temp)
    finally:
        source.close()
    os.replace(temp, dest_path)
    if dirty_dirs is None:
        fsync_dir(os.path.dirname(dest_path))
    else:
        dirty_dirs.add(os.path.dirname(dest_path))
    return checksum


def _size_with_wal(path: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += os.path.getsize(path + suffix)
        except FileNotFoundError:
            pass
    return total


def _write_private(path: str, data: bytes | bytearray) -> str:
    """Write ``data`` to a new file (mode 0600), fsync it, and return its checksum."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return xxhash.xxh3_128_hexdigest(data)


def _load_manifest(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)  # type: ignore[no-any-return]


def backup(store: Store, dest: str, *, keys: Iterable[object] | None = None,
           progress: Callable[[str, bool], None] | None = None) -> dict[str, Any]:
    """Back up tenants (all, or ``keys``) and the global DB into ``dest``; returns the manifest."""
    dest = os.path.abspath(dest)
    if os.path.commonpath([dest, store.root]) == store.root:
        raise ConfigurationError("the backup destination may not be inside the data root")
    ensure_private_dir(dest)
    previous = _load_manifest(dest).get("tenants", {})
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
    copied = skipped = 0
    dirty: set[str] = set()
    for record in records:
        path = store.path_of(record)
        digest = key_digest(record.key)
        rel = f"tenants/{digest[:2]}/{digest}.db"
        signature = _signature(path, record.generation)
        old = previous.get(record.key)
        target = os.path.join(dest, rel)
        if old is not None and old.get("signature") == signature and os.path.exists(target):
            entries[record.key] = old
            skipped += 1
            if progress is not None:
                progress(record.key, False)
            continue
        checksum = _copy_standalone(path, target, dirty_dirs=dirty)
        entries[record.key] = {"file": rel, "node": record.node, "generation": record.generation,
                               "incarnation": record.incarnation, "schema_version": record.schema_version,
                               "size": os.path.getsize(target), "checksum": checksum, "signature": signature}
        copied += 1
        if progress is not None:
            progress(record.key, True)
    global_target = os.path.join(dest, "global.db")
    global_checksum = _copy_standalone(store.globaldb.path, global_target, dirty_dirs=dirty)
    for directory in sorted(dirty):  # every copy is durable before the manifest names it
        fsync_dir(directory)
    manifest = {"format": 1, "created": time.time(), "root": store.root, "tenants": entries,
                "global": {"file": "global.db", "checksum": global_checksum},
                "copied": copied, "skipped": skipped}
    temp = os.path.join(dest, f".{MANIFEST}.tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(temp, 0o600)
    os.replace(temp, os.path.join(dest, MANIFEST))
    fsync_dir(dest)
    return manifest


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
        store._fence_file(existing, store.path_of(existing), "replaced")
        store.catalog.flip(key, from_generation=existing.generation, node=node, generation=generation,
                           incarnation=incarnation)
        remove_db_files(store.path_of(existing))
    else:
        store.catalog.register(key, node, generation, incarnation, _app_version(path))
    store.forget(key)
    record = store.catalog.lookup(key)
    assert record is not None
    has_events = store.read(key, "SELECT 1 FROM _shardlite_outbox LIMIT 1")
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


def restore(store: Store, src: str, *, keys: Iterable[object] | None = None, as_key: object | None = None,
            force: bool = False, progress: Callable[[str], None] | None = None) -> list[str]:
    """Restore tenants from a backup directory (checksums verified first); returns the restored keys."""
    src = os.path.abspath(src)
    manifest = _load_manifest(src)
    if not manifest:
        raise ConfigurationError(f"{src} holds no {MANIFEST}")
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
    manifest = _load_manifest(os.path.abspath(src))
    path = os.path.join(os.path.abspath(src), manifest["global"]["file"])
    if file_checksum(path) != manifest["global"]["checksum"]:
        raise ShardliteError("checksum mismatch for the backup's global.db")
    if any(True for _ in store.catalog.iter_tenants()):
        raise ConfigurationError("restoring the global DB needs an empty data root")
    source = open_trusted(path)
    try:
        tables = [str(r[0]) for r in source.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%'").fetchall()]
        copy = [t for t in tables if t in ("_shardlite_accounts", "_shardlite_credentials", "_shardlite_sessions")
                or not t.startswith("_shardlite")]
        version = source.execute("SELECT value FROM _shardlite_catalog_meta WHERE name = 'app_global_version'"
                                 ).fetchall()
        with store.globaldb.write() as conn:
            for table in copy:
                sql = str(source.execute("SELECT sql FROM sqlite_schema WHERE name = ?", (table,)).fetchall()[0][0])
                exists = conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?", (table,)).fetchall()
                if not exists:
                    conn.execute(sql)
                rows = source.execute(f"SELECT * FROM {_quote(table)}").fetchall()
                if rows:
                    marks = ", ".join("?" for _ in rows[0])
                    conn.executemany(f"INSERT OR REPLACE INTO {_quote(table)} VALUES ({marks})", rows)
            if version:  # the app's global schema came along: so did its version
                conn.execute("INSERT INTO _shardlite_catalog_meta(name, value) VALUES ('app_global_version', ?) "
                             "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (version[0][0],))
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
    checksum = _copy_standalone(store.path_of(record), path, private_dir=False)
    return {"key": canon, "file": path, "size": os.path.getsize(path), "checksum": checksum}


def import_tenant(store: Store, path: str, key: object, *, force: bool = False) -> TenantRecord:
    """Create tenant ``key`` from an exported file (new generation and incarnation). Its pending outbox
    events are kept when the file was exported from the same key, dropped otherwise."""
    canon = canonical(key)
    store.spec.steps_for(prefix_of(canon))
    return _bring_in(store, os.path.abspath(path), canon, purpose="import", keep_outbox=True, force=force)
