"""The transaction object handed to the caller's code (sync); the async twin wraps the same calls.

``tx.execute(sql, params=())`` returns an APSW cursor (iterable of tuples, ``fetchone``, ``fetchall``);
``tx.lastrowid`` and ``tx.changes`` describe the last statement; ``tx.emit(dest, topic, payload)`` adds an
outbox event that commits (or rolls back) with the transaction, ``tx.emit_many(dests, topic, payload)`` one
per destination. A transaction object is only valid inside its ``with`` block: using it afterwards raises,
so no statement can slip out in autocommit mode. Cursors live as long as their block: when it ends, every
cursor the transaction handed out that the caller still holds is closed, so the statements of a
multi-statement ``execute()`` that the caller had not reached never run (stepping the cursor afterwards
raises ``apsw.CursorClosedError``), and no statement holds a snapshot of a pooled connection. Consume
results inside the block.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from sys import getrefcount as _refs
from typing import Any

import apsw

from ..core.keys import canonical
from ..core.outbox import DEFAULT_MAX_PAYLOAD, check_topic, encode_payload
from ..errors import MetaUnavailable, PayloadTooLarge, QueryTimeout, ShardliteError, StatementNotAllowed, StorageError
from ..files.authorizer import INTERNAL_SQL, Guard
from ..files.engine import storage_error
from ..files.schema import EMIT_SQL
from .wakes import Wakes

__all__ = ["Transaction", "AsyncTransaction", "TransactionClosed", "Emitter"]

#: Whether the outbox holds an event, and the version of the relay's parked flag the file records (see
#: :mod:`shardlite.front.wakes`), in one statement.
_OUTBOX_STATE = (INTERNAL_SQL + "SELECT EXISTS (SELECT 1 FROM _shardlite_outbox), parked_version FROM _shardlite_relay "
                 "WHERE id = 1")
#: Bytes counted per event for its row, besides its payload, topic and destination (see Emitter.max_outbox).
EVENT_OVERHEAD = 64
#: The default bound on what one transaction adds to its outbox.
DEFAULT_MAX_OUTBOX = 64 * 1024 * 1024


class _Holder:
    __slots__ = ("spare",)

    spare: object


def _idle_refs() -> int:
    """What ``sys.getrefcount`` reports in ``_TxCore._execute`` for a spare cursor nobody else holds: its
    slot, the local name and the call's argument (the same pattern, measured on this interpreter)."""
    holder = _Holder()
    holder.spare = object()
    cur = holder.spare
    return _refs(cur)


_IDLE_REFS = _idle_refs()


def _idle_attr_refs() -> int:
    """``sys.getrefcount(holder.spare)`` for a spare cursor nobody else holds: its slot and the argument
    (what :func:`sealed` checks without a local name)."""
    holder = _Holder()
    holder.spare = object()
    return _refs(holder.spare)


#: see _idle_attr_refs
IDLE_ATTR_REFS = _idle_attr_refs()
_EMIT = INTERNAL_SQL + EMIT_SQL
_KNOWN_MAX = 65536


class TransactionClosed(ShardliteError):
    """The transaction's block has ended (or has not begun); the object cannot run statements."""


Params = Sequence[Any] | dict[str, Any]


class Emitter:
    """What ``tx.emit`` needs from the router: the payload limit, the pending-work flag, wake-ups.

    The pending-work flag records in the global DB that a tenant has pending events. It must be there
    before the transaction that first makes the tenant's empty outbox non-empty commits (a spurious flag
    costs the relay one look; a missing one would strand events). ``tx.emit`` queues it (:meth:`flag`, in
    a queue of the calling thread) and marks the transaction's handle; the store's commit of a marked
    handle calls :meth:`flush` with its key first, which writes that key and whatever else this thread
    has queued in one global transaction: the transactions an event loop runs in one iteration share one
    global write. ``wake()`` runs after a commit that emitted, to wake in-process relays at once.

    Parked flags (``wakes``, :mod:`shardlite.front.wakes`): when the outbox is empty but the file records the
    version of the relay's parked flag, and that marker is verified, no flag is written before the commit:
    the handle carries the version and ``wake()`` queues a wake-up of the flag after the commit.
    """

    def __init__(self, flag_many: Callable[[list[str]], None], max_payload: int = DEFAULT_MAX_PAYLOAD,
                 check_dest: Callable[[str], object] | None = None,
                 max_outbox: int = DEFAULT_MAX_OUTBOX, wakes: Wakes | None = None) -> None:
        self._flag_many = flag_many
        #: Parked flags: marker checks and wake-ups (None: every first event writes the flag)
        self.wakes = wakes
        self.max_payload = max_payload
        #: what one transaction may add to its tenant's outbox, in bytes (payloads, topics, destinations and
        #: EVENT_OVERHEAD per event)
        self.max_outbox = max_outbox
        #: Raises (ConfigurationError) for a destination this router could never create.
        self.check_dest = check_dest
        #: exact-str destinations and topics already checked, with the destinations' canonical keys: the
        #: checks cost more than the rest of an emit (bounded; emptied when full)
        self.known_dests: dict[str, str] = {}
        self.known_topics: set[str] = set()
        self._listeners: list[Callable[[str], None]] = []
        self._local = threading.local()
        #: Why the last write of flags failed when it was because the metadata store could not be reached;
        #: None again once a write succeeds (issue 15 point 4: the async group commit then refuses a
        #: transaction that needs a flag at once, rather than let it fail its whole batch; see aio.py).
        self.unavailable: MetaUnavailable | None = None
        self._probing = False

    def dest_key(self, dest: object) -> str:
        """The canonical key of an event destination; raises for an invalid one (see ``check_dest``)."""
        key = canonical(dest)
        if self.check_dest is not None:
            self.check_dest(key)
        if type(dest) is str:
            if len(self.known_dests) >= _KNOWN_MAX:
                self.known_dests.clear()
            self.known_dests[dest] = key
        return key

    def topic(self, topic: object) -> str:
        """``topic`` when it is a valid event topic (see :func:`~shardlite.core.outbox.check_topic`)."""
        checked = check_topic(topic)
        if len(self.known_topics) >= _KNOWN_MAX:
            self.known_topics.clear()
        self.known_topics.add(checked)
        return checked

    def _sets(self) -> tuple[set[str], set[str]]:
        """This thread's queued flags, and the keys whose flag it wrote since their last :meth:`flag`."""
        try:
            return self._local.queued, self._local.written
        except AttributeError:
            queued: set[str] = set()
            written: set[str] = set()
            self._local.queued, self._local.written = queued, written
            return queued, written

    def flag(self, key: str) -> None:
        """Queue ``key``'s pending-work flag in this thread (written by this thread's next :meth:`flush`)."""
        queued, written = self._sets()
        queued.add(key)
        written.discard(key)

    def flush(self, key: str | None = None, *, queued_here: bool = True) -> None:
        """Make sure ``key``'s flag is in the global DB, writing it and every flag this thread has queued in
        one global transaction, unless it was queued in this thread (``queued_here``) and a flush since
        wrote it. On failure they stay queued, and the error propagates (the caller must not commit)."""
        queued, written = self._sets()
        if key is not None:
            if queued_here and key in written and key not in queued:
                written.discard(key)  # written by a flush after it was queued: nothing to do
                return
            queued.add(key)
        if not queued:
            return
        keys = sorted(queued)
        queued.clear()
        try:
            self._flag_many(keys)
        except BaseException as exc:
            queued.update(keys)
            if isinstance(exc, MetaUnavailable):
                self.unavailable = exc
            raise
        self.unavailable = None
        written.update(keys)
        if key is not None:
            written.discard(key)
        if len(written) > _KNOWN_MAX:  # keys whose transaction never committed (rolled back): forget them
            written.clear()

    def probe(self, key: str) -> None:
        """Write ``key``'s flag to learn whether the metadata store is back (a spurious flag costs the relay
        one look); one caller at a time, the others return at once. Never raises: the outcome is
        :attr:`unavailable`."""
        if self._probing:
            return
        self._probing = True
        try:
            self.flush(key, queued_here=False)
        except Exception:  # noqa: BLE001 - recorded in self.unavailable (or a bug of the store: the next flush says)
            pass
        finally:
            self._probing = False

    def listen(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(source_key)`` after every commit that emitted (in the committing thread)."""
        self._listeners.append(listener)

    def unlisten(self, listener: Callable[[str], None]) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    def wake(self, source: str, parked: int | None = None) -> None:
        """After a commit that emitted from ``source``: wake in-process relays, and the parked flag (version
        ``parked``) when the commit relied on it instead of writing the flag."""
        if parked is not None and self.wakes is not None:
            self.wakes.queue(source, parked)
        for listener in list(self._listeners):
            listener(source)

    def close(self) -> None:
        """Write the queued wake-ups and stop their flusher (the store closes)."""
        if self.wakes is not None:
            self.wakes.close()

    def parked(self, key: str, generation: int, version: int) -> bool:
        """True when the parked flag ``version`` that ``key``'s file (of ``generation``) records can stand in
        for writing the flag (see :class:`~shardlite.front.wakes.Wakes`). Raises
        :class:`~shardlite.MetaUnavailable` when checking it found the store unreachable (writing the flag
        would fail too: the emit fails at once, nothing written)."""
        wakes = self.wakes
        if wakes is None:
            return False
        try:
            return wakes.verified(key, generation, version, skip_check=self.unavailable is not None)
        except MetaUnavailable as exc:
            self.unavailable = exc
            raise


class _TxCore:
    """State and sync implementation shared by :class:`Transaction` and its async twin."""

    __slots__ = ("key", "_conn", "_open", "_guard", "_emitter", "_outbox", "_handle", "_given")

    def __init__(self, key: str, conn: apsw.Connection, guard: Guard | None = None,
                 emitter: Emitter | None = None, handle: Any = None) -> None:
        self.key = key
        self._conn = conn
        self._open = True
        self._guard = guard
        self._emitter = emitter
        self._outbox = 0
        self._handle = handle  # a pool Handle: its ``emitted`` flag tells the committer to wake relays
        #: cursors handed to the caller other than the handle's spare (closed when the block ends)
        self._given: list[apsw.Cursor] | None = None

    def _check(self) -> apsw.Connection:
        if not self._open or self._conn.get_autocommit():
            self._refuse()
        return self._conn

    def _connection(self) -> apsw.Connection:
        """The connection, also after the block ended; an async scope that was never entered has none."""
        try:
            return self._conn
        except AttributeError:
            raise TransactionClosed(f"the transaction on {self.key!r} has not begun") from None

    def _refuse(self) -> None:
        """Raise why no statement can run: the block ended, or SQLite rolled the whole transaction back
        (INSERT OR ROLLBACK, RAISE(ROLLBACK), a fatal I/O error), after which a further statement would
        run, and commit, on its own. The block fails."""
        if not self._open:
            raise TransactionClosed(f"the transaction on {self.key!r} is not open (its block has ended or not begun)")
        self._open = False
        raise TransactionClosed(f"the transaction on {self.key!r} was rolled back by SQLite; "
                                "nothing more can run in it")

    def _execute(self, sql: str, params: Params = ()) -> apsw.Cursor:
        """Run ``sql`` (with ``params``) inside the transaction; returns the cursor.

        The cursor is the handle's spare one when nothing but the handle holds it any more (the caller
        dropped the cursor of the previous statement) and it carries no caller state (tracers, converters):
        nobody can tell it from a new one, and making a cursor costs a third of a cheap statement. A cursor
        the caller still holds (or closed, or configured) is never reused: it becomes the caller's own and
        a new one the spare."""
        if not self._open:  # _check() written out: this is every statement's path
            self._refuse()
        conn = self._conn
        if conn.get_autocommit():
            self._refuse()
        handle = self._handle
        try:
            if handle is None:
                cur = conn.cursor()
                self._adopt(cur)
                return cur.execute(sql, params)
            handle.calls = 0  # the statement clock (see Handle.progress)
            cur = handle.spare
            try:
                if _refs(cur) != _IDLE_REFS:  # the caller holds it: it becomes theirs until the block ends
                    self._adopt(cur)
                    cur = handle.spare = conn.cursor()
                elif (cur.exec_trace is not None or cur.row_trace is not None or cur.convert_binding is not None
                        or cur.convert_jsonb is not None):
                    cur = handle.spare = conn.cursor()
            except apsw.CursorClosedError:  # the caller closed it
                cur = handle.spare = conn.cursor()
            try:
                return cur.execute(sql, params)
            except apsw.IncompleteExecutionError:
                # A dropped cursor whose multi-statement text was not consumed: its remaining statements
                # never run (dropping it discards them); this statement gets a fresh cursor.
                cur = handle.spare = conn.cursor()
                return cur.execute(sql, params)
        except apsw.SQLError as exc:
            _refuse_vacuum(exc)
            raise
        except apsw.InterruptError:
            raise _timed_out(self.key, handle) from None
        except _STORAGE as exc:
            raise _storage(self.key, handle, exc) from exc

    def _adopt(self, cur: apsw.Cursor) -> None:
        """``cur`` is the caller's until the block ends, when :meth:`_seal` closes it (kept on the handle:
        a nested block's cursors close with its enclosing transaction)."""
        handle = self._handle
        if handle is not None:
            handle.given.append(cur)
        elif self._given is None:
            self._given = [cur]
        else:
            self._given.append(cur)

    def _seal(self, spare: bool = True) -> None:
        """The block ended: close every cursor it handed out that the caller may still hold, so no
        statement of it can run after the block (outside the transaction, without the lock or the fence
        check, or inside another caller's transaction) and none keeps a snapshot of the connection open.
        ``spare``: this is the outermost block on the handle (a nested block's cursors, the spare one
        included, belong to the enclosing transaction too and are closed with it)."""
        handle = self._handle
        if handle is None:
            given = self._given
            if given is not None:
                self._given = None
                for held in given:
                    held.close(True)
            return
        if spare:
            seal_handle(handle)


    def _executemany(self, sql: str, seq_of_params: Sequence[Params]) -> apsw.Cursor:
        cur = self._check().cursor()
        self._adopt(cur)
        if self._handle is not None:
            self._handle.calls = 0
        try:
            return cur.executemany(sql, seq_of_params)
        except apsw.SQLError as exc:
            _refuse_vacuum(exc)
            raise
        except apsw.InterruptError:
            raise _timed_out(self.key, self._handle) from None
        except _STORAGE as exc:
            raise _storage(self.key, self._handle, exc) from exc

    @property
    def lastrowid(self) -> int:
        """Rowid of the last row inserted on this connection."""
        return int(self._connection().last_insert_rowid())

    @property
    def changes(self) -> int:
        """Rows changed by the last INSERT, UPDATE or DELETE."""
        return int(self._connection().changes())

    def _emit(self, dest: object, topic: str, payload: Any) -> None:
        emitter = self._prepare_emit()
        key = emitter.known_dests.get(dest) if type(dest) is str else None
        if key is None:
            key = emitter.dest_key(dest)
        if type(topic) is not str or topic not in emitter.known_topics:
            emitter.topic(topic)
        self._write_events((key,), topic, encode_payload(payload, emitter.max_payload))

    def _emit_many(self, dests: Iterable[object], topic: str, payload: Any) -> None:
        """Every destination is checked and the payload encoded (once) before anything is written: an
        invalid one raises and emits nothing."""
        emitter = self._prepare_emit()
        if isinstance(dests, (str, bytes)):
            raise TypeError("emit_many() takes an iterable of destination keys, not one key")
        known = emitter.known_dests
        dest_keys = []
        for dest in dests:
            key = known.get(dest) if type(dest) is str else None
            dest_keys.append(emitter.dest_key(dest) if key is None else key)
        if type(topic) is not str or topic not in emitter.known_topics:
            emitter.topic(topic)
        data = encode_payload(payload, emitter.max_payload)
        if dest_keys:
            self._write_events(dest_keys, topic, data)

    def _prepare_emit(self) -> Emitter:
        self._check()
        emitter = self._emitter
        if emitter is None or self._guard is None:
            raise ShardliteError("emit() is only available in tenant transactions")
        return emitter

    def _write_events(self, dest_keys: Sequence[str], topic: str, data: str) -> None:
        """Insert one outbox row per destination (checked, canonical), queueing the pending-work flag when
        this transaction is the first to make the outbox non-empty."""
        conn, guard, emitter = self._conn, self._guard, self._emitter
        assert guard is not None and emitter is not None
        size = len(data) if data.isascii() else len(data.encode("utf-8"))
        if len(dest_keys) == 1:
            total = self._outbox + size + len(topic) + len(dest_keys[0]) + EVENT_OVERHEAD
        else:
            total = self._outbox + len(dest_keys) * (size + len(topic) + EVENT_OVERHEAD) + sum(map(len, dest_keys))
        if total > emitter.max_outbox:
            raise PayloadTooLarge(f"this transaction's outbox would hold {total} bytes, past the limit of "
                                  f"{emitter.max_outbox} (Router(max_outbox_bytes=...)); nothing of this emit was "
                                  "written: emit fewer or smaller events per transaction")
        if self._handle is not None:
            self._handle.calls = 0
        guard.trusted = True
        try:
            if not self._outbox:
                handle = self._handle
                state = conn.execute(_OUTBOX_STATE).fetchall()
                if not state or not state[0][0]:  # the first events of an empty outbox
                    parked = state[0][1] if state else None
                    if handle is None:  # no store commit will flush it: write it now
                        emitter.flush(self.key)
                    elif parked is not None and emitter.parked(self.key, handle.generation, int(parked)):
                        handle.wake_version = int(parked)  # a flag exists: the store's commit wakes it afterwards
                    else:
                        emitter.flag(self.key)
                        handle.needs_flag = threading.get_ident()  # the store's commit writes it first
            now = time.time()
            if len(dest_keys) == 1:
                conn.execute(_EMIT, (dest_keys[0], topic, data, now))
            else:
                conn.executemany(_EMIT, [(dest_key, topic, data, now) for dest_key in dest_keys])
        finally:
            guard.trusted = False
        self._outbox = total
        if self._handle is not None:
            self._handle.emitted = True

    def _internal(self, sql: str, params: Params = ()) -> apsw.Cursor:
        """One of shardlite's own statements (writes to ``_shardlite_*`` tables), e.g. the feed handler."""
        guard = self._guard
        if guard is None:
            raise ShardliteError("not available in this transaction")
        conn = self._check()
        if self._handle is not None:
            self._handle.calls = 0
        guard.trusted = True
        try:
            return conn.execute(INTERNAL_SQL + sql, params)
        finally:
            guard.trusted = False

    def _close(self) -> None:
        self._open = False
        self._seal()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.key!r}{'' if self._open else ' ended'}>"


#: APSW errors that mean the storage failed, not the caller's SQL (see engine.storage_error).
_STORAGE = (apsw.FullError, apsw.ReadOnlyError, apsw.IOError, apsw.CorruptError)


def _storage(key: str, handle: Any, exc: BaseException) -> StorageError:
    found = storage_error(exc, key, getattr(handle, "path", None))
    assert found is not None  # every class of _STORAGE is a storage failure
    return found


def _timed_out(key: str, handle: Any) -> QueryTimeout:
    """A statement of a transaction ran past its deadline (see Handle.progress); SQLite rolled a write's
    whole transaction back."""
    limit = getattr(handle, "limit", None)
    shown = f"{limit:g} s" if isinstance(limit, float) else "its deadline"
    return QueryTimeout(f"tenant {key!r}: a statement ran past {shown} and was interrupted; nothing of this "
                        "transaction is committed: make the statement cheaper (an index, a LIMIT) or raise the "
                        "router's statement_timeout")


def seal_handle(handle: Any) -> None:
    """Close the cursors the outermost block on ``handle`` handed out that the caller still holds: the
    adopted ones, and the spare one when it is held (see :meth:`_TxCore._seal`)."""
    given = handle.given
    if given:
        for held in given:
            held.close(True)
        given.clear()
    cur = handle.spare
    if _refs(cur) != _IDLE_REFS:
        handle.spare = handle.conn.cursor()
        cur.close(True)


def _refuse_vacuum(exc: apsw.SQLError) -> None:
    """``VACUUM`` never reaches the authorizer: outside a transaction its internal ATTACH is refused, inside
    one SQLite refuses it itself with a bare SQLError, raised here as the refusal it is."""
    if "cannot VACUUM" in str(exc):
        raise StatementNotAllowed("VACUUM (and VACUUM INTO) is not allowed on tenant connections: copies go "
                                  "through router.backup() or router.export()") from exc


class Transaction(_TxCore):
    """A write transaction (or a savepoint nested in one) on one tenant, or on the global DB."""

    __slots__ = ()

    execute = _TxCore._execute  # the method itself, not a call through a wrapper: one call less per statement

    def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> apsw.Cursor:
        return self._executemany(sql, seq_of_params)

    def emit(self, dest: object, topic: str, payload: Any) -> None:
        """Add an event for ``dest`` to this tenant's outbox, atomically with the transaction.

        A relay later runs the ``topic`` handler inside a write transaction on ``dest`` (exactly once in
        effect, in order per source and destination). ``payload`` must be JSON-serialisable and at most
        ``max_payload`` bytes once encoded (:class:`~shardlite.PayloadTooLarge`). Nothing is emitted if the
        transaction rolls back.
        """
        self._emit(dest, topic, payload)

    def emit_many(self, dests: Iterable[object], topic: str, payload: Any) -> None:
        """:meth:`emit` the same ``payload`` to each of ``dests`` (in that order; one event each, the payload
        encoded once): the fan-out to a room's members or a user's followers."""
        self._emit_many(dests, topic, payload)


class AsyncTransaction(_TxCore):
    """The async twin of :class:`Transaction`: ``await tx.execute(sql, params)``, ``await tx.emit(...)``.

    Statements run on the event loop: the transactions of a group-commit batch share one connection."""

    __slots__ = ()

    async def execute(self, sql: str, params: Params = ()) -> apsw.Cursor:
        # The body of _TxCore._execute, written out on purpose: calling it from here costs a Python frame
        # per statement, 4% of a group-committed write (measured). Change both together; the cursor and
        # transaction-state tests run through both.
        if not self._open:
            self._refuse()
        conn = self._conn
        if conn.get_autocommit():
            self._refuse()
        handle = self._handle
        try:
            if handle is None:
                cur = conn.cursor()
                self._adopt(cur)
                return cur.execute(sql, params)
            handle.calls = 0
            cur = handle.spare
            try:
                if _refs(cur) != _IDLE_REFS:
                    self._adopt(cur)
                    cur = handle.spare = conn.cursor()
                elif (cur.exec_trace is not None or cur.row_trace is not None or cur.convert_binding is not None
                        or cur.convert_jsonb is not None):
                    cur = handle.spare = conn.cursor()
            except apsw.CursorClosedError:
                cur = handle.spare = conn.cursor()
            try:
                return cur.execute(sql, params)
            except apsw.IncompleteExecutionError:
                cur = handle.spare = conn.cursor()
                return cur.execute(sql, params)
        except apsw.SQLError as exc:
            _refuse_vacuum(exc)
            raise
        except apsw.InterruptError:
            raise _timed_out(self.key, handle) from None
        except _STORAGE as exc:
            raise _storage(self.key, handle, exc) from exc

    async def executemany(self, sql: str, seq_of_params: Sequence[Params]) -> apsw.Cursor:
        return self._executemany(sql, seq_of_params)

    async def emit(self, dest: object, topic: str, payload: Any) -> None:
        """Add an outbox event, committed with this transaction (see :meth:`Transaction.emit`)."""
        self._emit(dest, topic, payload)

    async def emit_many(self, dests: Iterable[object], topic: str, payload: Any) -> None:
        """The same event for each of ``dests`` (see :meth:`Transaction.emit_many`)."""
        self._emit_many(dests, topic, payload)
