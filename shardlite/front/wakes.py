"""Parked pending-work flags on the emit path: the check of a tenant file's marker, and the wake-ups that
follow the commits which relied on it (the rules: :mod:`shardlite.meta.pending`).

A relay that leaves a source's outbox empty parks its flag and records the parked version in the file
(``_shardlite_relay.parked_version``). An emitter that then finds the outbox empty reads that marker in its
own transaction: when it is set and :meth:`Wakes.verified` for this process, a flag exists, so the
transaction commits without writing one and the flag is woken afterwards (:meth:`Wakes.queue`): off the
caller's thread, batched, by a small flusher thread calling :meth:`~shardlite.meta.pending.PendingWork.wake_many`,
which may be non-durable. A wake-up can be lost (the process killed after its commit, a store that crashed
before writing it, a store unreachable until the process ends): the relays' sweep of parked flags wakes
every parked source whose outbox holds events (:mod:`shardlite.services.relay_sweep`), so such an event is
delivered late, never lost.

Held wake-ups. While a relay of this process runs and holds the source's lease (:attr:`Wakes.holder`), its
wake-up waits for that relay, at most :data:`HOLD_MAX` seconds: no other relay can claim the source before
the lease ends, and the relay passes over every source with a queued wake-up at once (:meth:`Wakes.keys`).
When its pass leaves the outbox empty it settles the wake-up (:meth:`Wakes.settled`), which is then never
written, and the flag was never un-parked, so the relay need not park it again either (it still parks it when
a wake-up of it was written here since, :attr:`Wakes.written`, or the index lists it as due). A held wake-up is
a late one, never a lost one: it is written after :data:`HOLD_MAX`, when the relay stops, and by
:meth:`Wakes.flush`; a process killed meanwhile loses it like any queued wake-up (the sweep repairs that).

Verified. A marker is trusted once per ``(key, generation, version)`` per process, after one read of the
metadata found a flag with that version: a file restored or imported by hand, or copied from another root or
from an older backup, may carry a marker whose flag is not there (a restore or an import through shardlite
also clears the marker). A marker that does not check out, or a check that fails, takes the durable path:
the flag is written before the commit, as when there is no marker. A wake-up whose flag turns out gone
anyway (deleted behind this process's back) writes the flag with ``flag_many`` at once.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable

from ..errors import MetaUnavailable
from ..files.engine import on_fork_in_child
from ..meta.pending import PendingWork

__all__ = ["Wakes", "WAKE_DELAY", "HOLD_MAX"]

log = logging.getLogger("shardlite.relay")

#: How long the flusher waits after the first queued wake-up before it writes the batch: more wake-ups share
#: one write, and one whose source an in-process relay has settled meanwhile is dropped (see
#: :meth:`Wakes.settled`). Relays in other processes poll every ``poll_interval`` anyway.
WAKE_DELAY = 0.005
#: The longest a wake-up of a source whose lease an in-process relay holds waits for that relay (see the
#: module doc: held wake-ups): the sweep's interval, so a held wake-up is never later than a lost one.
HOLD_MAX = 5.0
#: Pause after a failed write of wake-ups, doubling up to :data:`_RETRY_CAP`.
_RETRY_BASE = 0.05
_RETRY_CAP = 2.0
_VERIFIED_MAX = 65536


class Wakes:
    """The parked-flag side of one store's emitter: verified markers and queued wake-ups. Thread-safe."""

    def __init__(self, pending: PendingWork, *, delay: float = WAKE_DELAY) -> None:
        self._pending = pending
        self.delay = delay
        self._verified: set[tuple[str, int, int]] = set()
        self._lock = threading.Lock()
        self._queued: dict[str, tuple[int, int, float]] = {}  # key -> (version, ticket, monotonic time queued)
        self._writing: set[str] = set()  # keys whose wake-up the flusher is writing now
        self._ticket = 0
        #: When the flusher next wakes by itself for a held wake-up (monotonic; None: only when signalled)
        self._until: float | None = None
        self._event = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        _all.add(self)
        #: Test hook: called with ``"queued"`` after a wake-up is queued (in the committing thread): a crash
        #: test kills the process there, or raises to drop it.
        self.fault: Callable[[str], None] | None = None
        #: The last error of a write of wake-ups (None once one succeeds).
        self.error: BaseException | None = None
        #: Set by a running in-process relay: True for a source whose lease it holds, whose wake-up then waits
        #: for that relay's pass, at most :data:`HOLD_MAX` (module doc). None: every wake-up is written soon.
        self.holder: Callable[[str], bool] | None = None
        #: Called with the keys of every batch of wake-ups written (the relay forgets that it parked them).
        self.written: list[Callable[[list[str]], None]] = []

    # -- the marker ----------------------------------------------------------------------------------------

    def verified(self, key: str, generation: int, version: int, *, skip_check: bool = False) -> bool:
        """True when the marker ``version`` in ``key``'s file (of ``generation``) names a flag that exists:
        known from before, or read now (one read of the metadata). ``skip_check``: do not read now (the store
        was found unreachable lately: the durable path then says so). :class:`~shardlite.MetaUnavailable`
        propagates (the durable path could not write the flag either); any other failure of the read is a
        False."""
        ident = (key, generation, version)
        if ident in self._verified:
            return True
        if skip_check:
            return False
        try:
            row = self._pending.row(key)
        except MetaUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 - the durable path writes the flag, or raises the store's error
            log.debug("shardlite: could not check the parked flag of %r (%s)", key, exc)
            return False
        if row is None or row.version != version:
            return False
        if len(self._verified) >= _VERIFIED_MAX:
            self._verified.clear()
        self._verified.add(ident)
        return True

    # -- wake-ups ------------------------------------------------------------------------------------------

    def queue(self, key: str, version: int) -> None:
        """``key`` committed its first events after its flag (``version``) was parked: wake it soon.

        A wake-up the in-process relay holds (:attr:`holder`) does not signal the flusher when it is already
        timed to wake for an earlier held one: this one's hold ends no sooner (a source's first queuing time
        stays), and the flusher looks at every queued wake-up whenever it wakes. Otherwise every emit on a
        parked source would make the flusher scan the held ones again, for nothing."""
        holder = self.holder
        with self._lock:
            self._ticket += 1
            earlier = self._queued.get(key)  # held since the first one: a busy source is held no longer
            self._queued[key] = (version, self._ticket, time.monotonic() if earlier is None else earlier[2])
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._run, name="shardlite-wakes", daemon=True)
                self._thread.start()
                atexit.register(_flush_at_exit, weakref.ref(self))  # a process that ends without close()
            quiet = self._until is not None and holder is not None and holder(key)
        if not quiet:
            self._event.set()
        if self.fault is not None:
            self.fault("queued")

    def ticket(self) -> int:
        """The current ticket: a relay takes one under a source's write lock, with the outbox empty."""
        with self._lock:
            return self._ticket

    def settled(self, key: str, ticket: int) -> None:
        """An in-process relay parked ``key``'s flag with the outbox empty, under the source's write lock
        held when :meth:`ticket` returned ``ticket``, and committed: every wake-up of ``key`` queued before
        that ticket is moot (its events were delivered; the flag is parked again)."""
        with self._lock:
            queued = self._queued.get(key)
            if queued is not None and queued[1] <= ticket:
                del self._queued[key]

    def keys(self) -> set[str]:
        """The sources whose wake-up is queued or being written: an in-process relay passes over them at
        once (and settles them), whatever their flag says yet."""
        with self._lock:
            return set(self._queued) | self._writing

    def queued(self, key: str) -> bool:
        """Whether a wake-up of ``key`` is queued here and not being written."""
        with self._lock:
            return key in self._queued

    def release(self) -> None:
        """The holding relay stops: write the held wake-ups soon (see :attr:`holder`)."""
        self.holder = None
        self._event.set()

    def _take(self, force: bool = False) -> tuple[list[tuple[str, int, int]], float | None]:
        """The queued wake-ups to write now: ``(key, version, ticket)``, in key order (the flaggers' lock
        order), and the monotonic time when the first one held back stops being held (None: none is).
        ``force``: all of them, held or not."""
        holder = None if force else self.holder
        until: float | None = None
        with self._lock:
            if holder is None:
                taken, self._queued = self._queued, {}
            else:
                now = time.monotonic()
                taken, kept = {}, {}
                for key, entry in self._queued.items():
                    if entry[2] > now - HOLD_MAX and holder(key):
                        kept[key] = entry
                        until = entry[2] + HOLD_MAX if until is None else min(until, entry[2] + HOLD_MAX)
                    else:
                        taken[key] = entry
                self._queued = kept
            if not force:
                self._until = until  # the flusher's own timer (see queue)
            self._writing |= set(taken)
        return sorted((key, version, ticket) for key, (version, ticket, _) in taken.items()), until

    def _done(self, taken: list[tuple[str, int, int]]) -> None:
        with self._lock:
            self._writing -= {key for key, _, _ in taken}

    def flush(self) -> None:
        """Write every queued wake-up now, on the caller's thread (``relay.drain()``, closing); errors
        propagate and the wake-ups stay queued."""
        taken, _ = self._take(force=True)
        if taken:
            try:
                self._write(taken)
            except BaseException:
                self._requeue(taken)
                raise
            finally:
                self._done(taken)

    def _write(self, taken: list[tuple[str, int, int]]) -> None:
        missing = self._pending.wake_many([(key, version) for key, version, _ in taken])
        if missing:  # the flag is gone (deleted behind this process's back): write it now
            keys = sorted({key for key, _ in missing})
            with self._lock:
                self._verified = {ident for ident in self._verified if ident[0] not in keys}
            self._pending.flag_many(keys)
            log.warning("shardlite: the parked pending-work flags of %d source(s) were gone (e.g. %r); written "
                        "again", len(keys), keys[0])
        self.error = None
        for listener in list(self.written):
            listener([key for key, _, _ in taken])

    def _requeue(self, taken: list[tuple[str, int, int]]) -> None:
        with self._lock:
            now = time.monotonic() - HOLD_MAX  # written as soon as it can be, never held again
            for key, version, ticket in taken:
                if key not in self._queued:  # a newer wake-up of the key supersedes this one
                    self._queued[key] = (version, ticket, now)

    def _run(self) -> None:
        pause = _RETRY_BASE
        until: float | None = None  # when the first held wake-up is due (None: none is held)
        while True:
            self._event.wait(None if until is None else max(until - time.monotonic(), 0.0))
            if self._closed:
                return
            time.sleep(self.delay)
            self._event.clear()
            taken, until = self._take()
            if not taken:
                continue
            try:
                self._write(taken)
                pause = _RETRY_BASE
            except Exception as exc:  # noqa: BLE001 - kept queued and tried again; the relays' sweep is the backstop
                self.error = exc
                self._requeue(taken)
                self._done(taken)
                log.warning("shardlite: could not wake %d parked pending-work flag(s) (%s); trying again in "
                            "%.2f s", len(taken), exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, _RETRY_CAP)
                self._event.set()
                continue
            self._done(taken)

    def pending_count(self) -> int:
        with self._lock:
            return len(self._queued)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (best effort, bounded by the store's own timeouts) and stop the flusher."""
        if self._closed:
            return
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the relays' sweep delivers those events later
            log.warning("shardlite: %d parked pending-work flag(s) not woken at close (%s); the relay's sweep "
                        "finds their events", self.pending_count(), exc)
        self._closed = True
        self._event.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def after_fork(self) -> None:
        """In a forked child: the parent's queue and thread are not ours (its wake-ups are its own)."""
        self._lock = threading.Lock()
        self._queued, self._writing = {}, set()
        self._until = None
        self._event = threading.Event()
        self._thread = None
        self.holder = None  # the parent's relay thread is not running here


_all: weakref.WeakSet[Wakes] = weakref.WeakSet()


def _after_fork() -> None:
    for wakes in list(_all):
        wakes.after_fork()


on_fork_in_child(_after_fork)


def _flush_at_exit(ref: weakref.ref[Wakes]) -> None:
    wakes = ref()
    if wakes is not None and not wakes._closed:
        try:
            wakes.flush()
        except Exception:  # noqa: BLE001 - the relays' sweep finds those events
            pass
