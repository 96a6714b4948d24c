"""The sync front end: :class:`Router` (README: Sync).

A ``Router`` may be shared by threads. One thread's transaction never sees or interleaves with another's:
each tenant connection is used by one thread at a time, and reads run on a separate ``query_only``
connection that only ever sees committed data. Nested ``transaction()`` blocks on the same key in the same
thread become savepoints.
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from sys import getrefcount as _refs
from typing import Any, Literal, TypeVar, overload

from ..core.keys import canonical
from ..core.outbox import DEFAULT_MAX_PAYLOAD, RetryPolicy
from ..core.retrying import RETRYABLE, Backoff
from ..errors import ConfigurationError, ShardliteError
from ..files.catalog import Location
from ..files.engine import Settings
from ..files.pool import Handle
from ..files.schema import Step
from ..services import backup as backup_mod
from ..services import erase as erase_mod
from ..services import lifecycle, metrics
from ..services.fanout import MapResult, run_map
from ..services.nodes import Nodes
from ..services.rebalance import Rebalancer
from ..services.relay import Handler, HandlerRegistry, Relay
from ..services.replicator_child import ReplicatorChild, start_replicator
from . import feed
from .accounts import Accounts
from .durability import DEFAULT_TIMEOUT, Durability
from .globals import GlobalTables
from .sessions import Sessions
from .store import Store
from .transaction import IDLE_ATTR_REFS, Params, Transaction, seal_handle

__all__ = ["Router"]

T = TypeVar("T")
Schema = Sequence[Step] | Mapping[str, Sequence[Step]] | None


class _Scope(Transaction):
    """``with router.transaction(key) as tx``: BEGIN IMMEDIATE (or a savepoint when nested). The scope is
    the transaction object itself (one object per transaction, not two: every sync write's path). It can
    be entered once; before that and after its block it refuses statements."""

    __slots__ = ("_router", "_savepoint", "_active")

    def __init__(self, router: Router, key: object) -> None:
        self._router = router
        self.key = key  # type: ignore[assignment]  # the caller's key until entered, then the canonical one
        self._savepoint: str | None = None
        self._conn = None  # type: ignore[assignment]  # never read while _open is False
        self._open = False
        self._handle = None

    def __enter__(self) -> Transaction:
        router = self._router
        store = router._store
        if self._handle is not None:
            raise ShardliteError("a transaction scope can be entered only once: call transaction(key) again")
        try:
            active = router._local.active
        except AttributeError:
            active = router._local.active = {}
        key: object = self.key  # any object may come in: canonical() checks it
        try:  # a warm write handle is filed under the canonical key, so its key is canonical(key)
            warm = store._wfast.get(key)  # type: ignore[call-overload]
        except TypeError:  # unhashable: canonical() says why it is not a key
            warm = None
        canon = warm.key if warm is not None else canonical(key)
        outer = active.get(canon)
        if outer is not None:
            handle = outer
            handle.savepoints += 1
            self._savepoint = f"shardlite_sp{handle.savepoints}"
            try:
                store.internal(handle, f"SAVEPOINT {self._savepoint}")
            except BaseException:
                handle.savepoints -= 1
                raise
        else:
            handle = store.begin_write(canon)
            active[canon] = handle
        self._active = active
        self.key, self._conn, self._guard, self._handle = canon, handle.conn, handle.guard, handle
        self._emitter, self._outbox, self._open = store.emitter, 0, True
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        handle = self._handle
        assert handle is not None
        store = self._router._store
        self._open = False
        if self._savepoint is not None:  # a nested block's cursors are its enclosing block's too
            try:
                if exc_type is not None and not handle.conn.get_autocommit():
                    store.internal(handle, f"ROLLBACK TO {self._savepoint}")
                if not handle.conn.get_autocommit():
                    store.internal(handle, f"RELEASE {self._savepoint}")
            finally:
                handle.savepoints -= 1
            return
        try:
            if handle.given or _refs(handle.spare) != IDLE_ATTR_REFS:  # the caller holds cursors: close them
                seal_handle(handle)
            if exc_type is None:
                store.commit(handle)
            else:
                store.rollback(handle)
        finally:
            del self._active[self.key]
            store.release(handle)
        if exc_type is None and self._router._durability.replicated:
            # committed and its connection released: now wait for the replica (front.durability)
            self._router._durability.wait(self.key, handle=handle)


class Router(HandlerRegistry):
    """Routes partition keys to one SQLite file per tenant.

    ``Router(root)`` is the embedded default: one node ``n1`` under ``root``. ``nodes=`` is used only when
    the root is first created; afterwards the catalog owns the node list. ``schema`` is a list of steps for
    every tenant or a mapping from key prefix to a list (README: How it works, Schemas). ``synchronous`` is ``"NORMAL"``
    (an acknowledged write survives a process crash) or ``"FULL"`` (it survives power loss).
    ``max_open`` bounds this process's open tenant connections. ``move_wait`` bounds how long a
    transaction waits for a tenant that is being moved before :class:`~shardlite.TenantMoving`.
    ``create=False`` refuses to create a data root that does not exist yet (:class:`ConfigurationError`).
    ``global_schema`` lists the steps of the app's own global tables (``router.globals``, in
    ``<root>/app_global.db``).
    ``clock`` (seconds since the epoch) drives session and account timestamps; tests inject one.
    ``relay=True`` runs the outbox relay on a background thread for the router's lifetime; ``max_payload``
    bounds an event's encoded payload and ``max_outbox_bytes`` what one transaction adds to its outbox
    (:class:`~shardlite.PayloadTooLarge` past either); ``retry`` sets the relay's attempts and backoff.
    ``statement_timeout`` (seconds, ``None``: none) interrupts a statement that runs longer
    (:class:`~shardlite.QueryTimeout`); ``max_rows`` and ``max_result_bytes`` cap what one read returns
    (:class:`~shardlite.ResultTooLarge`).
    ``meta`` says where the root's metadata lives: the embedded ``<root>/global.db`` (the default, or
    ``"sqlite"``), or a PostgreSQL database (``"postgresql://user@host:port/dbname"``; default
    ``$SHARDLITE_META``). The first router on a new root records it in ``<root>/meta.json`` (never with a
    password); later routers find it there, and a ``meta`` naming another store raises
    :class:`ConfigurationError`.
    ``replicate`` says where every tenant is replicated: ``"s3://bucket/prefix"`` (S3 API; ``?endpoint=``
    and ``&region=`` allowed, credentials only from the AWS environment or config) or ``"file:///abs/dir"``.
    The first router given one records it in the root's metadata (the canonical URL, never a secret); later
    routers and CLI commands find it there, and a ``replicate`` naming another location raises
    :class:`ConfigurationError`. The writers of a replicated root note each commit for the node's
    replicator and never checkpoint a tenant (docs/replication.md).
    ``replicator=True`` runs that replicator for the router's lifetime as a child process (``shardlite replicate
    run``; :mod:`shardlite.services.replicator_child`), stopped by :meth:`close`; the root must replicate
    (:class:`ConfigurationError` otherwise).
    ``durability`` is this router's acknowledgement policy (:mod:`shardlite.front.durability`): ``"local"``
    (the default: a transaction returns once committed to its tenant's file; the replica follows within the
    replicator's lag) or ``"replicated"`` (it returns once its commit is also durable in the replica, waiting
    at most ``durability_timeout`` seconds, else :class:`~shardlite.ReplicationUnavailable`: committed
    locally, not confirmed). ``"replicated"`` needs a root that replicates and a replicator running.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        nodes: Sequence[str] | None = None,
        schema: Schema = None,
        global_schema: Sequence[Step] | None = None,
        synchronous: str = "NORMAL",
        busy_timeout_ms: int = 5000,
        max_open: int = 256,
        cache_kib: int = 512,
        move_wait: float = 10.0,
        create: bool = True,
        clock: Callable[[], float] = time.time,
        relay: bool = False,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        max_outbox_bytes: int = 64 * 1024 * 1024,
        retry: RetryPolicy | None = None,
        statement_timeout: float | None = 30.0,
        max_rows: int = 100_000,
        max_result_bytes: int = 64 * 1024 * 1024,
        meta: str | None = None,
        replicate: str | None = None,
        replicator: bool = False,
        durability: str = "local",
        durability_timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        settings = Settings(synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, max_open=max_open,
                            cache_kib=cache_kib, statement_timeout=statement_timeout, max_rows=max_rows,
                            max_result_bytes=max_result_bytes)
        self._replicator: ReplicatorChild | None = None
        self._store = Store(os.fspath(root), nodes=nodes, schema=schema,  # type: ignore[arg-type]
                            global_schema=global_schema, settings=settings, move_wait=move_wait, create=create,
                            meta=meta, max_payload=max_payload, max_outbox=max_outbox_bytes, replicate=replicate)
        try:
            self._durability = Durability(self._store, durability, durability_timeout)
            if replicator:
                self._replicator = start_replicator(self._store)
        except BaseException:
            self._store.close()
            raise
        self._local = threading.local()
        store_meta = self._store.meta
        #: Accounts with unique e-mail addresses (:class:`~shardlite.front.accounts.Accounts`).
        self.accounts = Accounts(store_meta.accounts, store_meta.credentials, clock)
        #: Sessions (:class:`~shardlite.front.sessions.Sessions`).
        self.sessions = Sessions(store_meta.sessions, clock)
        #: The app's global tables (:class:`~shardlite.front.globals.GlobalTables`).
        self.globals = GlobalTables(store_meta.app_globals)
        self._handlers: dict[str, Handler] = {}
        #: The outbox relay (:class:`~shardlite.services.relay.Relay`): ``start()``/``stop()``, ``run_once()``,
        #: ``drain()``, ``status()``. Never started implicitly; ``relay=True`` runs it for the router's life.
        self.relay = Relay(self._store, self._handlers, policy=retry)
        #: Storage nodes (:class:`~shardlite.services.nodes.Nodes`): ``list()``, ``add()``, ``drain()``, ``remove()``.
        self.nodes = Nodes(self._store)
        #: Online tenant moves (:class:`~shardlite.services.rebalance.Rebalancer`): ``plan()``, ``apply()``,
        #: ``resume()``, ``cancel()``, ``complete()``, ``status()``.
        self.rebalance = Rebalancer(self._store)
        if relay:
            self.relay.start()

    # -- the contract -----------------------------------------------------------------------------------

    @property
    def root(self) -> str:
        return self._store.root

    @property
    def settings(self) -> Settings:
        return self._store.settings

    def _active(self) -> dict[str, Handle]:
        try:
            return self._local.active  # type: ignore[no-any-return]
        except AttributeError:
            self._local.active = {}
            return self._local.active  # type: ignore[no-any-return]

    def transaction(self, key: object) -> _Scope:
        """``with router.transaction(key) as tx:`` a write transaction on ``key``'s tenant.

        Starts with BEGIN IMMEDIATE (creating the tenant on its first write), checks the move fence before
        the body runs, commits when the block ends normally and rolls back when it raises. Nested on the
        same key in the same thread it becomes a savepoint. Raises :class:`~shardlite.Busy` when the
        tenant stays locked past the busy timeout.
        """
        return _Scope(self, key)

    def run(self, key: object, fn: Callable[[Transaction], T], *, timeout: float = 30.0) -> T:
        """Call ``fn(tx)`` in a write transaction, retrying the *whole* transaction on ``Busy`` and
        ``TenantMoving`` (jittered backoff, :mod:`shardlite.core.retrying`, the same policy as
        :meth:`AsyncRouter.run`) for up to ``timeout`` seconds. Returns ``fn``'s result.

        ``fn`` may run more than once, so it must not have side effects outside the transaction.
        """
        if canonical(key) in self._active():
            with self.transaction(key) as tx:  # nested: the outer transaction owns retries
                return fn(tx)
        backoff = Backoff(time.monotonic() + timeout)
        while True:
            try:
                with self.transaction(key) as tx:
                    return fn(tx)
            except RETRYABLE:
                pause = backoff.pause(time.monotonic())
                if pause is None:
                    raise
                time.sleep(pause)

    def query(self, key: object, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """Run one read-only statement on ``key``'s tenant; a list of tuples.

        Never creates anything: :class:`~shardlite.UnknownTenant` when the tenant does not exist. Sees only
        committed data (also inside the caller's own open transaction: use ``tx.execute`` to read your own
        uncommitted writes). A statement that writes is refused.
        """
        return self._store.read(key, sql, params)

    def wait_replicated(self, key: object, *, timeout: float | None = None) -> None:
        """Block until every commit to ``key``'s tenant made so far is durable in the root's replica, at most
        ``timeout`` seconds (default: the router's ``durability_timeout``), else
        :class:`~shardlite.ReplicationUnavailable`. Works whatever this router's ``durability``: the way to
        confirm a write that raised ReplicationUnavailable, or a batch of local-durability writes, later."""
        if self._store.replicate is None:
            raise ConfigurationError(f"{self.root} does not replicate: there is no replica to wait for")
        self._durability.wait(canonical(key), timeout)

    def locate(self, key: object) -> Location:
        """Where ``key`` lives (never creates): node, path, epoch and state; ``state="absent"`` and
        ``path=None`` with the ring's proposal for a key not created yet."""
        return self._store.locate(key)

    def exists(self, key: object) -> bool:
        return self._store.exists(key)

    def tenants(self) -> Iterator[str]:
        """Every live tenant key in the catalog, in key order (read in batches)."""
        return self._store.tenants()

    @overload
    def drop(self, key: object, *, erase: Literal[False] = False) -> None: ...

    @overload
    def drop(self, key: object, *, erase: Literal[True]) -> dict[str, Any]: ...

    def drop(self, key: object, *, erase: bool = False) -> dict[str, Any] | None:
        """Delete a tenant's file (with its WAL and SHM); the catalog keeps a tombstone. A later write
        to the same key creates a new tenant (new generation and incarnation). A replicated root keeps the
        tenant's history in the replica (until retention expires) unless ``erase=True``: then every capture
        of the key (any incarnation) is removed from the replica too, and the receipt (what was deleted,
        where, when) is returned (:func:`shardlite.services.erase.erase`; safe to repeat after a crash, and
        on an already dropped or erased key)."""
        if erase:
            return erase_mod.erase(self._store, key)
        lifecycle.drop(self._store, key)
        return None

    def migrate_all(self, *, parallel: int = 4,
                    progress: Callable[[str, BaseException | None], None] | None = None) -> dict[str, str]:
        """Bring every tenant to the current schema (each atomically); ``{key: error}`` for failures,
        which stay on their previous version."""
        return lifecycle.migrate_all(self._store, parallel=parallel, progress=progress)

    def status(self) -> dict[str, Any]:
        """Tenants per node and per schema version, and this process's open connections."""
        return metrics.status(self._store)

    # -- outbox ---------------------------------------------------------------------------------------------

    def feed(self, key: object, *, limit: int = 50, before: int | None = None) -> list[feed.FeedItem]:
        """``key``'s activity feed, newest first; ``before=item.id`` pages back. UnknownTenant if absent."""
        cursor = (1 << 62) if before is None else int(before)
        return feed.items(self._store.read(key, feed.page_query(limit), (cursor,), True))

    # -- operations -----------------------------------------------------------------------------------------

    def map(self, sql: str, params: Params = (), *, keys: Iterable[object] | None = None,
            parallel: int = 4) -> MapResult:
        """Run a read-only statement on many tenants (all, or ``keys``); iterate for ``(key, rows)``.
        Tenants are read as they are (no migration); see :mod:`shardlite.services.fanout`."""
        return run_map(self._store, sql, params, keys=keys, parallel=parallel)

    def backup(self, dest: str | os.PathLike[str], *, keys: Iterable[object] | None = None,
               parallel: int = backup_mod.PARALLEL) -> dict[str, Any]:
        """Back up tenants and the global DB into ``dest``, ``parallel`` copies at once (incremental; see
        :mod:`shardlite.services.backup`)."""
        return backup_mod.backup(self._store, os.fspath(dest), keys=keys, parallel=parallel)

    def restore(self, src: str | os.PathLike[str], *, keys: Iterable[object] | None = None,
                as_key: object | None = None, force: bool = False) -> list[str]:
        """Restore tenants from a backup (new generation and incarnation each); see :mod:`shardlite.services.backup`."""
        return backup_mod.restore(self._store, os.fspath(src), keys=keys, as_key=as_key, force=force)

    def export(self, key: object, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write ``key``'s tenant to a standalone SQLite file."""
        return backup_mod.export_tenant(self._store, key, os.fspath(path))

    def import_(self, path: str | os.PathLike[str], key: object, *, force: bool = False,
                keep_events: bool = False) -> Location:
        """Create tenant ``key`` from an exported file (new generation and incarnation). The file is untrusted:
        checked whole and shardlite's tables rebuilt before anything is registered. Its pending outbox events
        are dropped unless ``keep_events`` and the file holds ``key``'s own tenant (then they are validated
        and kept)."""
        backup_mod.import_tenant(self._store, os.fspath(path), key, force=force, keep_events=keep_events)
        return self.locate(key)

    def stats(self) -> dict[str, Any]:
        """Tenants and bytes per node, this process's open connections, schema versions, relay lag,
        rebalance state (what ``shardlite status --json`` prints)."""
        return metrics.stats(self._store, self.relay, self.rebalance)

    # -- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the relay if running, close every connection, then stop the replicator child (after its last
        round, which ships what was committed). Idempotent."""
        relay = getattr(self, "relay", None)
        if relay is not None:
            relay.stop()
        self._store.close()
        if self._replicator is not None:
            self._replicator.stop()

    @property
    def closed(self) -> bool:
        return self._store.closed

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        store = getattr(self, "_store", None)
        if store is not None and not store.closed:
            warnings.warn(f"shardlite Router for {store.root} was never closed", ResourceWarning, stacklevel=2)
            store.close()
        child = getattr(self, "_replicator", None)
        if child is not None:
            child.stop()

    def __repr__(self) -> str:
        return f"<Router {self.root!r}{' closed' if self.closed else ''}>"
