"""Connections to the PostgreSQL metadata: one pool per store, and one translation of failures.

psycopg 3's own pool (``psycopg_pool.ConnectionPool``) keeps the connections; what is ours is what a failure
means to a caller. A server that cannot be reached, a connection cut mid-call, a pool with no connection to
give within its timeout: all raise :class:`~shardlite.MetaUnavailable` naming the cause (retryable; the pool
reconnects by itself when the server is back). Errors that are the caller's (a constraint, a bad value) pass
through for the contract method to translate.
"""

from __future__ import annotations

import select
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import Connection
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from ...errors import ConfigurationError, MetaUnavailable

__all__ = ["Pool", "unavailable"]

#: SQLSTATE classes that mean "the server or the connection, not the request": connection exceptions (08),
#: operator intervention such as a shutdown (57), insufficient resources (53), system errors (58).
_UNAVAILABLE_CLASSES = ("08", "57", "53", "58")


def unavailable(where: str, exc: BaseException) -> MetaUnavailable:
    """The :class:`~shardlite.MetaUnavailable` for ``exc`` (a message without the password: ``where`` is
    the printable location, and libpq's messages never hold a password)."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return MetaUnavailable(
        f"the metadata store at {where} cannot be reached ({reason}); retry: shardlite reconnects by itself "
        "when the server is back")


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means the server or the connection. An error the server sent is judged by its
    SQLSTATE class alone: psycopg makes a deadlock (40P01), a serialization failure (40001) or a lock not
    available (55P03) ``OperationalError`` subclasses too, and those are the request's (the contract
    method retries or translates them), not an outage."""
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and sqlstate:
        return sqlstate[:2] in _UNAVAILABLE_CLASSES
    return isinstance(exc, (psycopg.OperationalError, PoolTimeout))


class Pool:
    """The store's connections: autocommit connections (each contract method opens its own transaction with
    ``conn.transaction()``), ``statement_timeout`` and ``connect_timeout`` set on each.

    Back by itself, promptly (issue 15 point 4, "everything resumes by itself when the server is back"):

    * psycopg_pool's reconnect pauses double without a cap (1, 2, 4, ... s), so after an outage of a minute
      the pool would not try again for about another minute. Each reconnect attempt here gives up after
      ``timeout`` seconds instead; the next caller that finds no connection starts a fresh one at once.
    * A connection the server closed while it sat idle in the pool (the server was killed and restarted
      between two calls) is seen before anything is sent on it (its socket is readable while idle) and
      replaced; nothing was sent, so taking another is safe, and the first call after a restart succeeds.
    """

    def __init__(self, dsn: str, where: str, *, size: int, timeout: float,
                 statement_timeout: float | None) -> None:
        options = f"-c statement_timeout={int(statement_timeout * 1000)}" if statement_timeout else ""
        self.where = where
        self._timeout = timeout
        self._pool: ConnectionPool[Connection[Any]] = ConnectionPool(
            dsn, min_size=1, max_size=max(1, size), open=False, timeout=timeout, name="shardlite-meta",
            reconnect_timeout=max(1.0, timeout),
            kwargs={"autocommit": True, "connect_timeout": max(1, round(timeout)), "options": options,
                    "application_name": "shardlite"})

    def open(self) -> None:
        try:
            self._pool.open(wait=True, timeout=self._timeout)
        except PoolTimeout as exc:
            self._pool.close()
            raise unavailable(self.where, exc) from None

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def connection(self) -> Iterator[Connection[Any]]:
        """A connection for the block; failures that mean the server is unreachable become
        :class:`~shardlite.MetaUnavailable`, and the pool then drops its dead idle connections."""
        try:
            with self._pool.connection() as conn:
                if _closed_while_idle(conn):
                    conn.close()  # the pool replaces a closed connection when it comes back
                    self._forget_dead()
                    raise _Stale()
                yield conn
        except _Stale:
            with self.connection() as conn:  # once more: the pool's other idle connections were checked
                yield conn
        except PoolClosed:
            raise ConfigurationError("the router is closed") from None
        except Exception as exc:
            if not is_unavailable(exc):
                raise
            self._forget_dead()
            raise unavailable(self.where, exc) from None

    def _forget_dead(self) -> None:
        """Have the pool test its idle connections now, dropping the dead ones and starting replacements."""
        try:
            self._pool.check()
        except Exception:  # noqa: BLE001 - best effort: a closed pool, or the check failing as the server is down
            pass


class _Stale(Exception):
    """An idle pooled connection turned out closed by the server (nothing was sent on it)."""


def _closed_while_idle(conn: Connection[Any]) -> bool:
    """True when the idle connection ``conn`` has something to read: an idle connection is sent nothing
    but the server's goodbye (an EOF when it was killed, an error when it was shut down or the backend
    terminated). One poll of the socket, no round trip. A false alarm (an asynchronous notice) costs only a
    reconnect."""
    if conn.closed:
        return True
    try:
        fd = conn.fileno()
    except psycopg.Error:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))
