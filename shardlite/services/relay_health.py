"""How the relay keeps one tenant's trouble to that tenant, and how it reports errors (rules: failures stay in their
tenant and waits are bounded).

* :class:`Troubles`: per tenant, how many times in a row it failed (or was unavailable), the last error's
  text, and the time before which it is not tried again. The relay keeps two: *failing* tenants (an error
  while claiming, reading, delivering to or acknowledging one; a failing source backs off, a failing
  destination's events count failed attempts) and *unavailable* ones (being moved, or locked by another
  writer: retried soon, nothing counted). They live in the relay's memory: another relay process keeps its
  own, and a source's backoff also moves its pending flag's due time (seen by every relay).
* :class:`PassStats`: what a pass (or a drain) did, what it held back and until when.
* :class:`ErrorLog`: one log line per error, naming the tenant (and its file, see :func:`describe`) and the
  cause, without a traceback; at most one line per ``interval`` seconds for each *kind* of error (its role
  and cause, whatever the tenant), saying how many like it were suppressed meanwhile and on how many
  tenants. A full disk that fails every destination of a node logs a line per interval, not one per
  pass. The newest error is kept for ``status()`` (:attr:`ErrorLog.last`), and each logged line is handed
  to ``on_logged`` (the relay records it in the global DB, where ``shardlite relay status`` finds it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import StorageError

__all__ = ["PassStats", "Trouble", "Troubles", "ErrorLog", "describe", "error_text", "LOG_INTERVAL"]

#: Seconds between two log lines for the same kind of error.
LOG_INTERVAL = 30.0
#: Bounds on what is remembered, so that a root with millions of failing tenants cannot grow the relay.
_MAX_TROUBLES = 100_000
_MAX_KINDS = 1_000
_MAX_TENANTS_PER_KIND = 1_000


@dataclass
class PassStats:
    """What one pass (or a drain, summed) did. ``progressed``: something was delivered, failed or died."""

    delivered: int = 0
    failed: int = 0  # failed attempts (a handler, or its destination as a whole)
    dead: int = 0
    unhandled: int = 0
    waiting: int = 0
    skipped: int = 0  # sources claimed by another relay
    sources: int = 0
    deferred: int = 0  # events held back because their destination was unavailable (nothing counted)
    tenant_errors: int = 0  # sources and destinations that failed as a whole
    unhandled_topics: set[str] = field(default_factory=set)
    failing: set[str] = field(default_factory=set)  # those tenants, and the sources still backing off
    next_retry: float | None = None  # earliest time something held back (a retry delay, a tenant) is due
    claimed_until: float | None = None  # latest lease of another relay that kept a source from us

    @property
    def progressed(self) -> bool:
        return self.delivered + self.failed + self.dead > 0

    def retry_at(self, when: float) -> None:
        """Something held back becomes due at ``when``."""
        if self.next_retry is None or when < self.next_retry:
            self.next_retry = when

    def add(self, other: PassStats) -> None:
        for name in ("delivered", "failed", "dead", "unhandled", "waiting", "skipped", "sources", "deferred",
                     "tenant_errors"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.unhandled_topics |= other.unhandled_topics
        self.failing |= other.failing
        for name, pick in (("next_retry", min), ("claimed_until", max)):
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, theirs if mine is None else mine if theirs is None else pick(mine, theirs))


def error_text(exc: BaseException) -> str:
    """``"Type: message"``, at most 2,000 characters (what dead letters and logs carry); a shardlite
    storage error also shows SQLite's error behind it (``StorageFull: ... (FullError: database or disk is
    full)``)."""
    cause = exc.__cause__
    behind = f" ({type(cause).__name__}: {cause})" if isinstance(exc, StorageError) and cause is not None else ""
    return f"{type(exc).__name__}: {exc}{behind}"[:2000]


def error_kind(exc: BaseException) -> str:
    """What groups repeated errors in the log: the error's class and, for a storage error (whose message
    names the tenant and file), SQLite's error behind it; otherwise the whole text."""
    cause = exc.__cause__
    if isinstance(exc, StorageError):
        return f"{type(exc).__name__}: {type(cause).__name__}: {cause}" if cause is not None else type(exc).__name__
    return error_text(exc)


def describe(role: str, key: str, exc: BaseException, path: str | None = None) -> str:
    """``"destination 'user:bob' (/data/n1/..../file): FullError: database or disk is full"``."""
    where = f" ({path})" if path else ""
    return f"{role} {key!r}{where}: {error_text(exc)}"


@dataclass
class Trouble:
    """One tenant's trouble: ``tries`` in a row, the last ``error``, first seen at ``since``; not tried
    again before ``until`` (wall clock)."""

    role: str
    error: str
    tries: int
    since: float
    until: float
    cause: str = ""  # the last error's type name

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"role": self.role, "error": self.error, "tries": self.tries, "since": self.since,
                "retry_in": max(0.0, self.until - now)}


class Troubles:
    """Tenants in trouble, by key. ``add`` counts one more try and sets the next time to try."""

    def __init__(self) -> None:
        self._entries: dict[str, Trouble] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def get(self, key: str) -> Trouble | None:
        return self._entries.get(key)

    def add(self, key: str, role: str, exc: BaseException, error: str, now: float,
            delay: Callable[[int], float]) -> Trouble:
        """One more failed try of ``key`` (``exc``, described by ``error``): it is not tried again for
        ``delay(tries)`` seconds."""
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= _MAX_TROUBLES:
                self._entries.pop(next(iter(self._entries)))  # the oldest: it is tried again at once
            entry = self._entries[key] = Trouble(role, error, 0, now, now)
        entry.tries += 1
        entry.role, entry.error, entry.cause = role, error, type(exc).__name__
        entry.until = now + delay(entry.tries)
        return entry

    def clear(self, key: str) -> None:
        """``key`` worked again."""
        self._entries.pop(key, None)

    def waiting(self, key: str, now: float) -> Trouble | None:
        """The entry of ``key`` if it must not be tried before a later time, else None."""
        entry = self._entries.get(key)
        return entry if entry is not None and entry.until > now else None

    def snapshot(self, now: float) -> dict[str, dict[str, Any]]:
        return {key: entry.as_dict(now) for key, entry in list(self._entries.items())}

    def forget_before(self, when: float) -> None:
        """Forget the tenants whose last try was due before ``when`` (not heard of since)."""
        for key, entry in list(self._entries.items()):
            if entry.until < when:
                self._entries.pop(key, None)


@dataclass
class _Kind:
    logged_at: float  # monotonic time of the last line logged for this kind
    last_text: str
    last_tenant: str | None
    suppressed: int = 0
    tenants: set[str] = field(default_factory=set)


class ErrorLog:
    """Rate-limited error lines (see the module doc). Not thread-safe by itself: the relay reports from
    one pass at a time; ``last`` may be read from any thread."""

    def __init__(self, logger: logging.Logger, *, interval: float = LOG_INTERVAL,
                 on_logged: Callable[[dict[str, Any]], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.interval = interval
        self.on_logged = on_logged
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        #: the newest error reported (logged or suppressed): ``{"at", "tenant", "error"}``
        self.last: dict[str, Any] | None = None
        #: how many errors were reported, and how many of them logged
        self.reported = 0
        self.logged = 0

    def report(self, text: str, *, kind: str, tenant: str | None = None,
               exc_info: BaseException | None = None) -> None:
        """Report one error. ``text`` names the tenant and the cause; ``kind`` is what makes two errors
        "the same" (the cause without the tenant); ``exc_info`` adds a traceback to the lines that are
        logged (for errors that are not about one tenant, which may be shardlite's own bugs)."""
        now = self.clock()
        self.reported += 1
        self.last = {"at": time.time(), "tenant": tenant, "error": text}
        entry = self._kinds.get(kind)
        if entry is not None and now - entry.logged_at < self.interval:
            entry.suppressed += 1
            entry.last_text, entry.last_tenant = text, tenant
            if tenant is not None and len(entry.tenants) < _MAX_TENANTS_PER_KIND:
                entry.tenants.add(tenant)
            return
        if entry is None and len(self._kinds) >= _MAX_KINDS:
            self._kinds.pop(next(iter(self._kinds)))
        note = self._suppressed_note(entry, now) if entry is not None else ""
        self._kinds[kind] = _Kind(now, text, tenant)
        self._log(text + note, tenant, exc_info)

    def flush(self) -> None:
        """Log what was suppressed since each kind's last line (at the end of a drain, on stop)."""
        now = self.clock()
        for kind, entry in list(self._kinds.items()):
            if entry.suppressed:
                text = entry.last_text + self._suppressed_note(entry, now)
                self._kinds[kind] = _Kind(now, entry.last_text, entry.last_tenant)
                self._log(text, entry.last_tenant, None)

    def _suppressed_note(self, entry: _Kind, now: float) -> str:
        if not entry.suppressed:
            return ""
        tenants = len(entry.tenants)
        on = f", on {tenants}{'+' if tenants >= _MAX_TENANTS_PER_KIND else ''} tenants" if tenants > 1 else ""
        return (f" [{entry.suppressed} more like it suppressed in the last {now - entry.logged_at:.0f} s{on}]")

    def _log(self, text: str, tenant: str | None, exc_info: BaseException | None) -> None:
        self.logged += 1
        self.logger.warning("relay: %s", text, exc_info=exc_info)
        if self.on_logged is not None:
            try:
                self.on_logged({"at": time.time(), "tenant": tenant, "error": text})
            except Exception as exc:  # noqa: BLE001 - recording the error must not raise one
                self.logger.warning("relay: could not record the last error (%s)", error_text(exc))
