"""Reads of tenant files: the read half of :class:`~shardlite.front.store.Store` (a mixin), kept apart from
resolution, opening and write transactions.

* ``read`` / ``_query``: one read-only statement on a tenant's ``query_only`` connection. A point read costs
  two ``fetchone()`` calls; a larger result is read in chunks under ``max_rows`` and ``max_result_bytes``
  (:mod:`shardlite.files.limits`), a value over :data:`~shardlite.files.limits.FAST_VALUE` makes the read run again
  measured, and a statement past ``statement_timeout`` is interrupted (:class:`~shardlite.QueryTimeout`).
* Reads check the move fence *after* the query when the file changed: the marker is permanent, so a read
  whose snapshot preceded it is valid, and one that may not have is retried at the new home.
* ``read_internal`` / ``read_on_writer``: shardlite's own reads of its ``_shardlite_*`` tables (trusted,
  not capped).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from itertools import islice
from typing import Any

import apsw

from ..errors import QueryTimeout, ResultTooLarge, StatementNotAllowed
from ..files.authorizer import INTERNAL_SQL
from ..files.engine import Settings
from ..files.limits import FAST_VALUE, FIRST_CHUNK, MEASURED, Ticket, fetch
from ..files.pool import Handle

__all__ = ["TenantReads", "Cancelled"]


class Cancelled(Exception):
    """Internal: the caller of a read handed to a worker thread gave up on it (see limits.Ticket)."""


class TenantReads:
    """Mixin of :class:`~shardlite.front.store.Store`: reads. The store provides handles (``acquire``,
    ``release``, ``retire_handle``), the fence check (``retired``), waiting for moves and the settings."""

    settings: Settings
    move_wait: float
    _fast: dict[Any, Handle]
    _deadline: float
    _free_values: int

    def acquire(self, key: object, role: str, *, create: bool, revive: bool = True,
                move_wait: float | None = None, wait_ms: int | None = None) -> Handle:
        raise NotImplementedError

    def release(self, handle: Handle) -> None:
        raise NotImplementedError

    def retire_handle(self, handle: Handle) -> None:
        raise NotImplementedError

    def retired(self, handle: Handle) -> bool:
        raise NotImplementedError

    def _wait_for_move(self, canon: str, old_generation: int, deadline: float) -> None:
        raise NotImplementedError

    def read(self, key: object, sql: str, params: Sequence[object] | dict[str, object] = (),
             internal: bool = False, ticket: Ticket | None = None,
             move_wait: float | None = None) -> list[tuple[Any, ...]]:
        """Run one read-only statement on ``key``'s tenant and return every row. ``internal``: one of
        shardlite's own reads, its text already prefixed with INTERNAL_SQL (see :meth:`read_internal`).
        ``ticket``, ``move_wait``: see :meth:`_query` and :meth:`acquire` (a read handed to a worker thread
        by the event loop waits for nothing there: the loop waits instead).

        Hot path: a warm, free read connection found by the caller's key object, one statement, one
        ``data_version`` call. Everything else (cold tenants, contention, a moved file) takes
        :meth:`_read_slow`.
        """
        try:
            handle = self._fast.get(key)
        except TypeError:  # unhashable: not a key; canonical() in the slow path says so
            handle = None
        if handle is not None and handle.lock.acquire(False):
            try:
                if not handle.closed:
                    rows = self._query(handle, sql, params, internal, ticket)
                    if rows is not None:
                        return rows
            finally:
                handle.lock.release()
        return self._read_slow(key, sql, params, "r", internal, ticket, move_wait)

    def _query(self, handle: Handle, sql: str, params: Sequence[object] | dict[str, object],
               internal: bool = False, ticket: Ticket | None = None,
               budget: tuple[float, int] | None = None) -> list[Any] | None:
        """The rows, or None when the file turned out retired (the rows may predate a move: discard).

        ``internal``: one of shardlite's own reads (its text starts with INTERNAL_SQL), run trusted and not
        capped. Otherwise the result is capped (``max_rows``, ``max_result_bytes``: :class:`ResultTooLarge`)
        and the statement interrupted past ``statement_timeout`` (:class:`QueryTimeout`). ``ticket``: the
        read was handed to this thread and its caller may give up (:class:`Cancelled` then). ``budget``:
        ``(seconds, progress calls)`` of a read on the event loop: past it (or on a value larger than
        :data:`~shardlite.files.limits.FAST_VALUE`) ``apsw.InterruptError`` / ``apsw.TooBigError`` propagate and the
        caller runs it again elsewhere.

        Hot path (a point read): the statement clock reset, one ``islice`` of the cursor, one length check."""
        handle.calls = 0
        if budget is not None:
            handle.limit, handle.max_calls = budget
        elif handle.max_calls:  # the last read on this connection ran on the event loop, under its budget
            handle.limit, handle.max_calls = self._deadline, 0
        if ticket is not None and not ticket.attach(handle.conn):
            raise Cancelled()
        try:
            if internal:
                rows = self._internal_rows(handle, sql, params)
            else:  # a point read costs two fetchone(): no more than fetchall(), and nothing past the caps
                cur = handle.cur.execute(sql, params)
                row = cur.fetchone()
                if row is None:
                    rows = []
                else:
                    second = cur.fetchone()
                    rows = [row] if second is None and len(row) <= self._free_values else \
                        self._whole(handle, row, second)
        except (apsw.Error, ResultTooLarge) as exc:
            rows = self._read_failed(handle, exc, sql, params, internal, ticket, budget)
        finally:
            if ticket is not None:
                ticket.detach()
        dv = handle.conn.data_version()
        if dv == handle.checked_dv:
            return rows
        if self.retired(handle):
            return None
        handle.checked_dv = dv
        return rows

    @staticmethod
    def _internal_rows(handle: Handle, sql: str, params: Sequence[object] | dict[str, object]) -> list[Any]:
        guard = handle.guard
        guard.trusted = True
        try:
            return handle.cur.execute(sql, params).fetchall()
        finally:
            guard.trusted = False

    def _whole(self, handle: Handle, row: tuple[Any, ...], second: tuple[Any, ...] | None) -> list[Any]:
        """The whole result of a user read that has a second row (``second``), or one row with values
        enough to measure: the rest read in chunks under the caps (see shardlite.files.limits)."""
        first = [row] if second is None else [row, second, *islice(handle.cur, FIRST_CHUNK - 2)]
        n = len(first)
        # values counted by the first row's width: a multi-statement read whose later rows are wider is
        # measured from the next chunk on (see shardlite.files.limits)
        if n < FIRST_CHUNK and n <= self.settings.max_rows and n * len(row) <= self._free_values:
            return first
        return self._fetch_rest(handle, first)

    def _read_failed(self, handle: Handle, exc: BaseException, sql: str, params: Sequence[object] | dict[str, object],
                     internal: bool, ticket: Ticket | None, budget: tuple[float, int] | None) -> list[Any]:
        """A read raised ``exc``: run it again with large values allowed, or say why it failed."""
        if isinstance(exc, apsw.ReadOnlyError):
            raise StatementNotAllowed("queries are read-only: write inside router.transaction(key)") from exc
        self._reset_cursor(handle)
        if isinstance(exc, apsw.TooBigError) and budget is None:
            return self._measured(handle, sql, params, internal)
        if isinstance(exc, apsw.InterruptError) and budget is None:
            if ticket is not None and ticket.cancelled:
                raise Cancelled() from None
            raise QueryTimeout(f"tenant {handle.key!r}: the read ran past statement_timeout="
                               f"{self.settings.statement_timeout} s and was interrupted; make it cheaper "
                               "(an index, a LIMIT) or raise statement_timeout") from None
        raise exc

    def _fetch_rest(self, handle: Handle, first: list[Any]) -> list[Any]:
        """The rest of a user read that did not fit the fast path, under the caps."""
        return fetch(handle.cur, max_rows=self.settings.max_rows, max_bytes=self.settings.max_result_bytes,
                     rows=first, what=f"the read of tenant {handle.key!r}")

    def _measured(self, handle: Handle, sql: str, params: Sequence[object] | dict[str, object],
                  internal: bool) -> list[Any]:
        """A read that met a value over FAST_VALUE, run again with values up to the byte cap allowed and
        every chunk measured (see shardlite.files.limits)."""
        conn = handle.conn
        cap = self.settings.max_result_bytes
        conn.limit(apsw.SQLITE_LIMIT_LENGTH, cap)
        guard = handle.guard
        guard.trusted = internal
        handle.calls = 0
        try:
            return fetch(handle.cur.execute(sql, params), max_rows=self.settings.max_rows, max_bytes=cap,
                         value_cap=MEASURED, what=f"the read of tenant {handle.key!r}")
        except apsw.TooBigError:
            self._reset_cursor(handle)
            raise ResultTooLarge(f"the read of tenant {handle.key!r} builds a value larger than max_result_bytes="
                                 f"{cap} bytes; nothing was returned: read it in pieces (substr) or raise "
                                 "max_result_bytes") from None
        except BaseException:
            self._reset_cursor(handle)
            raise
        finally:
            guard.trusted = False
            conn.limit(apsw.SQLITE_LIMIT_LENGTH, FAST_VALUE)

    @staticmethod
    def _reset_cursor(handle: Handle) -> None:
        """Discard whatever the handle's own cursor had left (rows of a read that failed part-way)."""
        cur = handle.cur
        handle.cur = handle.conn.cursor()
        cur.close(True)

    def _read_slow(self, key: object, sql: str, params: Sequence[object] | dict[str, object],
                   role: str = "r", internal: bool = False, ticket: Ticket | None = None,
                   move_wait: float | None = None, wait_ms: int | None = None) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + (self.move_wait if move_wait is None else move_wait)
        while True:
            handle = self.acquire(key, role, create=False, move_wait=move_wait, wait_ms=wait_ms)
            try:
                rows = self._query(handle, sql, params, internal, ticket)
                if rows is not None:
                    return rows
                generation = handle.generation
                self.retire_handle(handle)
            finally:
                self.release(handle)
            self._wait_for_move(handle.key, generation, deadline)

    def read_internal(self, key: object, sql: str, params: Sequence[object] = (), *, on_writer: bool = False,
                      move_wait: float | None = None, wait_ms: int | None = None) -> list[tuple[Any, ...]]:
        """One of shardlite's own reads (of ``_shardlite_*`` tables, which user SQL may not read) on
        ``key``'s tenant: ``sql`` without the INTERNAL_SQL prefix (added here), run trusted.
        ``on_writer``: on the tenant's write connection, outside any transaction (committed data), for
        reads of tenants shardlite is about to write anyway (the relay), so that they do not hold a
        second pooled connection per tenant. ``move_wait``, ``wait_ms``: see :meth:`acquire`."""
        if on_writer:
            return self._read_slow(key, INTERNAL_SQL + sql, params, "w", True, move_wait=move_wait, wait_ms=wait_ms)
        return self.read(key, INTERNAL_SQL + sql, params, True, move_wait=move_wait)

    def read_on_writer(self, key: str, sql: str, params: Sequence[object] = (), *,
                       move_wait: float | None = None, wait_ms: int | None = None) -> list[tuple[Any, ...]]:
        """:meth:`read_internal` on the tenant's write connection."""
        return self.read_internal(key, sql, params, on_writer=True, move_wait=move_wait, wait_ms=wait_ms)

