"""The transaction object handed to the caller's code (sync); the async twin wraps the same calls.

``tx.execute(sql, params=())`` returns an APSW cursor (iterable of tuples, ``fetchone``, ``fetchall``);
``tx.lastrowid`` and ``tx.changes`` describe the last statement. A transaction object is only valid
inside its ``with`` block: using it afterwards raises, so no statement can slip out in autocommit mode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import apsw

from .errors import ShardliteError

__all__ = ["Transaction", "TransactionClosed"]


class TransactionClosed(ShardliteError):
    """The transaction's block has ended; the object can no longer run statements."""


Params = Sequence[Any] | dict[str, Any]


class Transaction:
    """A write transaction (or a savepoint nested in one) on one tenant, or on the global DB."""

    __slots__ = ("key", "_conn", "_open")

    def __init__(self, key: str, conn: apsw.Connection) -> None:
        self.key = key
        self._conn = conn
        self._open = True

    def execute(self, sql: str, params: Params = ()) -> apsw.Cursor:
        """Run ``sql`` (with ``params``) inside the transaction; returns the cursor."""
        if not self._open:
            raise TransactionClosed(f"the transaction on {self.key!r} has ended")
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> apsw.Cursor:
        if not self._open:
            raise TransactionClosed(f"the transaction on {self.key!r} has ended")
        return self._conn.executemany(sql, seq_of_params)

    @property
    def lastrowid(self) -> int:
        """Rowid of the last row inserted on this connection."""
        return int(self._conn.last_insert_rowid())

    @property
    def changes(self) -> int:
        """Rows changed by the last INSERT, UPDATE or DELETE."""
        return int(self._conn.changes())

    def _close(self) -> None:
        self._open = False

    def __repr__(self) -> str:
        return f"<Transaction {self.key!r}{'' if self._open else ' ended'}>"
