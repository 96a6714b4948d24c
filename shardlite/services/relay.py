"""The relay: delivers outbox events to their handlers on the destination tenants (rules: outbox effects happen
exactly once; crashes lose nothing acknowledged; failures stay in their tenant and waits are bounded).

Finding work. A tenant with pending events has a flag in the metadata's pending-work index
(:mod:`shardlite.meta.pending`). The flag is written only on transitions: by ``tx.emit`` when it finds the
outbox empty (*before* that transaction commits), and by the relay when a pass leaves the outbox empty
(*parked*: kept but not due, its version recorded in the source file, so the next emit only wakes it after
its commit: :mod:`shardlite.services.relay_sweep`, :mod:`shardlite.front.wakes`) or waiting for a retry (its
due time moves). Relays read the index (a read, never every tenant file) to find due tenants, and sweep the
parked flags every ``Sweeper.interval`` seconds (5 s) for events whose wake-up was lost: such an event is
delivered within that interval plus one pass.

Claiming. A relay claims a source tenant inside the tenant's own file (``_shardlite_relay``, a lease of
``lease`` seconds) so several relays never work one source at once and never fight over the global DB. A
relay that dies leaves a lease that expires; another relay then takes over. An acknowledgement renews the
lease when less than half of it is left, and while more than a quarter is left the next pass *reads* the
source (claim row, incarnation and outbox in one snapshot on its write connection) instead of claiming it
in a write transaction: a busy source costs one write per pass, not two. ``stop()`` and the end of
``drain()`` give the leases up.

One pass over a set of sources (every due one, up to ``sources_per_pass``):

1. claim each source ``S`` and read up to ``batch`` of its outbox rows in seq order;
2. :func:`~shardlite.core.outbox.plan` what is due and has a handler, per destination, in order, and group the
   sources' plans by destination;
3. for each destination ``D``: **one** write transaction on ``D`` for all the sources with events for it
   (:mod:`shardlite.services.delivery`: inbox marks make a redelivery a no-op, each handler runs in a savepoint,
   the first failing handler stops its (source, destination) pair for this pass, not the other pairs);
4. acknowledge in each ``S``: delete delivered events, count failures (backoff, or dead letter after
   ``max_attempts``), renew the lease if it runs short; a source left empty has its flag parked inside this
   transaction, under ``S``'s write lock, only if no emitter re-flagged it since (an emitter that finds the
   outbox empty and no parked flag bumps the version). No event is stranded: a crash anywhere leaves either
   the flag or nothing to deliver; a commit of ``S`` that fails after the park un-parks the flag. The park
   is skipped (no metadata round trip under the lock) when this relay parked that very version and no
   wake-up of it was written by this process since, unless the index listed the source as due in this pass:
   the flag is then still parked, or was woken by another process and costs one more look (held wake-ups,
   :mod:`shardlite.front.wakes`). *Parking ahead*: before the acknowledgements, the flags of the sources
   whose acknowledgement will leave the outbox empty (everything read was delivered, not a whole batch) are
   parked in one metadata call (``park_many``), with the version the file names, so that those
   acknowledgements make no metadata round trip under the lock; one that finds events left (emitted after
   step 1) or fails makes its flag due again (one ``wake_many`` at the end of the pass; at once on a failed
   commit). A crash in between leaves events under a parked flag, which the sweep wakes. A source
   an application transaction holds locked is acknowledged after the free ones, waiting
   at most ``ACK_WAIT_MS``; one still locked is acknowledged by a later pass (never counted as a failure).

A crash between ``D``'s commit and ``S``'s acknowledgement redelivers those events later; the inbox mark
makes that a no-op. Handlers must keep their effects inside the transaction they are given.

Confinement (rule 15). A failure in one tenant never stops the pass for the others:

* a *source* that fails (an error while claiming, reading or acknowledging it: a hostile schema that
  breaks shardlite's own statements, a file that cannot be opened or written) is skipped; its pending
  flag's due time backs off exponentially (the policy's ``backoff_base`` to ``backoff_cap``, counted in
  consecutive failures) and ``status()`` shows its error. ``drain()`` retries it ``max_attempts`` times,
  then leaves it flagged;
* a *destination* that fails is treated like a failing handler (:mod:`shardlite.services.delivery`): its events
  count failed attempts and end as dead letters with the error text;
* an *unavailable* tenant (being moved, locked by another writer past ``LOCK_WAIT_MS``, or a destination
  whose metadata cannot be reached or written now: :mod:`shardlite.services.delivery`) is not a failure: nothing
  is counted; a destination's events stay in the outbox, in order, and it is tried again after a short
  backoff (``RetryPolicy.unavailable_delay``) without delaying other destinations; a busy source is
  simply left for the next pass. No pass waits on one tenant longer than the lock wait
  (a move is not waited for);
* errors are reported naming the tenant, its file and the cause, logged at most once per
  ``LOG_INTERVAL`` per kind with a count of those suppressed (:mod:`shardlite.services.relay_health`); the last
  one is recorded in the global DB for ``shardlite relay status``.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from ..core.outbox import RetryPolicy, backoff, next_due
from ..errors import Busy, MetaUnavailable, TenantMoving, UnknownTenant
from ..front.store import Store
from . import relay_ops
from .delivery import DONE, UNAVAILABLE, Claim, Deliverer, Group, Handler, HandlerRegistry, describe_tenant
from .relay_ack import move_flag, settle_outbox
from .relay_health import LOG_INTERVAL, ErrorLog, PassStats, Troubles, describe, error_kind, error_text
from .relay_lease import ClaimedElsewhere, claim_source, release_leases
from .relay_sweep import Sweeper, park_ahead, park_emptied, wake_parked_ahead

__all__ = ["Relay", "PassStats", "Handler", "HandlerRegistry", "LEASE_SECONDS", "ACK_WAIT_MS", "LOCK_WAIT_MS",
           "LOG_INTERVAL"]

log = logging.getLogger("shardlite.relay")

#: How long a relay's claim on a source tenant lasts; a relay that died is replaced after at most this.
LEASE_SECONDS = 10.0
#: How long the second try at acknowledging a source that an application transaction had locked waits.
ACK_WAIT_MS = 2
#: How long a claim or a delivery waits for another writer's lock on one tenant: a tenant still locked
#: after it is tried again later, so that it never delays the others.
LOCK_WAIT_MS = 5
_PARKED_MAX = 65536

#: What an acknowledgement left in the outbox, and the file's parked-flag marker.
_LEFT = "SELECT (SELECT count(*) FROM _shardlite_outbox), parked_version FROM _shardlite_relay WHERE id = 1"


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
        #: (source, version) of flags parked ahead whose acknowledgement left events: woken at the pass's end
        self._unpark: list[tuple[str, int]] = []
        self._held: set[str] = set()  # sources whose lease this relay (probably) holds
        #: source -> the version this relay parked its flag with, while no wake-up of it was written here since
        #: (see _acknowledge: such a flag is still parked unless another process woke it)
        self._parked: dict[str, int] = {}
        self._due_now: set[str] = set()  # the sources the index listed as due for the current pass
        self._failing_sources = Troubles()  # backing off (see the module doc)
        self._failing_dests = Troubles()  # for status() only: their events count the failed attempts
        self._unavailable = Troubles()  # destinations moving or locked: tried again soon, nothing counted
        self._moving_sources = Troubles()  # sources found moving: looked at again soon
        #: Rate-limited error reports; ``errors.last`` is the newest error (see :mod:`~shardlite.services.relay_health`)
        self.errors = ErrorLog(log, on_logged=self._record_error)
        self._deliverer = Deliverer(store, handlers, self.report, LOCK_WAIT_MS)
        #: The sweep of parked flags (lost wake-ups, expiry): :mod:`shardlite.services.relay_sweep`
        self.sweeper = Sweeper(store, lock_wait_ms=LOCK_WAIT_MS)
        store.meta.watch_tenants(self.sweeper.hint)  # after every reconnect of the hints: sweep
        if store.emitter.wakes is not None:
            store.emitter.wakes.written.append(self._woken)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Test hook: called with a step name ("claimed", "delivered", "parked-ahead" when flags were parked
        #: ahead, "acknowledged") during each pass, and
        #: by :meth:`retry_dead` ("re-emitting": before the source's commit of a re-emit; "re-emitted": between
        #: that commit and the letter's deletion), so crash tests can kill the process at an exact point.
        self.fault: Callable[[str], None] | None = None

    @property
    def last_error(self) -> dict[str, Any] | None:
        """The newest error this relay met: ``{"at", "tenant", "error"}`` (None if none)."""
        return self.errors.last

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
        self._hold_wakes(True)
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
            self._hold_wakes(False)
            self._thread = None
        if self._held and not self.store.closed:
            self.release_claims()
        self.errors.flush()

    def _hold_wakes(self, on: bool) -> None:
        """While this relay runs (``on``), this process's wake-ups of the sources whose lease it holds wait for
        its passes (see :mod:`shardlite.front.wakes`, held wake-ups); ``on=False`` writes them."""
        wakes = self.store.emitter.wakes
        if wakes is None:
            return
        if on:
            wakes.holder = lambda key: key in self._held  # self._held is replaced by release_claims
        elif wakes.holder is not None:
            wakes.release()

    def _woken(self, keys: list[str]) -> None:
        """This process wrote wake-ups of ``keys``: their flags are due, no longer parked by this relay."""
        parked = self._parked
        for key in keys:
            parked.pop(key, None)

    def notify(self, source: str) -> None:
        """``source`` committed new events in this process: pass over it at once, whatever its due time."""
        self._hot.add(source)
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once().progressed
            except Exception as exc:  # noqa: BLE001 - a relay thread must survive anything a pass throws
                self.pass_failed(exc)
                busy = False
            if not busy:
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    def pass_failed(self, exc: BaseException) -> None:
        """A whole pass failed (not one tenant: the global DB, or a bug): report it, rate-limited, with
        a traceback on the lines that are logged."""
        self.errors.report(f"relay pass failed: {error_text(exc)}", kind=f"pass: {error_kind(exc)}", exc_info=exc)
        if isinstance(exc, MetaUnavailable):
            self.sweeper.request()  # wake-ups written while it was unreachable may be lost

    # -- passes -----------------------------------------------------------------------------------------

    def run_once(self, *, limit: int = 256, every: bool = False) -> PassStats:
        """One pass over every due, unclaimed source (at most ``limit``); ``every`` ignores due times (parked
        flags excepted: ``drain()`` sweeps them first). Sweeps the parked flags first when it is time."""
        if not every and self.sweeper.due():
            self.sweeper.sweep()
        now = time.time()
        hot, self._hot = self._hot, set()
        wakes = self.store.emitter.wakes
        if wakes is not None:
            hot |= wakes.keys()  # committed here, their flags not woken yet: passed at once (and settled)
        pending = self.store.meta.pending
        flagged = [row.key for row in pending.due(math.inf if every else now, 1_000_000 if every else limit)]
        self._due_now = set(flagged)
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
        delays, unavailable destinations and the leases of relays that died, or until ``timeout``. Events
        with no handler here (and those behind them on the same pair) stay pending, and so do the events
        of a source that failed ``max_attempts`` times in a row (``stats.failing``)."""
        deadline = time.monotonic() + timeout
        total = PassStats()
        wakes = self.store.emitter.wakes
        if wakes is not None:
            wakes.flush()  # this process's wake-ups first
        self.sweeper.sweep(expire=False)  # and those lost elsewhere
        try:
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
        finally:
            if not self.running:
                self.release_claims()
            self.errors.flush()
        return total

    def pass_over(self, source: str) -> PassStats:
        """Deliver what is due from ``source``'s outbox (see the module doc for the protocol)."""
        return self._pass([source])

    def _pass(self, sources: list[str]) -> PassStats:
        """Claim ``sources``, deliver their due events grouped by destination (one write transaction per
        destination, whatever the number of sources writing to it), then acknowledge each source."""
        now = time.time()
        stats = PassStats()
        claimed: list[Claim] = []
        for source in sources:
            stats.sources += 1
            if (self._failing_sources or self._unavailable or self._moving_sources) and self._held_back(
                    source, now, stats):
                continue
            try:
                claim = self._claim(source, now)
            except UnknownTenant:
                self._held.discard(source)
                self._failing_sources.clear(source)
                self._forget_source(source)
                continue
            except ClaimedElsewhere as other:
                # look again soon, not only when the lease ends: its holder may give it up at once (stop)
                self._skip_until[source] = min(other.until, now + self.claimed_recheck)
                stats.skipped += 1
                stats.claimed_until = other.until if stats.claimed_until is None else max(
                    stats.claimed_until, other.until)
                continue
            except Busy as exc:  # an application transaction holds it: the next pass tries again
                log.debug("relay: source %r is locked (%s)", source, exc)
                stats.retry_at(now + self.poll_interval)
                continue
            except TenantMoving as exc:
                self._set_unavailable(self._moving_sources, "source", source, exc, stats)
                continue
            except Exception as exc:  # noqa: BLE001 - confined to this source (module doc)
                self._source_failed(source, exc, stats)
                continue
            if self._moving_sources:
                self._moving_sources.clear(source)
            claimed.append(claim)
        if not claimed:
            return stats
        if self.fault is not None:
            self.fault("claimed")
        by_dest: dict[str, list[Group]] = {}
        for claim in claimed:
            stats.waiting += claim.work.waiting
            stats.unhandled += len(claim.work.unhandled)
            stats.unhandled_topics |= {row.topic for row in claim.work.unhandled}
            due = claim.work.next_due
            if due is not None:
                stats.retry_at(due)
            for dest, dest_rows in claim.work.deliver.items():
                by_dest.setdefault(dest, []).append((claim, dest_rows))
        for dest, groups in by_dest.items():
            self._deliver(dest, groups, now, stats)
        if self.fault is not None:
            self.fault("delivered")
        # An application transaction may hold a source's lock for a while (a group-commit batch stays open
        # for a loop iteration): acknowledge the free sources first, then those that were busy, waiting a
        # little; one still locked is acknowledged by a later pass (its events redelivered: a no-op then).
        ahead = park_ahead(self.store.meta.pending, claimed, self._parked, self._due_now)
        if ahead and self.fault is not None:
            self.fault("parked-ahead")
        busy: list[Claim] = []
        for claim in claimed:
            try:
                self._acknowledge(claim, stats, wait_ms=0, ahead=ahead.get(claim.source), keep_on_busy=True)
            except Busy:
                busy.append(claim)
            except TenantMoving as exc:
                log.debug("relay: could not acknowledge %r now (%s)", claim.source, exc)
        for claim in busy:
            try:
                self._acknowledge(claim, stats, wait_ms=ACK_WAIT_MS, ahead=ahead.get(claim.source))
            except (Busy, TenantMoving) as exc:
                log.debug("relay: %r stays unacknowledged until a later pass (%s)", claim.source, exc)
        if self._unpark:
            unpark, self._unpark = self._unpark, []
            if not wake_parked_ahead(self.store.meta.pending, unpark):
                self.sweeper.request()
        return stats

    def _held_back(self, source: str, now: float, stats: PassStats) -> bool:
        """True when ``source`` backs off after failing, or waits after being found moving (as a source or
        as a destination: a source's first read would wait for the move)."""
        trouble = self._moving_sources.waiting(source, now)
        if trouble is None:
            trouble = self._unavailable.waiting(source, now)
            if trouble is not None and trouble.cause != TenantMoving.__name__:
                trouble = None  # only locked: its claim waits a few ms at most
        if trouble is not None:
            stats.retry_at(trouble.until)
            return True
        trouble = self._failing_sources.waiting(source, now)
        if trouble is None:
            return False
        stats.failing.add(source)
        if trouble.tries < self.policy.max_attempts:  # drain() waits for a few tries, not for ever
            stats.retry_at(trouble.until)
        return True

    def _deliver(self, dest: str, groups: list[Group], now: float, stats: PassStats) -> None:
        """Deliver to ``dest`` unless it is known to be unavailable; defer its events if it is."""
        if self._unavailable:
            trouble = self._unavailable.waiting(dest, now)
            if trouble is not None:
                self._defer(groups, trouble.until, stats)
                return
        outcome = self._deliverer.deliver(dest, groups)
        if outcome.state == DONE:
            if self._unavailable:
                self._unavailable.clear(dest)
            if self._failing_dests:
                self._failing_dests.clear(dest)
        elif outcome.state == UNAVAILABLE:
            assert outcome.exc is not None
            self._defer(groups, self._set_unavailable(self._unavailable, "destination", dest, outcome.exc, stats),
                        stats)
        else:
            assert outcome.exc is not None
            self._failing_dests.add(dest, "destination", outcome.exc, outcome.text, time.time(), lambda _: 0.0)
            stats.tenant_errors += 1
            stats.failing.add(dest)

    @staticmethod
    def _defer(groups: list[Group], until: float, stats: PassStats) -> None:
        for claim, rows in groups:
            claim.defer(len(rows), until)
            stats.deferred += len(rows)
        stats.retry_at(until)

    def _set_unavailable(self, troubles: Troubles, role: str, key: str, exc: BaseException,
                         stats: PassStats) -> float:
        """``key`` is moving or locked: not tried again before the returned time (nothing counted)."""
        trouble = troubles.add(key, role, exc, describe(role, key, exc), time.time(), self.policy.unavailable_delay)
        log.debug("relay: %s (try %d; again in %.2f s)", trouble.error, trouble.tries, trouble.until - time.time())
        stats.retry_at(trouble.until)
        return trouble.until

    def _source_failed(self, source: str, exc: BaseException, stats: PassStats) -> None:
        """An error while claiming, reading or acknowledging ``source``: report it and back off (here and in
        its pending flag's due time, which every relay sees)."""
        policy = self.policy
        self._parked.pop(source, None)  # its flag is due again (below)
        text = self.report("source", source, exc, "")
        trouble = self._failing_sources.add(source, "source", exc, text, time.time(),
                                            lambda tries: backoff(tries, policy.backoff_base, policy.backoff_cap))
        stats.tenant_errors += 1
        stats.failing.add(source)
        if trouble.tries < policy.max_attempts:
            stats.retry_at(trouble.until)
        try:
            self.store.meta.pending.set_due(source, trouble.until)
        except Exception as err:  # noqa: BLE001 - the global DB's trouble: this relay's own backoff holds
            self.errors.report(f"could not move the pending flag of {source!r}: {error_text(err)}",
                               kind=f"global: {error_kind(err)}", tenant=source)

    def report(self, role: str, key: str, exc: BaseException, note: str = "") -> str:
        """Report an error about one tenant (rate-limited); returns its text (tenant, file, cause)."""
        text = describe_tenant(self.store, role, key, exc, note)
        self.errors.report(text, kind=f"{role}: {error_kind(exc)}", tenant=key)
        return text

    def _claim(self, source: str, now: float) -> Claim:
        """Take the source's lease and read a batch of its outbox (:func:`~.relay_lease.claim_source`)."""
        return claim_source(self.store, source, now, relay_id=self.id, lease=self.lease, batch=self.batch,
                            handlers=self.handlers, held=self._held, wait_ms=LOCK_WAIT_MS)

    def release_claims(self) -> None:
        """Give up the leases this relay holds (its acknowledgements renew them, so that its next pass over
        a busy source needs no claim transaction): another relay can take those sources at once. A source
        that cannot be written now keeps the lease until it runs out."""
        held, self._held = self._held, set()
        release_leases(self.store, held, relay_id=self.id, wait_ms=LOCK_WAIT_MS, report=self.report)

    def _acknowledge(self, claim: Claim, stats: PassStats, wait_ms: int | None = None,
                     ahead: int | None = None, keep_on_busy: bool = False) -> None:
        """In the source: delete what was delivered, count failures (backoff or dead letter), renew the
        lease when less than half of it is left. A source left empty has its flag parked under its write
        lock (:func:`~shardlite.services.relay_sweep.park_emptied`), unless the pass parked it ahead
        (:func:`~shardlite.services.relay_sweep.park_ahead`) with the version the file still records
        (``ahead``); one whose remaining events are due later gets its
        flag's due time moved, and one parked ahead that kept events is made due again. Busy and
        TenantMoving propagate (nothing was written; a flag parked is un-parked); any other error is the
        source's failure (reported, backed off: the flag due again). ``keep_on_busy``: on Busy, a flag
        parked ahead stays parked, for the caller's second attempt (which un-parks it if that fails too)."""
        store, policy = self.store, self.policy
        pending, letters = store.meta.pending, store.meta.dead_letters
        source, delivered, failed, dead = claim.source, claim.delivered, claim.failed, claim.dead
        next_due_at = claim.work.next_due
        if claim.deferred_until is not None:
            next_due_at = claim.deferred_until if next_due_at is None else min(next_due_at, claim.deferred_until)
        now = time.time()
        wakes = store.emitter.wakes
        parked: int | None = None
        ticket = 0
        try:
            with store.writing(source, create=False, wait_ms=wait_ms, move_wait=0) as handle:
                next_due_at = settle_outbox(store, handle, claim, policy, letters, now, next_due_at, stats)
                left: list[Any] = store.internal(handle, _LEFT).fetchall()
                remaining, marker = int(left[0][0]), left[0][1]
                if remaining == 0:  # under the source's write lock: an emitter after this commit sees the marker
                    ticket = wakes.ticket() if wakes is not None else 0
                    if ahead is not None and marker == ahead:
                        parked = ahead  # parked ahead with the version the file records
                    elif marker is not None and self._parked.get(source) == marker and source not in self._due_now:
                        # This relay parked the flag with the version the file records, no wake-up of it was
                        # written here since and the index did not list it as due: it is still parked (or
                        # woken by another process, and then due: one more look, whose pass parks it).
                        parked = int(marker)
                    else:
                        parked = park_emptied(store, handle, source, marker)
                if claim.until - time.time() < self.lease / 2:
                    claim.until = time.time() + self.lease
                    store.internal(handle, "UPDATE _shardlite_relay SET claimed_by = ?, claimed_until = ? "
                                   "WHERE id = 1", (self.id, claim.until))
        except UnknownTenant:
            self._held.discard(source)
            self._parked.pop(source, None)
            self._forget_source(source)
            return
        except (Busy, TenantMoving) as exc:
            self._parked.pop(source, None)
            if parked is None and not (keep_on_busy and isinstance(exc, Busy)):
                parked = ahead
            if parked is not None:  # parked, then the commit failed: the events are still there
                try:
                    pending.wake_many([(source, parked)])
                except Exception as err:  # noqa: BLE001 - the sweep wakes it (a parked source holding events)
                    log.debug("relay: could not un-park %r (%s)", source, err)
            raise
        except Exception as exc:  # noqa: BLE001 - confined to this source (module doc)
            self._parked.pop(source, None)
            self._source_failed(source, exc, stats)  # its flag's due time moves: un-parked
            return
        if parked is not None:
            if len(self._parked) >= _PARKED_MAX:
                self._parked.clear()
            self._parked[source] = parked
            if wakes is not None:
                wakes.settled(source, ticket)  # this process's wake-ups of it queued before are moot
        elif remaining == 0:  # not parked: no flag, or flagged again since
            self._parked.pop(source, None)
        if self._failing_sources:
            self._failing_sources.clear(source)
        if self.fault is not None:
            self.fault("acknowledged")
        retrying = len(failed) - sum(1 for seq in failed if seq in dead)
        stats.delivered += len(delivered)
        stats.dead += len(dead)
        stats.failed += retrying
        if remaining == 0:
            return
        held = claim.work.waiting + len(claim.work.unhandled) + retrying + claim.deferred
        due = next_due(now, remaining=remaining, held=held, retry_due=next_due_at,
                       unhandled=bool(claim.work.unhandled), recheck=self.unhandled_recheck)
        if ahead is not None:  # parked ahead, and events were left (due now): un-parked after the pass's acks
            self._parked.pop(source, None)
            self._unpark.append((source, ahead))
            return
        move_flag(pending, wakes, self._parked, source, marker, due, now)

    def _forget_source(self, source: str) -> None:
        self._parked.pop(source, None)
        flag = self.store.meta.pending.row(source)
        if flag is not None:
            self.store.meta.pending.clear_many([(source, flag.version)])

    # -- operations (shardlite.services.relay_ops) ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Pending events, age of the oldest (lag) and dead letters, per node; pending events per topic and
        the topics this process has no handler for; the last error (this relay's, or the last one any relay
        of the root recorded, whichever is newer); the tenants this relay sees failing or unavailable now.
        Opens only the tenants whose flag is due (a parked flag's source was drained; events under one whose
        wake-up was lost are counted once the sweep has woken it)."""
        return relay_ops.status(self)

    def retry_dead(self, *, source: str | None = None, seq: int | None = None) -> int:
        """Re-emit dead letters (all, one source's, or one) as new events; returns how many. A letter whose
        source cannot be written now stays a dead letter (the error is reported) and the others go on."""
        return relay_ops.retry_dead(self, source=source, seq=seq)

    def recorded_error(self) -> dict[str, Any] | None:
        """The last error any relay of this root logged: ``{"at", "tenant", "error", "relay"}`` (or None)."""
        return relay_ops.recorded_error(self.store)

    def troubles(self, now: float) -> dict[str, dict[str, Any]]:
        """``{"failing": {key: ...}, "unavailable": {key: ...}}``: the sources this relay backs off from,
        the destinations whose failure it met in the last minute, the tenants it found moving or locked,
        with their last error, tries in a row and when they are tried again."""
        self._failing_dests.forget_before(now - 2 * LOG_INTERVAL)  # no event of theirs failed for a while
        return {"failing": self._failing_sources.snapshot(now) | self._failing_dests.snapshot(now),
                "unavailable": self._moving_sources.snapshot(now) | self._unavailable.snapshot(now)}

    def _record_error(self, record: dict[str, Any]) -> None:
        relay_ops.record_error(self.store, record | {"relay": self.id})
