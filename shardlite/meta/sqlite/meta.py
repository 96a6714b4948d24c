""":class:`SqliteMeta`: the embedded :class:`~shardlite.meta.store.MetaStore`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

from ...files.catalog import SqliteCatalog
from ...files.engine import Settings
from ...files.globaldb import APP_DB_NAME, GlobalDB
from ..store import MetaStore
from .accounts import SqliteAccounts, SqliteCredentials
from .app_globals import SqliteAppGlobals
from .journal import SqliteJournal
from .kv import SqliteKV
from .nodes import SqliteNodes
from .pending import SqliteDeadLetters, SqlitePending
from .sessions import SqliteSessions
from .tenants import SqliteTenants

__all__ = ["SqliteMeta"]


class SqliteMeta:
    """The metadata of the root ``root`` in its SQLite files (see the package doc)."""

    def __init__(self, root: str, settings: Settings) -> None:
        self.root = root
        self.globaldb = GlobalDB(root, settings)
        #: The app's own global tables (``router.globals``), in a file of their own (see globaldb.py).
        self.appdb = GlobalDB(root, settings, name=APP_DB_NAME, user_sql=True)
        self.catalog = SqliteCatalog(self.globaldb)
        self.tenants = SqliteTenants(self.globaldb)
        self.nodes = SqliteNodes(self.globaldb)
        self.journal = SqliteJournal(self.globaldb, self.tenants)
        self.accounts = SqliteAccounts(self.globaldb)
        self.credentials = SqliteCredentials(self.globaldb)
        self.sessions = SqliteSessions(self.globaldb)
        self.app_globals = SqliteAppGlobals(self.appdb)
        self.pending = SqlitePending(self.globaldb)
        self.dead_letters = SqliteDeadLetters(self.globaldb)
        self.kv = SqliteKV(self.globaldb)

    @property
    def location(self) -> str:
        return f"sqlite:{self.globaldb.path}"

    @property
    def exists(self) -> bool:
        return self.globaldb.exists

    @property
    def closed(self) -> bool:
        return self.globaldb.closed

    def open(self, *, create: bool, default_nodes: Sequence[tuple[str, str, int]] = ()) -> None:
        try:
            self.catalog.open(create=create)
            self.nodes.seed(default_nodes)
            self.appdb.open(create=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.globaldb.close()
        self.appdb.close()

    @property
    def local(self) -> bool:
        return True

    def watch_tenants(self, callback: Callable[[str | None], None]) -> None:
        """Never called: processes on one root share global.db, and a stale route is stopped by the in-file
        fence (the cache is a hint, as always)."""

    def node_list_token(self) -> object | None:
        """None: the node list is a local read, taken afresh each time (no process is told of changes)."""
        return None

    def export_global(self, directory: str) -> AbstractContextManager[str]:
        return nullcontext(self.globaldb.path)  # the file itself: a backup copies it with SQLite's own API

    @property
    def app_global_path(self) -> str:
        return self.appdb.path


def _conforms(meta: SqliteMeta) -> MetaStore:
    return meta  # mypy checks here that SqliteMeta satisfies the MetaStore contract
