"""The core both front ends share: resolve a key, open its file, run the fence, create tenants.

Data flow (README: How it works): key --canonical--> catalog lookup (cached) --miss/new--> ring --> node dir -->
tenant file --> connection (bounded pool, pragmas, authorizer) --> transaction (BEGIN IMMEDIATE; fence
check; commit).

Rules kept here:

* Rule 4: write transactions start with ``BEGIN IMMEDIATE`` under a busy timeout; a lock held past it
  raises :class:`~shardlite.errors.Busy` (retryable, nothing committed).
* Rule 8 (reader side): right after ``BEGIN IMMEDIATE`` the file's retired marker is checked, before the
  caller's code runs. The check costs one ``SELECT`` only when the file changed since the last check
  (``Connection.data_version()``, a file-control call, tells); a retired file makes the store forget the
  cached location, ask the catalog again and retry at the new home within ``move_wait`` seconds, after
  which :class:`~shardlite.errors.TenantMoving` is raised. Reads check the marker *after* the query when the
  file changed: the marker is permanent, so a read whose snapshot preceded it is valid, and one that may
  not have is retried at the new home.
* Reads never create anything: a missing tenant raises :class:`~shardlite.errors.UnknownTenant`.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import apsw

from ..core.keys import canonical, prefix_of
from ..core.outbox import DEFAULT_MAX_PAYLOAD
from ..core.placement import tenant_relpath
from ..errors import (
    Busy,
    ConfigurationError,
    ShardliteError,
    StatementNotAllowed,
    StorageReadOnly,
    TenantMoving,
    UnknownTenant,
)
from ..files.authorizer import INTERNAL_SQL
from ..files.catalog import Location, TenantRecord
from ..files.checkpoints import DUE_FRAMES, Checkpointer, Submit
from ..files.engine import Settings, abandon, ensure_private_dir, on_fork_in_child, set_busy_timeout, storage_error
from ..files.limits import FAST_VALUE
from ..files.noteswriter import NotesWriter, WalHook
from ..files.pool import Handle, HandlePool
from ..files.sanitize import foreign_references, tenant_objects
from ..files.schema import SchemaSpec, Step
from ..files.tenant import Personaliser, open_tenant
from ..meta.choose import store_for
from ..meta.nodes import check_node_name
from ..meta.replica_record import record_replica
from ..meta.store import MetaStore
from .tenant_create import TenantCreation
from .tenant_reads import TenantReads
from .transaction import DEFAULT_MAX_OUTBOX, Emitter, TransactionClosed
from .wakes import Wakes

__all__ = ["Store"]

_LIVE = ("active", "moving")
_BEGIN = INTERNAL_SQL + "BEGIN IMMEDIATE"
_COMMIT = INTERNAL_SQL + "COMMIT"
_ROLLBACK = INTERNAL_SQL + "ROLLBACK"
_FENCE = INTERNAL_SQL + "SELECT retired FROM _shardlite_meta WHERE id = 1"
_stores: weakref.WeakSet[Store] = weakref.WeakSet()


def _after_fork() -> None:
    for store in list(_stores):
        store._abandon_after_fork()


on_fork_in_child(_after_fork)


def _reset_spare(handle: Handle) -> None:
    """The connection still has a read open after its transaction ended: a statement the caller left
    unfinished on the spare cursor (say ``tx.execute("SELECT ...").fetchone()``), which would keep an old
    snapshot, block checkpoints, and make the next ``BEGIN IMMEDIATE`` fail once another connection wrote.
    Discard it (a cursor the caller still held was closed when the block ended)."""
    spare = handle.spare
    handle.spare = handle.conn.cursor()
    spare.close(True)


#: VM steps between two looks at the clock on write connections (a cheap write takes ~30).
WRITE_CHECK_STEPS = 1000


class _Retired(Exception):
    """Internal: the handle's file carries the retired marker."""


class Store(TenantCreation, TenantReads):
    """Thread-safe core over one data root. See :class:`shardlite.Router` for the public face."""

    def __init__(
        self,
        root: str,
        *,
        nodes: Sequence[str] | None = None,
        schema: Sequence[Step] | dict[str, Sequence[Step]] | None = None,
        global_schema: Sequence[Step] | None = None,
        settings: Settings | None = None,
        move_wait: float = 10.0,
        create: bool = True,
        meta: str | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        checkpoint_submit: Submit | None = None,
        read_check_steps: int = WRITE_CHECK_STEPS,
        replicate: str | None = None,
    ) -> None:
        """``checkpoint_submit``: an executor's ``submit``; when given, write connections checkpoint their
        WAL on its workers instead of inside the committing ``COMMIT`` (see :mod:`shardlite.files.checkpoints`).
        ``replicate`` (:mod:`shardlite.meta.replica_record`): on a replicated root every tenant connection notes
        its commits (:mod:`shardlite.files.noteswriter`) and never checkpoints (no autocheckpoint, no Checkpointer)."""
        self.root = os.path.abspath(os.fspath(root))
        self.settings = settings or Settings()
        self.spec = SchemaSpec(schema)
        self.move_wait = move_wait
        nodes = list(nodes) if nodes is not None else None
        if nodes is not None:
            if not nodes:
                raise ConfigurationError("nodes= needs at least one node name")
            for name in nodes:
                check_node_name(name)
            if len(set(nodes)) != len(nodes):
                raise ConfigurationError("node names must be unique")
        #: The root's metadata (:mod:`shardlite.meta`): the embedded SQLite files, or PostgreSQL.
        self.meta: MetaStore = store_for(self.root, self.settings, meta, create=create)
        fresh = not self.meta.exists
        try:
            self._open_catalog(create, nodes, fresh, global_schema)
            self.replicate = record_replica(self.meta.kv, self.root, replicate)  #: canonical URL, or None
        except BaseException:
            self.meta.close()
            raise
        self.pool = HandlePool(self.settings.max_open, self.settings.busy_timeout_ms / 1000)
        self._records: dict[str, TenantRecord] = {}
        self.meta.watch_tenants(self._route_hint)  # routes changed by other processes (PostgreSQL: NOTIFY)
        self._fast: dict[Any, Handle] = {}  # read handles by the caller's key object (skips canonical())
        self._wfast: dict[str, Handle] = {}  # write handles by canonical key
        #: Outbox hooks shared by every transaction of this store (``tx.emit``).
        if type(max_outbox) is not int or max_outbox < max_payload:
            raise ConfigurationError("max_outbox_bytes must be an int no smaller than max_payload")
        self.emitter = Emitter(self.meta.pending.flag_many, max_payload, check_dest=lambda key: self.spec.steps_for(
            prefix_of(key)), max_outbox=max_outbox, wakes=Wakes(self.meta.pending))
        self._templates: dict[str, Personaliser] = {}
        self._template_lock = threading.Lock()
        #: VM steps between two looks at the clock on read connections (the AsyncRouter's inline budget
        #: needs finer ones than the statement deadline)
        self.read_check_steps = read_check_steps
        self._deadline = self.settings.deadline
        #: values a read may hold without being measured (see shardlite.files.limits)
        self._free_values = self.settings.max_result_bytes // FAST_VALUE
        #: this process's change notes, when the root replicates
        self.notes = None if self.replicate is None else NotesWriter()
        self.checkpoints = (None if checkpoint_submit is None or self.notes is not None
                            else Checkpointer(checkpoint_submit, self._open_for_checkpoint))
        self._closed = False
        _stores.add(self)

    def _open_catalog(self, create: bool, nodes: list[str] | None, fresh: bool,
                      global_schema: Sequence[Step] | None) -> None:
        self.meta.open(create=create, default_nodes=[(n, n, 1) for n in (nodes or ["n1"])])
        if global_schema:
            if isinstance(global_schema, str) or not isinstance(global_schema, (list, tuple)):
                raise ConfigurationError("global_schema is a list of steps (SQL text or callables)")
            self.meta.app_globals.migrate(global_schema)
        self._init_nodes()
        catalog_nodes = self._refresh_nodes()
        if nodes is not None and not fresh and sorted(nodes) != sorted(n.name for n in catalog_nodes):
            raise ConfigurationError(
                f"nodes={sorted(nodes)} disagrees with the catalog at {self.root} "
                f"({sorted(n.name for n in catalog_nodes)}); the catalog owns the node list after the root is "
                "created: change it with `shardlite nodes add NAME` / `shardlite nodes remove NAME`"
            )
        for node in catalog_nodes:
            ensure_private_dir(node.path)

    def note_new_file(self, key: str, node: str) -> None:
        """The catalog now routes ``key`` to a new file on ``node`` (a move's flip, a restore, an import): on a
        replicated root, tell that node's replicator at once, so the new file's history starts within one
        round (its first capture is a snapshot) rather than at the replicator's next reconcile pass."""
        if self.notes is not None:
            self.notes.note(self.node_path(node), key, 0)

    def path_of(self, record: TenantRecord) -> str:
        return os.path.join(self.node_path(record.node), tenant_relpath(record.key, record.generation))

    # -- resolution -----------------------------------------------------------------------------------

    def resolve(self, canon: str, *, create: bool, revive: bool = True) -> TenantRecord | None:
        """The live record of ``canon`` (cached), creating the tenant when ``create``; None if absent.

        ``revive=False`` never re-creates a dropped tenant (the relay delivers nothing to one)."""
        record = self._records.get(canon)
        if record is not None:
            return record
        record, first = self._lookup_creating(canon, revive) if create else (self.meta.tenants.lookup(canon), None)
        if record is not None and record.state in _LIVE:
            if len(self._records) > 100_000:
                self._records.clear()
            self._records[canon] = record
            return record
        if record is not None and record.state == "dropping":
            raise TenantMoving(f"tenant {canon!r} is being dropped")
        if not create or (not revive and record is not None and record.state == "dropped"):
            return None
        return self._create(canon, first)

    def cached(self, canon: str) -> bool:
        """Whether this process has ``canon``'s route cached (:meth:`resolve` answers without the metadata)."""
        return canon in self._records

    def forget(self, canon: str) -> None:
        """Drop the cached location of ``canon`` (the next access asks the catalog)."""
        self._records.pop(canon, None)

    def _route_hint(self, canon: str | None) -> None:
        """The metadata says ``canon``'s row changed elsewhere (None: anything may have): drop the route."""
        if canon is None:
            self._records.clear()
        else:
            self._records.pop(canon, None)

    # -- handles --------------------------------------------------------------------------------------

    def _open(self, canon: str, record: TenantRecord, role: str) -> Handle:
        path = self.path_of(record)
        try:
            conn, guard, ident = open_tenant(
                path, key=canon, incarnation=record.incarnation, settings=self.settings,
                steps=self.spec.steps_for(prefix_of(canon)), read_only=role == "r",
                wal_hook=self.note_hook(record.node, canon))
        except apsw.CantOpenError as exc:
            self.forget(canon)
            fresh = self.meta.tenants.lookup(canon)
            if fresh is not None and fresh.generation == record.generation and fresh.state in _LIVE:
                raise ShardliteError(
                    f"tenant {canon!r}: the catalog says {path} but the file is missing ({exc})") from exc
            raise _Retired() from exc
        if ident.retired is not None:
            conn.close()
            self.forget(canon)
            raise _Retired()
        if role == "w" and conn.readonly("main"):
            # SQLite opens a file it may not write read-only, silently: such a connection must never be
            # pooled for writes (it would refuse every write until the process restarts, even after the
            # permissions are fixed); the next write opens the file again.
            conn.close()
            raise StorageReadOnly(f"tenant {canon!r} ({path}): the file or its directory cannot be written by this "
                                  "process; nothing was committed: make them writable by this user (mode "
                                  "0600/0700); the next write opens the file again")
        if ident.app_version > record.schema_version:
            self.meta.tenants.note_schema_version(canon, ident.app_version)
        handle = Handle(canon, role, conn, guard, path, record.generation, ident.incarnation)
        handle.limit = self._deadline
        conn.setprogresshandler(handle.progress, self.read_check_steps if role == "r" else WRITE_CHECK_STEPS)
        if role == "r":
            conn.limit(apsw.SQLITE_LIMIT_LENGTH, FAST_VALUE)  # larger values: the measured path (_query)
        elif self.checkpoints is not None:
            handle.wal = self.checkpoints.watch(conn)
        return self.pool.add(handle)

    def note_hook(self, node: str, canon: str) -> WalHook | None:
        """The WAL hook that notes the commits of ``canon`` in ``node`` when the root replicates, else None."""
        return None if self.notes is None else self.notes.hook(self.node_path(node), canon)

    def _open_for_checkpoint(self, handle: Handle) -> apsw.Connection:
        """A connection of its own on ``handle``'s file, identity-checked and ``query_only``."""
        conn, _guard, _ident = open_tenant(handle.path, key=handle.key, incarnation=handle.incarnation,
                                           settings=self.settings, steps=(), read_only=True)
        return conn

    def acquire(self, key: object, role: str, *, create: bool, revive: bool = True,
                move_wait: float | None = None, wait_ms: int | None = None) -> Handle:
        """An entered handle for ``key``: resolved, opened, identity-checked. The caller must release it.
        ``move_wait``: how long to wait for a tenant being moved (default: the router's ``move_wait``);
        ``wait_ms``: for another thread of this process using the connection (default: the busy timeout)."""
        canon = canonical(key)
        deadline = time.monotonic() + (self.move_wait if move_wait is None else move_wait)
        while True:
            if self._closed:
                raise ShardliteError("the router is closed")
            record = self.resolve(canon, create=create, revive=revive)
            if record is None:
                raise UnknownTenant.for_key(canon)
            handle = self.pool.get(canon, role)
            try:
                if handle is None or handle.generation != record.generation:
                    handle = self._open(canon, record, role)
            except _Retired:
                self._wait_for_move(canon, record.generation, deadline)
                continue
            if not handle.enter((self.settings.busy_timeout_ms if wait_ms is None else wait_ms) / 1000):
                raise Busy(f"tenant {canon!r}: another thread of this process held its connection past the "
                           f"{'busy timeout' if wait_ms is None else f'{wait_ms} ms wait'}")
            if handle.closed:
                handle.exit()
                continue
            if role == "r":
                if len(self._fast) > 4 * self.settings.max_open:
                    self._fast.clear()
                self._fast[key] = handle
            elif role == "w":
                if len(self._wfast) > 4 * self.settings.max_open:
                    self._wfast.clear()
                self._wfast[canon] = handle
            return handle

    def release(self, handle: Handle) -> None:
        handle.exit()
        if self.pool.waiting:
            self.pool.released()

    def retire_handle(self, handle: Handle) -> None:
        """The handle's file is retired: close it and forget its location. The caller holds it."""
        self.forget(handle.key)
        self.pool.discard(handle)

    def _wait_for_move(self, canon: str, old_generation: int, deadline: float) -> None:
        """Wait (bounded) until the catalog no longer points at ``old_generation``, or says the tenant is
        plainly ``active`` there again (a move that was cancelled lifts its fence). Callers loop on it until
        their deadline, so the pause between looks grows with the time already waited."""
        self.forget(canon)
        waited = max(0.0, self.move_wait - (deadline - time.monotonic()))
        delay = min(0.001 + waited / 10, 0.05)
        while True:
            record = self.meta.tenants.lookup(canon)
            if record is None or record.generation != old_generation or record.state not in _LIVE:
                return
            if time.monotonic() + delay > deadline:
                raise TenantMoving(f"tenant {canon!r} is being moved; retry later")
            time.sleep(delay)
            if record.state == "active":
                return  # not (or no longer) moving: look at the file again
            delay = min(delay * 2, 0.05)

    # -- transactions -----------------------------------------------------------------------------------

    def retired(self, handle: Handle) -> bool:
        """Read the marker (inside the caller's transaction, or in its own read)."""
        handle.calls = 0
        guard = handle.guard
        guard.trusted = True
        try:
            rows = handle.cur.execute(_FENCE).fetchall()
        finally:
            guard.trusted = False
        return bool(rows) and rows[0][0] is not None

    def internal(self, handle: Handle, sql: str, params: Sequence[object] = ()) -> apsw.Cursor:
        """Run one of shardlite's own statements (transaction control, writes to ``_shardlite_*``)."""
        handle.calls = 0  # every statement starts its own clock (see Handle.progress)
        guard = handle.guard
        guard.trusted = True
        try:
            return handle.conn.execute(INTERNAL_SQL + sql, params)
        finally:
            guard.trusted = False

    def internal_many(self, handle: Handle, sql: str, seq_of_params: Sequence[Sequence[object]]) -> None:
        """:meth:`internal` for each parameter set of ``seq_of_params`` (``executemany``)."""
        handle.calls = 0
        guard = handle.guard
        guard.trusted = True
        try:
            handle.conn.executemany(INTERNAL_SQL + sql, seq_of_params)
        finally:
            guard.trusted = False

    def begin(self, handle: Handle, wait_ms: int | None = None) -> bool:
        """BEGIN IMMEDIATE and the fence check. False (rolled back) when the file is retired. ``wait_ms``:
        wait that long for another writer's lock instead of the busy timeout (0: not at all)."""
        handle.calls = 0  # BEGIN and the fence check: a clock of their own (see Handle.progress)
        conn = handle.conn
        guard = handle.guard
        guard.trusted = True
        if wait_ms is not None:
            set_busy_timeout(conn, wait_ms)
        try:
            handle.cur.execute(_BEGIN)
        except apsw.BusyError as exc:
            raise Busy(f"tenant {handle.key!r} stayed locked past the busy timeout ({exc})") from exc
        except (apsw.FullError, apsw.ReadOnlyError, apsw.IOError, apsw.CorruptError) as exc:
            found = storage_error(exc, handle.key, handle.path)
            assert found is not None
            raise found from exc
        finally:
            guard.trusted = False
            if wait_ms is not None:
                set_busy_timeout(conn, self.settings.busy_timeout_ms)
        dv = conn.data_version()
        if dv != handle.checked_dv:
            try:
                moved = self.retired(handle)
            except BaseException:
                self.rollback(handle)
                raise
            if moved:
                self.rollback(handle)
                return False
            handle.checked_dv = dv
        return True

    def check_schema(self, handle: Handle) -> None:
        """User SQL changed the schema inside the open transaction: refuse it (:class:`StatementNotAllowed`,
        the caller rolls back) when any user object now references, shadows or constrains one of
        shardlite's tables (a foreign key into ``_shardlite_relay`` would make shardlite's own writes fail with
        "foreign key mismatch"; the authorizer is not told what a REFERENCES clause names)."""
        handle.guard.ddl = False
        conn = handle.conn
        found = (foreign_references(conn, "main", internal=tenant_objects())
                 + foreign_references(conn, "temp", internal=tenant_objects()))
        if found:
            raise StatementNotAllowed(f"tenant {handle.key!r}: user schema objects may not reference shardlite's own "
                                      f"tables ({'; '.join(found)}); nothing of this transaction was committed")

    def commit(self, handle: Handle) -> None:
        handle.calls = 0  # the COMMIT never inherits the clock of a statement before it
        conn = handle.conn
        guard = handle.guard
        if guard.ddl:
            try:
                self.check_schema(handle)
            except BaseException:
                self.rollback(handle)
                raise
        guard.trusted = True
        try:
            if handle.needs_flag:  # the pending-work flag before the commit that needs it
                try:
                    self.emitter.flush(handle.key, queued_here=handle.needs_flag == threading.get_ident())
                finally:  # written, or this transaction rolls back: the handle's next one needs none
                    handle.needs_flag = 0
            handle.cur.execute(_COMMIT)
        except apsw.BusyError as exc:
            if not conn.get_autocommit():
                conn.execute(_ROLLBACK)
            raise Busy(f"tenant {handle.key!r}: commit blocked ({exc}); nothing was committed") from exc
        except (apsw.FullError, apsw.ReadOnlyError, apsw.IOError, apsw.CorruptError) as exc:
            if not conn.get_autocommit():
                conn.execute(_ROLLBACK)
            found = storage_error(exc, handle.key, handle.path)
            assert found is not None
            raise found from exc
        except apsw.SQLError:
            if conn.get_autocommit():  # "cannot commit - no transaction is active"
                raise TransactionClosed(f"the transaction on {handle.key!r} was rolled back by SQLite (an OR "
                                        "ROLLBACK conflict, RAISE(ROLLBACK) or an I/O error); nothing of it was "
                                        "committed") from None
            conn.execute(_ROLLBACK)
            raise
        except BaseException:
            if not conn.get_autocommit():
                conn.execute(_ROLLBACK)
            raise
        finally:
            guard.trusted = False
        if conn.txn_state():
            _reset_spare(handle)
        handle.checked_dv = conn.data_version()
        watch = handle.wal
        if watch is not None and watch.frames >= DUE_FRAMES:
            self.checkpoints.after_commit(handle, watch)  # type: ignore[union-attr]  # set with handle.wal
        if handle.emitted:
            handle.emitted, parked, handle.wake_version = False, handle.wake_version, None
            self.emitter.wake(handle.key, parked)

    def rollback(self, handle: Handle) -> None:
        handle.emitted, handle.needs_flag, handle.wake_version = False, 0, None
        handle.calls = 0
        conn = handle.conn
        if conn.get_autocommit():
            return  # SQLite already rolled back (some errors do)
        guard = handle.guard
        guard.trusted = True
        try:
            conn.execute(_ROLLBACK)
        finally:
            guard.trusted = False
        if conn.txn_state():
            _reset_spare(handle)

    def begin_write(self, canon: str, *, create: bool = True, revive: bool = True,
                    wait_ms: int | None = None, move_wait: float | None = None) -> Handle:
        """An entered ``"w"`` handle inside ``BEGIN IMMEDIATE`` at the tenant's current home.

        ``canon`` must already be canonical. Retries at the new home when the file turns out retired,
        for up to ``move_wait`` seconds (default: the router's), then raises :class:`TenantMoving`.
        """
        handle: Handle | None = self._wfast.get(canon)
        if handle is not None:
            if handle.lock.acquire(False):
                if handle.closed:
                    handle.lock.release()
                    handle = None
                else:
                    handle.owner, handle.depth = threading.get_ident(), 1
            else:
                handle = None
        deadline = 0.0
        while True:
            if handle is None:
                handle = self.acquire(canon, "w", create=create, revive=revive, move_wait=move_wait,
                                      wait_ms=wait_ms)
            try:
                ok = self.begin(handle, wait_ms)
            except BaseException:
                self.release(handle)
                raise
            if ok:
                return handle
            generation = handle.generation
            self.retire_handle(handle)
            self.release(handle)
            deadline = deadline or time.monotonic() + (self.move_wait if move_wait is None else move_wait)
            self._wait_for_move(canon, generation, deadline)
            handle = None

    @contextmanager
    def writing(self, key: str, *, create: bool = True, revive: bool = True,
                wait_ms: int | None = None, move_wait: float | None = None) -> Iterator[Handle]:
        """``with store.writing(key) as handle``: one of shardlite's own write transactions (commit on
        success, rollback on error, the handle released either way). ``wait_ms``: see :meth:`begin`;
        ``move_wait``: see :meth:`begin_write` (0: :class:`TenantMoving` at once for a moving tenant)."""
        handle = self.begin_write(key, create=create, revive=revive, wait_ms=wait_ms, move_wait=move_wait)
        try:
            yield handle
            self.commit(handle)
        except BaseException:
            self.rollback(handle)
            raise
        finally:
            self.release(handle)

    # -- catalog-level operations -------------------------------------------------------------------------

    def locate(self, key: object) -> Location:
        canon = canonical(key)
        record = self.meta.tenants.lookup(canon)
        if record is None or record.state not in _LIVE:
            return Location(canon, self.propose(canon), None, 0, "absent", 0)
        return Location(canon, record.node, self.path_of(record), record.epoch, record.state, record.generation)

    def exists(self, key: object) -> bool:
        record = self.meta.tenants.lookup(canonical(key))
        return record is not None and record.state in _LIVE

    def tenants(self) -> Iterator[str]:
        for record in self.meta.tenants.iter_tenants():
            yield record.key

    # -- lifecycle ---------------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._fast.clear()
        self._wfast.clear()
        with self._template_lock:
            for personaliser in self._templates.values():
                personaliser.close()
            self._templates.clear()
        self.pool.close_all()
        if self.notes is not None:
            self.notes.close()
        self.emitter.close()  # before the metadata: the queued wake-ups are written
        self.meta.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def _abandon_after_fork(self) -> None:
        self._fast = {}
        self._wfast = {}
        self._records = {}
        self._template_lock = threading.Lock()
        abandon(list(self._templates.values()))  # may be mid-use by a parent thread: never touch them
        self._templates = {}
        self.pool.abandon()

