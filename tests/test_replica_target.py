"""The replica target contract (:class:`shardlite.replica.target.ReplicaTarget`): one conformance suite over
every backend (``file`` and ``s3``, the latter against a real SeaweedFS server), plus what is particular to
one backend (the directory's atomic writes under ``kill -9`` and its file modes; the S3 target's outage and
recovery, its error mapping) and the location rules (parsing, redaction, credentials never shown, the S3
client loaded only for s3://)."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from helpers_s3 import TargetFactory

from shardlite import ConfigurationError, ReplicaError, ReplicaUnavailable, ShardliteError
from shardlite.errors import ReplicaObjectMissing
from shardlite.replica import ReplicaTarget, check_name, open_target, parse_target, redact
from shardlite.replica.directory import DirectoryTarget
from shardlite.testing.s3 import S3Server


def _put_all(target: ReplicaTarget, items: dict[str, bytes], threads: int = 16) -> None:
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kv: target.put(*kv), items.items()))


# -- the conformance suite: every backend ------------------------------------------------------------------

def test_is_a_replica_target(replica_target: ReplicaTarget) -> None:
    assert isinstance(replica_target, ReplicaTarget)
    assert replica_target.url.startswith(("s3://", "file:///"))
    assert replica_target.url in repr(replica_target)


def test_put_get_round_trip(replica_target: ReplicaTarget) -> None:
    big = os.urandom(5 * 1024 * 1024)
    replica_target.put("n1/small", b"hello")
    replica_target.put("n1/empty", b"")
    replica_target.put("n1/big.bin", big)
    assert replica_target.get("n1/small") == b"hello"
    assert replica_target.get("n1/empty") == b""
    assert replica_target.get("n1/big.bin") == big
    assert replica_target.head("n1/small") == 5
    assert replica_target.head("n1/empty") == 0
    assert replica_target.head("n1/big.bin") == len(big)
    replica_target.put("n1/view", memoryview(b"from a view"))  # any bytes-like object
    assert replica_target.get("n1/view") == b"from a view"


def test_missing_objects(replica_target: ReplicaTarget) -> None:
    assert replica_target.head("nothing/here") is None
    with pytest.raises(ReplicaObjectMissing) as caught:
        replica_target.get("nothing/here")
    assert isinstance(caught.value, KeyError) and isinstance(caught.value, ShardliteError)
    assert "nothing/here" in str(caught.value) and replica_target.url in str(caught.value)
    with pytest.raises(KeyError):
        replica_target.get_range("nothing/here", 0, 10)
    with pytest.raises(KeyError):
        replica_target.get_range("nothing/here", 0, 0)
    replica_target.put("some/object", b"x")
    assert replica_target.head("some") is None  # a folder of objects is no object
    with pytest.raises(KeyError):
        replica_target.get("some")


def test_overwrite_replaces_whole(replica_target: ReplicaTarget) -> None:
    replica_target.put("obj", b"a" * 1000)
    replica_target.put("obj", b"short")
    assert replica_target.get("obj") == b"short"
    assert replica_target.head("obj") == 5
    assert list(replica_target.list()) == [("obj", 5)]


def test_put_if_absent(replica_target: ReplicaTarget) -> None:
    assert replica_target.put_if_absent("lease/a", b"writer-1") is True
    assert replica_target.put_if_absent("lease/a", b"writer-2") is False
    assert replica_target.get("lease/a") == b"writer-1"  # the loser changed nothing
    assert replica_target.put_if_absent("lease/a", b"writer-1") is True  # the same bytes: a retry of the winner
    replica_target.put("lease/a", b"replaced")  # put still overwrites
    assert replica_target.get("lease/a") == b"replaced"


def test_put_if_absent_race_has_one_winner(replica_target: ReplicaTarget) -> None:
    """Writers racing on one name: exactly one is told it won, and the name holds its bytes."""
    for round_ in range(2):  # SeaweedFS makes racing conditional writes wait in steps of a second: few rounds
        name = f"race/{round_}"
        barrier = threading.Barrier(5)

        def claim(i: int, name: str = name, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return replica_target.put_if_absent(name, f"writer-{i}".encode())

        with ThreadPoolExecutor(5) as pool:
            outcomes = list(pool.map(claim, range(5)))
        assert outcomes.count(True) == 1, outcomes
        assert replica_target.get(name) == f"writer-{outcomes.index(True)}".encode()


def test_ranges(replica_target: ReplicaTarget) -> None:
    data = bytes(range(256)) * 4  # 1,024 bytes
    replica_target.put("packed", data)
    assert replica_target.get_range("packed", 0, 10) == data[:10]
    assert replica_target.get_range("packed", 100, 50) == data[100:150]
    assert replica_target.get_range("packed", 1000, 100) == data[1000:]  # cut at the end
    assert replica_target.get_range("packed", 1023, 1) == data[1023:]
    assert replica_target.get_range("packed", 1024, 10) == b""  # from the end on
    assert replica_target.get_range("packed", 5000, 1) == b""
    assert replica_target.get_range("packed", 7, 0) == b""
    assert replica_target.get_range("packed", 0, 1024) == data
    replica_target.put("empty", b"")
    assert replica_target.get_range("empty", 0, 10) == b""
    for start, length in ((-1, 5), (0, -1)):
        with pytest.raises(ValueError):
            replica_target.get_range("packed", start, length)


def test_list_sorted_by_code_point(replica_target: ReplicaTarget) -> None:
    """Sorted as S3 sorts keys: ``x/a-b`` and ``x/a.b`` before ``x/a/b`` ('-' and '.' come before '/'), which a
    server walking folders (SeaweedFS) does not do by itself."""
    names = ["x/a_b", "x/a/b", "x/a-b", "x/ab", "x/a.b", "x/a0", "x/a/c/d", "y/z", "x0"]
    _put_all(replica_target, {name: name.encode() for name in names})
    listed = list(replica_target.list())
    assert listed == sorted((name, len(name)) for name in names)
    assert [n for n, _ in listed][:3] == ["x/a-b", "x/a.b", "x/a/b"]
    assert [n for n, _ in replica_target.list("x/a")] == sorted(n for n in names if n.startswith("x/a"))
    assert [n for n, _ in replica_target.list("x/a/")] == ["x/a/b", "x/a/c/d"]
    assert [n for n, _ in replica_target.list("x")] == sorted(n for n in names if n.startswith("x"))
    assert [n for n, _ in replica_target.list("x/")] == sorted(n for n in names if n.startswith("x/"))
    assert list(replica_target.list("x/a/c/d")) == [("x/a/c/d", 7)]
    assert list(replica_target.list("nothing/")) == []
    assert list(replica_target.list("x/zz")) == []


def test_list_and_delete_past_one_page(replica_target: ReplicaTarget, make_replica_target: TargetFactory) -> None:
    """More than 1,000 objects (one S3 page, one DeleteObjects request): all listed, in order, and all
    deleted; the S3 target deletes them in batches of at most 1,000."""
    names = [f"seg/{i:05d}" for i in range(1100)]
    _put_all(replica_target, {name: b"%d" % i for i, name in enumerate(names)})
    replica_target.put("other/one", b"1")
    listed = list(replica_target.list("seg/"))
    assert [n for n, _ in listed] == names
    assert listed[1099] == ("seg/01099", 4)
    assert len(list(replica_target.list())) == 1101
    batches: list[int] = []
    if make_replica_target.backend == "s3":  # watch the requests go by (the real client does the work)
        client: Any = replica_target._client  # type: ignore[attr-defined]
        real = client.delete_objects

        def counting(**kwargs: Any) -> Any:
            batches.append(len(kwargs["Delete"]["Objects"]))
            return real(**kwargs)

        client.delete_objects = counting
    replica_target.delete_many(iter(names))  # any iterable
    if make_replica_target.backend == "s3":
        assert batches == [1000, 100]
    assert list(replica_target.list()) == [("other/one", 1)]


def test_prefixes_are_isolated(make_replica_target: TargetFactory) -> None:
    """Two targets side by side (one bucket for S3), even with prefixes that share a beginning, never see
    each other's objects."""
    first, second = make_replica_target("p1"), make_replica_target("p1x")
    first.put("obj", b"first")
    second.put("obj", b"second")
    second.put("only/second", b"2")
    assert first.get("obj") == b"first" and second.get("obj") == b"second"
    assert list(first.list()) == [("obj", 5)]
    assert list(second.list()) == [("obj", 6), ("only/second", 1)]
    assert first.head("only/second") is None
    first.delete_many(["obj", "only/second"])
    assert second.get("obj") == b"second" and second.get("only/second") == b"2"
    assert list(first.list()) == []


def test_delete_many(replica_target: ReplicaTarget) -> None:
    _put_all(replica_target, {"d/a": b"a", "d/b": b"b", "d/c/d": b"cd", "keep": b"k"})
    replica_target.delete_many(["d/a", "d/c/d", "never/was", "d/a"])  # missing and repeated names are fine
    assert list(replica_target.list()) == [("d/b", 1), ("keep", 1)]
    replica_target.delete_many([])
    with pytest.raises(ValueError):
        replica_target.delete_many(["d/b", "../keep"])  # every name is checked before anything is deleted
    assert list(replica_target.list()) == [("d/b", 1), ("keep", 1)]
    replica_target.delete_many(["d/b"])
    replica_target.put("d/b/now-a-folder", b"x")  # a deleted name can become a folder, and the reverse
    replica_target.delete_many(["d/b/now-a-folder"])
    replica_target.put("d/b", b"again")
    assert list(replica_target.list()) == [("d/b", 5), ("keep", 1)]


HOSTILE = ["", "/a", "a/", "a//b", ".", "..", "../a", "a/../b", "a/./b", ".hidden", "a/.tmp-1234", "-rf", "A",
           "Upper/x", "a b", "a\x00b", "a\nb", "a\\b", "a?b", "a%2fb", "a:b", "a*b", "é", "ｆｕｌｌ", "a\u202eb",
           "x" * 129, "/".join(["a"] * 17), "a/" * 255 + "b", "~user"]


@pytest.mark.parametrize("name", HOSTILE, ids=lambda n: repr(n)[:20])
def test_hostile_names_refused(replica_target: ReplicaTarget, name: str, tmp_path: Path) -> None:
    calls = [lambda: replica_target.put(name, b"x"), lambda: replica_target.put_if_absent(name, b"x"),
             lambda: replica_target.get(name), lambda: replica_target.get_range(name, 0, 1),
             lambda: replica_target.head(name), lambda: replica_target.delete_many([name])]
    for call in calls:
        with pytest.raises(ValueError):
            call()
    if name not in ("", "a/", "a/" * 255 + "b"):  # "" and "a/" are valid listing prefixes
        with pytest.raises(ValueError):
            list(replica_target.list(name))
    assert list(replica_target.list()) == []
    if isinstance(replica_target, DirectoryTarget):
        assert not os.path.exists(replica_target.path)  # nothing was created anywhere


def test_non_text_names_refused(replica_target: ReplicaTarget) -> None:
    for name in (b"bytes", 7, None):
        with pytest.raises(ValueError):
            replica_target.put(name, b"x")  # type: ignore[arg-type]


def test_valid_names() -> None:
    for name in ("a", "n1/000001.seg", "x_y-z.1", "0", "_meta/state", "a" * 128, "/".join(["a"] * 16)):
        assert check_name(name) == name


def test_folder_and_object_of_one_name(replica_target: ReplicaTarget) -> None:
    """The contract forbids a name that is also the folder of another name; the directory backend refuses
    it (S3 would hold both)."""
    replica_target.put("f/obj", b"1")
    if not isinstance(replica_target, DirectoryTarget):
        pytest.skip("S3 holds a key and the keys below it side by side; callers never make both")
    with pytest.raises(ValueError, match="folder"):
        replica_target.put("f/obj/child", b"2")
    replica_target.put("g/dir/child", b"1")
    with pytest.raises(ValueError, match="folder"):
        replica_target.put("g/dir", b"2")
    assert list(replica_target.list()) == [("f/obj", 1), ("g/dir/child", 1)]


# -- the directory backend ----------------------------------------------------------------------------------

_WRITER = textwrap.dedent("""
    import sys
    from shardlite.replica import open_target
    target = open_target(sys.argv[1])
    size = int(sys.argv[2])
    i = 0
    while True:
        i += 1
        data = bytes([i % 251]) * size
        print(i, flush=True)
        target.put("big/object", data)
""")


def test_directory_put_is_atomic_under_kill_9(tmp_path: Path) -> None:
    """A writer killed (kill -9) in the middle of ``put`` leaves the previous object whole and nothing else
    visible; a reader never sees a part of an object while it writes."""
    url = "file://" + os.fspath(tmp_path / "replica")
    target = open_target(url)
    size = 8 * 1024 * 1024
    rng = random.Random(7)
    for _round in range(3):
        child = subprocess.Popen([sys.executable, "-c", _WRITER, url, str(size)], stdout=subprocess.PIPE,
                                 text=True)
        try:
            assert child.stdout is not None
            while int(child.stdout.readline() or 0) < 3:  # two puts done, the third under way
                assert child.poll() is None, "the writer died"
            seen = set()
            deadline = time.monotonic() + rng.uniform(0.0, 0.08)
            while time.monotonic() < deadline:  # read while it writes
                data = target.get("big/object")
                assert len(data) == size and data.count(data[:1]) == size, "a reader saw a partial object"
                seen.add(data[0])
            os.kill(child.pid, signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        data = target.get("big/object")
        assert len(data) == size and data.count(data[:1]) == size
        assert list(target.list()) == [("big/object", size)]  # the killed writer's temporary file is not listed


def test_directory_modes(tmp_path: Path) -> None:
    """Folders the target creates are 0700 and its files 0600, whatever the umask; its root too."""
    root = tmp_path / "replica" / "deep"
    target = open_target("file://" + os.fspath(root))
    old = os.umask(0)
    try:
        target.put("a/b/c", b"1")
        target.put_if_absent("a/d", b"2")
        target.put("top", b"3")
    finally:
        os.umask(old)
    for folder in (tmp_path / "replica", root, root / "a", root / "a" / "b"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for file in (root / "a" / "b" / "c", root / "a" / "d", root / "top"):
        assert stat.S_IMODE(file.stat().st_mode) == 0o600, file
    assert sorted(p.name for p in (root / "a").iterdir()) == ["b", "d"]  # no temporary file left


def test_directory_prunes_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "replica"
    target = open_target("file://" + os.fspath(root))
    target.put("a/b/c/d", b"1")
    target.put("a/keep", b"2")
    target.delete_many(["a/b/c/d"])
    assert sorted(p.name for p in (root / "a").iterdir()) == ["keep"]
    assert root.is_dir()


def test_directory_stale_temporary_files_do_not_keep_folders(tmp_path: Path) -> None:
    """A killed writer's temporary file (``.tmp-*``, never listed) older than an hour goes with its folder
    when the folder's last object is deleted; a fresh one (a writer at work) keeps the folder."""
    from shardlite.replica.directory import STALE_TEMP_S

    root = tmp_path / "replica"
    target = open_target("file://" + os.fspath(root))
    for folder in ("old", "fresh"):
        target.put(f"{folder}/x", b"1")
        (root / folder / ".tmp-0123456789abcdef").write_bytes(b"partial")
    past = time.time() - STALE_TEMP_S - 60
    os.utime(root / "old" / ".tmp-0123456789abcdef", (past, past))
    assert list(target.list()) == [("fresh/x", 1), ("old/x", 1)]
    target.delete_many(["old/x", "fresh/x"])
    assert sorted(p.name for p in root.iterdir()) == ["fresh"]
    assert [p.name for p in (root / "fresh").iterdir()] == [".tmp-0123456789abcdef"]


def test_directory_puts_and_deletes_race_on_shared_folders(tmp_path: Path) -> None:
    """Writers filling and emptying folders under one parent at once (each delete prunes the folders it
    empties while others create them): every put lands, nothing fails."""
    target = open_target("file://" + os.fspath(tmp_path / "replica"))

    def churn(worker: int) -> None:
        for i in range(100):
            name = f"shared/{i % 2}/deep/w{worker}"  # folders shared by all the writers
            target.put(name, b"%d" % i)
            assert target.get(name) == b"%d" % i
            target.delete_many([name])
        target.put(f"shared/w{worker}/last", b"done")

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(churn, range(6)))
    assert list(target.list()) == [(f"shared/w{w}/last", 4) for w in range(6)]


def test_directory_full_or_read_only_disk_is_unavailable(tmp_path: Path) -> None:
    """A full disk or a read-only mount under a directory target: ReplicaUnavailable naming the object and
    the cause; a failed put leaves no temporary file, and the target works again once there is room."""
    from helpers_fs import remount, tmpfs

    with tmpfs(tmp_path / "disk", size="2m") as disk:
        target = open_target("file://" + os.fspath(disk / "replica"))
        target.put("a/small", b"1")
        with pytest.raises(ReplicaUnavailable, match=r"'a/big'.*No space left on device"):
            target.put("a/big", b"x" * (4 * 1024 * 1024))
        assert sorted(p.name for p in (disk / "replica" / "a").iterdir()) == ["small"]
        target.put("a/fits", b"y" * 1024)
        remount(disk, "ro")
        try:
            with pytest.raises(ReplicaUnavailable, match=r"'a/more'.*Read-only file system"):
                target.put("a/more", b"z")
            assert target.get("a/fits") == b"y" * 1024  # reads go on
        finally:
            remount(disk, "rw")


def test_directory_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "replica").write_bytes(b"not a folder")
    target = open_target("file://" + os.fspath(tmp_path / "replica"))
    with pytest.raises(ConfigurationError, match="not a directory"):
        target.put("a/x", b"1")
    assert target.head("a/x") is None and list(target.list()) == []


# -- the S3 backend: outages, errors, credentials -----------------------------------------------------------

@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials of no server in the AWS environment, and nowhere else to look (for loopback servers that
    are not S3 servers)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIDNOSERVER", "AWS_SECRET_ACCESS_KEY": "no-server-secret",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                        "AWS_SHARED_CREDENTIALS_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)


def test_s3_outage_is_unavailable_then_recovers(s3_env: S3Server) -> None:
    """The server stopped: every call fails with ReplicaUnavailable within seconds (never a hang), naming the
    target and saying to retry; started again on its data, the same target works and the data is there."""
    target = open_target(s3_env.url("outage"))
    target.put("before", b"kept")
    s3_env.stop(kill=True)
    try:
        for call in (lambda: target.put("during", b"x"), lambda: target.get("before"),
                     lambda: target.head("before"), lambda: list(target.list()),
                     lambda: target.delete_many(["before"]), lambda: target.put_if_absent("during", b"x"),
                     lambda: target.get_range("before", 0, 2)):
            began = time.monotonic()
            with pytest.raises(ReplicaUnavailable) as caught:
                call()
            assert time.monotonic() - began < 15.0
            message = str(caught.value)
            assert target.url in message and "retry" in message
            assert s3_env.secret_key not in message and s3_env.access_key not in message
    finally:
        s3_env.start()
    assert target.get("before") == b"kept"
    target.put("after", b"new")
    assert [n for n, _ in target.list()] == ["after", "before"]
    target.close()


def test_s3_nothing_listening_is_unavailable(aws_env: None) -> None:
    import socket

    with socket.socket() as probe:  # a loopback port with nothing on it
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = open_target(f"s3://replica/p?endpoint=http://127.0.0.1:{port}&region=us-east-1")
    began = time.monotonic()
    with pytest.raises(ReplicaUnavailable, match=f"127.0.0.1:{port}"):
        target.put("x", b"1")
    assert time.monotonic() - began < 15.0
    target.close()


def test_s3_server_that_never_answers_is_unavailable(aws_env: None) -> None:
    """A server that accepts connections and never answers: each attempt ends at the read timeout, the
    attempts are bounded, and the caller gets ReplicaUnavailable (short timeouts here to keep it quick)."""
    import socket

    from shardlite.replica.s3 import S3Target

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # the kernel completes connections; nobody reads or answers
        port = silent.getsockname()[1]
        location = parse_target(f"s3://replica/p?endpoint=http://127.0.0.1:{port}&region=us-east-1")
        target = S3Target(location, read_timeout=0.3)
        began = time.monotonic()
        with pytest.raises(ReplicaUnavailable, match="ReadTimeout"):
            target.get("x")
        assert time.monotonic() - began < 10.0
        target.close()


class _ErrorServer:
    """A loopback HTTP server that answers every request with one S3 error (status and code), counting the
    requests: how the S3 target treats throttling, 5xx and refusals, which SeaweedFS cannot be made to send."""

    def __init__(self, status: int, code: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        owner = self
        body = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>no</Message>"
                "</Error>").encode()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" (1.0 makes it wait 1 s)

            def _answer(self) -> None:
                owner.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body) if self.command != "HEAD" else 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"s3://replica/p?endpoint=http://127.0.0.1:{self.httpd.server_address[1]}&region=us-east-1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.mark.parametrize(("status", "code", "error", "attempts"), [
    (503, "SlowDown", ReplicaUnavailable, 3),
    (500, "InternalError", ReplicaUnavailable, 3),
    (429, "TooManyRequests", ReplicaUnavailable, 3),
    (403, "AccessDenied", ConfigurationError, 1),
    (400, "InvalidArgument", ReplicaError, 1),
])
def test_s3_server_errors(aws_env: None, status: int, code: str, error: type[Exception], attempts: int) -> None:
    """Throttling and 5xx are retried a bounded number of times, then ReplicaUnavailable saying to retry;
    refusals are not retried: credentials are a ConfigurationError, anything else a ReplicaError; every
    message names the target, the operation, the code and the status."""
    server = _ErrorServer(status, code)
    target = open_target(server.url)
    try:
        began = time.monotonic()
        with pytest.raises(error) as caught:
            target.put("n1/seg", b"data")
        assert time.monotonic() - began < 10.0
        assert server.requests == attempts
        message = str(caught.value)
        assert target.url in message and "'n1/seg'" in message and code in message and f"HTTP {status}" in message
        if error is ReplicaUnavailable:
            assert "retry" in message
        assert type(caught.value) is error
    finally:
        target.close()
        server.close()


def test_s3_conditional_write_conflicts_are_retried_then_unavailable(aws_env: None) -> None:
    """409 ConditionalRequestConflict (AWS: a racing conditional write; try again) is retried by
    put_if_absent itself, a bounded number of times, then ReplicaUnavailable."""
    server = _ErrorServer(409, "ConditionalRequestConflict")
    target = open_target(server.url)
    try:
        with pytest.raises(ReplicaUnavailable, match="ConditionalRequestConflict"):
            target.put_if_absent("lease", b"me")
        assert server.requests == 3
    finally:
        target.close()
        server.close()


def test_s3_missing_bucket_is_a_configuration_error(s3_env: S3Server) -> None:
    target = open_target(s3_env.url("p", bucket="no-such-bucket"))
    with pytest.raises(ConfigurationError, match="does not exist"):
        target.put("x", b"1")
    target.close()


def test_s3_wrong_or_missing_credentials(s3_env: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused or missing credentials are a ConfigurationError saying where credentials come from; no
    message, str() or repr() ever shows the secret (nor the wrong one)."""
    wrong = "Wr0ngSecretValue" + "x" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    target = open_target(s3_env.url("creds"))
    with pytest.raises(ConfigurationError, match="AWS_ACCESS_KEY_ID") as caught:
        target.put("x", b"1")
    for text in (str(caught.value), repr(caught.value), str(target), repr(target), target.url):
        assert wrong not in text and s3_env.secret_key not in text
    target.close()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    target = open_target(s3_env.url("creds"))
    with pytest.raises(ConfigurationError, match="AWS_ACCESS_KEY_ID"):
        target.get("x")
    target.close()


def test_s3_target_never_shows_the_secret(s3_env: S3Server) -> None:
    target = open_target(s3_env.url("shown"))
    texts = [str(target), repr(target), target.url, s3_env.url("shown"), repr(s3_env)]
    with pytest.raises(ReplicaObjectMissing) as caught:
        target.get("absent")
    texts.append(str(caught.value))
    for text in texts:
        assert s3_env.secret_key not in text
    target.close()


def test_s3_objects_are_plain_keys(s3_env: S3Server) -> None:
    """Objects are the keys ``<prefix>/<name>`` of the bucket, readable by any S3 client; keys that are not
    valid names under the prefix (a stranger's) are not listed."""
    target = open_target(s3_env.url("plain/keys"))
    target.put("n1/seg", b"abc")
    client: Any = s3_env.client()
    assert client.get_object(Bucket=s3_env.bucket, Key="plain/keys/n1/seg")["Body"].read() == b"abc"
    client.put_object(Bucket=s3_env.bucket, Key="plain/keys/Not A Name", Body=b"?")
    assert list(target.list()) == [("n1/seg", 3)]
    client.close()
    target.close()


# -- locations -----------------------------------------------------------------------------------------------

def test_parse_locations() -> None:
    s3 = parse_target("s3://my-bucket/some/Prefix?endpoint=http://127.0.0.1:8333&region=eu-west-1")
    assert (s3.scheme, s3.bucket, s3.prefix, s3.endpoint, s3.region) == (
        "s3", "my-bucket", "some/Prefix", "http://127.0.0.1:8333", "eu-west-1")
    assert s3.url == "s3://my-bucket/some/Prefix?endpoint=http://127.0.0.1:8333&region=eu-west-1"
    assert parse_target("s3://bucket").url == "s3://bucket"
    assert parse_target("s3://bucket/p/").prefix == "p"
    assert parse_target(" file:///var/replica/ ").path == "/var/replica"
    assert parse_target("file://localhost/var/replica").url == "file:///var/replica"


@pytest.mark.parametrize("url", [
    "file://relative/path", "file:relative", "file:///", "file:///a/../b", "file:///a?x=1", "/plain/path",
    "relative", "http://host/bucket", "s3://ab", "s3://Bad_Bucket", "s3://MyBucket", "s3://my..bucket", "s3://-bucket", "s3://bucket:9000/p",
    "s3://bucket/a//b", "s3://bucket/.hidden", "s3://bucket?endpoint=ftp://h", "s3://bucket?unknown=1",
    "s3://bucket?endpoint=http://h:1/path", "s3://bucket?region=", "s3://bucket?region=a&region=b",
    "s3://bucket#frag", "s3://bucket?endpoint=http://h:notaport", "", "s3://", "s3://bucket/\x00",
])
def test_bad_locations_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_target(url)


@pytest.mark.parametrize("url", [
    "s3://AKIAEXAMPLE:TopSecretValue1@bucket/prefix",
    "s3://bucket/prefix?endpoint=http://user:TopSecretValue1@127.0.0.1:9000",
    "s3://bucket/prefix?secret=TopSecretValue1",
    "s3://bucket/prefix?aws_secret_access_key=TopSecretValue1&endpoint=http://h:1",
])
def test_credentials_in_a_location_are_refused_unshown(url: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        open_target(url)
    assert "TopSecretValue1" not in str(caught.value) and "TopSecretValue1" not in repr(caught.value)
    assert "TopSecretValue1" not in redact(url)


def test_redact() -> None:
    assert redact("s3://key:secret@bucket/p?endpoint=http://u:pw@h:1&region=r&token=t") == \
        "s3://***@bucket/p?endpoint=http://***@h:1&region=r&token=***"
    assert redact("file:///var/replica") == "file:///var/replica"
    assert redact("s3://bucket/p?endpoint=http://h:1") == "s3://bucket/p?endpoint=http://h:1"
    assert redact("s3://[bad") == "<unparseable replica URL>"
    assert redact(None) == "<NoneType>"


def test_errors_are_in_the_tree() -> None:
    assert issubclass(ReplicaUnavailable, ReplicaError) and issubclass(ReplicaError, ShardliteError)
    assert issubclass(ReplicaObjectMissing, ReplicaError) and issubclass(ReplicaObjectMissing, KeyError)
    assert str(ReplicaObjectMissing("no object 'x'")) == "no object 'x'"


def test_the_s3_client_is_imported_only_for_s3(tmp_path: Path) -> None:
    """boto3/botocore cost about 0.2 s to import: a process whose roots do not replicate to S3 (and the CLI)
    never loads them; an s3:// target loads botocore when it is opened."""
    code = textwrap.dedent(f"""
        import sys, shardlite, shardlite.cli, shardlite.replica
        from shardlite import Router
        from shardlite.replica import open_target
        Router({os.fspath(tmp_path / 'root')!r}).close()
        target = open_target("file://" + {os.fspath(tmp_path / 'replica')!r})
        target.put("a", b"1")
        loaded = [m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore") or m == "shardlite.replica.s3"]
        assert not loaded, loaded
        open_target("s3://bucket/p?endpoint=http://127.0.0.1:9&region=us-east-1")
        assert "botocore" in sys.modules
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
