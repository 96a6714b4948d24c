"""The contract of the app's own global tables: :class:`AppGlobals` (``router.globals`` runs on it).

Unlike every other metadata contract, this one takes the app's SQL text: the app declares its global
tables (``Router(..., global_schema=[...])``) and reads and writes them with its own statements. That SQL
is **SQLite dialect**, run under the same authorizer as tenant SQL (no transaction control, no ATTACH, no
pragmas that change anything, no ``_shardlite_*`` names, no object referencing shardlite's tables:
app SQL never touches shardlite's tables), on ``<root>/app_global.db``, a file that holds nothing of
shardlite's.

**Backends.** Whatever backend holds shardlite's own metadata, the app's global tables stay in the root's
``app_global.db`` (the SQLite implementation, :class:`shardlite.meta.sqlite.app_globals.SqliteAppGlobals`)
until a decision on their dialect is made (a PostgreSQL home would change the app's SQL, ``lastrowid`` and
the authorizer's rules; issue 15, design question 1). That decision is open; a PostgreSQL metadata backend
hands out the SQLite implementation for ``app_globals`` meanwhile.

Rules:

* :meth:`~AppGlobals.transaction` is one atomic unit (all of the block or nothing); a nested one is a
  savepoint of the enclosing one. Writers are serialised (one at a time per root; keep the write rate low).
* :meth:`~AppGlobals.query` sees committed data only and never writes.
* The version is the number of the app's ``global_schema`` steps applied; it only grows through
  :meth:`~AppGlobals.migrate`, and a restore may set it (:meth:`~AppGlobals.clear`, :meth:`~AppGlobals.
  import_sqlite`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import apsw

from ..files.schema import Step
from ..front.transaction import Params, Transaction

__all__ = ["AppGlobals"]


class AppGlobals(Protocol):
    """The app's global tables (``meta.app_globals``). See the module doc."""

    def transaction(self) -> AbstractContextManager[Transaction]:
        """``with app_globals.transaction() as tx``: a write transaction (BEGIN IMMEDIATE; a savepoint
        when nested on this thread) running the app's SQL under the authorizer; commits when the block
        ends normally, rolls back when it raises. Cursors returned inside are closed when it ends. A
        statement the authorizer refuses raises :class:`~shardlite.StatementNotAllowed`; DDL that makes an
        object reference shardlite's tables is refused at commit (nothing committed)."""
        ...

    def query(self, sql: str, params: Params = ()) -> list[tuple[Any, ...]]:
        """One read-only statement of the app's (committed data only); a write is refused."""
        ...

    def migrate(self, steps: Sequence[Step]) -> None:
        """Apply the steps past :meth:`version` (SQL text or callables taking a cursor: the app's own
        trusted code) and set the version to ``len(steps)``, in one atomic unit (concurrent migrators of
        one root apply each step once). Fewer steps than the version: nothing happens."""
        ...

    def version(self) -> int:
        """The number of the app's global schema steps applied."""
        ...

    # -- restore (cold) -----------------------------------------------------------------------------------

    def table_with_rows(self) -> str | None:
        """The name of an app table holding a row, or None when every app table is empty."""
        ...

    def clear(self, version: int) -> None:
        """Delete every row of every app table (the tables stay) and set the version to ``version``, in
        one atomic unit."""
        ...

    def import_sqlite(self, source: apsw.Connection, label: str) -> dict[str, int]:
        """Copy the app's global schema and rows from ``source``, an untrusted SQLite copy (a backup's; the
        caller has refused copies touching shardlite's tables), in one atomic unit: its tables (created
        from its definitions when missing, each checked to be one ``CREATE`` of exactly that object on a
        scratch database first), their rows (insert or replace, by column name), then its indexes, views and
        triggers, then its version. Returns the rows copied per table; :class:`~shardlite.ShardliteError`
        naming ``label`` when a definition is refused (nothing written)."""
        ...
