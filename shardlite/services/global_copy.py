"""Copying a backup's checked global DB copies into a root (for :mod:`shardlite.services.restore`).

What comes back: shardlite's accounts, credentials and sessions (through the root's
:class:`~shardlite.meta.accounts.AccountStore`, whatever its backend; into an account space that already
holds rows, such as a PostgreSQL database other roots share, only the accounts it lacks, with their
credentials and sessions: the space's own accounts are newer and stay, and an imported account whose e-mail
key another account holds there refuses the restore), and the app's whole global schema
with its rows (:meth:`~shardlite.meta.app_globals.AppGlobals.import_sqlite`): its tables, then its
indexes, views and triggers, then its version.

The copies are untrusted SQLite files (a backup keeps today's global.db schema): the caller has already
refused copies whose schema touches shardlite's tables; here each of shardlite's tables must have exactly
the columns the root's has (any order, any case), and each row the columns' types
(:func:`~shardlite.meta.accounts.checked_rows`), before anything is written.
"""

from __future__ import annotations

from typing import Any, Final

import apsw

from ..errors import EmailTaken, ShardliteError, UnknownAccount
from ..front.store import Store
from ..meta.accounts import ACCOUNT_COLUMNS, CREDENTIAL_COLUMNS, SESSION_COLUMNS, AccountRows
from ..meta.sqlite.app_globals import NOT_SQLITE, quote_name

__all__ = ["copy_globals", "RESTORED_INTERNAL"]

#: shardlite's own global tables a backup brings back, with their columns (the catalog, nodes, relay and
#: rebalance state describe the old root and are not).
RESTORED_INTERNAL: Final = {"_shardlite_accounts": ACCOUNT_COLUMNS, "_shardlite_credentials": CREDENTIAL_COLUMNS,
                            "_shardlite_sessions": SESSION_COLUMNS}


def copy_globals(store: Store, src: str, sources: dict[str, tuple[apsw.Connection, str]]) -> dict[str, int]:
    """Copy the checked global copies ``sources`` (``{"global": (conn, label)}``, and ``"app_global"`` when
    the backup has one; older backups kept the app's tables in the ``global`` copy) into the root's
    metadata; the rows copied per table."""
    try:
        source, label = sources["global"]
        try:
            # an account space that already holds rows is shared with other roots (PostgreSQL), or was used
            # since: its accounts are newer than the backup's and stay (AccountStore.import_rows)
            shared = store.meta.accounts.has_rows()
            copied = store.meta.accounts.import_rows(_account_rows(source, label), keep_existing=shared)
        except EmailTaken as exc:
            raise ShardliteError(f"{label} is refused: {exc}") from None
        except (ValueError, UnknownAccount) as exc:
            raise ShardliteError(f"{label} is refused: {exc}") from None
        app_source, app_label = sources.get("app_global", sources["global"])
        copied |= store.meta.app_globals.import_sqlite(app_source, app_label)
        return copied
    except apsw.Error as exc:  # a copy SQLite cannot read, a row the live tables refuse
        raise ShardliteError(f"restoring the global DB from {src} failed ({exc}); fix the cause and retry") from exc


def _account_rows(source: apsw.Connection, label: str) -> AccountRows:
    """The rows of shardlite's tables in ``source`` that a restore brings back, in the contract's column
    order (a table the copy lacks gives none); :class:`ShardliteError` when a table's columns differ."""
    found: dict[str, list[tuple[Any, ...]]] = {}
    names = source.execute(f"SELECT name FROM sqlite_schema WHERE type = 'table' AND {NOT_SQLITE}").fetchall()
    for (name,) in names:
        table = str(name)
        columns = RESTORED_INTERNAL.get(table)
        if columns is None:
            continue
        have = [str(r[1]) for r in source.execute(f"PRAGMA table_info({quote_name(table)})").fetchall()]
        if sorted(map(str.lower, have)) != sorted(columns):
            raise ShardliteError(f"{label} is refused: its {table} has the columns {have}, not {list(columns)}")
        listed = ", ".join(quote_name(c) for c in columns)
        found[table] = [tuple(row) for row in source.execute(f"SELECT {listed} FROM {quote_name(table)}")]
    return AccountRows(*(found.get(table, []) for table in RESTORED_INTERNAL))
