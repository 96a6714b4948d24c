"""Restore from a backup, and tenant import: files from outside, validated whole before anything is
registered (rule 14).

Restore (``router.restore(src, keys=None, as_key=None, force=False)``, ``shardlite restore SRC``) and import
(``router.import_(path, key)``, ``shardlite tenants import FILE KEY``) run in two phases:

1. *Check and prepare*, registering nothing: the manifest is validated whole (:func:`shardlite.services.manifest.load`),
   every key to restore and every target key is valid with a schema for its prefix, no live tenant would
   be replaced without ``force``; then for each tenant its copy is found inside the backup directory (no
   symlink, no path outside it), opened read-only and inert (:func:`open_copy`: read into memory with its
   checksum verified on the same bytes, or for a large copy opened ``immutable`` so SQLite writes nothing
   next to it), copied into a private temporary file in its node directory and checked there:
   ``integrity_check``, the stored key equal to the manifest's, no schema object touching shardlite's
   tables, shardlite's tables rebuilt from their current definitions with validated rows
   (:func:`shardlite.files.sanitize.rebuild_tenant_tables`). Any failure removes every temporary file and
   raises: nothing was registered.
2. *Install*: each prepared tenant gets a new generation and a new incarnation (never a reused one), its
   file is linked into place and the catalog flipped (a live tenant replaced with ``force`` is fenced
   first) or registered.

Outbox events: a same-key restore keeps the copy's pending events (each keeps the incarnation that emitted
it, so a destination that already applied them does not apply them again); ``as_key`` drops them. Import
drops them unless ``keep_events=True`` and the file holds that key's own tenant. Kept events are
validated (destination a canonical key, topic, JSON payload); a file with an invalid one is refused.

:func:`restore_globals` copies the accounts, sessions and app global tables of the backup's global DB copy
into an empty root, after the same checks on that copy. :func:`restore_root` restores a whole backup into a
root that does not exist yet (or is empty): the backup's node layout (:mod:`shardlite.services.restore_layout`),
the global data, then the tenants.
"""

from __future__ import annotations

import os
import secrets
import stat
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import apsw
import xxhash

from ..core.keys import canonical, key_digest, prefix_of
from ..core.placement import tenant_relpath
from ..errors import ConfigurationError, IdentityMismatch, ShardliteError, UnknownTenant
from ..files.catalog import TenantRecord
from ..files.copying import backup_into, fsync_file_and_dir, inert, integrity_ok, open_trusted, remove_db_files
from ..files.engine import ensure_private_dir, fsync_dir
from ..files.sanitize import global_objects, rebuild_tenant_tables, refuse_foreign, shown
from ..front.store import Store
from . import manifest as mf
from .global_copy import copy_globals
from .lifecycle import fence_file
from .restore_layout import NodePlan, RootChanged, claimed_root, open_root_with_layout, plan_layout, read_layout

__all__ = ["restore", "restore_globals", "restore_root", "RootRestore", "NodePlan", "import_tenant", "open_copy",
           "open_image", "install_image",
           "MEMORY_LIMIT"]

#: Copies up to this size are read into memory (checksum and SQLite see the same bytes); larger ones are
#: opened in place, read-only and immutable.
MEMORY_LIMIT = 64 * 1024 * 1024
_HEADER_JOURNAL = slice(18, 20)  # file format write/read version: 1 rollback journal, 2 WAL
_DAMAGED = "nothing was restored; restore from another backup (or take a new one)"


def open_copy(path: str, *, checksum: str | None, label: str) -> apsw.Connection:
    """A read-only, :func:`~shardlite.files.copying.inert` connection to the standalone SQLite file ``path`` (a
    backup copy or a file to import), which never writes into the file's directory nor changes the file:
    no lock, no ``-wal``/``-shm``/``-journal``, no checkpoint. Refuses (:class:`ShardliteError`) a symlink,
    anything but a regular file, a checksum other than ``checksum`` (when given), and a file in WAL mode
    whose log is not empty (or, past :data:`MEMORY_LIMIT`, any file in WAL mode)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigurationError(f"{label} does not exist; check the path") from None
    except OSError as exc:
        raise ShardliteError(f"{label} cannot be opened ({exc.strerror}: a symlink is never followed)") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"{label} is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            if info.st_size <= MEMORY_LIMIT:
                data = handle.read()
                _check_sum(xxhash.xxh3_128_hexdigest(data), checksum, label)
                _check_wal(path, data[_HEADER_JOURNAL], label, in_memory=True)
                return open_image(data)
            digest = xxhash.xxh3_128()
            header = handle.read(100)
            digest.update(header)
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            _check_sum(digest.hexdigest(), checksum, label)
            _check_wal(path, header[_HEADER_JOURNAL], label, in_memory=False)
    finally:
        os.close(fd)
    uri = "file:" + urllib.parse.quote(path) + "?immutable=1"
    conn = apsw.Connection(uri, flags=apsw.SQLITE_OPEN_READONLY | apsw.SQLITE_OPEN_URI | apsw.SQLITE_OPEN_NOFOLLOW)
    try:
        inert(conn)
        now = os.stat(path, follow_symlinks=False)
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (info.st_dev, info.st_ino, info.st_size,
                                                                      info.st_mtime_ns):
            raise ShardliteError(f"{label} changed while it was being checked; retry")
    except BaseException:
        conn.close()
        raise
    return conn


def open_image(data: bytes) -> apsw.Connection:
    """A read-only, inert, in-memory connection to the database image ``data`` (a copy read into memory, or
    an image rebuilt from a replica). An image whose header says WAL mode is opened as the image alone (its
    log is empty or already applied): as a rollback-journal file, its content unchanged."""
    if data[_HEADER_JOURNAL] == b"\x02\x02":
        data = data[:_HEADER_JOURNAL.start] + b"\x01\x01" + data[_HEADER_JOURNAL.stop:]
    conn = inert(apsw.Connection(":memory:"))
    try:
        conn.deserialize("main", data)
        conn.execute("PRAGMA query_only = 1")
    except BaseException:
        conn.close()
        raise
    return conn


def _check_sum(found: str, expected: str | None, label: str) -> None:
    if expected is not None and found != expected:
        raise ShardliteError(f"checksum mismatch for {label}: the backup is damaged; {_DAMAGED}")


def _check_wal(path: str, versions: bytes, label: str, *, in_memory: bool) -> None:
    if versions != b"\x02\x02":
        return
    try:
        log = os.stat(path + "-wal", follow_symlinks=False).st_size
    except FileNotFoundError:
        log = 0
    if log or not in_memory:
        raise ShardliteError(f"{label} is in WAL mode{' with a write-ahead log next to it' if log else ''}: "
                             "shardlite reads standalone files only; make it one first (sqlite3 FILE "
                             "'PRAGMA journal_mode=DELETE', or `shardlite tenants export`)")


# -- phase 1: check and prepare ----------------------------------------------------------------------------------


@dataclass
class _Prepared:
    key: str
    node: str
    temp: str  # the checked, rebuilt copy, private, in the node directory
    incarnation: str
    events: int
    app_version: int


def _prepare(store: Store, source: apsw.Connection, key: str, *, label: str, expect_key: str | None,
             keep_events: bool, node: str | None = None) -> _Prepared:
    """Copy ``source`` into a private temporary file in ``key``'s node directory, check it and rebuild
    shardlite's tables in it (new incarnation); registers nothing. The temporary file is removed when
    this raises. A live tenant stays on its node; a new one goes to ``node`` when given, else where the
    ring proposes."""
    existing = store.meta.tenants.lookup(key)
    if existing is not None and existing.state != "dropped":
        node = existing.node
    elif node is None:
        node = store.propose(key)
    digest = key_digest(key)
    directory = os.path.join(store.node_path(node), digest[:2])
    ensure_private_dir(directory)
    temp = os.path.join(directory, f"{digest}.incoming-{secrets.token_hex(4)}")
    incarnation = secrets.token_hex(16)
    try:
        dest = open_trusted(temp, create=True)
        try:
            dest.execute("PRAGMA synchronous=OFF")  # a scratch file until fsynced below
            try:
                backup_into(dest, source)
                healthy = integrity_ok(dest)
            except apsw.NotADBError:
                raise IdentityMismatch(f"{label} is not a shardlite tenant file (SQLite cannot read it as a "
                                       "database); name a file `shardlite tenants export` wrote, or a backup's "
                                       "copy") from None
            if not healthy:
                raise ShardliteError(f"{label} fails integrity_check; {_DAMAGED}")
            version: Any = dest.execute("PRAGMA user_version").fetchall()[0][0]
            if int(version) < 0:
                raise ShardliteError(f"{label} is refused: its schema version is {version}")
            dest.execute("PRAGMA journal_mode=WAL").fetchall()
            dest.execute("BEGIN IMMEDIATE")
            try:
                rebuilt = rebuild_tenant_tables(dest, key=key, incarnation=incarnation, keep_events=keep_events,
                                                label=label, max_payload=store.emitter.max_payload)
                if expect_key is not None and rebuilt.old_key != expect_key:
                    raise IdentityMismatch(f"{label} holds tenant {shown(rebuilt.old_key)}, not "
                                           f"{shown(expect_key)}; {_DAMAGED}")
                dest.execute("COMMIT")
            except BaseException:
                if not dest.get_autocommit():
                    dest.execute("ROLLBACK")
                raise
            dest.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        finally:
            dest.close()
        fsync_file_and_dir(temp)
    except BaseException:
        remove_db_files(temp)
        raise
    return _Prepared(key, node, temp, incarnation, rebuilt.events, int(version))


def _install(store: Store, prepared: _Prepared, purpose: str, force: bool) -> TenantRecord:
    """Register a prepared copy: a new generation, the file linked into place, the catalog flipped (the
    live tenant fenced first: only with ``force``, also when it was created since the first check) or the
    tenant registered. The temporary file is gone afterwards."""
    key = prepared.key
    try:
        generation = store.meta.tenants.allocate_generation(key, prepared.node, purpose)
        path = os.path.join(store.node_path(prepared.node), tenant_relpath(key, generation))
        os.link(prepared.temp, path)
    finally:
        remove_db_files(prepared.temp)
    try:
        fsync_dir(os.path.dirname(path))
        if prepared.events:  # flagged before the catalog routes to the file, as an emit flags before its commit:
            store.meta.pending.flag_many([key])  # a crash after the flip strands nothing (a spurious flag: one look)
        existing = store.meta.tenants.lookup(key)
        if existing is not None and existing.state in ("active", "dropping"):
            if not force:
                raise ConfigurationError(f"tenant {key!r} was created meanwhile; pass force=True (--force) to "
                                         "replace it")
            fence_file(store, existing, store.path_of(existing), "replaced")
            store.meta.tenants.flip(key, from_generation=existing.generation, node=prepared.node,
                                    generation=generation, incarnation=prepared.incarnation,
                                    expect_states=("active", "dropping"))
            remove_db_files(store.path_of(existing))
        elif store.meta.tenants.register(key, prepared.node, generation, prepared.incarnation,
                                         prepared.app_version).generation != generation:
            raise ConfigurationError(f"tenant {key!r} was created meanwhile; pass force=True (--force) to replace it")
    except BaseException:
        now = store.meta.tenants.lookup(key)
        if now is None or now.generation != generation:
            remove_db_files(path)  # never routed to
        raise
    store.forget(key)
    store.note_new_file(key, prepared.node)
    record = store.meta.tenants.lookup(key)
    assert record is not None
    return record


def _check_target(store: Store, key: str, force: bool) -> None:
    store.spec.steps_for(prefix_of(key))  # ConfigurationError when the prefix has no schema
    existing = store.meta.tenants.lookup(key)
    if existing is not None and existing.state == "moving":
        raise ConfigurationError(f"tenant {key!r} is being moved; retry after the rebalance")
    if existing is not None and existing.state in ("active", "dropping") and not force:
        raise ConfigurationError(f"tenant {key!r} exists; pass force=True (--force) to replace it")


def _discard(prepared: list[_Prepared]) -> None:
    for item in prepared:
        remove_db_files(item.temp)


def _failed(action: str, exc: BaseException, done: list[str]) -> ShardliteError:
    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if done:
        return ShardliteError(f"{action} failed ({cause}) after restoring {len(done)} tenants "
                              f"({', '.join(map(repr, done[:5]))}{', ...' if len(done) > 5 else ''}); fix the "
                              "cause (free space?) and restore the rest again (--force for those already back)")
    return ShardliteError(f"{action} failed ({cause}); nothing was restored: fix the cause (free space?) and retry")


# -- restore -------------------------------------------------------------------------------------------------------


def _backup_dir(src: str) -> tuple[str, dict[str, Any]]:
    """The backup directory ``src`` (absolute) and its validated manifest; call it under the lock."""
    src = os.path.abspath(src)
    manifest = mf.load(src, what_to_do=_DAMAGED) if os.path.isdir(src) else None
    if not manifest:
        raise ConfigurationError(f"{src} holds no {mf.MANIFEST}: name the backup directory (the one holding it)")
    return src, manifest


def _lockable(src: str) -> str:
    src = os.path.abspath(src)
    if not os.path.isdir(src):
        raise ConfigurationError(f"{src} holds no {mf.MANIFEST}: name the backup directory (the one holding it)")
    return src


def restore(store: Store, src: str, *, keys: Iterable[object] | None = None, as_key: object | None = None,
            force: bool = False, progress: Callable[[str], None] | None = None) -> list[str]:
    """Restore tenants (all, or ``keys``) from the backup directory ``src``; returns the restored keys.
    Everything is checked, and every copy prepared, before anything is registered (module docstring).
    Holds a shared lock on the directory (a backup into it is refused meanwhile) and an exclusive one on
    the data root (another restore into it is refused meanwhile)."""
    src = _lockable(src)
    with mf.locked(src, shared=True), mf.locked(store.root, shared=False):
        src, manifest = _backup_dir(src)
        return _restore(store, src, manifest, keys, as_key, force, progress)


def _restore(store: Store, src: str, manifest: dict[str, Any], keys: Iterable[object] | None,
             as_key: object | None, force: bool, progress: Callable[[str], None] | None,
             placement: Callable[[str], str | None] | None = None) -> list[str]:
    """``placement(key)``: the node a new tenant restored from ``key``'s copy goes to (None: the ring's)."""
    entries: dict[str, Any] = manifest["tenants"]
    wanted = list(entries) if keys is None else list(dict.fromkeys(canonical(k) for k in keys))
    if as_key is not None and len(wanted) != 1:
        raise ConfigurationError("as_key (--as) restores exactly one tenant (--key)")
    target_of = {key: canonical(as_key) if as_key is not None else key for key in wanted}
    for key in wanted:
        if key not in entries:
            raise UnknownTenant(f"the backup holds no tenant {key!r}")
        _check_target(store, target_of[key], force)
    paths = {key: mf.member(src, entries[key]["file"]) for key in wanted}
    prepared: list[_Prepared] = []
    try:
        for key in wanted:
            label = f"the copy of {key!r} in {src}"
            source = open_copy(paths[key], checksum=entries[key]["checksum"], label=label)
            try:
                prepared.append(_prepare(store, source, target_of[key], label=label, expect_key=key,
                                         keep_events=as_key is None,
                                         node=placement(key) if placement is not None else None))
            finally:
                source.close()
    except (OSError, apsw.Error) as exc:
        _discard(prepared)
        raise _failed(f"restoring from {src}", exc, []) from exc
    except BaseException:
        _discard(prepared)
        raise
    restored: list[str] = []
    try:
        for item in prepared:
            try:
                _install(store, item, "restore", force)
            except (OSError, apsw.Error) as exc:
                raise _failed(f"restoring {item.key!r} from {src}", exc, restored) from exc
            restored.append(item.key)
            if progress is not None:
                progress(item.key)
    finally:
        _discard(prepared[len(restored):])
    return restored


# -- the global DB -------------------------------------------------------------------------------------------------

def _global_copies(manifest: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(name, file, checksum)`` of each global copy in the backup: ``global`` (shardlite's accounts,
    credentials, sessions) and ``app_global`` (the app's own global tables; backups made before those had a
    file of their own keep them in the ``global`` copy)."""
    return [(name, manifest[name]["file"], manifest[name]["checksum"]) for name in ("global", "app_global")
            if name in manifest]


def restore_globals(store: Store, src: str) -> dict[str, int]:
    """Copy the backup's accounts, sessions and app global tables into an empty root, after checking each
    copy: its checksum, no schema object touching shardlite's tables, single CREATE TABLE statements for the
    app's tables. Returns the rows copied per table."""
    src = _lockable(src)
    with mf.locked(src, shared=True):
        return _restore_globals(store, *_backup_dir(src))


def _open_global_copies(src: str, manifest: dict[str, Any]) -> dict[str, tuple[apsw.Connection, str]]:
    """The backup's global DB copies (``global`` and, when the backup has one, ``app_global``), each opened
    read-only and checked (checksum, integrity, no schema object touching shardlite's tables) before any
    is used: name -> (connection, label). The caller closes them."""
    sources: dict[str, tuple[apsw.Connection, str]] = {}
    try:
        for name, relative, checksum in _global_copies(manifest):
            label = f"the {name} DB copy {relative} in {src}"
            source = open_copy(mf.member(src, relative), checksum=checksum, label=label)
            sources[name] = (source, label)
            if not integrity_ok(source):
                raise ShardliteError(f"{label} fails integrity_check; {_DAMAGED}")
            refuse_foreign(source, label, internal=global_objects() if name == "global" else frozenset())
    except BaseException:
        for source, _ in sources.values():
            source.close()
        raise
    return sources


def _restore_globals(store: Store, src: str, manifest: dict[str, Any]) -> dict[str, int]:
    if any(True for _ in store.meta.tenants.iter_tenants(batch=1)):
        raise ConfigurationError("restoring the global DB needs an empty data root (no tenants); restore the whole "
                                 "backup into a new root instead (`shardlite restore SRC --root NEW`)")
    sources = _open_global_copies(src, manifest)
    try:
        return copy_globals(store, src, sources)
    finally:
        for source, _ in sources.values():
            source.close()


# -- a whole backup into a new root ----------------------------------------------------------------------------


@dataclass
class RootRestore:
    """What :func:`restore_root` did: the root, whether it was new (False: an empty root was filled), its
    nodes, the tenants restored and the global rows copied per table."""

    root: str
    created: bool
    nodes: list[NodePlan]
    tenants: list[str]
    globals: dict[str, int]
    #: objects of a replica left out as damaged (``skip_damaged``): [{"object", "error"}]
    damaged: list[dict[str, str]] = field(default_factory=list)
    #: tenants of a replica left out, their history not replayable (``skip_damaged``): [{"key", "error"}]
    left_out: list[dict[str, str]] = field(default_factory=list)


def restore_root(src: str, root: str, *, node_paths: Mapping[str, str] | None = None,
                 keys: Iterable[object] | None = None, progress: Callable[[str], None] | None = None,
                 finish: Callable[[Store], None] | None = None) -> RootRestore:
    """Restore the backup directory ``src`` into ``root``, a data root that does not exist yet (or holds no
    ``global.db``) or is empty (:func:`~shardlite.services.restore_layout.root_state`); a live root is refused
    (:class:`ConfigurationError`: :func:`restore` restores into one).

    The root gets the backup's node layout (:mod:`shardlite.services.restore_layout`; ``node_paths`` maps node names
    to directories), then the global data (accounts, credentials, sessions, the app's global tables), then
    the tenants (all, or ``keys``), each on its node of the backup while that node is active, else where the
    ring proposes, checked as :func:`restore` checks them. The manifest, the global copy and the layout are
    all checked before anything is made. When it fails, what it made is taken back
    (:class:`~shardlite.services.restore_layout.RootUndo`): a new root is removed again, an empty root gets its
    default node list back, except once tenants were registered (the error says which). ``finish`` (optional)
    runs on the new root's store once everything is in, before it is closed; a failure there takes the restore
    back as any other."""
    src, root = _lockable(src), os.path.abspath(root)
    if os.path.commonpath([src, root]) in (src, root):
        raise ConfigurationError(f"the new root {root} and the backup {src} overlap; restore into another directory")
    with mf.locked(src, shared=True):
        src, manifest = _backup_dir(src)
        entries: dict[str, Any] = manifest["tenants"]
        for key in keys if keys is not None else ():
            if canonical(key) not in entries:
                raise UnknownTenant(f"the backup holds no tenant {canonical(key)!r}; `shardlite restore` without --key "
                                    "restores all of them")
        sources = _open_global_copies(src, manifest)
        try:
            conn, label = sources["global"]
            plans = plan_layout(read_layout(conn, label, _DAMAGED), root, old_root=manifest.get("root"), backup=src,
                                node_paths=node_paths)
            active = {plan.name for plan in plans if plan.state == "active"}
            with claimed_root(root) as made_root:
                return _fill_root(src, root, made_root, manifest, sources, plans, keys, progress,
                                  lambda key: entries[key]["node"] if entries[key]["node"] in active else None,
                                  finish)
        finally:
            for source, _ in sources.values():
                source.close()


def _fill_root(src: str, root: str, made_root: str | None, manifest: dict[str, Any],
               sources: dict[str, tuple[apsw.Connection, str]], plans: list[NodePlan], keys: Iterable[object] | None,
               progress: Callable[[str], None] | None, placement: Callable[[str], str | None],
               finish: Callable[[Store], None] | None = None) -> RootRestore:
    store, undo = open_root_with_layout(root, plans, made_root)
    try:
        copied = copy_globals(store, src, sources)
        restored = _restore(store, src, manifest, keys, None, False, progress, placement)
        if finish is not None:
            finish(store)
    except BaseException as exc:
        taken_back = undo.run(store)
        if not isinstance(exc, ShardliteError) or isinstance(exc, RootChanged):
            raise
        if not taken_back:
            raise ShardliteError(f"{exc} ({root} keeps the backup's node layout and global data)") from exc
        cause = exc.__cause__ if isinstance(exc.__cause__, (OSError, apsw.Error)) else exc
        what = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        raise ShardliteError(f"restoring {src} into {root} failed ({what}); what the restore made there was "
                             "taken back: fix the cause (free space?) and run it again") from exc
    store.close()
    return RootRestore(root, undo.new, plans, restored, copied)


# -- import ----------------------------------------------------------------------------------------------------------


def import_tenant(store: Store, path: str, key: object, *, force: bool = False,
                  keep_events: bool = False) -> TenantRecord:
    """Create tenant ``key`` from a standalone file (an export), with a new generation and incarnation.
    The file is untrusted: checked, copied and rebuilt as in a restore before anything is registered.
    Its pending outbox events are dropped unless ``keep_events`` and the file holds ``key``'s own tenant
    (then they are validated and kept)."""
    canon = canonical(key)
    _check_target(store, canon, force)
    path = os.path.abspath(path)
    source = open_copy(path, checksum=None, label=path)
    try:
        prepared = _prepare(store, source, canon, label=path, expect_key=None, keep_events=keep_events)
    except (OSError, apsw.Error) as exc:
        raise ShardliteError(f"importing {path} failed ({exc}); nothing was imported") from exc
    finally:
        source.close()
    try:
        return _install(store, prepared, "import", force)
    except (OSError, apsw.Error) as exc:
        raise ShardliteError(f"importing {path} failed ({exc}); nothing was imported") from exc


def install_image(store: Store, image: bytes, key: str, *, as_key: object | None = None, force: bool = False,
                  label: str, purpose: str = "restore") -> TenantRecord:
    """Create or replace tenant ``as_key`` (default ``key``) from the database image ``image`` of tenant
    ``key``, as a restore does: checked (integrity, the stored key, shardlite's tables rebuilt), a new
    generation and incarnation, events kept only when restored under their own key. Holds the root's
    restore lock."""
    canon = canonical(key)
    target = canonical(as_key) if as_key is not None else canon
    with mf.locked(store.root, shared=False):
        _check_target(store, target, force)
        source = open_image(image)
        try:
            prepared = _prepare(store, source, target, label=label, expect_key=canon, keep_events=as_key is None)
        except (OSError, apsw.Error) as exc:
            raise _failed(f"restoring {label}", exc, []) from exc
        finally:
            source.close()
        try:
            return _install(store, prepared, purpose, force)
        except (OSError, apsw.Error) as exc:
            raise _failed(f"restoring {label}", exc, []) from exc
        finally:
            _discard([prepared])
