"""``router.globals``: the app's own global tables (``Router(..., global_schema=[...])``).

For small global indexes an app needs (which conversations a user belongs to, say). Keep them small and
their write rate low: every write here takes the one write lock of ``<root>/app_global.db``, the file that
holds them. That file holds nothing of shardlite's (credentials, sessions and the catalog are in
``global.db``, which app SQL never reaches), and user SQL here runs under the same authorizer as tenant
SQL: no transaction control, no ATTACH, no pragmas that change anything, no ``_shardlite_*`` names. As in
tenant transactions, cursors returned inside ``transaction()`` are closed when its block ends.
"""

from __future__ import annotations

from typing import Any

from .globaldb import GlobalDB
from .transaction import Params, Transaction

__all__ = ["GlobalTables"]


class _GlobalScope:
    __slots__ = ("_db", "_write", "_tx")

    def __init__(self, db: GlobalDB) -> None:
        self._db = db
        self._write = db.write(trusted=False)
        self._tx: Transaction | None = None

    def __enter__(self) -> Transaction:
        conn = self._write.__enter__()
        self._tx = Transaction("<global>", conn)
        return self._tx

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
        assert self._tx is not None
        self._tx._close()
        self._write.__exit__(et, ev, tb)


class GlobalTables:
    """Transactions and queries on the app's global tables."""

    def __init__(self, db: GlobalDB) -> None:
        self._db = db

    def transaction(self) -> _GlobalScope:
        """``with router.globals.transaction() as tx:`` BEGIN IMMEDIATE on ``app_global.db`` (a savepoint
        when nested); commits on success, rolls back on error."""
        return _GlobalScope(self._db)

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One read-only statement on the app's global tables (committed data only)."""
        return self._db.read(sql, params)
