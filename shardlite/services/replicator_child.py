"""The replicator of a single-process app: ``shardlite replicate run`` as a child process the router starts and
stops (``Router(root, replicate=URL, replicator=True)``, the same on ``AsyncRouter``).

Captures must run in a process that owns every SQLite connection of the files it captures (docs/replication.md,
"the -shm trap"), so the router never captures beside its own pool: it runs the replicator as a child process.

Rules:

- The child is ``python -P -m shardlite --root ROOT replicate run --parent PID`` with this interpreter and this
  copy of shardlite. It never outlives the app: it exits when ``os.getppid()`` is no longer ``PID`` (checked at
  start and every round), and on Linux the kernel also tells it at once (``PR_SET_PDEATHSIG``).
- Its stderr is the app's stderr (the replicator's warnings are the app's to see); its stdout and stdin are
  ``/dev/null``. It ignores SIGINT (a Ctrl-C in the app's terminal is the app's to handle): SIGTERM stops it.
- :meth:`ReplicatorChild.stop` (the router's ``close()``, its garbage collection, interpreter exit) sends SIGTERM;
  the child runs one last round (so the writes committed before ``close()`` are shipped) and exits; past
  :data:`STOP_WAIT` seconds it is killed (SIGKILL), which a replicator survives by design (the next one resumes).
- Only the process that started the child stops it: a forked copy of the app (``multiprocessing`` with fork)
  inherits this object but never signals or waits for the child.
- A child that exits without being asked to is logged once (a warning with its exit status) and started again
  after a back-off (1 s, doubling, at most :data:`MAX_DELAY`). After :data:`MAX_CRASHES` exits in a row that
  each came less than :data:`STEADY` seconds after their start, the router gives up and logs an error: the app
  goes on writing (logs grow) until ``shardlite replicate run`` runs by other means.
- Several app processes on one root each start a child; one child owns each node (``flock``), the others wait as
  standbys and take over when it stops (:mod:`shardlite.services.replication`).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import site
import subprocess
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING

from ..errors import ConfigurationError

if TYPE_CHECKING:
    from ..front.store import Store

__all__ = ["ReplicatorChild", "STOP_WAIT", "MAX_DELAY", "MAX_CRASHES", "STEADY", "set_parent_death_signal",
           "start_replicator"]

log = logging.getLogger("shardlite.replicator")

#: Seconds ``stop()`` waits for the child after SIGTERM (its last round included) before SIGKILL.
STOP_WAIT = 10.0
#: The longest pause before a crashed child is started again.
MAX_DELAY = 60.0
#: Exits in a row, each within STEADY seconds of its start, after which the router stops restarting the child.
MAX_CRASHES = 8
#: A child that ran this long before exiting was steady: the back-off starts over.
STEADY = 60.0

_live: weakref.WeakSet[ReplicatorChild] = weakref.WeakSet()


def _package_path() -> list[str]:
    """PYTHONPATH entries that give the child this process's copy of shardlite: the directory it was imported
    from, unless that is a site-packages directory (which the child's interpreter finds by itself; putting it
    on PYTHONPATH would put every installed package before the standard library)."""
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sites = {os.path.abspath(p) for p in [*site.getsitepackages(), site.getusersitepackages()]}
    return [] if parent in sites else [parent]


class ReplicatorChild:
    """``shardlite replicate run`` for ``root`` as a child process of this one (module docstring)."""

    def __init__(self, root: str, *, interval: float | None = None, stop_wait: float = STOP_WAIT) -> None:
        if not sys.executable:
            raise ConfigurationError("replicator=True needs sys.executable to start `shardlite replicate run`; "
                                     "run `shardlite replicate run --root ROOT` as a process of its own instead")
        self.root = os.path.abspath(root)
        self.interval = interval
        self.stop_wait = stop_wait
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._thread: threading.Thread | None = None
        #: Exits of the child nobody asked for (each logged once), and whether the router gave up restarting it.
        self.crashes = 0
        self.gave_up = False

    # -- starting --------------------------------------------------------------------------------------

    def command(self) -> list[str]:
        argv = [sys.executable, "-P", "-m", "shardlite", "--root", self.root, "replicate", "run",
                "--parent", str(self._owner)]
        if self.interval is not None:
            argv += ["--interval", repr(float(self.interval))]
        return argv

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        extra = _package_path()
        if extra:
            env["PYTHONPATH"] = os.pathsep.join(extra + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        # SIGTERM stays blocked in the child (a blocked signal mask survives exec) until its handler is in place,
        # so a stop() right after the start still ends with the last round instead of a death by signal.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=None,
                                    env=env, close_fds=True)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        self._started_at = time.monotonic()
        return proc

    def start(self) -> None:
        """Start the child and the thread that watches it. Once."""
        with self._lock:
            if self._proc is not None:
                return
            self._proc = self._spawn()
        _live.add(self)
        self._thread = threading.Thread(target=self._watch, name="shardlite-replicator", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        """The running child's process id (None before start, once stopped, or after giving up)."""
        proc = self._proc
        return None if proc is None or proc.returncode is not None else proc.pid

    # -- watching --------------------------------------------------------------------------------------

    def _watch(self) -> None:
        in_a_row = 0
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.wait()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - self._started_at
            in_a_row = 1 if ran >= STEADY else in_a_row + 1
            self.crashes += 1
            if in_a_row >= MAX_CRASHES:
                self.gave_up = True
                log.error("replicator for %s (pid %d) exited with status %s, its %d-th exit in a row within %.0f s of "
                          "its start: not restarting it; the app's writes are not replicated until `shardlite "
                          "replicate run --root %s` runs", self.root, proc.pid, code, in_a_row, STEADY, self.root)
                return
            delay = min(MAX_DELAY, 2.0 ** (in_a_row - 1))
            log.warning("replicator for %s (pid %d) exited with status %s after %.1f s; starting it again in %.0f s",
                        self.root, proc.pid, code, ran, delay)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._proc = self._spawn()
                except OSError as exc:
                    self.gave_up = True
                    log.error("replicator for %s could not be started again (%s); not restarting it", self.root, exc)
                    return

    # -- stopping --------------------------------------------------------------------------------------

    def stop(self) -> int | None:
        """SIGTERM, wait up to ``stop_wait`` seconds (the child's last round), then SIGKILL. Returns the exit status
        of the last child (None when there was none, or in a forked copy of the process that started it, which
        leaves the child alone). Idempotent."""
        if os.getpid() != self._owner:
            return None
        with self._lock:
            self._stopping.set()
            proc = self._proc
        if proc is None:
            return None
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(self.stop_wait)
            except subprocess.TimeoutExpired:
                log.warning("replicator for %s (pid %d) did not stop within %.1f s of SIGTERM: killed", self.root,
                            proc.pid, self.stop_wait)
                proc.kill()
                proc.wait()
            else:
                if proc.returncode != 0:
                    log.warning("replicator for %s (pid %d) stopped with status %s", self.root, proc.pid,
                                proc.returncode)
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        _live.discard(self)
        return proc.returncode


@atexit.register
def _stop_all() -> None:
    """At interpreter exit: stop every child this process started (forked copies stop nothing)."""
    for child in list(_live):
        try:
            child.stop()
        except Exception:  # noqa: BLE001 - exiting; the child also sees its parent gone
            pass


def set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel to send ``sig`` to this process when its parent thread ends
    (``prctl(PR_SET_PDEATHSIG)``). False where it is not available. The signal also comes when the *thread* that
    started this process ends while the process lives on: the handler must check ``os.getppid()``."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(1, sig, 0, 0, 0)) == 0  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return False


def start_replicator(store: Store) -> ReplicatorChild:
    """``replicator=True``: the child replicator of ``store``'s root, started. A root that does not replicate is
    refused (ConfigurationError, saying how to make it replicate)."""
    if store.replicate is None:
        raise ConfigurationError(f"replicator=True: {store.root} does not replicate; give it a replica with "
                                 "replicate='s3://bucket/prefix' or replicate='file:///abs/dir' (recorded in the "
                                 "root for every later router), or `shardlite init --root ROOT --replicate URL`")
    child = ReplicatorChild(store.root)
    child.start()
    return child
