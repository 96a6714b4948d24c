"""A throwaway PostgreSQL server from Debian's packages, on loopback, for tests and benchmarks.

``with postgres(["app"]) as server: server.dsn("app")`` finds ``/usr/lib/postgresql/<v>/bin`` (``$PG_BIN``
wins; with ``install=True``, the default, it installs the ``postgresql`` package with apt-get when it is
missing and we are root), runs ``initdb`` into a fresh temporary directory (under /var/tmp when the
``postgres`` user cannot enter the temp dir), starts the server on a free 127.0.0.1 port and creates the
databases, then yields a :class:`PgServer`. Afterwards, also on an error or Ctrl-C in the block, it stops
the server (fast shutdown) and removes the directory; when the server does not stop (its postmaster was
killed, say) the processes left of it are killed and its shared memory segment removed first.

The server:

* listens on ``127.0.0.1`` only (``listen_addresses``), on a port that was free when probed (it retries
  with another port when the probe raced another process); its Unix socket is in the temporary directory
  (mode 0700);
* runs with ``fsync=on`` and ``synchronous_commit`` at its default ``on``, and keeps its dynamic shared
  memory in files under its data directory (``dynamic_shared_memory_type=mmap``: the default ``posix``
  leaves ``/dev/shm/PostgreSQL.*`` behind when the postmaster is killed); ``settings`` adds or overrides
  ``postgres -c`` settings;
* has one superuser: ``postgres`` when we are root, else our own user name, with a random password.
  TCP connections must give it (``scram-sha-256``; :meth:`PgServer.dsn` includes it, so keep DSNs out of
  logs, or use ``dsn(..., password=False)`` to show one); the Unix socket trusts its (private) directory.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user (created if
missing) through ``runuser -u postgres --`` (or ``su``), and the directory is handed to that user.

When PostgreSQL cannot be had, :func:`postgres` raises :class:`PgUnavailable` with a readable reason, before
it yields and after removing whatever it had made; callers decide whether that is a skip or a failure.

Importing this module starts nothing and does not import psycopg: only :func:`postgres` (to create the
databases) and the :class:`PgServer` methods that talk to the server import it, when called.

Standalone smoke test: ``python -m shardlite.testing.postgres`` starts a server, prints its version and DSN
(without the password), stops it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # importing this module never imports psycopg
    from psycopg import Connection

__all__ = ["PgUnavailable", "PgServer", "postgres", "find_bin", "server_processes", "SUPERUSER"]

SUPERUSER = "postgres"
"""The OS user (and database superuser) the server runs as when we are root."""

_DEBIAN_INITDB = "/usr/lib/postgresql/*/bin/initdb"
_STOP_WAIT_S = 10.0  # how long killed processes get to disappear before cleanup goes on without them


class PgUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or started here; the message says why and what to do."""


@dataclass(frozen=True)
class PgServer:
    """A running throwaway server (valid inside the ``with postgres(...)`` block only).

    ``pid`` is the postmaster's process id; ``directory`` the temporary directory holding ``datadir``, the
    Unix socket and ``server.log``, removed when the block ends."""

    host: str
    port: int
    user: str
    password: str = field(repr=False)
    version: str
    datadir: str
    pid: int
    directory: str
    #: How to start it again on the same port (:meth:`start`): the run-as prefix, the bin directory and the
    #: ``-c`` options.
    launch: tuple[tuple[str, ...], str, tuple[tuple[str, str], ...]] = field(default=((), "", ()), repr=False)

    def current_pid(self) -> int | None:
        """The running postmaster's pid (``pid`` is the first one's; :meth:`start` makes a new one), or
        ``None`` when it is not running."""
        pid = _pidfile(self.datadir)[0]
        return pid if pid is not None and pid in server_processes(self.datadir) else None

    def kill(self) -> None:
        """``kill -9`` of the postmaster, as a crash would; then its orphaned children are killed and its
        shared memory segment removed (what an init system does before a restart), so :meth:`start` can
        run."""
        pid = self.current_pid()
        if pid is not None:
            _signal([pid], signal.SIGKILL)
        _shutdown(self.datadir)

    def start(self) -> None:
        """Start the server again on its port after :meth:`kill` (crash recovery runs, as after a real crash);
        :class:`PgUnavailable` when it does not come up."""
        prefix, bindir, opts = self.launch
        if not bindir:
            raise PgUnavailable("this server was not started by postgres(): it cannot be started again")
        if self.current_pid() is None:  # a killed postmaster's lock files; its zombie would pass PostgreSQL's check
            for stale in (os.path.join(self.datadir, "postmaster.pid"),
                          os.path.join(self.directory, f".s.PGSQL.{self.port}.lock")):
                with suppress(FileNotFoundError):
                    os.unlink(stale)
        conf = " ".join(f"-c {k}={v}" for k, v in opts) + f" -p {self.port}"
        done = _run(list(prefix), [os.path.join(bindir, "pg_ctl"), "-D", self.datadir, "-l", self.logfile,
                                   "-o", conf, "-w", "-t", "60", "start"])
        if done.returncode != 0:
            raise PgUnavailable(f"pg_ctl start failed: {_tail(self.logfile)}")

    @property
    def logfile(self) -> str:
        """The server's log file (inside ``directory``)."""
        return os.path.join(self.directory, "server.log")

    def dsn(self, database: str = "postgres", *, password: bool = True) -> str:
        """A ``postgresql://`` URL for ``database`` as the superuser, over TCP to 127.0.0.1; with
        ``password=False`` the password is left out (for messages: such a URL cannot log in)."""
        secret = f":{self.password}" if password else ""
        return f"postgresql://{self.user}{secret}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name`` (any name; it is quoted) and return its DSN. Imports psycopg."""
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, closing the connections still open to it. Imports psycopg."""
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    @contextmanager
    def database(self, prefix: str = "test") -> Iterator[str]:
        """A fresh, empty database named ``<prefix>_<random>`` for the block: yields its DSN, drops it
        afterwards (also on error), with whatever connections the block left open to it. ``ValueError`` when
        the name would pass PostgreSQL's 63 bytes (it would cut it, and the drop would miss it)."""
        name = f"{prefix}_{uuid.uuid4().hex[:16]}"
        if len(name.encode()) > 63:
            raise ValueError(f"database prefix {prefix!r} is too long: at most 46 bytes")
        dsn = self.create_database(name)
        try:
            yield dsn
        finally:
            self.drop_database(name)

    @contextmanager
    def _admin(self) -> Iterator[Connection[tuple[Any, ...]]]:
        import psycopg

        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=30) as conn:
            yield conn


def _version_key(path: str) -> tuple[int, ...]:
    name = path.split(os.sep)[-3]  # /usr/lib/postgresql/<version>/bin/initdb
    return tuple(int(p) for p in re.findall(r"\d+", name)) or (0,)


def find_bin(*, install: bool = True) -> str:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``: ``$PG_BIN`` when set (it must hold an
    executable ``initdb``), else Debian's newest ``/usr/lib/postgresql/<v>/bin``. When there is none and
    ``install`` is true, installs the ``postgresql`` package with apt-get (root only) first.

    Raises :class:`PgUnavailable` saying why when there is no usable directory."""
    explicit = os.environ.get("PG_BIN")
    if explicit:
        if os.access(os.path.join(explicit, "initdb"), os.X_OK):
            return explicit
        raise PgUnavailable(f"PG_BIN={explicit} has no executable initdb (unset PG_BIN to use Debian's package)")
    found = sorted(glob.glob(_DEBIAN_INITDB), key=_version_key)
    if not found and install:
        _install()
        found = sorted(glob.glob(_DEBIAN_INITDB), key=_version_key)
    if not found:
        raise PgUnavailable("no /usr/lib/postgresql/*/bin/initdb: install Debian's postgresql package "
                            "(`make postgres` does it as root: apt-get install postgresql), or set PG_BIN")
    return os.path.dirname(found[-1])


def _install() -> None:
    if os.geteuid() != 0:
        raise PgUnavailable("PostgreSQL is not installed and we are not root (apt-get install postgresql)")
    if shutil.which("apt-get") is None:
        raise PgUnavailable("PostgreSQL is not installed and there is no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    print("pg: installing PostgreSQL from Debian's packages (apt-get)...", file=sys.stderr, flush=True)
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "postgresql"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise PgUnavailable(f"{' '.join(cmd)} failed: {' / '.join(tail)}")


def _ensure_user() -> None:
    try:
        pwd.getpwnam(SUPERUSER)
        return
    except KeyError:
        pass
    useradd = shutil.which("useradd")
    if useradd is None:
        raise PgUnavailable("running as root and there is no 'postgres' user nor useradd")
    done = subprocess.run([useradd, "--system", "--no-create-home", "--home-dir", "/nonexistent",
                           "--shell", "/usr/sbin/nologin", SUPERUSER], capture_output=True, text=True)
    if done.returncode != 0:
        raise PgUnavailable(f"could not create the 'postgres' user: {done.stderr.strip()}")


def _runas_prefix() -> list[str]:
    """Command prefix running a program as the server's OS user (empty when we are not root)."""
    if os.geteuid() != 0:
        return []
    _ensure_user()
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", SUPERUSER, "--"]
    if shutil.which("su"):
        return ["su", SUPERUSER, "-s", "/bin/sh", "-c"]  # the command follows as one quoted string
    raise PgUnavailable("running as root and neither runuser nor su is available")


def _run(prefix: list[str], argv: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    if prefix and prefix[0] == "su":
        cmd = [*prefix, shlex.join(argv)]
    else:
        cmd = [*prefix, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd="/")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _traversable(path: str) -> bool:
    """Whether every directory from / down to ``path`` can be entered by other users."""
    path = os.path.realpath(path)
    while True:
        try:
            if not os.stat(path).st_mode & 0o001:
                return False
        except OSError:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _base_dir(as_other_user: bool) -> str | None:
    """Where to put the server's directory: the temp dir, unless the server's user cannot reach it (some
    process may have made /tmp 0700), then /var/tmp (same kind of disk, not tmpfs)."""
    if not as_other_user:
        return None
    for base in (tempfile.gettempdir(), "/var/tmp"):
        if os.path.isdir(base) and _traversable(base):
            return base
    raise PgUnavailable(f"neither {tempfile.gettempdir()} nor /var/tmp can be entered by the 'postgres' user")


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return " / ".join(f.read().strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _write_private(path: str, text: str, owner: pwd.struct_passwd | None) -> None:
    """Write ``text`` to a new file only its owner (``owner``, else us) can read."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


@contextmanager
def postgres(databases: Sequence[str] = ("bench",), *, settings: dict[str, str] | None = None,
             install: bool = True) -> Iterator[PgServer]:
    """Start a throwaway server, create ``databases``, yield it; stop it and remove its files afterwards.

    Raises :class:`PgUnavailable` (before yielding, with nothing left behind) when PostgreSQL cannot be
    found (or, with ``install``, installed) or started. Cleanup runs however the block ends, including
    ``KeyboardInterrupt``, and also when the server died or was killed meanwhile."""
    bindir = find_bin(install=install)
    prefix = _runas_prefix()
    owner = pwd.getpwnam(SUPERUSER) if prefix else None
    user = SUPERUSER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    password = secrets.token_urlsafe(24)
    tmp = tempfile.mkdtemp(prefix="shardlite-pg-", dir=_base_dir(bool(prefix)))
    datadir, logfile = os.path.join(tmp, "data"), os.path.join(tmp, "server.log")
    try:
        if owner is not None:
            os.chown(tmp, owner.pw_uid, owner.pw_gid)
        os.chmod(tmp, 0o700)
        pwfile = os.path.join(tmp, "pwfile")
        _write_private(pwfile, password + "\n", owner)
        done = _run(prefix, [os.path.join(bindir, "initdb"), "-D", datadir, "-U", user, f"--pwfile={pwfile}",
                             "--auth-host=scram-sha-256", "--auth-local=trust", "--encoding=UTF8", "--no-locale",
                             "--no-sync"])
        os.unlink(pwfile)
        if done.returncode != 0:
            raise PgUnavailable(f"initdb failed: {(done.stderr or done.stdout).strip()[-300:]}")
        opts = {"listen_addresses": "127.0.0.1", "unix_socket_directories": tmp, "fsync": "on",
                "max_connections": "100", "dynamic_shared_memory_type": "mmap"}
        opts.update(settings or {})
        port = _start(prefix, bindir, datadir, logfile, opts)
        done = _run(prefix, [os.path.join(bindir, "postgres"), "--version"])
        version = done.stdout.strip() or os.path.basename(os.path.dirname(bindir))
        pid = _pidfile(datadir)[0]
        if pid is None:
            raise PgUnavailable(f"the server started but wrote no postmaster.pid: {_tail(logfile)}")
        server = PgServer("127.0.0.1", port, user, password, version, datadir, pid, tmp,
                          (tuple(prefix), bindir, tuple(opts.items())))
        for db in databases:
            try:
                server.create_database(db)
            except Exception as exc:
                raise PgUnavailable(f"CREATE DATABASE {db} failed: {exc}") from exc
        yield server
    finally:
        _shutdown(datadir)
        shutil.rmtree(tmp, ignore_errors=True)


def _start(prefix: list[str], bindir: str, datadir: str, logfile: str, opts: dict[str, str]) -> int:
    """Start the server on a free port (three tries: a probed port can be taken before the server binds it)
    and return the port; :class:`PgUnavailable` with the log's tail when it does not start."""
    for _attempt in range(3):
        port = _free_port()
        conf = " ".join(f"-c {k}={v}" for k, v in opts.items()) + f" -p {port}"
        done = _run(prefix, [os.path.join(bindir, "pg_ctl"), "-D", datadir, "-l", logfile, "-o", conf,
                             "-w", "-t", "60", "start"])
        if done.returncode == 0:
            return port
        _shutdown(datadir)  # pg_ctl may give up waiting on a server that is still starting
        with suppress(FileNotFoundError):  # nothing of it runs now; a stale lock file would refuse the next try
            os.unlink(os.path.join(datadir, "postmaster.pid"))
    raise PgUnavailable(f"pg_ctl start failed: {_tail(logfile)}")


def _pidfile(datadir: str) -> tuple[int | None, int | None]:
    """The postmaster's pid and its System V shared memory id from ``postmaster.pid`` (``None`` for each
    one missing: no file, or the server had not written it yet)."""
    try:
        with open(os.path.join(datadir, "postmaster.pid"), encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None, None
    pid = int(lines[0]) if lines and lines[0].strip().isdigit() else None
    shm = lines[6].split() if len(lines) > 6 else []
    shmid = int(shm[1]) if len(shm) == 2 and shm[1].isdigit() else None
    return pid, shmid


def _comm_state(pid: int) -> tuple[str, str] | None:
    """``(comm, state)`` of process ``pid``, ``None`` when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()[0]


def server_processes(datadir: str) -> list[int]:
    """The live (not zombie) processes of the server on ``datadir``: every ``postgres`` process whose
    working directory is ``datadir`` (the postmaster changes into it and its children inherit it; they are
    not in its process group, and a killed postmaster's children are orphans, so neither the group nor the
    parent tells). Needs to read their ``/proc/<pid>/cwd``: root, or the same user."""
    target = os.fsencode(os.path.realpath(datadir))
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _comm_state(int(entry))
        if stat is None or stat[0] != "postgres" or stat[1] == "Z":
            continue
        try:
            cwd = os.readlink(os.fsencode(f"/proc/{entry}/cwd"))
        except OSError:
            continue
        if cwd in (target, target + b" (deleted)"):
            found.append(int(entry))
    return sorted(found)


def _shutdown(datadir: str) -> None:
    """Stop whatever runs of the server on ``datadir`` and wait until none of it is left: SIGINT to a live
    postmaster (PostgreSQL's fast shutdown, what ``pg_ctl stop -m fast`` sends) and up to a minute for it;
    then SIGKILL to every process of it still there (a postmaster killed before leaves its children for a
    moment; a stuck one is not waited for longer). Last, the System V segment a killed postmaster leaves is
    removed. Signals go only to processes :func:`server_processes` finds (so never to a recycled pid), and
    a dead postmaster is not waited for (``pg_ctl stop`` would wait for its zombie to be reaped)."""
    pid, shmid = _pidfile(datadir)
    if pid is not None and pid in server_processes(datadir):
        _signal([pid], signal.SIGINT)
        _wait_gone(datadir, 60.0)
    deadline = time.monotonic() + _STOP_WAIT_S
    while (left := server_processes(datadir)) and time.monotonic() < deadline:
        _signal(left, signal.SIGKILL)
        time.sleep(0.01)
    if shmid is not None:
        _remove_segment(shmid)


def _signal(pids: list[int], signum: signal.Signals) -> None:
    for p in pids:
        try:
            os.kill(p, signum)
        except OSError:  # gone meanwhile
            pass


def _wait_gone(datadir: str, timeout: float) -> None:
    """Wait (polling) until no process of the server on ``datadir`` is left, or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while server_processes(datadir) and time.monotonic() < deadline:
        time.sleep(0.01)


def _remove_segment(shmid: int) -> None:
    """Remove System V shared memory segment ``shmid`` if it still exists with no process attached (a
    postmaster removes its own at a clean stop; a killed one leaves it behind)."""
    try:
        with open("/proc/sysvipc/shm", encoding="ascii") as f:
            rows = [line.split() for line in f.read().splitlines()[1:]]
    except OSError:
        return
    if any(len(row) > 6 and row[1] == str(shmid) and row[6] == "0" for row in rows):
        ipcrm = shutil.which("ipcrm")
        if ipcrm is not None:
            subprocess.run([ipcrm, "-m", str(shmid)], capture_output=True, timeout=30)


def main() -> None:
    """``python -m shardlite.testing.postgres``: start a server, print its version and DSN, stop it."""
    try:
        with postgres(["smoke"]) as server:
            print(f"{server.version} running; DSN {server.dsn('smoke', password=False)} (data in {server.datadir})")
        print("stopped and removed")
    except PgUnavailable as exc:
        print(f"PostgreSQL unavailable: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
