"""What one read may cost: caps on the rows and bytes it returns, and a way for its caller to stop it.

Every statement on a tenant connection also has a deadline; the clock for it lives on the connection's
handle (:meth:`shardlite.files.pool.Handle.progress`). This module holds the parts that do not need a handle:

* :func:`fetch` reads a cursor's rows under ``max_rows`` and ``max_result_bytes``. It never holds more
  than one chunk beyond the caps: rows come in chunks (``islice``, no Python code per row), and a
  chunk's bytes are measured (the length of its ``marshal`` encoding: a string's or blob's length plus a
  few bytes, 9 for a number) only when the rows so far could hold more than the byte cap. Read
  connections refuse values over :data:`FAST_VALUE` bytes (SQLite's ``SQLITE_LIMIT_LENGTH``), so a result
  of up to ``max_result_bytes / FAST_VALUE`` values (1,024 by default) needs no measuring at all: a point
  read pays for one ``islice`` and a length check. A read that meets a larger value is run again with
  that limit raised to the byte cap, every chunk measured (:data:`MEASURED`).
* :class:`Ticket` lets an event loop interrupt a read it handed to a worker thread when its caller is
  cancelled (``Connection.interrupt`` is safe to call from any thread).
"""

from __future__ import annotations

import marshal
import threading
from itertools import islice
from typing import Any, Final

import apsw

from ..errors import ResultTooLarge

__all__ = ["fetch", "Ticket", "FAST_VALUE", "MEASURED", "FIRST_CHUNK", "CHUNK"]

#: Largest value (bytes) a read connection returns without the measured path.
FAST_VALUE: Final = 64 * 1024
#: ``value_cap`` for :func:`fetch` on the measured path: every chunk is measured.
MEASURED: Final = 1 << 62
#: Rows read before anything is measured (a point read, a page of a feed) and per later chunk.
FIRST_CHUNK: Final = 64
CHUNK: Final = 1024

Row = tuple[Any, ...]


def _size(rows: list[Row]) -> int:
    return len(marshal.dumps(rows))


def fetch(cursor: apsw.Cursor, *, max_rows: int, max_bytes: int, value_cap: int = FAST_VALUE,
          what: str = "the result", rows: list[Row] | None = None) -> list[Row]:
    """Every row of ``cursor`` (all its statements'), or :class:`ResultTooLarge` as soon as they pass
    ``max_rows`` rows or ``max_bytes`` bytes; ``value_cap`` is the largest value the connection returns
    (nothing is measured while the values read so far could not hold ``max_bytes`` even at that size).
    ``rows``: the first :data:`FIRST_CHUNK` rows (or fewer: the whole result), already read from it.
    On error the cursor may still have rows: the caller discards it."""
    if rows is None:
        rows = list(islice(cursor, FIRST_CHUNK))
    chunk, expected = rows, FIRST_CHUNK
    values = 0
    size = -1  # not measured yet
    while True:
        if len(rows) > max_rows:
            raise _too_many(what, max_rows)
        if chunk:
            values += len(chunk[0]) if len(chunk) == 1 else sum(map(len, chunk))
            if size >= 0:
                size += _size(chunk)
            elif values * value_cap > max_bytes:
                size = _size(rows)
            if size > max_bytes:
                raise _too_big(what, max_bytes)
        if len(chunk) < expected:
            return rows
        chunk, expected = list(islice(cursor, CHUNK)), CHUNK
        rows.extend(chunk)


def _too_many(what: str, limit: int) -> ResultTooLarge:
    return ResultTooLarge(f"{what} has more than max_rows={limit} rows; nothing was returned: page through it "
                          "(LIMIT with a cursor column) or raise max_rows")


def _too_big(what: str, limit: int) -> ResultTooLarge:
    return ResultTooLarge(f"{what} holds more than max_result_bytes={limit} bytes; nothing was returned: page "
                          "through it (LIMIT with a cursor column) or raise max_result_bytes")


class Ticket:
    """One read handed to a worker thread, which its caller may give up on: :meth:`cancel` interrupts the
    statement if it is running and makes it refuse to start otherwise. The worker :meth:`attach`\\ es the
    connection it runs on for the statement's duration and :meth:`detach`\\ es it after, under a lock, so
    an interrupt never reaches another statement of that connection."""

    __slots__ = ("_lock", "_conn", "cancelled")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: apsw.Connection | None = None
        self.cancelled = False

    def attach(self, conn: apsw.Connection) -> bool:
        """Before the statement: False when the caller gave up already (do not run it)."""
        with self._lock:
            if self.cancelled:
                return False
            self._conn = conn
            return True

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            if self._conn is not None:
                self._conn.interrupt()
