"""A bounded pool of open tenant connections (``max_open``), shared by the threads of one process.

Each open connection is a :class:`Handle`. A handle is used by one thread at a time (one thread's
transaction never interleaves with another's); the same thread may re-enter it (nested transactions,
reads inside its own transaction). Eviction is second-chance ("clock") over insertion order, so a hit
costs one attribute store instead of reordering a dict; only handles nobody holds are closed.

Roles: ``"w"`` handles carry write transactions; ``"r"`` handles serve ``router.query`` and run with
``PRAGMA query_only``, so a read can never write nor see another thread's uncommitted transaction.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from time import monotonic as _monotonic
from typing import Any

import apsw

from ..errors import Busy
from .authorizer import Guard
from .checkpoints import WalWatch

__all__ = ["Handle", "HandlePool"]


class Handle:
    """One open connection to one generation of one tenant's file."""

    __slots__ = ("key", "role", "conn", "cur", "guard", "path", "generation", "incarnation", "checked_dv",
                 "lock", "owner", "depth", "used", "closed", "aliases", "savepoints", "emitted", "needs_flag",
                 "wake_version", "spare", "given", "wal", "calls", "started", "limit", "max_calls", "__weakref__")

    def __init__(self, key: str, role: str, conn: apsw.Connection, guard: Guard, path: str,
                 generation: int, incarnation: str) -> None:
        self.key, self.role, self.conn, self.guard, self.path = key, role, conn, guard, path
        #: one cursor reused for every statement whose rows are consumed at once (transaction control,
        #: the fence check, savepoints, ``query``): ``conn.execute`` makes a new cursor per call, which
        #: costs about 0.4 µs, a third of a cheap statement. APSW refuses re-entrant use of a cursor.
        self.cur = conn.cursor()
        #: the cursor the next statement of a transaction runs on, unless its caller still holds it (see
        #: ``Transaction.execute``)
        self.spare = conn.cursor()
        #: cursors the open transaction handed to its caller besides the spare one (closed when it ends)
        self.given: list[apsw.Cursor] = []
        self.generation, self.incarnation = generation, incarnation
        #: ``data_version`` at which the file was last seen not retired (see Store.check_fence).
        self.checked_dv = -1
        self.lock = threading.Lock()
        self.owner: int | None = None
        self.depth = 0
        self.used = True
        self.closed = False
        self.aliases: list[Any] = []
        self.savepoints = 0
        #: set by ``tx.emit`` in the open transaction; the committer wakes relays and clears it
        self.emitted = False
        #: ``tx.emit`` queued the tenant's pending-work flag (in the thread of this id; 0: not): the committer
        #: makes sure it is written before the COMMIT
        self.needs_flag = 0
        #: the parked flag's version a transaction relied on instead of writing the flag (woken after COMMIT)
        self.wake_version: int | None = None
        #: the WAL hook of a write connection whose checkpoints a Checkpointer schedules (else None)
        self.wal: WalWatch | None = None
        # The statement clock (see progress): calls of the progress handler since the statement began
        # (whoever starts a statement sets it to 0), when the first came, the limit in seconds and, for a
        # read on the event loop, in calls (0: none).
        self.calls = 0
        self.started = 0.0
        self.limit = float("inf")
        self.max_calls = 0

    def progress(self) -> bool:
        """SQLite's progress handler for this connection (every N virtual-machine steps): True interrupts the
        running statement once it has run past ``limit`` seconds (or ``max_calls`` calls) since the first
        call after it began. The first call can come up to N steps into the statement (SQLite counts
        steps across runs of a cached statement), so the clock starts there."""
        calls = self.calls + 1
        self.calls = calls
        now = _monotonic()
        if calls == 1:
            self.started = now
            return False
        return now - self.started > self.limit or 0 < self.max_calls < calls

    def enter(self, timeout: float = -1) -> bool:
        """Take exclusive use for this thread (re-entrant). False on timeout."""
        me = threading.get_ident()
        if self.owner == me:
            self.depth += 1
            return True
        if not self.lock.acquire(timeout=timeout):
            return False
        self.owner = me
        self.depth = 1
        return True

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.owner = None
            self.lock.release()

    def __repr__(self) -> str:
        return f"<Handle {self.key!r} {self.role} gen={self.generation}{' closed' if self.closed else ''}>"


class HandlePool:
    """Open handles by ``(key, role)``, at most ``max_open`` of them."""

    def __init__(self, max_open: int, wait_timeout: float) -> None:
        self.max_open = max_open
        self.wait_timeout = wait_timeout
        self._handles: OrderedDict[tuple[str, str], Handle] = OrderedDict()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        #: threads waiting in :meth:`add` for a handle to become idle
        self.waiting = 0

    def __len__(self) -> int:
        return len(self._handles)

    def get(self, key: str, role: str) -> Handle | None:
        handle = self._handles.get((key, role))
        if handle is not None:
            handle.used = True
        return handle

    def add(self, handle: Handle) -> Handle:
        """Insert ``handle``; if one for the same key and role appeared meanwhile, keep that one and close
        ``handle`` (returning the kept one). Evicts idle handles to stay within ``max_open``."""
        victims: list[Handle] = []
        deadline = time.monotonic() + self.wait_timeout
        with self._lock:
            existing = self._handles.get((handle.key, handle.role))
            if existing is not None and existing.generation == handle.generation:
                victims.append(handle)
                kept = existing
            else:
                if existing is not None:
                    self._handles.pop((handle.key, handle.role))
                while len(self._handles) >= self.max_open:
                    victim = self._pick_victim()
                    if victim is None:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            handle.closed = True
                            handle.conn.close()
                            raise Busy(f"all {self.max_open} tenant connections (max_open) stayed in use")
                        self.waiting += 1
                        try:
                            # Short slices: a release that read ``waiting`` just before we raised it
                            # (without the lock) cannot strand us until the deadline.
                            self._freed.wait(min(left, 0.05))
                        finally:
                            self.waiting -= 1
                        continue
                    victims.append(victim)
                self._handles[(handle.key, handle.role)] = handle
                kept = handle
        for victim in victims:
            self._close_locked_victim(victim, already_locked=victim is not handle)
        return kept

    def _pick_victim(self) -> Handle | None:
        """Second-chance scan; the returned handle is removed and its lock is held by us."""
        for _ in range(2 * len(self._handles) + 1):
            if not self._handles:
                return None
            slot, handle = next(iter(self._handles.items()))
            if handle.used:
                handle.used = False
                self._handles.move_to_end(slot)
                continue
            if handle.owner is None and handle.lock.acquire(blocking=False):
                del self._handles[slot]
                return handle
            self._handles.move_to_end(slot)
        return None

    def _close_locked_victim(self, victim: Handle, *, already_locked: bool) -> None:
        victim.closed = True
        try:
            victim.conn.close()
        finally:
            if already_locked:
                victim.lock.release()

    def discard(self, handle: Handle) -> None:
        """Remove and close ``handle``; the caller holds it (entered)."""
        with self._lock:
            if self._handles.get((handle.key, handle.role)) is handle:
                del self._handles[(handle.key, handle.role)]
            self._freed.notify_all()
        handle.closed = True
        handle.conn.close()

    def released(self) -> None:
        """Tell waiters a handle became idle."""
        with self._lock:
            self._freed.notify_all()

    def handles(self) -> list[Handle]:
        with self._lock:
            return list(self._handles.values())

    def close_all(self) -> list[Handle]:
        """Close every idle handle; return those still held by someone (left open)."""
        busy = []
        with self._lock:
            for slot, handle in list(self._handles.items()):
                if handle.owner is None and handle.lock.acquire(blocking=False):
                    del self._handles[slot]
                    handle.closed = True
                    handle.conn.close()
                    handle.lock.release()
                else:
                    busy.append(handle)
        return busy

    def abandon(self) -> None:
        """After fork in a child: forget every handle without closing it (engine keeps them alive)."""
        self._handles = OrderedDict()
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
