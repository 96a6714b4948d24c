"""The test harness for a real PostgreSQL server (``helpers_pg``, over ``shardlite.testing.postgres``).

A session's tests share one server (``pg_server``) and each gets a database of its own (``pg_dsn``), which
psycopg reaches sync and async; the server listens on 127.0.0.1 only; a server whose postmaster is killed
with SIGKILL is still cleaned up (its processes, its directory, its shared memory); and without PostgreSQL
the tests that need it skip loudly, or fail under ``CI=true``. Nothing here mocks PostgreSQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from helpers_pg import separate_server
from helpers_real import MissingComponentWarning, missing_component

from shardlite.testing.postgres import PgServer, PgUnavailable, postgres, server_processes

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent


def test_sync_connection_writes_and_reads(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("CREATE TABLE notes(id serial PRIMARY KEY, body text NOT NULL)")
        conn.execute("INSERT INTO notes(body) VALUES (%s), (%s)", ("hello", "wörld"))
    with psycopg.connect(pg_dsn) as other:  # committed: another connection sees it
        rows = other.execute("SELECT body FROM notes ORDER BY id").fetchall()
    assert rows == [("hello",), ("wörld",)]


def test_async_connection_writes_and_reads(pg_dsn: str) -> None:
    async def main() -> list[tuple[str, int]]:
        async with await psycopg.AsyncConnection.connect(pg_dsn) as conn:
            await conn.execute("CREATE TABLE counters(name text PRIMARY KEY, n int NOT NULL)")
            await conn.execute("INSERT INTO counters VALUES ('a', 1), ('b', 2)")
        async with await psycopg.AsyncConnection.connect(pg_dsn) as other:
            cur = await other.execute("SELECT name, n FROM counters ORDER BY name")
            return await cur.fetchall()

    assert asyncio.run(main()) == [("a", 1), ("b", 2)]


_seen_databases: list[str] = []


@pytest.mark.parametrize("turn", ["first", "second"])
def test_each_test_gets_its_own_empty_database(pg_dsn: str, pg_server: PgServer, turn: str) -> None:
    """Each test's database starts empty and differs from the others'; an earlier test's one is gone."""
    with psycopg.connect(pg_dsn) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        tables = conn.execute("SELECT table_name FROM information_schema.tables "
                              "WHERE table_schema NOT IN ('pg_catalog', 'information_schema')").fetchall()
        conn.execute("CREATE TABLE left_behind(x int)")  # must not be seen by the next test
    assert name is not None and tables == []
    assert name[0] not in _seen_databases
    with psycopg.connect(pg_server.dsn(), autocommit=True) as admin:
        existing = {row[0] for row in admin.execute("SELECT datname FROM pg_database")}
    assert name[0] in existing and not existing & set(_seen_databases)
    _seen_databases.append(name[0])


def _listening(port: int) -> dict[str, list[str]]:
    """The local addresses of the TCP sockets listening on ``port``, from /proc/net/tcp and tcp6."""
    found: dict[str, list[str]] = {"tcp": [], "tcp6": []}
    for table in found:
        with open(f"/proc/net/{table}", encoding="ascii") as f:
            for line in f.read().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.rsplit(":", 1)
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found[table].append(address)
    return found


def test_server_listens_on_loopback_only(pg_server: PgServer) -> None:
    """Bound to 127.0.0.1 alone: no wildcard or IPv6 listener, and 127.0.0.2 (loopback too, but not the
    bound address) is refused while 127.0.0.1 answers. No other address is tried: the kernel's table of
    listening sockets already shows that no interface but 127.0.0.1 can reach the port."""
    with psycopg.connect(pg_server.dsn()) as conn:
        row = conn.execute("SHOW listen_addresses").fetchone()
    assert row == ("127.0.0.1",)
    assert _listening(pg_server.port) == {"tcp": ["0100007F"], "tcp6": []}  # 127.0.0.1, little-endian hex
    socket.create_connection(("127.0.0.1", pg_server.port), timeout=10).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.2", pg_server.port), timeout=10).close()


def test_password_is_required_over_tcp(pg_server: PgServer) -> None:
    """Other local users cannot log in without the random password, and messages can leave it out."""
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(pg_server.dsn(password=False), connect_timeout=10).close()
    assert pg_server.password not in pg_server.dsn(password=False) + repr(pg_server)


def _shm_ids() -> set[str]:
    with open("/proc/sysvipc/shm", encoding="ascii") as f:
        return {line.split()[1] for line in f.read().splitlines()[1:]}


def test_killed_postmaster_is_cleaned_up() -> None:
    """kill -9 of a separately started server's postmaster (with a backend serving a connection): leaving
    the block still removes its directory, leaves none of its processes, and frees its System V segment
    (a killed postmaster leaves it; a clean stop removes it)."""
    with separate_server() as server:
        conn = psycopg.connect(server.dsn())
        # its dynamic shared memory lives in its directory, not as /dev/shm files a kill would leave behind
        assert conn.execute("SHOW dynamic_shared_memory_type").fetchone() == ("mmap",)
        processes = server_processes(server.datadir)
        assert server.pid in processes and len(processes) > 2  # postmaster, its helpers, our backend
        with open(os.path.join(server.datadir, "postmaster.pid"), encoding="ascii") as f:
            shmid = f.read().splitlines()[6].split()[1]
        assert shmid in _shm_ids()
        os.kill(server.pid, signal.SIGKILL)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    assert not os.path.exists(server.directory)
    assert server_processes(server.datadir) == []
    assert shmid not in _shm_ids()


def test_error_in_the_block_still_stops_and_removes_the_server() -> None:
    with pytest.raises(RuntimeError, match="boom"), separate_server() as server:
        raise RuntimeError("boom")
    assert not os.path.exists(server.directory)
    assert server_processes(server.datadir) == []


def test_importing_the_module_imports_no_driver_and_starts_nothing(tmp_path: Path) -> None:
    code = ("import sys, shardlite.testing.postgres as m; "
            "assert 'psycopg' not in sys.modules and 'asyncpg' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


# -- PostgreSQL missing ------------------------------------------------------------------------------------------


def test_missing_component_skips_loudly_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shared policy itself (the browser, tmpfs and PostgreSQL tests use it)."""
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"^!!! GADGET TESTS NOT RUN: no gadget !!!$"), \
            pytest.warns(MissingComponentWarning, match="GADGET TESTS NOT RUN"):
        missing_component("GADGET TESTS", "no gadget")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="GADGET TESTS NOT RUN: no gadget .*CI=true"):
        missing_component("GADGET TESTS", "no gadget")


def test_missing_binaries_raise_pg_unavailable_before_anything_is_made(monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    monkeypatch.setenv("PG_BIN", os.fspath(tmp_path / "nonexistent"))
    monkeypatch.setenv("TMPDIR", os.fspath(tmp_path))
    with pytest.raises(PgUnavailable, match="nonexistent has no executable initdb"), postgres(()):
        pass
    assert os.listdir(tmp_path) == []


INNER_TESTS = """
def test_one(pg_dsn):
    pass

def test_two(pg_dsn):
    pass

def test_without_postgres():
    pass
"""

INNER_CONFTEST = """
from helpers_pg import pg_dsn, pg_server  # noqa: F401
from helpers_real import pytest_terminal_summary  # noqa: F401
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A small project using our fixtures, where PostgreSQL cannot be found (``PG_BIN=/nonexistent``)."""
    monkeypatch.setenv("PG_BIN", "/nonexistent")
    monkeypatch.syspath_prepend(os.fspath(HERE))
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")  # pytest-asyncio is loaded
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(INNER_TESTS)
    return pytester


def test_without_postgres_the_tests_that_need_it_skip_loudly(inner: pytest.Pytester,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=2, warnings=1)  # one start attempt for the session, one warning
    result.stdout.fnmatch_lines([
        "*MissingComponentWarning: !!! POSTGRESQL TESTS NOT RUN: no PostgreSQL server could be started: "
        "PG_BIN=/nonexistent has no executable initdb*",
        "*! real components missing: tests skipped !*",
        "2 tests skipped: !!! POSTGRESQL TESTS NOT RUN: no PostgreSQL server could be started: "
        "PG_BIN=/nonexistent has no executable initdb*",
    ])
    assert result.ret == 0


def test_without_postgres_under_ci_the_tests_that_need_it_fail(inner: pytest.Pytester,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*POSTGRESQL TESTS NOT RUN: *PG_BIN=/nonexistent*CI=true*"])
    result.stdout.no_fnmatch_line("*real components missing*")
    assert result.ret == pytest.ExitCode.TESTS_FAILED


# -- Ctrl-C ------------------------------------------------------------------------------------------------------


CTRL_C_TEST = """
import os, pathlib, signal

def test_waits_for_ctrl_c(pg_server, pg_dsn):
    report = pathlib.Path(os.environ["REPORT"])
    report.with_suffix(".tmp").write_text(pg_server.datadir)
    report.with_suffix(".tmp").replace(report)  # whole when it appears: the outer test reads it at once
    signal.pause()  # until the SIGINT
"""


def test_ctrl_c_during_a_session_stops_and_removes_its_server(tmp_path: Path) -> None:
    """A real SIGINT to a pytest process whose test holds ``pg_dsn``: pytest tears the session down and the
    server is gone with its directory."""
    (tmp_path / "conftest.py").write_text(INNER_CONFTEST)
    (tmp_path / "test_inner.py").write_text(CTRL_C_TEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    report = tmp_path / "datadir.txt"
    env = dict(os.environ, REPORT=os.fspath(report), PYTHONPATH=os.fspath(HERE))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_inner.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not report.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert report.exists(), proc.communicate(timeout=60)[0] if proc.poll() is not None else "no report"
        datadir = report.read_text()
        assert server_processes(datadir)
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "KeyboardInterrupt" in out, out
    assert not os.path.exists(os.path.dirname(datadir)), out
    assert server_processes(datadir) == []
