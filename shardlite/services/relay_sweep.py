"""Parked pending-work flags on the relay's side (the rules: :mod:`shardlite.meta.pending`).

Parking. A pass that leaves a source's outbox empty parks the source's flag instead of deleting it
(:func:`park_emptied`, under the source's write lock, in the acknowledging transaction): the flag stays,
not due, and the file records the parked version (``_shardlite_relay.parked_version``) only after
``pending.park`` succeeded, so a marker always names a flag that was there. The next emitter that finds the
outbox empty sees the marker and needs no durable flag write before its commit, only a wake-up after it
(:mod:`shardlite.front.wakes`).

Sweeping (:class:`Sweeper`). Wake-ups are best effort: one is lost when the writer dies right after its
commit, when the metadata store crashes before it wrote the (non-durable) wake-up, or when the store stays
unreachable until the writer ends. So every ``interval`` seconds (:data:`SWEEP_INTERVAL`), after every
reconnect of the metadata hints and after a pass that found the store unreachable, the relay lists the
parked flags (``pending.parked``, by pages) and reads each parked source's outbox (on its write connection,
never waiting for it: on a read connection while it is in use): one that holds events is woken. A source whose
file and log have not changed (size and modification time, both last changed over a second before they were
looked at, so that a later commit shows even with the file system's coarse clock) since a sweep found its
outbox empty is not read again.
**An event whose wake-up was lost is delivered within** ``interval`` **seconds (5 s by default) plus
one pass** of a running relay (``drain()`` sweeps when it starts). The same sweep expires the flags of
sources parked and idle for ``ttl`` seconds (:data:`PARK_TTL`): under the source's write lock, with its
outbox empty, the marker is cleared and committed, then the flag is deleted if its version is unchanged (a
crash between leaves a parked flag without a marker: harmless, expired by a later sweep). The set of
parked flags is therefore the sources drained within the last ``ttl`` seconds, and a sweep reads those
written since the previous one: at most one read per such source per ``interval``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from ..errors import Busy, TenantMoving, UnknownTenant
from ..files.pool import Handle

if TYPE_CHECKING:
    from ..front.store import Store
    from ..meta.pending import PendingWork
    from .delivery import Claim

__all__ = ["Sweeper", "SweepStats", "park_emptied", "park_ahead", "wake_parked_ahead", "SWEEP_INTERVAL", "PARK_TTL"]

log = logging.getLogger("shardlite.relay")

#: Seconds between two sweeps of the parked flags (the bound on a lost wake-up's delay).
SWEEP_INTERVAL = 5.0
#: Seconds a source stays parked and idle before its flag and marker are expired.
PARK_TTL = 300.0
#: Whether the outbox holds an event (a sweep's read).
_ANY = "SELECT EXISTS (SELECT 1 FROM _shardlite_outbox)"
#: Whether the outbox holds an event, and the file's parked-flag marker.
_STATE = ("SELECT EXISTS (SELECT 1 FROM _shardlite_outbox), parked_version FROM _shardlite_relay WHERE id = 1")
_SEEN_MAX = 1_000_000
_SET_MARKER = "UPDATE _shardlite_relay SET parked_version = ? WHERE id = 1"
_CLEAR_MARKER = "UPDATE _shardlite_relay SET parked_version = NULL WHERE id = 1 AND parked_version IS NOT NULL"


def park_emptied(store: Store, handle: Handle, source: str, marker: int | None) -> int | None:
    """In the relay's acknowledging transaction on ``source`` (its write lock held, the outbox found empty),
    with ``marker`` the version its file records: park the source's flag and record its version. Returns the
    version parked, or None (no flag, or it was flagged again meanwhile: it stays due, which costs one more
    look). The marker is written only after the park succeeded, and cleared when the flag could not be
    parked (it names no parked flag then)."""
    pending = store.meta.pending
    if marker is not None and pending.park(source, marker):
        return marker  # the usual case: the flag the file records, parked again (nothing to write here)
    flag = pending.row(source)
    if flag is not None and pending.park(source, flag.version):
        store.internal(handle, _SET_MARKER, (flag.version,))
        return flag.version
    if marker is not None:
        store.internal(handle, _CLEAR_MARKER)
    return None


def park_ahead(pending: PendingWork, claims: list[Claim], parked: dict[str, int], due_now: set[str]) -> dict[str, int]:
    """Park, in one metadata call, the flags of the sources whose acknowledgement is about to leave their
    outbox empty (everything ``claims`` read was delivered, not a whole batch) and whose file names a parked
    version not known to be parked still (``parked``: what this relay parked, unless ``due_now`` lists the
    source): ``{source: version}`` of those parked. The acknowledgement then needs no metadata call under the
    source's write lock, and makes the flag due again when it finds events left or fails (the rules:
    :mod:`shardlite.meta.pending`, parking ahead). A failure here parks nothing: each acknowledgement parks
    its own flag then, as without this step."""
    wanted = [(claim.source, claim.marker) for claim in claims
              if claim.marker is not None and not claim.full and claim.read == len(claim.delivered)
              and not claim.failed and not claim.dead and not claim.deferred and not claim.work.waiting
              and not claim.work.unhandled and (parked.get(claim.source) != claim.marker or claim.source in due_now)]
    if not wanted:
        return {}
    try:
        done = set(pending.park_many(wanted))
    except Exception as exc:  # noqa: BLE001 - each acknowledgement parks its own flag instead
        log.debug("relay: could not park %d flag(s) ahead (%s)", len(wanted), exc)
        return {}
    return {source: version for source, version in wanted if source in done}


def wake_parked_ahead(pending: PendingWork, pairs: list[tuple[str, int]]) -> bool:
    """Make due, in one metadata call, the flags parked ahead (``(source, version)``) whose acknowledgement
    left events (emitted after the pass read the outbox); a flag gone meanwhile is written again. False when
    the store could not be reached: those sources hold events under parked flags, what a sweep repairs."""
    try:
        missing = pending.wake_many(pairs)
        if missing:
            pending.flag_many([key for key, _ in missing])
    except Exception as exc:  # noqa: BLE001 - the caller asks for a sweep
        log.debug("relay: could not wake %d flag(s) parked ahead (%s)", len(pairs), exc)
        return False
    return True


class SweepStats:
    """What one sweep did."""

    __slots__ = ("looked", "woken", "expired")

    def __init__(self) -> None:
        self.looked = self.woken = self.expired = 0

    def __repr__(self) -> str:
        return f"<SweepStats looked={self.looked} woken={self.woken} expired={self.expired}>"


class Sweeper:
    """The sweep of one relay (see the module doc). ``due()`` says whether it is time; :meth:`request`
    asks for one at the next chance (a reconnect of the metadata)."""

    def __init__(self, store: Store, *, interval: float = SWEEP_INTERVAL, ttl: float = PARK_TTL,
                 page: int = 500, lock_wait_ms: int = 5) -> None:
        self.store = store
        self.interval = interval
        self.ttl = ttl
        self.page = page
        self.lock_wait_ms = lock_wait_ms
        self._next = 0.0  # monotonic time of the next sweep (0: at the first chance)
        #: per source, the signature of its files when a sweep last found its outbox empty
        self._seen: dict[str, tuple[int, ...]] = {}
        #: Totals over this sweeper's life (what ``status`` and tests read)
        self.woken = self.expired = 0

    def due(self) -> bool:
        return time.monotonic() >= self._next

    def request(self) -> None:
        """Sweep at the next chance (after a reconnect: wake-ups written meanwhile may be lost)."""
        self._next = 0.0

    def hint(self, key: str | None) -> None:
        """A metadata hint (see ``MetaStore.watch_tenants``): None follows every reconnect."""
        if key is None:
            self.request()

    def sweep(self, *, expire: bool = True) -> SweepStats:
        """Wake every parked source whose outbox holds events, and (``expire``) expire the sources parked and
        idle for ``ttl`` seconds. A source that cannot be read (moving, failing) is woken: the relay's passes
        deal with it. Errors of the metadata store
        propagate (the next chance sweeps again)."""
        self._next = 0.0  # until this one completes
        pending = self.store.meta.pending
        wakes = self.store.emitter.wakes
        stats = SweepStats()
        now = time.time()
        after = ""
        while True:
            rows = pending.parked(self.page, now, after)
            wake: list[tuple[str, int]] = []
            for row in rows:
                idle = expire and row.parked is not None and row.parked <= now - self.ttl
                if not idle and wakes is not None and wakes.queued(row.key):
                    continue  # its wake-up is queued here (held for this process's relay): not lost
                signature = self._signature(row.key)
                if signature is not None and not idle and self._seen.get(row.key) == signature:
                    continue  # not written since its outbox was found empty
                stats.looked += 1
                try:
                    state = self._read(row.key)
                except UnknownTenant:
                    pending.clear_many([(row.key, row.version)])  # a dropped source: nothing to deliver
                    self._seen.pop(row.key, None)
                    continue
                except Exception as exc:  # noqa: BLE001 - a pass looks at it and reports its trouble
                    log.debug("relay sweep: %r could not be read (%s); woken", row.key, exc)
                    wake.append((row.key, row.version))
                    continue
                if state and state[0][0]:
                    wake.append((row.key, row.version))
                    self._seen.pop(row.key, None)
                elif idle:
                    stats.expired += self._expire(row.key, row.version)
                    self._seen.pop(row.key, None)
                elif signature is not None:
                    if len(self._seen) >= _SEEN_MAX:
                        self._seen.clear()
                    self._seen[row.key] = signature
            if wake:
                pending.wake_many(wake)  # a flag gone or flagged again since is due or deleted: nothing to do
                stats.woken += len(wake)
            if len(rows) < self.page:
                break
            after = rows[-1].key
        self._next = time.monotonic() + self.interval
        self.woken += stats.woken
        self.expired += stats.expired
        if stats.woken:
            log.info("relay sweep: woke %d parked source(s) whose outbox held events (a lost wake-up)", stats.woken)
        return stats

    def _read(self, source: str) -> list[Any]:
        """Whether ``source``'s outbox holds an event: on its write connection (open already when it was written
        lately), without waiting for it; on a read connection when this process is using it."""
        try:
            return self.store.read_on_writer(source, _ANY, move_wait=0.0, wait_ms=0)
        except Busy:
            return self.store.read_internal(source, _ANY, move_wait=0.0)

    def _signature(self, source: str) -> tuple[int, ...] | None:
        """Size and modification time of ``source``'s file and log, when both last changed over a second ago
        (None: not known here, or changed lately). Every commit changes the log, and a checkpoint the file;
        file times tick coarsely, so a signature taken right after a change could miss the next one."""
        store = self.store
        try:
            record = store.resolve(source, create=False, revive=False)
            if record is None:
                return None
            path = store.path_of(record)
            main, log_ = os.stat(path), _stat(path + "-wal")
        except Exception:  # noqa: BLE001 - read it instead
            return None
        if max(main.st_mtime_ns, log_[1]) > time.time_ns() - 1_000_000_000:
            return None
        return (record.generation, main.st_size, main.st_mtime_ns, *log_)

    def _expire(self, source: str, version: int) -> int:
        """Clear ``source``'s marker (under its write lock, its outbox empty) and then its flag, if its version
        is still ``version``. 1 when expired; 0 when the source was busy, moving or held events (woken)."""
        store = self.store
        try:
            with store.writing(source, create=False, wait_ms=self.lock_wait_ms, move_wait=0) as handle:
                state: list[Any] = store.internal(handle, _STATE).fetchall()
                if state and state[0][0]:
                    held = True
                else:
                    held = False
                    store.internal(handle, _CLEAR_MARKER)
        except (Busy, TenantMoving, UnknownTenant) as exc:
            log.debug("relay sweep: %r not expired now (%s)", source, exc)
            return 0
        except Exception as exc:  # noqa: BLE001 - a failing source: a later sweep tries again
            log.debug("relay sweep: %r could not be expired (%s)", source, exc)
            return 0
        if held:
            store.meta.pending.wake_many([(source, version)])
            return 0
        store.meta.pending.clear_many([(source, version)])  # after the marker's commit: marker => flag
        return 1


def _stat(path: str) -> tuple[int, int]:
    try:
        found = os.stat(path)
    except FileNotFoundError:
        return (-1, -1)
    return (found.st_size, found.st_mtime_ns)
