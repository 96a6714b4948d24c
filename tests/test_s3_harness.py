"""The test harness for a real S3 server (``helpers_s3``, over ``shardlite.testing.s3``: SeaweedFS ``weed
mini``): it listens on 127.0.0.1 only, answers authenticated requests with its own key, stops and starts
again on the same data and port, leaves nothing behind (its directory, its /tmp sockets), and without the
binary the tests that need it skip loudly, or fail under ``CI=true``. Nothing here mocks S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from shardlite.testing.s3 import S3Server, S3Unavailable, seaweedfs

pytest_plugins = ["pytester"]

HERE = Path(__file__).resolve().parent


def _listening(pid: int) -> list[tuple[str, int]]:
    """``(address, port)`` of every TCP socket process ``pid`` listens on (from /proc, IPv4 and IPv6)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for row in f.read().splitlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                    address, port = cols[1].rsplit(":", 1)
                    found.append((address, int(port, 16)))
    return found


def test_listens_on_loopback_only(s3_server: S3Server) -> None:
    assert s3_server.pid is not None
    listening = _listening(s3_server.pid)
    assert {port for _, port in listening} == set(s3_server.ports.values())
    assert len(s3_server.ports) == 10
    assert all(address == "0100007F" for address, _ in listening), listening  # 127.0.0.1, nothing else


def test_answers_with_its_own_key_only(s3_server: S3Server) -> None:
    client: Any = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="harness/hello", Body=b"hi")
    assert client.get_object(Bucket=s3_server.bucket, Key="harness/hello")["Body"].read() == b"hi"
    client.close()
    import boto3
    from botocore.exceptions import ClientError

    stranger = boto3.session.Session().client(
        "s3", endpoint_url=s3_server.endpoint, region_name="us-east-1", aws_access_key_id=s3_server.access_key,
        aws_secret_access_key="not-the-secret")
    with pytest.raises(ClientError, match="SignatureDoesNotMatch"):
        stranger.get_object(Bucket=s3_server.bucket, Key="harness/hello")
    stranger.close()
    assert s3_server.secret_key not in repr(s3_server) and s3_server.secret_key not in s3_server.url("x")
    config = Path(s3_server.directory) / "s3.json"
    assert (config.stat().st_mode & 0o777) == 0o600


def test_stop_start_on_the_same_data_then_nothing_left(tmp_path: Path) -> None:
    """A server of its own: killed and started again on its port, its data is there; after the block its
    process, its directory and its /tmp sockets are gone."""
    with seaweedfs(("first", "second")) as server:
        client: Any = server.client()
        client.put_object(Bucket="second", Key="kept", Body=b"data")
        port, directory = server.port, server.directory
        for kill in (True,):  # a kill -9 (the final stop of the block is the graceful one)
            pid = server.pid
            assert pid is not None
            server.stop(kill=kill)
            assert server.pid is None and not os.path.exists(f"/proc/{pid}/cmdline")
            server.start()
            assert server.port == port
            assert client.get_object(Bucket="second", Key="kept")["Body"].read() == b"data"
        client.close()
        pid = server.pid
        grpc_ports = [server.ports[f"{name}.grpc"] for name in ("s3", "master", "volume", "filer", "admin")]
    assert not os.path.exists(directory)
    assert not os.path.exists(f"/proc/{pid}/cmdline")
    left = [name for name in os.listdir("/tmp") if name.startswith("seaweedfs-")
            and any(name.endswith(f"-{p}.sock") for p in grpc_ports)]
    assert left == []


def test_missing_binary_raises_before_anything_is_made(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEED_BIN", os.fspath(tmp_path / "nonexistent"))
    monkeypatch.setenv("TMPDIR", os.fspath(tmp_path))
    with pytest.raises(S3Unavailable, match="nonexistent is not an executable"), seaweedfs():
        pass
    assert os.listdir(tmp_path) == []


def test_importing_the_harness_imports_no_s3_client(tmp_path: Path) -> None:
    code = ("import sys, shardlite.testing.s3; "
            "assert 'boto3' not in sys.modules and 'botocore' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr


INNER_TESTS = """
def test_one(s3_server):
    pass

def test_two(replica_target):
    pass

def test_without_s3():
    pass
"""

INNER_CONFTEST = """
from helpers_s3 import s3_server, s3_env, replica_backend, make_replica_target, replica_target  # noqa: F401
from helpers_real import pytest_terminal_summary  # noqa: F401
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A small project using our fixtures, where SeaweedFS cannot be found (``WEED_BIN=/nonexistent``)."""
    monkeypatch.setenv("WEED_BIN", "/nonexistent")
    monkeypatch.syspath_prepend(os.fspath(HERE))
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")  # pytest-asyncio is loaded
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(INNER_TESTS)
    return pytester


def test_without_seaweedfs_the_tests_that_need_it_skip_loudly(inner: pytest.Pytester,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The file backend of the conformance suite still runs; the S3 ones skip with one loud reason."""
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, skipped=2, warnings=1)  # one start attempt for the session, one warning
    result.stdout.fnmatch_lines([
        "*MissingComponentWarning: !!! S3 (SEAWEEDFS) TESTS NOT RUN: WEED_BIN=/nonexistent is not an "
        "executable file*",
        "*! real components missing: tests skipped !*",
        "2 tests skipped: !!! S3 (SEAWEEDFS) TESTS NOT RUN: WEED_BIN=/nonexistent*",
    ])
    assert result.ret == 0


def test_without_seaweedfs_under_ci_the_tests_that_need_it_fail(inner: pytest.Pytester,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(["*S3 (SEAWEEDFS) TESTS NOT RUN: *WEED_BIN=/nonexistent*CI=true*"])
    result.stdout.no_fnmatch_line("*real components missing*")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
