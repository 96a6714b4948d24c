"""``router.globals``: the app's own global tables (``Router(..., global_schema=[...])``).

For small global indexes an app needs (which conversations a user belongs to, say). Keep them small and
their write rate low: every write here takes the one write lock of ``<root>/app_global.db``, the file that
holds them. That file holds nothing of shardlite's (credentials, sessions and the catalog are in
``global.db``, which app SQL never reaches), and user SQL here runs under the same authorizer as tenant
SQL: no transaction control, no ATTACH, no pragmas that change anything, no ``_shardlite_*`` names. As in
tenant transactions, cursors returned inside ``transaction()`` are closed when its block ends.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

from ..meta.app_globals import AppGlobals
from .transaction import Params, Transaction

__all__ = ["GlobalTables"]


class GlobalTables:
    """Transactions and queries on the app's global tables (rows and SQL behind the contract
    :class:`~shardlite.meta.app_globals.AppGlobals`)."""

    def __init__(self, app_globals: AppGlobals) -> None:
        self._app = app_globals

    def transaction(self) -> AbstractContextManager[Transaction]:
        """``with router.globals.transaction() as tx:`` BEGIN IMMEDIATE on ``app_global.db`` (a savepoint
        when nested); commits on success, rolls back on error."""
        return self._app.transaction()

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One read-only statement on the app's global tables (committed data only)."""
        return self._app.query(sql, params)
