"""The destination half of a relay pass: applying events in one destination tenant (rules: outbox effects happen
exactly once; failures stay in their tenant and waits are bounded),
with the handlers registered by ``router.handler(topic)`` (:class:`HandlerRegistry`).

A pass groups its sources' due events by destination (see :mod:`shardlite.services.relay`). :meth:`Deliverer.deliver`
applies one destination's groups, each ``(claim, rows)`` with one source's events in seq order, in **one**
write transaction there. Per source it reads the high-water mark of ``(source, incarnation)`` in
``_shardlite_inbox``, skips events at or below it (applied before: a redelivery has no effect), runs each
handler in its own savepoint and advances the mark in the same transaction as the handlers' effects.

The outcome is sorted into the claims (nothing is written to the sources here):

* committed: the applied (and skipped) events count as delivered;
* a handler raises: its savepoint is rolled back, its event counts a failed attempt, and its pair stops
  for this pass (order per pair); the other pairs go on;
* a handler's statement fails in a way after which SQLite rolled the whole transaction back (a full disk,
  an I/O error, ``OR ROLLBACK``, ``RAISE(ROLLBACK)``): the event counts a failed attempt with *that* error,
  and the transaction is run again without its pair, so the other sources' events still go in;
* the destination was dropped, or its key has no schema in this process (it can never be created here):
  its events become dead letters. Nothing else does at once: another :class:`~shardlite.ConfigurationError`
  (no active node to place it on, a closed store) is a condition that passes;
* the destination is unavailable (being moved, locked by another writer past ``wait_ms``, or the metadata
  it needs cannot be reached or changed under it: :class:`~shardlite.MetaUnavailable`,
  :class:`~shardlite.MetaConflict`, any ConfigurationError but the missing schema): nothing is attempted
  nor counted; the caller defers its events (they stay in the outbox, in order) and tries again later;
* any other error fails the destination as a whole (a hostile schema that breaks shardlite's own
  statements, a file that cannot be opened or written): the first event of each pair counts a failed
  attempt, with an error text naming the destination, its file and the cause, so a destination that keeps
  failing ends with its events as dead letters after ``max_attempts``, like a failing handler.

Waits are bounded: the destination's lock is waited for at most ``wait_ms`` and a moving destination not
at all (``move_wait=0``), so one destination never delays the others.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import apsw

from ..core.keys import prefix_of
from ..core.outbox import Event, OutboxRow, Plan, check_topic
from ..errors import Busy, ConfigurationError, MetaConflict, MetaUnavailable, TenantMoving, UnknownTenant
from ..front.feed import INSERT as feed_insert
from ..front.feed import append as feed_append
from ..front.feed import insert_values as feed_values
from ..front.store import Store
from ..front.transaction import Transaction
from .relay_health import describe, error_text

__all__ = ["Claim", "Deliverer", "Handler", "HandlerRegistry", "Group", "Outcome", "DONE", "UNAVAILABLE", "FAILED"]

Handler = Callable[[Transaction, Event], None]

#: What :meth:`Deliverer.deliver` says about a destination.
DONE, UNAVAILABLE, FAILED = "done", "unavailable", "failed"

_UPSERT_MARK = ("INSERT INTO _shardlite_inbox(source, incarnation, last_seq) VALUES (?, ?, ?) "
                "ON CONFLICT(source, incarnation) DO UPDATE SET last_seq = excluded.last_seq")
_READ_MARK = "SELECT last_seq FROM _shardlite_inbox WHERE source = ? AND incarnation = ?"


class HandlerRegistry:
    """``handler(topic)`` and ``use_feed(*topics)``, shared by :class:`~shardlite.Router` and
    :class:`~shardlite.AsyncRouter` (both keep their handlers in ``self._handlers``)."""

    _handlers: dict[str, Handler]

    def handler(self, topic: str) -> Callable[[Handler], Handler]:
        """``@router.handler("message")`` registers ``fn(tx, event)`` for ``topic``: the relay runs it inside
        a write transaction on the event's destination tenant (a plain function, also under AsyncRouter)."""
        check_topic(topic)

        def register(fn: Handler) -> Handler:
            self._handlers[topic] = fn
            return fn
        return register

    def use_feed(self, *topics: str) -> None:
        """Deliver events of ``topics`` to the built-in activity feed of their destination."""
        for topic in topics:
            self.handler(topic)(feed_append)


@dataclass
class Claim:
    """A source claimed for one pass: its batch, the plan for it, and the outcomes as they come in."""

    source: str
    incarnation: str
    work: Plan
    until: float  # when this relay's lease on the source ends (renewed by the acknowledgement when short)
    delivered: list[int] = field(default_factory=list)
    failed: dict[int, tuple[OutboxRow, str]] = field(default_factory=dict)
    dead: dict[int, tuple[OutboxRow, str]] = field(default_factory=dict)
    #: events held back because their destination was unavailable (no attempt counted), and when the
    #: earliest of those destinations is tried again
    deferred: int = 0
    deferred_until: float | None = None
    #: how many events the claim read, and whether that was a whole batch (more may follow)
    read: int = 0
    full: bool = False
    #: the flag version the source's file recorded as parked when the claim read it (None: no marker)
    marker: int | None = None

    def defer(self, count: int, until: float) -> None:
        self.deferred += count
        self.deferred_until = until if self.deferred_until is None else min(self.deferred_until, until)


Group = tuple[Claim, list[OutboxRow]]
#: ``report(role, key, exc, note) -> text``: record an error about one tenant; returns the text that names it
Report = Callable[[str, str, BaseException, str], str]


class Outcome(NamedTuple):
    """What happened in one destination: ``state`` is DONE (committed, or its events became dead letters),
    UNAVAILABLE (Busy or TenantMoving: nothing attempted) or FAILED (the destination failed as a whole);
    ``exc`` and ``text`` (naming the destination and the cause) describe the last two."""

    state: str
    exc: BaseException | None = None
    text: str = ""


_DONE = Outcome(DONE)


class _RolledBack(Exception):
    """Internal: a handler's statement failed and SQLite rolled the destination's transaction back."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(error_text(cause))
        self.cause = cause
        self.claim: Claim | None = None
        self.row: OutboxRow | None = None


class Deliverer:
    """Applies events in destination tenants for a :class:`~shardlite.services.relay.Relay`."""

    def __init__(self, store: Store, handlers: dict[str, Handler], report: Report, wait_ms: int) -> None:
        self.store = store
        self.handlers = handlers
        self.report = report
        #: how long a delivery waits for another writer's lock on the destination
        self.wait_ms = wait_ms

    def deliver(self, dest: str, groups: list[Group]) -> Outcome:
        """Apply ``groups`` in ``dest`` (see the module doc) and sort the outcome into their claims. On
        UNAVAILABLE nothing was attempted: the caller defers the events; on FAILED a failed attempt of
        each pair's first event is recorded (and the error reported)."""
        pending = groups
        while pending:
            results: list[tuple[Claim, list[int], tuple[OutboxRow, str] | None]] = []
            try:
                with self.store.writing(dest, create=True, revive=False, wait_ms=self.wait_ms,
                                        move_wait=0) as handle:
                    for claim, rows in pending:
                        done, failure = self._apply_group(handle, claim, rows)
                        results.append((claim, done, failure))
            except _RolledBack as lost:
                assert lost.claim is not None and lost.row is not None
                text = self.report("destination", dest, lost.cause,
                                   " (SQLite rolled the transaction back; it runs again without this pair)")
                lost.claim.failed[lost.row.seq] = (lost.row, text)
                pending = [group for group in pending if group[0] is not lost.claim]
                continue
            except (Busy, TenantMoving, MetaUnavailable, MetaConflict) as exc:
                return Outcome(UNAVAILABLE, exc, describe("destination", dest, exc))
            except UnknownTenant:
                self._dead(pending, f"destination {dest!r} was dropped")
                return _DONE
            except ConfigurationError as exc:
                never = self._never_created(dest)
                if never is None:  # a passing condition (no active node, a closed store): retried later
                    return Outcome(UNAVAILABLE, exc, describe("destination", dest, exc))
                self._dead(pending, f"destination {dest!r} cannot be created: {never}")
                return _DONE
            except Exception as exc:  # noqa: BLE001 - confined to this destination (module doc)
                text = self.report("destination", dest, exc, "")
                for claim, rows in pending:
                    claim.failed[rows[0].seq] = (rows[0], text)
                return Outcome(FAILED, exc, text)
            for claim, done, failure in results:
                claim.delivered.extend(done)
                if failure is not None:
                    claim.failed[failure[0].seq] = failure
            break
        return _DONE

    def _never_created(self, dest: str) -> ConfigurationError | None:
        """Why ``dest`` can never be created by this process (its key prefix has no schema here), or None."""
        try:
            self.store.spec.steps_for(prefix_of(dest))
        except ConfigurationError as exc:
            return exc
        return None

    @staticmethod
    def _dead(groups: list[Group], error: str) -> None:
        for claim, rows in groups:
            for row in rows:
                claim.dead[row.seq] = (row, error)

    def _apply_group(self, handle: Any, claim: Claim, rows: list[OutboxRow]
                     ) -> tuple[list[int], tuple[OutboxRow, str] | None]:
        """One source's events for the handle's tenant: skip those at or below the inbox mark of their
        emitting incarnation (applied before: the acknowledgement was lost), run the others, and move the
        marks in the same transaction. Returns the seqs that count as delivered if the transaction
        commits, and the first failing event with its error (None if none failed)."""
        done: list[int] = []
        failure: tuple[OutboxRow, str] | None = None
        marks: dict[str, int] = {}  # high-water mark per emitting incarnation, as read
        moved: dict[str, int] = {}  # ... and as advanced by this pass
        source = claim.source
        internal = self.store.internal
        for row in rows:
            emitter = row.incarnation(claim.incarnation)
            if emitter not in marks:
                found: list[Any] = internal(handle, _READ_MARK, (source, emitter)).fetchall()
                marks[emitter] = int(found[0][0]) if found else 0
            if row.seq <= marks[emitter]:
                done.append(row.seq)
                continue
            try:
                error = self._apply(handle, source, emitter, row)
            except _RolledBack as lost:
                lost.claim, lost.row = claim, row
                raise
            if error is not None:
                failure = (row, error)
                break
            marks[emitter] = moved[emitter] = row.seq
            done.append(row.seq)
        for emitter, seq in moved.items():
            internal(handle, _UPSERT_MARK, (source, emitter, seq))
        return done, failure

    def _apply(self, handle: Any, source: str, incarnation: str, row: OutboxRow) -> str | None:
        """Run one handler in a savepoint; the error text when it failed (its effects rolled back).
        Raises :class:`_RolledBack` when SQLite rolled the whole transaction back (the savepoint went with
        it: the real error is reported, never "no such savepoint").

        The built-in feed handler is applied directly: one INSERT of the payload as stored (no decoding
        and re-encoding, no Event object) and no savepoint, as a single statement that fails leaves no
        effect."""
        store = self.store
        conn: apsw.Connection = handle.conn
        handler = self.handlers[row.topic]
        if handler is feed_append:
            try:
                store.internal(handle, feed_insert, feed_values(source, incarnation, row.topic, row.payload,
                                                                row.seq, row.created))
            except Exception as exc:  # noqa: BLE001 - recorded like any failing handler
                if conn.get_autocommit():
                    raise _RolledBack(exc) from exc
                return error_text(exc)
            return None
        store.internal(handle, "SAVEPOINT shardlite_relay")
        tx = Transaction(handle.key, conn, handle.guard, store.emitter, handle)
        try:
            handler(tx, row.event(source, incarnation))
        except Exception as exc:  # noqa: BLE001 - a failing handler is recorded, never fatal to the relay
            if conn.get_autocommit():  # SQLite rolled the transaction back, savepoint and all
                raise _RolledBack(exc) from exc
            store.internal(handle, "ROLLBACK TO shardlite_relay")
            store.internal(handle, "RELEASE shardlite_relay")
            return error_text(exc)
        finally:
            tx._close()
        if conn.get_autocommit():  # the handler caught the error after which SQLite rolled everything back
            raise _RolledBack(RuntimeError("the handler returned after SQLite had rolled its transaction back"))
        store.internal(handle, "RELEASE shardlite_relay")
        return None


def where(store: Store, key: str) -> str | None:
    """The file of ``key``'s tenant as the catalog has it (None if unknown): for error texts."""
    try:
        return store.locate(key).path
    except Exception:  # noqa: BLE001 - only used to describe an error that is already being handled
        return None


def describe_tenant(store: Store, role: str, key: str, exc: BaseException, note: str = "") -> str:
    """:func:`~shardlite.services.relay_health.describe` with the tenant's file, plus ``note``."""
    return describe(role, key, exc, where(store, key)) + note
