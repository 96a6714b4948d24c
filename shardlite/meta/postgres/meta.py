""":class:`PgMeta`: a :class:`~shardlite.meta.store.MetaStore` in a PostgreSQL database."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import psycopg

from ...errors import ConfigurationError
from ...files.engine import Settings
from ...files.globaldb import APP_DB_NAME, GlobalDB
from ..location import MetaLocation
from ..sqlite.app_globals import SqliteAppGlobals
from ..store import MetaStore
from .accounts import SESSION_HINTS, PgAccounts, PgCredentials
from .connect import Pool
from .export import exported_global
from .journal import PgJournal
from .kv import PgKV
from .listen import Listener
from .nodes import PgNodes
from .pending import PgDeadLetters, PgPending
from .schema import NODE_HINTS, TENANT_HINTS, upgrade
from .session_cache import CachedSessions
from .sessions import PgSessions
from .tenants import PgTenants

__all__ = ["PgMeta"]

#: Connections per store: metadata calls are short, and the hot paths never reach it for warm keys.
POOL_SIZE = 4
#: Seconds to wait for a connection (a server that is down gives MetaUnavailable after this).
CONNECT_TIMEOUT = 5.0


class PgMeta:
    """The metadata of the root ``root`` (id ``root_id`` in the database) at ``location`` (see the package
    doc). Every method may be called from any thread; each takes a pooled connection for its call."""

    def __init__(self, root: str, location: MetaLocation, root_id: str, settings: Settings, *,
                 pool_size: int = POOL_SIZE, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        if location.embedded:
            raise ConfigurationError("PgMeta needs a postgresql:// location")
        self.root = root
        self.root_id = root_id
        self._location = location
        self.pool = Pool(location.dsn, location.printable, size=pool_size, timeout=connect_timeout,
                         statement_timeout=settings.statement_timeout)
        #: The app's own global tables stay in the root's ``app_global.db`` with this backend too: they are
        #: the app's SQLite-dialect SQL under shardlite's authorizer (see :mod:`shardlite.meta.app_globals`).
        self.appdb = GlobalDB(root, settings, name=APP_DB_NAME, user_sql=True)
        self.app_globals = SqliteAppGlobals(self.appdb)
        #: The tenant catalog: one key space per database; its enumerations cover this root's nodes.
        self.tenants = PgTenants(self.pool, root_id)
        #: This root's nodes (node names are unique across the database).
        self.nodes = PgNodes(self.pool, root, root_id, location.printable)
        #: Rebalance plans and claim-checked move steps (:mod:`shardlite.meta.postgres.journal`).
        self.journal = PgJournal(self.pool, root_id)
        #: Sessions with a cache of live ones kept right by NOTIFY (issue 15 point 3: see .session_cache).
        self.sessions = CachedSessions(PgSessions(self.pool))
        self.accounts = PgAccounts(self.pool, hint=self.sessions.hint)
        self.credentials = PgCredentials(self.pool)
        #: The relay's pending-work flags, its dead letters and the root's named values.
        self.pending = PgPending(self.pool)
        self.dead_letters = PgDeadLetters(self.pool)
        self.kv = PgKV(self.pool, root_id)
        self._route_watchers: list[Callable[[str | None], None]] = []
        #: The one listening connection of this store: route, node-list and session hints (started by open).
        self._hints: Listener | None = None
        #: Bumped by every node-list hint for this root and every (re)connect of the hints.
        self._node_epoch = 0
        self._opened = False

    @property
    def location(self) -> str:
        return self._location.printable

    @property
    def exists(self) -> bool:
        if self.pool.closed and not self._opened:
            with psycopg.connect(self._location.dsn, autocommit=True, connect_timeout=5) as conn:
                return self._root_known(conn)
        with self.pool.connection() as conn:
            return self._root_known(conn)

    def _root_known(self, conn: psycopg.Connection[tuple[object, ...]]) -> bool:
        row = conn.execute("SELECT to_regclass('shardlite.roots') IS NOT NULL").fetchone()
        if not row or not row[0]:
            return False
        return conn.execute("SELECT 1 FROM shardlite.roots WHERE id = %s", (self.root_id,)).fetchone() is not None

    @property
    def closed(self) -> bool:
        return not self._opened or self.pool.closed

    def open(self, *, create: bool, default_nodes: Sequence[tuple[str, str, int]] = ()) -> None:
        self.pool.open()
        try:
            with self.pool.connection() as conn:
                upgrade(conn)
                with conn.transaction():
                    if not self._root_known(conn):
                        if not create:
                            raise ConfigurationError(
                                f"{self.root} is not a shardlite root in the metadata at {self.location}: "
                                "create it first (shardlite init --root ROOT --meta URL)")
                        conn.execute("INSERT INTO shardlite.roots(id, label, created) VALUES (%s, %s, %s) "
                                     "ON CONFLICT (id) DO NOTHING", (self.root_id, self.root[:1000], time.time()))
                    self.nodes.seed(conn, default_nodes)
            self.appdb.open(create=True)
            self._hints = Listener(self._location.dsn, self.location, (TENANT_HINTS, NODE_HINTS, SESSION_HINTS),
                                   self._on_notify, self._on_reset)
            self.sessions.attach(self._hints)
            self._hints.start()
        except BaseException:
            self.close()
            raise
        self._opened = True

    @property
    def local(self) -> bool:
        return False

    def watch_tenants(self, callback: Callable[[str | None], None]) -> None:
        """``callback(key)`` whenever a tenant's row changes in the database, by any process;
        ``callback(None)`` after every (re)connect of the hints (NOTIFY is not durable: anything may have
        changed meanwhile). Runs on the hints' thread. Until the first connect nothing is hinted: a route
        cache is a hint too (the in-file fence stops a stale owner), so it is never wrong for long."""
        self._route_watchers.append(callback)

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == SESSION_HINTS:
            self.sessions.hint(payload)
        elif channel == NODE_HINTS:
            if payload == self.root_id:
                self._node_epoch += 1
        else:
            self._hint(payload)

    def _on_reset(self) -> None:
        self.sessions.reset()  # NOTIFY is not durable: anything may have changed unheard meanwhile
        self._node_epoch += 1
        self._hint(None)

    def _hint(self, key: str | None) -> None:
        for callback in list(self._route_watchers):
            callback(key)

    def node_list_token(self) -> object | None:
        """``(connects, epoch)`` while the hints are connected, else None. ``connected`` is read before
        ``connects`` (which grows before ``connected`` turns true), so a token read on a new connection
        differs from every token of the one before it even before its reset has run."""
        listener = self._hints
        if listener is None or not listener.connected:
            return None
        return (listener.connects, self._node_epoch)

    def close(self) -> None:
        listener, self._hints = self._hints, None
        if listener is not None:
            listener.close()
        self._opened = False
        self.sessions.close()
        self.pool.close()
        self.appdb.close()

    def export_global(self, directory: str) -> AbstractContextManager[str]:
        return exported_global(self.pool, self.root_id, directory)

    @property
    def app_global_path(self) -> str:
        return self.appdb.path


def _conforms(meta: PgMeta) -> MetaStore:
    return meta  # mypy checks here that PgMeta satisfies the whole MetaStore contract
