"""Read-only queries across many tenants: ``router.map(sql, params, keys=None, parallel=N)``.

Tenants are read *as they are*: no migration on the way (a tenant on an older schema version is reported
in :attr:`MapResult.outdated`, and the statement runs on it anyway). Each tenant is opened on its own
short-lived connection with ``query_only`` and the read-only authorizer, so a statement that writes is
refused (:class:`~shardlite.StatementNotAllowed`, raised at the first tenant) and the pool of the router
is left alone. Results stream: at most ``2 * parallel`` tenants are in flight, so memory does not grow
with the number of tenants.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apsw

from ..core.keys import canonical, prefix_of
from ..errors import ConfigurationError, QueryTimeout, ResultTooLarge, StatementNotAllowed, UnknownTenant
from ..files.authorizer import Guard
from ..files.catalog import TenantRecord
from ..files.limits import MEASURED, fetch
from ..front.store import Store

__all__ = ["MapResult", "run_map"]

Row = tuple[Any, ...]


class MapResult:
    """Iterate for ``(key, rows)``. ``columns`` is set once a tenant answered; ``outdated`` maps keys on an
    older app schema to their version; ``errors`` maps keys that could not be read to the reason."""

    def __init__(self, iterator: Generator[tuple[str, list[Row]], None, None],
                 stop: threading.Event | None = None, closing: threading.Event | None = None) -> None:
        self._iterator = iterator
        self._closing = closing or threading.Event()
        self._stop = stop or threading.Event()
        self.columns: list[str] | None = None
        self.outdated: dict[str, int] = {}
        self.errors: dict[str, str] = {}
        self.count = 0

    def __iter__(self) -> MapResult:
        return self

    def __next__(self) -> tuple[str, list[Row]]:
        item = next(self._iterator)
        self.count += 1
        return item

    def stop(self) -> None:
        """Ask the iteration to end (reads in flight are interrupted) without waiting for it; :meth:`close`
        waits."""
        self._stop.set()

    def close(self) -> None:
        """Stop early: reads in flight are interrupted, queued ones never start, and the reading threads
        are gone when this returns (also what an exception in the consumer's loop, Ctrl-C, leads to). Called
        while another thread is inside ``next()``, it returns at once and that ``next()`` ends the iteration."""
        self.stop()
        self._closing.set()  # a close, not the garbage collector: the reading threads are joined
        try:
            self._iterator.close()
        except ValueError:  # "generator already executing" in another thread: it stops at the flag
            pass

    def __enter__(self) -> MapResult:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_one(store: Store, key: str, path: str, sql: str, params: Sequence[Any] | dict[str, Any],
              current: int | None, stop: threading.Event) -> tuple[list[Row], list[str], int]:
    guard = Guard(read_only=True)
    conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE | apsw.SQLITE_OPEN_NOFOLLOW)
    try:
        # A read-only visit must not checkpoint (a write) when it happens to close the last connection.
        conn.config(apsw.SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1)
        conn.setbusytimeout(store.settings.busy_timeout_ms)
        conn.limit(apsw.SQLITE_LIMIT_ATTACHED, 0)
        conn.execute("PRAGMA query_only = 1")
        stored = conn.execute("SELECT key FROM _shardlite_meta WHERE id = 1").fetchall()
        if not stored or stored[0][0] != key:
            raise UnknownTenant(f"{path} does not hold {key!r}")
        found: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
        version = int(found)
        conn.authorizer = guard
        columns: list[str] = []

        def names(cur: apsw.Cursor, _sql: str, _bindings: Any) -> bool:
            # Called once the statement is prepared, before it runs: the column names are known even
            # when it returns no row (afterwards APSW no longer describes a finished statement).
            if not columns:
                columns.extend(d[0] for d in cur.description)
            return True

        cursor = conn.cursor()
        cursor.exec_trace = names
        settings = store.settings
        conn.limit(apsw.SQLITE_LIMIT_LENGTH, settings.max_result_bytes)
        started = time.monotonic()
        conn.setprogresshandler(lambda: stop.is_set() or time.monotonic() - started > settings.deadline, 1000)
        try:
            rows = fetch(cursor.execute(sql, params), max_rows=settings.max_rows,
                         max_bytes=settings.max_result_bytes, value_cap=MEASURED, what=f"the read of tenant {key!r}")
        except apsw.InterruptError:
            if stop.is_set():
                raise  # the map was stopped: nobody reads this result
            raise QueryTimeout(f"the read of tenant {key!r} ran past statement_timeout={settings.statement_timeout} s "
                               "and was interrupted") from None
        except apsw.TooBigError:
            raise ResultTooLarge(f"the read of tenant {key!r} builds a value larger than max_result_bytes="
                                 f"{settings.max_result_bytes} bytes") from None
        return rows, columns, version if current is not None and version < current else -1
    finally:
        conn.close()


def _current_version(store: Store, prefix: str) -> int | None:
    """The app schema version tenants of ``prefix`` should be on: the router's schema when it declares
    one for the prefix, else the newest version the catalog has seen among them (``shardlite query``
    runs without the app's schema)."""
    if store.spec.declared:
        try:
            return store.spec.version_for(prefix)
        except ConfigurationError:
            pass
    return store.meta.tenants.max_schema_version(prefix)


def run_map(store: Store, sql: str, params: Sequence[Any] | dict[str, Any] = (), *,
            keys: Iterable[object] | None = None, parallel: int = 4) -> MapResult:
    """See the module doc. Keys that are not live tenants are reported in ``errors``."""
    if parallel < 1:
        raise ConfigurationError("parallel must be >= 1")
    result: MapResult

    def records() -> Iterator[tuple[str, TenantRecord | None]]:
        if keys is None:
            for record in store.meta.tenants.iter_tenants():
                yield record.key, record
            return
        for key in keys:
            canon = canonical(key)
            yield canon, store.meta.tenants.lookup(canon)

    versions: dict[str, int | None] = {}

    def locations() -> Iterator[tuple[str, str | None, int | None]]:
        for key, record in records():
            if record is None or record.state not in ("active", "moving"):
                yield key, None, None
                continue
            prefix = prefix_of(key)
            if prefix not in versions:
                versions[prefix] = _current_version(store, prefix)
            yield key, store.path_of(record), versions[prefix]

    def stream(executor: ThreadPoolExecutor, stop: threading.Event) -> Iterator[tuple[str, list[Row]]]:
        window: deque[tuple[str, Future[tuple[list[Row], list[str], int]] | None]] = deque()
        todo = locations()
        exhausted = False
        while (window or not exhausted) and not stop.is_set():
            while not exhausted and len(window) < 2 * parallel:
                try:
                    key, path, current = next(todo)
                except StopIteration:
                    exhausted = True
                    break
                future = None if path is None else executor.submit(_read_one, store, key, path, sql, params,
                                                                   current, stop)
                window.append((key, future))
            if not window:
                break
            key, future = window.popleft()
            if future is None:
                result.errors[key] = "no such tenant"
                continue
            try:
                rows, columns, outdated = future.result()
            except StatementNotAllowed:
                raise  # the statement writes: refused for every tenant (it is one of apsw's errors too)
            except (apsw.Error, UnknownTenant, OSError, QueryTimeout, ResultTooLarge) as exc:
                result.errors[key] = f"{type(exc).__name__}: {exc}"
                continue
            if result.columns is None and columns:
                result.columns = columns
            if outdated >= 0:
                result.outdated[key] = outdated
            yield key, rows

    stop = threading.Event()
    closing = threading.Event()

    def generate() -> Generator[tuple[str, list[Row]], None, None]:
        executor = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="shardlite-map")
        try:
            yield from stream(executor, stop)
        finally:
            # Finished, refused (StatementNotAllowed), closed early or interrupted (Ctrl-C in the consumer):
            # queued reads never start and running ones stop at their next progress check. The threads are
            # joined unless the garbage collector is finalizing an abandoned map (GeneratorExit without
            # close()): a finalizer may run inside another thread's start-up, where a join deadlocks.
            stop.set()
            abandoned = isinstance(sys.exc_info()[1], GeneratorExit) and not closing.is_set()
            executor.shutdown(wait=not abandoned, cancel_futures=True)

    result = MapResult(generate(), stop, closing)
    return result
