"""Change hints across processes: :class:`Listener` keeps one connection LISTENing and hands each NOTIFY to
the store's caches.

A cache fed by hints must survive lost hints: PostgreSQL's NOTIFY is not durable (a notification sent while
this connection was down is gone), so after every (re)connect :class:`Listener` calls ``on_reset``, and the
owner re-reads or drops whatever it caches. ``on_reset`` runs after the LISTEN commands, so a change made
after it is always hinted. Until the first connect, and while it is down, :attr:`Listener.connected` is
false: a cache that promises freshness must then not trust itself beyond what it can check.

Written by hand over psycopg's ``Connection.notifies``: the pool cannot hold a listening connection, and no
library does reconnect-and-reset for us.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import psycopg
from psycopg import sql

__all__ = ["Listener"]

log = logging.getLogger("shardlite.meta")

#: Seconds between checks of the stop flag while no notification comes (bounds :meth:`Listener.close`).
POLL = 0.25
#: Reconnect pauses double from FIRST up to CAP.
FIRST, CAP = 0.05, 2.0


class Listener:
    """LISTEN on ``channels`` of the database at ``dsn`` on a daemon thread (``where`` is the printable
    location, for logs). ``on_notify(channel, payload)`` runs for each notification and ``on_reset()`` after
    each connect, both on that thread; an exception from either is logged and does not stop it."""

    def __init__(self, dsn: str, where: str, channels: Sequence[str],
                 on_notify: Callable[[str, str], None], on_reset: Callable[[], None]) -> None:
        self._dsn = dsn
        self._where = where
        self._channels = tuple(channels)
        self._on_notify = on_notify
        self._on_reset = on_reset
        self._stop = threading.Event()
        self._connected = threading.Event()
        #: Connects so far, counted before :attr:`connected` turns true (see :attr:`connects`).
        self._connects = 0
        self._thread = threading.Thread(target=self._run, name="shardlite-meta-listen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def connected(self) -> bool:
        """True while the connection is up and listening (every hint since the last reset arrives)."""
        return self._connected.is_set()

    @property
    def connects(self) -> int:
        """How many times the connection came up. It grows before :attr:`connected` turns true, so a
        reader that sees :attr:`connected` and then reads this tells a connection from the one before it
        (hints may have been lost between them) even before ``on_reset`` has run."""
        return self._connects

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def close(self) -> None:
        """Stop listening; returns once the thread ended (within about :data:`POLL` seconds, or the connect
        timeout when it is connecting)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        pause = FIRST
        failures = 0
        while not self._stop.is_set():
            try:
                with psycopg.connect(self._dsn, autocommit=True, connect_timeout=5, keepalives=1,
                                     keepalives_idle=5, keepalives_interval=2, keepalives_count=2,
                                     application_name="shardlite-listen") as conn:
                    for channel in self._channels:
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    self._connects += 1
                    self._connected.set()
                    self._call(self._on_reset)
                    pause, failures = FIRST, 0
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=POLL):
                            self._call(self._on_notify, note.channel, note.payload)
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect
                failures += 1
                if failures in (1, 10) or failures % 100 == 0:
                    log.warning("shardlite: change hints from %s interrupted (%s); reconnecting", self._where,
                                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
            finally:
                self._connected.clear()
            self._stop.wait(pause)
            pause = min(pause * 2, CAP)

    def _call(self, fn: Callable[..., None], *args: str) -> None:
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a cache's bug must not stop the hints for every other cache
            log.exception("shardlite: a change-hint handler failed")
