"""Helpers for tests that run shardlite in worker subprocesses (concurrency, crash and fork tests).

Workers are Python scripts written into the test's tmp dir and run with ``sys.executable``; they import
shardlite like any application. Nothing here imports the stdlib ``sqlite3``: files are inspected with APSW
(the same SQLite copy shardlite uses), never with a second SQLite library in this process.

* :func:`write_script` / :func:`spawn` / :func:`finish`: start a worker and collect its output, failing
  with the worker's stderr when it exits non-zero.
* :class:`FileBarrier`: start N workers at the same moment. Each worker calls ``barrier(sync_dir, name)``
  (from :data:`WORKER_PRELUDE`), which creates ``ready-<name>`` and spins until ``go`` exists; the test waits
  for every ready file, then creates ``go``.
* :class:`LineReader`: read a worker's stdout line by line with a timeout (a background thread feeds a
  queue), so a test can wait for "acknowledged" lines and then kill the worker.
* :func:`kill9`, :func:`db_files`, :func:`integrity_check`: crash and check.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import IO

import apsw

REPO = Path(__file__).resolve().parents[1]
DEADLINE = 60.0  # generous bound for waiting loops; never a timing assertion

#: Put at the top of every worker script (``{prelude}`` in the templates below).
WORKER_PRELUDE = '''
import os
import sys
import time


def barrier(sync_dir, name, timeout=60.0):
    """Announce readiness, then wait for the test to create sync_dir/go (file barrier)."""
    open(os.path.join(sync_dir, "ready-" + str(name)), "w").close()
    go = os.path.join(sync_dir, "go")
    deadline = time.monotonic() + timeout
    while not os.path.exists(go):
        if time.monotonic() > deadline:
            sys.exit("barrier: the test never said go")
        time.sleep(0.0002)


def ack(*items):
    """One line on stdout, flushed at once (the test reads it as an acknowledgement)."""
    sys.stdout.write(" ".join(str(i) for i in items) + "\\n")
    sys.stdout.flush()
'''


def child_env(**extra: str) -> dict[str, str]:
    """The environment for workers: the repository importable, unbuffered output, plus ``extra``."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([path] if path else []))
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("SHARDLITE_ROOT", None)
    env.update(extra)
    return env


def write_script(directory: str | os.PathLike[str], name: str, source: str) -> Path:
    """Write a worker script (``source`` is dedented; ``{prelude}`` is replaced by the prelude)."""
    path = Path(directory) / name
    text = textwrap.dedent(source).replace("{prelude}", WORKER_PRELUDE)
    path.write_text(text)
    return path


def spawn(script: str | os.PathLike[str], *args: object, env: dict[str, str] | None = None,
          cwd: str | os.PathLike[str] | None = None) -> subprocess.Popen[str]:
    """Start ``python script args...`` with stdout and stderr piped (text)."""
    return subprocess.Popen([sys.executable, os.fspath(script), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env if env is not None else child_env(), cwd=cwd)


def finish(proc: subprocess.Popen[str], timeout: float = DEADLINE) -> str:
    """Wait for ``proc``; return its stdout. Fails the test (with its stderr) unless it exited 0."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"worker {proc.args!r} did not finish in {timeout}s\nstdout:\n{out}\nstderr:\n{err}") from None
    if proc.returncode != 0:
        raise AssertionError(f"worker {proc.args!r} exited {proc.returncode}\nstdout:\n{out}\nstderr:\n{err}")
    return out


def finish_all(procs: Sequence[subprocess.Popen[str]], timeout: float = DEADLINE) -> list[str]:
    try:
        return [finish(p, timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


class FileBarrier:
    """Release several worker processes at the same moment (see the module doc)."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return os.fspath(self.dir)

    def wait_ready(self, procs: Iterable[subprocess.Popen[str]], names: Iterable[object]) -> None:
        procs, wanted = list(procs), [self.dir / f"ready-{n}" for n in names]
        deadline = time.monotonic() + DEADLINE
        while not all(p.exists() for p in wanted):
            for proc in procs:
                if proc.poll() is not None:
                    out, err = proc.communicate()
                    raise AssertionError(f"worker {proc.args!r} died before the barrier ({proc.returncode})\n"
                                         f"{out}\n{err}")
            if time.monotonic() > deadline:
                raise AssertionError("workers never reached the barrier")
            time.sleep(0.005)

    def go(self) -> None:
        (self.dir / "go").touch()


class LineReader:
    """Reads a stream's lines on a background thread; :meth:`next` waits with a timeout.

    Only complete lines (ending in a newline) are delivered: a line cut short by a SIGKILL is never
    mistaken for an acknowledgement.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.partial = ""
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            if line.endswith("\n"):
                self._queue.put(line[:-1])
            else:
                self.partial = line
        self._queue.put(None)

    def next(self, timeout: float = DEADLINE) -> str | None:
        """The next complete line, or None at end of stream. AssertionError after ``timeout``."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no output line within {timeout}s") from None

    def rest(self, timeout: float = DEADLINE) -> list[str]:
        """Every remaining complete line, until end of stream (call after the process ended)."""
        lines: list[str] = []
        while True:
            line = self.next(timeout)
            if line is None:
                return lines
            lines.append(line)


def kill9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL ``proc`` (if still running) and reap it."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=DEADLINE)


def close_pipes(proc: subprocess.Popen[str]) -> str:
    """Read what is left on ``proc``'s stderr (after it ended) and close its pipes; returns the stderr text."""
    err = ""
    if proc.stderr is not None:
        err = proc.stderr.read()
        proc.stderr.close()
    if proc.stdout is not None:
        proc.stdout.close()
    return err


def db_files(root: str | os.PathLike[str]) -> list[Path]:
    """Every SQLite database under ``root``: the global DB and every tenant file (``*.db``)."""
    return sorted(p for p in Path(root).rglob("*.db") if p.is_file())


def temp_files(root: str | os.PathLike[str]) -> list[Path]:
    """Leftover temporary files of tenant creation (``<name>.db.tmp-<pid>-<hex>``)."""
    return sorted(p for p in Path(root).rglob("*.tmp-*") if p.is_file())


def integrity_check(path: str | os.PathLike[str]) -> str:
    """``PRAGMA integrity_check`` of ``path`` through APSW, read-only; ``"ok"`` when the file is sound."""
    path = os.fspath(path)
    try:
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
    except apsw.CantOpenError:  # a WAL file without its -wal/-shm may need a read-write open to recover
        conn = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READWRITE)
    try:
        conn.setbusytimeout(10_000)
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        return "\n".join(str(r[0]) for r in rows)
    finally:
        conn.close()


def assert_all_files_sound(root: str | os.PathLike[str]) -> list[Path]:
    """Every DB file under ``root`` passes ``PRAGMA integrity_check``; returns the files checked."""
    files = db_files(root)
    assert files, f"no database files under {root}"
    bad = {os.fspath(p): result for p in files if (result := integrity_check(p)) != "ok"}
    assert not bad, f"integrity_check failed: {bad}"
    return files
