"""The relay: delivers outbox events to their handlers on the destination tenants (brief rules 9, 12).

Finding work. A tenant with pending events has a row in the global DB's ``_shardlite_pending`` table. The
row is written only on transitions: by ``tx.emit`` when it finds the outbox empty (*before* that
transaction commits), and by the relay when a pass leaves the outbox empty (deleted) or waiting for a retry
(its due time moves). Relays read the table (a read, never every tenant file) to find due tenants.

Claiming. A relay claims a source tenant inside the tenant's own file (``_shardlite_relay``, a lease of
``lease`` seconds) so several relays never work one source at once and never fight over the global DB. A
relay that dies leaves a lease that expires; another relay then takes over. An acknowledgement renews the
lease when less than half of it is left, and while more than a quarter is left the next pass *reads* the
source (claim row, incarnation and outbox in one snapshot on its write connection) instead of claiming it
in a write transaction: a busy source costs one write per pass, not two. ``stop()`` and the end of
``drain()`` give the leases up.

One pass over a set of sources (every due one, up to ``sources_per_pass``):

1. claim each source ``S`` and read up to ``batch`` of its outbox rows in seq order;
2. :func:`~shardlite.outbox.plan` what is due and has a handler, per destination, in order, and group the
   sources' plans by destination;
3. for each destination ``D``: **one** write transaction on ``D`` for all the sources with events for it
   (created on first delivery unless it was dropped: then the events become dead letters). For each
   source it reads the high-water mark for ``(S, incarnation)`` from ``_shardlite_inbox``, skips events
   at or below it (a redelivery has no effect), runs each handler in its own savepoint, and advances the
   mark in the same transaction as the handlers' effects; the first failing handler stops that
   (source, destination) pair for this pass (order per pair), not the other sources' events;
4. acknowledge in each ``S``: delete delivered events, count failures (backoff, or dead letter after
   ``max_attempts``), renew the lease if it runs short; the pending flag's version is read inside this
   transaction, under ``S``'s write lock, and the flags of the sources left empty are deleted afterwards
   (one global write for the pass), each only if no emitter re-flagged it since (an emitter that finds
   the outbox empty bumps the version). No event is stranded: a crash anywhere leaves either the flag or nothing to
   deliver. A source an application transaction holds locked is acknowledged after the free ones, waiting
   at most ``ACK_WAIT_MS``; one still locked is acknowledged by a later pass (never counted as a failure).

A crash between ``D``'s commit and ``S``'s acknowledgement redelivers those events later; the inbox mark
makes that a no-op. Handlers must keep their effects inside the transaction they are given.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import apsw

from .errors import Busy, ConfigurationError, ShardliteError, TenantMoving, UnknownTenant
from .feed import INSERT as feed_insert
from .feed import append as feed_append
from .feed import insert_values as feed_values
from .outbox import Event, OutboxRow, Plan, RetryPolicy, check_topic, next_due, plan
from .schema import EMIT_SQL, REMEMBER_LAST_SEQ
from .store import Store
from .transaction import Transaction

__all__ = ["Relay", "PassStats", "Handler", "HandlerRegistry", "LEASE_SECONDS"]

log = logging.getLogger("shardlite.relay")

Handler = Callable[[Transaction, Event], None]

#: How long a relay's claim on a source tenant lasts; a relay that died is replaced after at most this.
LEASE_SECONDS = 10.0
#: How long the second try at acknowledging a source that an application transaction had locked waits.
ACK_WAIT_MS = 2

# The batch size is written into the SQL text (see feed.page_query: a bound LIMIT re-prepares every run).
_READ_OUTBOX = ("SELECT seq, dest, topic, payload, created, attempts, next_at, origin FROM _shardlite_outbox "
                "ORDER BY seq LIMIT {batch:d}")
#: A source whose lease this relay still holds is read, not claimed: the claim row, the file's incarnation
#: and a batch of its outbox in one snapshot (one row with NULL event columns when the outbox is empty).
_PEEK = ("SELECT r.claimed_by, r.claimed_until, m.incarnation, o.seq, o.dest, o.topic, o.payload, o.created, "
         "o.attempts, o.next_at, o.origin FROM _shardlite_meta AS m JOIN _shardlite_relay AS r ON r.id = 1 "
         "LEFT JOIN (SELECT * FROM _shardlite_outbox ORDER BY seq LIMIT {batch:d}) AS o WHERE m.id = 1 ORDER BY o.seq")


@dataclass
class PassStats:
    delivered: int = 0
    failed: int = 0
    dead: int = 0
    unhandled: int = 0
    waiting: int = 0
    skipped: int = 0  # sources claimed by another relay
    sources: int = 0
    unhandled_topics: set[str] = field(default_factory=set)
    next_retry: float | None = None  # earliest time an event held by a retry delay becomes due
    claimed_until: float | None = None  # latest lease of another relay that kept a source from us

    @property
    def progressed(self) -> bool:
        return self.delivered + self.failed + self.dead > 0

    def add(self, other: PassStats) -> None:
        for name in ("delivered", "failed", "dead", "unhandled", "waiting", "skipped", "sources"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unhandled_topics |= other.unhandled_topics
        for name, pick in (("next_retry", min), ("claimed_until", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else pick(mine, theirs))


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


class _ClaimedElsewhere(Exception):
    """Internal: another live relay holds the source's lease until ``until``."""

    def __init__(self, until: float) -> None:
        super().__init__(until)
        self.until = until


@dataclass
class _Claim:
    """A source claimed for one pass: its batch, the plan for it, and the outcomes as they come in."""

    source: str
    incarnation: str
    work: Plan
    until: float  # when this relay's lease on the source ends (renewed by the acknowledgement when short)
    delivered: list[int] = field(default_factory=list)
    failed: dict[int, tuple[OutboxRow, str]] = field(default_factory=dict)
    dead: dict[int, tuple[OutboxRow, str]] = field(default_factory=dict)


class Relay:
    """Delivers events for one store. ``start()``/``stop()`` run it on a background thread;
    ``run_once()`` and ``drain()`` run it on the caller's thread."""

    def __init__(self, store: Store, handlers: dict[str, Handler], *, policy: RetryPolicy | None = None,
                 lease: float = LEASE_SECONDS, batch: int = 500, poll_interval: float = 0.05,
                 unhandled_recheck: float = 5.0) -> None:
        self.store = store
        self.handlers = handlers
        self.policy = policy or RetryPolicy()
        self.lease = lease
        self.batch = batch
        self.poll_interval = poll_interval
        self.unhandled_recheck = unhandled_recheck
        #: Seconds before a source found under another relay's lease is looked at again (it may be released
        #: long before the lease ends).
        self.claimed_recheck = 0.5
        #: How many sources one pass claims before it delivers: their events for a destination are applied
        #: in one transaction there. Claims last ``lease`` seconds, so keep a pass well inside it.
        self.sources_per_pass = 256
        self.id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._skip_until: dict[str, float] = {}
        self._hot: set[str] = set()  # sources this process just emitted from: passed at once
        self._held: set[str] = set()  # sources whose lease this relay (probably) holds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        #: Test hook: called with a step name ("claimed", "delivered", "acknowledged") during each pass, so
        #: crash tests can kill the process at an exact point of the protocol.
        self.fault: Callable[[str], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Run the relay on a daemon thread until :meth:`stop` (idempotent)."""
        if self.running:
            return
        self._stop.clear()
        self.store.emitter.listen(self.notify)
        self._thread = threading.Thread(target=self._loop, name="shardlite-relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread after its current pass and give up the leases this relay holds (idempotent)."""
        thread = self._thread
        if thread is not None:
            self._stop.set()
            self._wake.set()
            thread.join(timeout)
            self.store.emitter.unlisten(self.notify)
            self._thread = None
        if self._held and not self.store.closed:
            self.release_claims()

    def notify(self, source: str) -> None:
        """``source`` committed new events in this process: pass over it at once, whatever its due time."""
        self._hot.add(source)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                stats = self.run_once()
                busy = stats.delivered + stats.failed + stats.dead > 0
            except Exception as exc:  # noqa: BLE001 - a relay thread must survive anything a pass throws
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("relay pass failed")
                busy = False
            if not busy:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    # -- passes -----------------------------------------------------------------------------------------

    def run_once(self, *, limit: int = 64, every: bool = False) -> PassStats:
        """One pass over every due, unclaimed source (at most ``limit``); ``every`` ignores due times."""
        now = time.time()
        hot, self._hot = self._hot, set()
        flagged = ((key for key, _, _ in self.store.catalog.pending_all()) if every else
                   (key for key, _, _ in self.store.catalog.pending_due(now, limit)))
        keys = list(dict.fromkeys([*hot, *flagged]))
        total = PassStats()
        ready: list[str] = []
        for key in keys:
            until = self._skip_until.get(key, 0.0)
            if until > now:
                total.skipped += 1
                total.claimed_until = until if total.claimed_until is None else max(total.claimed_until, until)
            else:
                ready.append(key)
        for start in range(0, len(ready), self.sources_per_pass):
            total.add(self._pass(ready[start:start + self.sources_per_pass]))
        return total

    def drain(self, *, timeout: float = 60.0) -> PassStats:
        """Run passes over every flagged source until nothing more can be delivered: waiting out retry
        delays and the leases of relays that died, or until ``timeout``. Events with no handler here (and
        those behind them on the same pair) stay pending."""
        deadline = time.monotonic() + timeout
        total = PassStats()
        while time.monotonic() < deadline:
            stats = self.run_once(every=True)
            total.add(stats)
            if stats.progressed:
                continue
            wake_at = [t for t in (stats.next_retry, stats.claimed_until) if t is not None]
            if not wake_at:
                break  # nothing left, or only events no handler here can take
            pause = min(wake_at) - time.time()
            time.sleep(min(max(pause, 0.005), 0.25, max(0.0, deadline - time.monotonic())))
            self._skip_until = {k: v for k, v in self._skip_until.items() if v > time.time()}
        if not self.running:
            self.release_claims()
        return total

    def pass_over(self, source: str) -> PassStats:
        """Deliver what is due from ``source``'s outbox (see the module doc for the protocol)."""
        return self._pass([source])

    def _pass(self, sources: list[str]) -> PassStats:
        """Claim ``sources``, deliver their due events grouped by destination (one write transaction per
        destination, whatever the number of sources writing to it), then acknowledge each source."""
        now = time.time()
        stats = PassStats()
        claimed: list[_Claim] = []
        for source in sources:
            stats.sources += 1
            try:
                claim = self._claim(source, now)
            except UnknownTenant:
                self._held.discard(source)
                self._forget_source(source)
                continue
            except _ClaimedElsewhere as other:
                # look again soon, not only when the lease ends: its holder may give it up at once (stop)
                self._skip_until[source] = min(other.until, now + self.claimed_recheck)
                stats.skipped += 1
                stats.claimed_until = other.until if stats.claimed_until is None else max(
                    stats.claimed_until, other.until)
                continue
            except (Busy, TenantMoving) as exc:
                log.info("relay: source %r not available now (%s)", source, exc)
                continue
            claimed.append(claim)
        if not claimed:
            return stats
        if self.fault is not None:
            self.fault("claimed")
        by_dest: dict[str, list[tuple[_Claim, list[OutboxRow]]]] = {}
        for claim in claimed:
            stats.waiting += claim.work.waiting
            stats.unhandled += len(claim.work.unhandled)
            stats.unhandled_topics |= {row.topic for row in claim.work.unhandled}
            due = claim.work.next_due
            if due is not None:
                stats.next_retry = due if stats.next_retry is None else min(stats.next_retry, due)
            for dest, dest_rows in claim.work.deliver.items():
                by_dest.setdefault(dest, []).append((claim, dest_rows))
        for dest, groups in by_dest.items():
            self._deliver(dest, groups)
        if self.fault is not None:
            self.fault("delivered")
        emptied: list[tuple[str, int]] = []
        # An application transaction may hold a source's lock for a while (a group-commit batch stays open
        # for a loop iteration): acknowledge the free sources first, then those that were busy, waiting a
        # little; one still locked is acknowledged by a later pass (its events redelivered: a no-op then).
        busy: list[_Claim] = []
        for claim in claimed:
            try:
                self._acknowledge(claim, stats, emptied, wait_ms=0)
            except Busy:
                busy.append(claim)
            except TenantMoving as exc:
                log.info("relay: could not acknowledge %r now (%s)", claim.source, exc)
        for claim in busy:
            try:
                self._acknowledge(claim, stats, emptied, wait_ms=ACK_WAIT_MS)
            except (Busy, TenantMoving) as exc:
                log.debug("relay: %r stays unacknowledged until a later pass (%s)", claim.source, exc)
        if emptied:
            self.store.catalog.clear_pending_many(emptied)
        return stats

    def _claim(self, source: str, now: float) -> _Claim:
        """Take the source's lease (in its own file) and read a batch of its outbox. It is read first: while
        this relay's lease has more than a quarter of its time left (acknowledgements renew it) the read
        is the claim (no other relay can take the source meanwhile, and emitters only add rows), and a
        live lease of another relay is seen without taking the source's write lock."""
        found = self.store.read_on_writer(source, _PEEK.format(batch=int(self.batch)))
        claimed_by, claimed_until, incarnation = found[0][:3]
        if claimed_by == self.id and claimed_until - now > self.lease / 4:
            rows = [OutboxRow(*row[3:]) for row in found if row[3] is not None]
            return _Claim(source, str(incarnation), plan(rows, self.handlers, now), float(claimed_until))
        if claimed_by not in (None, self.id) and claimed_until > now:
            self._held.discard(source)
            raise _ClaimedElsewhere(float(claimed_until))
        with self.store.writing(source, create=False) as handle:
            claim: list[Any] = self.store.internal(
                handle, "SELECT claimed_by, claimed_until FROM _shardlite_relay WHERE id = 1").fetchall()
            claimed_by, claimed_until = claim[0]
            if claimed_by not in (None, self.id) and claimed_until > now:
                self._held.discard(source)
                raise _ClaimedElsewhere(float(claimed_until))
            self.store.internal(handle, "UPDATE _shardlite_relay SET claimed_by = ?, claimed_until = ? "
                                "WHERE id = 1", (self.id, now + self.lease))
            self._held.add(source)
            found = self.store.internal(handle, _READ_OUTBOX.format(batch=int(self.batch))).fetchall()
            rows = [OutboxRow(*row) for row in found]
            return _Claim(source, handle.incarnation, plan(rows, self.handlers, now), now + self.lease)

    def release_claims(self) -> None:
        """Give up the leases this relay holds (its acknowledgements renew them, so that its next pass over
        a busy source needs no claim transaction): another relay can take those sources at once."""
        held, self._held = self._held, set()
        for source in held:
            try:
                with self.store.writing(source, create=False) as handle:
                    self.store.internal(handle, "UPDATE _shardlite_relay SET claimed_by = NULL, claimed_until = 0 "
                                        "WHERE id = 1 AND claimed_by = ?", (self.id,))
            except (UnknownTenant, Busy, TenantMoving) as exc:  # expires by itself within the lease
                log.info("relay: could not release %r (%s)", source, exc)

    def _deliver(self, dest: str, groups: list[tuple[_Claim, list[OutboxRow]]]) -> None:
        """Apply every source's ``rows`` for ``dest`` (each source's in seq order) in one transaction on
        ``dest``, and sort them into the claims' outcomes. A handler that fails stops its own
        (source, destination) pair for this pass; the other sources' events still go in."""
        done: list[tuple[_Claim, list[int]]] = []
        try:
            with self.store.writing(dest, create=True, revive=False) as handle:
                for claim, rows in groups:
                    done.append((claim, self._apply_group(handle, claim, rows)))
        except UnknownTenant:
            for claim, rows in groups:
                for row in rows:
                    claim.dead[row.seq] = (row, f"destination {dest!r} was dropped")
            return
        except ConfigurationError as exc:  # no schema for the destination here: it can never be created
            for claim, rows in groups:
                for row in rows:
                    claim.dead[row.seq] = (row, f"destination {dest!r} cannot be created: {exc}")
            return
        except (Busy, TenantMoving) as exc:
            for claim, rows in groups:
                claim.failed[rows[0].seq] = (rows[0], f"{type(exc).__name__}: {exc}")
            return
        for claim, seqs in done:
            claim.delivered.extend(seqs)

    def _apply_group(self, handle: Any, claim: _Claim, rows: list[OutboxRow]) -> list[int]:
        """One source's events for the handle's tenant: skip those at or below the inbox mark of their
        emitting incarnation (applied before: the acknowledgement was lost), run the others, and move the
        marks in the same transaction. Returns the seqs that count as delivered."""
        done: list[int] = []
        marks: dict[str, int] = {}  # high-water mark per emitting incarnation, as read
        moved: dict[str, int] = {}  # ... and as advanced by this pass
        source = claim.source
        for row in rows:
            emitter = row.incarnation(claim.incarnation)
            if emitter not in marks:
                found: list[Any] = self.store.internal(
                    handle, "SELECT last_seq FROM _shardlite_inbox WHERE source = ? AND incarnation = ?",
                    (source, emitter)).fetchall()
                marks[emitter] = int(found[0][0]) if found else 0
            if row.seq <= marks[emitter]:
                done.append(row.seq)
                continue
            error = self._apply(handle, source, emitter, row)
            if error is not None:
                claim.failed[row.seq] = (row, error)
                break
            marks[emitter] = moved[emitter] = row.seq
            done.append(row.seq)
        for emitter, seq in moved.items():
            self.store.internal(
                handle, "INSERT INTO _shardlite_inbox(source, incarnation, last_seq) VALUES (?, ?, ?) "
                "ON CONFLICT(source, incarnation) DO UPDATE SET last_seq = excluded.last_seq",
                (source, emitter, seq))
        return done

    def _apply(self, handle: Any, source: str, incarnation: str, row: OutboxRow) -> str | None:
        """Run one handler in a savepoint; the error text when it failed (its effects rolled back).

        The built-in feed handler is applied directly: one INSERT of the payload as stored (no decoding
        and re-encoding, no Event object) and no savepoint, as a single statement that fails leaves no
        effect. If SQLite rolled the whole transaction back instead, the error propagates and the
        destination's transaction fails as a whole."""
        store = self.store
        handler = self.handlers[row.topic]
        if handler is feed_append:
            try:
                store.internal(handle, feed_insert, feed_values(source, incarnation, row.topic, row.payload,
                                                                row.seq, row.created))
            except Exception as exc:  # noqa: BLE001 - recorded like any failing handler
                if handle.conn.get_autocommit():
                    raise
                return f"{type(exc).__name__}: {exc}"[:2000]
            return None
        store.internal(handle, "SAVEPOINT shardlite_relay")
        tx = Transaction(handle.key, handle.conn, handle.guard, store.emitter, handle)
        try:
            handler(tx, row.event(source, incarnation))
        except Exception as exc:  # noqa: BLE001 - a failing handler is recorded, never fatal to the relay
            store.internal(handle, "ROLLBACK TO shardlite_relay")
            store.internal(handle, "RELEASE shardlite_relay")
            return f"{type(exc).__name__}: {exc}"[:2000]
        finally:
            tx._close()
        store.internal(handle, "RELEASE shardlite_relay")
        return None

    def _acknowledge(self, claim: _Claim, stats: PassStats, emptied: list[tuple[str, int]],
                     wait_ms: int | None = None) -> None:
        """In the source: delete what was delivered, count failures (backoff or dead letter), renew the
        lease when less than half of it is left. A source left empty goes into ``emptied`` with the flag
        version read under its write lock; one whose remaining events are due later gets its flag's due
        time moved."""
        store, catalog, policy = self.store, self.store.catalog, self.policy
        source, delivered, failed, dead = claim.source, claim.delivered, claim.failed, claim.dead
        next_due_at = claim.work.next_due
        now = time.time()
        try:
            with store.writing(source, create=False, wait_ms=wait_ms) as handle:
                if delivered or failed or dead:  # failed ones may turn dead (deleted) below
                    store.internal(handle, REMEMBER_LAST_SEQ)  # before deleting: numbers never come back
                if delivered:  # one cached statement per seq: no table-valued function a user table could shadow
                    store.internal_many(handle, "DELETE FROM _shardlite_outbox WHERE seq = ?",
                                        [(seq,) for seq in delivered])
                for seq, (row, error) in failed.items():
                    attempts = row.attempts + 1
                    if policy.dead(attempts):
                        dead[seq] = (row, error)
                        continue
                    retry_at = policy.next_at(now, attempts)
                    store.internal(handle, "UPDATE _shardlite_outbox SET attempts = ?, next_at = ?, last_error = ? "
                                   "WHERE seq = ?", (attempts, retry_at, error, seq))
                    next_due_at = retry_at if next_due_at is None else min(next_due_at, retry_at)
                    stats.next_retry = retry_at if stats.next_retry is None else min(stats.next_retry, retry_at)
                for seq, (row, error) in dead.items():
                    catalog.add_dead_letter(source, row.incarnation(handle.incarnation), seq, row.dest, row.topic,
                                            row.payload, row.created, max(row.attempts + 1, 1), error)
                    store.internal(handle, "DELETE FROM _shardlite_outbox WHERE seq = ?", (seq,))
                left: list[Any] = store.internal(handle, "SELECT count(*) FROM _shardlite_outbox").fetchall()
                remaining = int(left[0][0])
                # read under the source's write lock: an emitter that re-flags it after this commit bumps it
                version = catalog.pending_row(source) if remaining == 0 else None
                if claim.until - time.time() < self.lease / 2:
                    claim.until = time.time() + self.lease
                    store.internal(handle, "UPDATE _shardlite_relay SET claimed_by = ?, claimed_until = ? "
                                   "WHERE id = 1", (self.id, claim.until))
        except UnknownTenant:
            self._held.discard(source)
            self._forget_source(source)
            return
        if self.fault is not None:
            self.fault("acknowledged")
        retrying = len(failed) - sum(1 for seq in failed if seq in dead)
        stats.delivered += len(delivered)
        stats.dead += len(dead)
        stats.failed += retrying
        if remaining == 0:
            if version is not None:
                emptied.append((source, version[0]))
            return
        held = claim.work.waiting + len(claim.work.unhandled) + retrying
        due = next_due(now, remaining=remaining, held=held, retry_due=next_due_at,
                       unhandled=bool(claim.work.unhandled), recheck=self.unhandled_recheck)
        version = catalog.pending_row(source)
        current = version[1] if version is not None else None
        if current is None or (abs(current - due) > 1e-3 and not (current <= now and due <= now)):
            catalog.set_pending_due(source, due)

    def _forget_source(self, source: str) -> None:
        row = self.store.catalog.pending_row(source)
        if row is not None:
            self.store.catalog.clear_pending(source, row[0])

    # -- operations -------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Pending events, age of the oldest (lag) and dead letters, per node; pending events per topic and
        the topics this process has no handler for. Opens only the tenants flagged as having pending
        events."""
        store = self.store
        now = time.time()
        per_node: dict[str, dict[str, Any]] = {
            n.name: {"pending": 0, "oldest_age": 0.0, "dead_letters": 0, "sources": 0} for n in
            store.catalog.nodes()}
        topics: dict[str, int] = {}
        for key, _due, _since in store.catalog.pending_all():
            try:
                count, oldest = store.read_internal(key, "SELECT count(*), min(created) FROM _shardlite_outbox")[0]
                node = store.locate(key).node
                for (topic, n) in store.read_internal(key, "SELECT topic, count(*) FROM _shardlite_outbox "
                                                      "GROUP BY topic"):
                    topics[topic] = topics.get(topic, 0) + int(n)
            except (UnknownTenant, ShardliteError, apsw.Error):
                continue
            entry = per_node.setdefault(node, {"pending": 0, "oldest_age": 0.0, "dead_letters": 0, "sources": 0})
            entry["pending"] += int(count)
            entry["sources"] += 1 if count else 0
            if oldest is not None:
                entry["oldest_age"] = max(entry["oldest_age"], now - float(oldest))
        dead = store.catalog.dead_letters(limit=1_000_000)
        for letter in dead:
            node = store.locate(letter["source"]).node
            per_node.setdefault(node, {"pending": 0, "oldest_age": 0.0, "dead_letters": 0, "sources": 0})
            per_node[node]["dead_letters"] += 1
        return {
            "pending": sum(v["pending"] for v in per_node.values()),
            "oldest_age": max([v["oldest_age"] for v in per_node.values()] or [0.0]),
            "dead_letters": len(dead),
            "topics": dict(sorted(topics.items())),
            "unhandled_topics": sorted(t for t in topics if t not in self.handlers),
            "nodes": per_node,
            "running": self.running,
            "last_error": self.last_error,
        }

    def retry_dead(self, *, source: str | None = None, seq: int | None = None) -> int:
        """Re-emit dead letters (all, one source's, or one) as new events; returns how many."""
        store = self.store
        count = 0
        for letter in store.catalog.dead_letters(limit=1_000_000):
            if source is not None and letter["source"] != source:
                continue
            if seq is not None and letter["seq"] != seq:
                continue
            try:
                with store.writing(letter["source"], create=False) as handle:
                    store.internal(handle, EMIT_SQL,
                                   (letter["dest"], letter["topic"], letter["payload"], letter["created"]))
                    store.catalog.flag_pending(letter["source"])
            except UnknownTenant:
                continue  # its source was dropped: nothing can re-emit it (the letter stays listed)
            store.catalog.delete_dead_letter(letter["source"], letter["incarnation"], letter["seq"])
            count += 1
        return count

