"""A throwaway PostgreSQL server for the benchmarks, from Debian's packages, on loopback.

``with postgres(["chat"]) as server: server.dsn("chat")`` finds ``/usr/lib/postgresql/<v>/bin`` (installing
the ``postgresql`` package with apt-get when it is missing and we are root), runs ``initdb`` into a fresh
temporary directory (under /var/tmp when the ``postgres`` user cannot enter the temp dir), starts the
server on a free 127.0.0.1 port (``fsync=on``, ``synchronous_commit`` left at its default ``on``; its Unix
socket in the temporary directory, no TCP on other interfaces), creates the databases and yields.
Afterwards (also on error or Ctrl-C) it stops the server and removes the directory.

PostgreSQL refuses to run as root, so as root the server runs as the ``postgres`` system user (created if
missing) through ``runuser -u postgres --`` (or ``su``), and the directory is handed to that user.

When PostgreSQL cannot be had, :func:`postgres` raises :class:`PgUnavailable` with a readable reason, before
anything is started; callers report the PostgreSQL rows as skipped.

Standalone smoke test: ``python benchmarks/pg.py`` starts a server, prints its version and DSN, stops it.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["PgUnavailable", "PgServer", "postgres", "find_bin"]

SUPERUSER = "postgres"


class PgUnavailable(RuntimeError):
    """PostgreSQL cannot be installed or started here; the message says why."""


@dataclass(frozen=True)
class PgServer:
    host: str
    port: int
    user: str
    version: str
    datadir: str

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"


def _version_key(path: str) -> tuple[int, ...]:
    name = path.split(os.sep)[-3]  # /usr/lib/postgresql/<version>/bin/initdb
    return tuple(int(p) for p in re.findall(r"\d+", name)) or (0,)


def find_bin(*, install: bool = True) -> str:
    """Directory holding ``initdb`` and ``pg_ctl`` (``$PG_BIN`` wins, else Debian's newest version)."""
    explicit = os.environ.get("PG_BIN")
    if explicit:
        if os.access(os.path.join(explicit, "initdb"), os.X_OK):
            return explicit
        raise PgUnavailable(f"PG_BIN={explicit} has no executable initdb")
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if not found and install:
        _install()
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if not found:
        raise PgUnavailable("no /usr/lib/postgresql/*/bin/initdb (install Debian's postgresql package)")
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


@contextmanager
def postgres(databases: Sequence[str] = ("bench",), *, settings: dict[str, str] | None = None) -> Iterator[PgServer]:
    """Start a throwaway server, create ``databases``, yield it; stop it and remove its files afterwards.

    Raises :class:`PgUnavailable` (before yielding) when PostgreSQL cannot be installed or started."""
    bindir = find_bin()
    prefix = _runas_prefix()
    user = SUPERUSER if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    tmp = tempfile.mkdtemp(prefix="shardlite-pg-", dir=_base_dir(bool(prefix)))
    datadir, logfile = os.path.join(tmp, "data"), os.path.join(tmp, "server.log")
    started = False
    try:
        if prefix:
            info = pwd.getpwnam(SUPERUSER)
            os.chown(tmp, info.pw_uid, info.pw_gid)
        os.chmod(tmp, 0o700)
        done = _run(prefix, [os.path.join(bindir, "initdb"), "-D", datadir, "-U", user, "--auth=trust",
                             "--encoding=UTF8", "--no-locale", "--no-sync"])
        if done.returncode != 0:
            raise PgUnavailable(f"initdb failed: {(done.stderr or done.stdout).strip()[-300:]}")
        opts = {"listen_addresses": "127.0.0.1", "unix_socket_directories": tmp, "fsync": "on",
                "max_connections": "100"}
        opts.update(settings or {})
        port = 0
        for _attempt in range(3):  # a free port can be taken between the probe and the bind
            port = _free_port()
            conf = " ".join(f"-c {k}={v}" for k, v in opts.items()) + f" -p {port}"
            done = _run(prefix, [os.path.join(bindir, "pg_ctl"), "-D", datadir, "-l", logfile, "-o", conf,
                                 "-w", "-t", "60", "start"])
            if done.returncode == 0:
                started = True
                break
            time.sleep(0.2)
        if not started:
            raise PgUnavailable(f"pg_ctl start failed: {_tail(logfile)}")
        for db in databases:
            done = _run(prefix, [os.path.join(bindir, "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user,
                                 db])
            if done.returncode != 0:
                raise PgUnavailable(f"createdb {db} failed: {done.stderr.strip()}")
        done = _run(prefix, [os.path.join(bindir, "postgres"), "--version"])
        version = done.stdout.strip() or os.path.basename(os.path.dirname(bindir))
        yield PgServer("127.0.0.1", port, user, version, datadir)
    finally:
        if started:
            _run(prefix, [os.path.join(bindir, "pg_ctl"), "-D", datadir, "-m", "fast", "-w", "-t", "60", "stop"])
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    try:
        with postgres(["smoke"]) as server:
            print(f"{server.version} running; DSN {server.dsn('smoke')} (data in {server.datadir})")
        print("stopped and removed")
    except PgUnavailable as exc:
        print(f"PostgreSQL unavailable: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
