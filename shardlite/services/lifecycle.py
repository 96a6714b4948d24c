"""Tenant lifecycle operations over a :class:`~shardlite.front.store.Store`: drop, fence, migrate every tenant.

* :func:`drop` fences the file (the retired marker, written inside its own write lock, so a process that
  still has it open finds it in its next transaction), records the tombstone in the catalog, closes this
  process's handles and deletes the file with its WAL and SHM. The key's generation is never reused. On a
  replicated root the fence is written in the write lock that captures the commits the node's replicator
  had not captured yet, and those are staged with a drop record in the node's staging before the tombstone
  (:func:`shardlite.services.drop_tail.fence_and_stage`), which the node's replicator ships in its next pack:
  a whole-root restore at a time after the drop leaves the tenant out, and a one-tenant restore at a time
  before it holds every commit acknowledged until then.
* :func:`fence_file` is that fence, also used when a restore replaces a live tenant.
* :func:`migrate_all` opens every live tenant (opening migrates a tenant that is behind), in parallel.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import apsw

from ..core.keys import canonical
from ..errors import Busy, IdentityMismatch, TenantMoving, UnknownTenant
from ..files.catalog import TenantRecord
from ..files.copying import remove_db_files, write_locked
from ..files.engine import fsync_dir
from ..front.store import Store
from . import drop_tail

__all__ = ["drop", "fence_file", "migrate_all"]


def drop(store: Store, key: object) -> None:
    """Drop a tenant: fence its file, record the tombstone, delete the file with its WAL and SHM."""
    canon = canonical(key)
    record = store.meta.tenants.lookup(canon)
    if record is None or record.state == "dropped":
        raise UnknownTenant.for_key(canon)
    if record.state == "moving":
        raise TenantMoving(f"tenant {canon!r} is being moved; drop it after the move")
    if record.state == "active":
        # F3: only from active (a mover's active -> moving decided meanwhile makes this a MetaConflict)
        store.meta.tenants.set_state(canon, "dropping", expect_generation=record.generation,
                                     expect_states=("active",))
    path = store.path_of(record)
    store.forget(canon)
    if store.replicate is None:
        fence_file(store, record, path, "dropped")
    else:  # the fence, and the commits the replicator had not captured staged with the drop record
        drop_tail.fence_and_stage(store, record, path)
    store.meta.tenants.set_state(canon, "dropped", expect_generation=record.generation, expect_states=("dropping",))
    _discard_handles(store, canon)
    remove_db_files(path)
    fsync_dir(os.path.dirname(path))


def _discard_handles(store: Store, canon: str) -> None:
    """Close this process's pool handles of ``canon`` (those another thread holds past the busy timeout stay)."""
    for handle in store.pool.handles():
        if handle.key == canon and handle.enter(store.settings.busy_timeout_ms / 1000):
            try:
                store.pool.discard(handle)
            finally:
                handle.exit()


def fence_file(store: Store, record: TenantRecord, path: str, marker: str) -> None:
    """Write the retired marker into ``path`` inside its own write lock (idempotent).

    The connection is shardlite's own and inert (:func:`~shardlite.files.copying.inert`; foreign keys off): no
    trigger, view or foreign key a file's schema holds can block the fence (a tenant that made itself
    undroppable stayed in ``dropping`` for ever)."""
    if not os.path.exists(path):
        return

    def busy(exc: apsw.BusyError) -> Busy:
        return Busy(f"tenant {record.key!r}: {path} stayed locked past the busy timeout ({exc}); nothing was "
                    "changed: retry")

    with write_locked(path, busy_timeout_ms=store.settings.busy_timeout_ms, busy=busy,
                      wal_hook=store.note_hook(record.node, record.key)) as conn:
        stored = conn.execute("SELECT key, incarnation FROM _shardlite_meta WHERE id = 1").fetchall()
        if stored != [(record.key, record.incarnation)]:
            raise IdentityMismatch(f"{path} does not hold incarnation {record.incarnation} of {record.key!r}: "
                                   "refusing to fence it")
        conn.execute("UPDATE _shardlite_meta SET retired = ? WHERE id = 1", (marker,))


def migrate_all(store: Store, *, parallel: int = 4,
                progress: Callable[[str, BaseException | None], None] | None = None) -> dict[str, str]:
    """Open (and so migrate) every live tenant; return ``{key: error text}`` for those that failed."""
    failures: dict[str, str] = {}

    def one(key: str) -> None:
        error: BaseException | None = None
        try:
            store.release(store.acquire(key, "w", create=False))
        except Exception as exc:  # noqa: BLE001 - reported per tenant, the run goes on
            error = exc
            failures[key] = f"{type(exc).__name__}: {exc}"
        if progress is not None:
            progress(key, error)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as executor:
        for _ in executor.map(one, store.tenants()):
            pass
    return failures
