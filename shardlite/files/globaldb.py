"""The root's shared SQLite DBs: one writer connection, per-thread readers, versions.

Two files use this class:

* ``<root>/global.db`` (``GlobalDB(root, settings)``): shardlite's own metadata (the catalog, accounts,
  credentials, sessions, the relay's pending-work flags, the move journal). Only shardlite's own statements
  ever run on its connections: app SQL never reaches them (app SQL and outside files are untrusted).
* ``<root>/app_global.db`` (``GlobalDB(root, settings, name=APP_DB_NAME, user_sql=True)``): the app's own
  global tables (``router.globals``). User SQL runs there under the same authorizer as tenant SQL; it holds
  no shardlite table, so no timing of a lazily stepped cursor, foreign key or trigger can reach a
  credential, a session digest or a catalog row.

Their write rate must stay low (they must never become the global write lock per-tenant files exist to
avoid), so everything hot is a read: reads go to a ``query_only`` connection per thread (no lock, WAL
readers never block), and writes share one connection behind a re-entrant lock. A write inside a write on
the same thread becomes a savepoint.

shardlite's tables in ``global.db`` are named ``_shardlite_*`` and versioned by ``PRAGMA user_version``;
the app's global schema carries its version in ``app_global.db``'s ``PRAGMA user_version``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from typing import Any

import apsw

from ..errors import Busy, ConfigurationError, ShardliteError, StatementNotAllowed
from .authorizer import INTERNAL_SQL, Guard
from .engine import Settings, create_private_file, ensure_private_dir, on_fork_in_child, open_connection
from .schema import Step, run_step

__all__ = ["GlobalDB", "GLOBAL_DB_NAME", "APP_DB_NAME"]

GLOBAL_DB_NAME = "global.db"
APP_DB_NAME = "app_global.db"

_BEGIN = INTERNAL_SQL + "BEGIN IMMEDIATE"
_COMMIT = INTERNAL_SQL + "COMMIT"
_ROLLBACK = INTERNAL_SQL + "ROLLBACK"


class _Write:
    """``with db.write(trusted=...) as conn``: BEGIN IMMEDIATE, or a savepoint when nested."""

    __slots__ = ("db", "trusted", "savepoint", "was_trusted")

    def __init__(self, db: GlobalDB, trusted: bool) -> None:
        self.db, self.trusted = db, trusted
        self.savepoint: str | None = None
        self.was_trusted = True

    def __enter__(self) -> apsw.Connection:
        db = self.db
        if not db._lock.acquire(timeout=db.settings.busy_timeout_ms / 1000):
            raise Busy("another thread held the global DB's writer past the busy timeout")
        try:
            conn = db.writer
            guard = db.guard
            self.was_trusted = guard.trusted
            guard.trusted = True
            if db._depth:
                self.savepoint = f"shardlite_g{db._depth}"
                conn.execute(f"{INTERNAL_SQL}SAVEPOINT {self.savepoint}")
            else:
                try:
                    conn.execute(_BEGIN)
                except apsw.BusyError as exc:
                    raise Busy(f"the global DB stayed locked past the busy timeout ({exc})") from exc
            db._depth += 1
            guard.trusted = self.trusted
        except BaseException:
            db.guard.trusted = self.was_trusted
            db._lock.release()
            raise
        return conn

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        db = self.db
        conn = db.writer
        db.guard.trusted = True
        try:
            if conn.get_autocommit():
                # SQLite rolled the whole transaction back (INSERT OR ROLLBACK, RAISE(ROLLBACK), a fatal I/O
                # error): nothing of it (nor of an enclosing block) committed.
                if et is None:
                    raise ShardliteError("the global transaction was rolled back by SQLite (an OR ROLLBACK "
                                         "conflict, RAISE(ROLLBACK) or an I/O error); nothing was committed")
            elif self.savepoint is not None:
                if et is not None:
                    conn.execute(f"{INTERNAL_SQL}ROLLBACK TO {self.savepoint}")
                conn.execute(f"{INTERNAL_SQL}RELEASE {self.savepoint}")
            elif et is None:
                try:
                    if db.guard.ddl:
                        db.guard.ddl = False
                        _refuse_foreign_objects(conn)
                    conn.execute(_COMMIT)
                except BaseException as exc:
                    if not conn.get_autocommit():
                        conn.execute(_ROLLBACK)
                    if isinstance(exc, apsw.BusyError):
                        raise Busy(f"the global DB commit was blocked ({exc}); nothing was committed") from exc
                    raise
            else:
                conn.execute(_ROLLBACK)
        finally:
            db._depth -= 1
            db.guard.trusted = self.was_trusted
            db._lock.release()


def _refuse_foreign_objects(conn: apsw.Connection) -> None:
    """User SQL changed the app DB's schema: no object of it may name a shardlite table (those live in
    global.db; a reference would only ever fail, or reach a table of that name created later)."""
    from .sanitize import foreign_references  # sanitize needs the catalog's steps, which import this module

    found = foreign_references(conn, "main", internal=frozenset()) + foreign_references(conn, "temp",
                                                                                         internal=frozenset())
    if found:
        raise StatementNotAllowed(f"the app's global tables may not reference shardlite's own tables "
                                  f"({'; '.join(found)}); nothing of this transaction was committed")


class GlobalDB:
    """Connections to one of the root's shared DBs (see the module doc). Thread-safe.

    ``user_sql``: the DB user SQL may reach (``router.globals``): its writer runs bodies under the
    authorizer (``write(trusted=False)``) and is never left in trusted mode between statements, and its
    readers refuse writes, transaction control and shardlite's reserved names. Otherwise every connection
    runs only shardlite's own statements."""

    def __init__(self, root: str, settings: Settings, *, name: str = GLOBAL_DB_NAME, user_sql: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.path = os.path.join(self.root, name)
        self.settings = settings
        self.user_sql = user_sql
        self.guard = Guard()
        self.guard.trusted = not user_sql
        self._lock = threading.RLock()
        self._writer: apsw.Connection | None = None
        self._depth = 0
        self._local = threading.local()
        self._readers: list[apsw.Connection] = []
        self._readers_lock = threading.Lock()
        self._closed = True
        on_fork_in_child(self._abandon)

    @property
    def exists(self) -> bool:
        return os.path.exists(self.path)

    def open(self, *, create: bool, internal_steps: Sequence[Sequence[Step]] = ()) -> None:
        """Open (creating when ``create``) and bring shardlite's tables to ``len(internal_steps)`` (steps
        are SQL text or callables taking a cursor on the writer, run inside the upgrade's transaction)."""
        if not create and not self.exists:
            raise ConfigurationError(f"no shardlite data root at {self.root} (run `shardlite init` first)")
        ensure_private_dir(self.root)
        create_private_file(self.path)
        self._closed = False
        if not internal_steps:
            return
        with self.write() as conn:
            found: Any = conn.execute("PRAGMA user_version").fetchall()[0][0]
            version = int(found)
            for steps in internal_steps[version:]:
                for sql in steps:
                    run_step(conn, sql)
            if version < len(internal_steps):
                conn.execute(f"PRAGMA user_version = {len(internal_steps)}")

    @property
    def writer(self) -> apsw.Connection:
        if self._writer is None:
            if self._closed:
                raise ConfigurationError("the router is closed")
            self._writer = open_connection(self.path, self.settings, create=False, cache_kib=4096,
                                           authorizer=self.guard)
        return self._writer

    def write(self, *, trusted: bool = True) -> _Write:
        """A write transaction on the writer connection (nested: a savepoint). ``trusted=False`` runs
        the body under the authorizer (user SQL)."""
        return _Write(self, trusted)

    def reader(self) -> apsw.Connection:
        """This thread's ``query_only`` connection (committed data only)."""
        try:
            return self._local.conn  # type: ignore[no-any-return]
        except AttributeError:
            pass
        if self._closed:
            raise ConfigurationError("the router is closed")
        guard = Guard(read_only=True)
        conn = open_connection(self.path, self.settings, create=False, cache_kib=2048, authorizer=guard)
        guard.trusted = True
        conn.execute("PRAGMA query_only = 1")
        guard.trusted = not self.user_sql  # global.db's readers run only shardlite's own reads
        self._local.conn = conn
        with self._readers_lock:
            self._readers.append(conn)
        return conn

    def read(self, sql: str, params: Sequence[object] | dict[str, object] = ()) -> list[tuple[Any, ...]]:
        return self.reader().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._readers_lock:
            readers, self._readers = self._readers, []
        for conn in readers:
            try:
                conn.close()
            except apsw.ThreadingViolationError:
                pass  # in use by another thread right now; closed when that thread lets go of it
        self._local = threading.local()

    @property
    def closed(self) -> bool:
        return self._closed

    def _abandon(self) -> None:
        """After fork in a child: forget inherited connections without closing them (reopened lazily)."""
        self._lock = threading.RLock()
        self._readers_lock = threading.Lock()
        self._writer = None
        self._depth = 0
        self._readers = []
        self._local = threading.local()
