""":class:`SqliteMeta`: the embedded :class:`~shardlite.meta.store.MetaStore`."""

from __future__ import annotations

from collections.abc import Sequence

from ...catalog import SqliteCatalog
from ...engine import Settings
from ...globaldb import APP_DB_NAME, GlobalDB
from ..store import MetaStore
from .kv import SqliteKV
from .pending import SqliteDeadLetters, SqlitePending

__all__ = ["SqliteMeta"]


class SqliteMeta:
    """The metadata of the root ``root`` in its SQLite files (see the package doc)."""

    def __init__(self, root: str, settings: Settings) -> None:
        self.root = root
        self.globaldb = GlobalDB(root, settings)
        #: The app's own global tables (``router.globals``), in a file of their own (see globaldb.py).
        self.appdb = GlobalDB(root, settings, name=APP_DB_NAME, user_sql=True)
        self.catalog = SqliteCatalog(self.globaldb)
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
            self.catalog.open(create=create, default_nodes=list(default_nodes))
            self.appdb.open(create=True)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.globaldb.close()
        self.appdb.close()


def _conforms(meta: SqliteMeta) -> MetaStore:
    return meta  # mypy checks here that SqliteMeta satisfies the MetaStore contract
