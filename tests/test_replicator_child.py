"""``Router(root, replicate=URL, replicator=True)``: the replicator as a child process of the app
(shardlite/services/replicator_child.py). Real processes; every wait polls with a deadline."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers_cli import run_script
from helpers_procs import DEADLINE, child_env, write_script
from helpers_s3 import TargetFactory

import shardlite
from shardlite.core import timeline
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_read, replication, replicator_child
from shardlite.services.replication import Replication

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}


def _gone(pid: int) -> bool:
    """No such process, or a zombie nobody reaps (this machine's pid 1 may not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _ready(pid: int) -> bool:
    """The child has its SIGTERM handler and its parent-death signal in place (it unblocks SIGTERM after both)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = {line.split(":")[0]: int(line.split()[1], 16) for line in f
                     if line.startswith(("SigBlk", "SigCgt"))}
    except FileNotFoundError:
        return False
    bit = 1 << (signal.SIGTERM - 1)
    return bool(masks["SigCgt"] & bit) and not masks["SigBlk"] & bit


def _until(what: str, check: Callable[[], bool], deadline: float = DEADLINE) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {deadline} s: {what}")
        time.sleep(0.05)


def _replicated(target: ReplicaTarget, key: str) -> list[str] | None:
    import apsw

    history = replica_read.captures_of(target, [key]).get(key)
    found = timeline.image_at(history) if history else None
    if found is None:
        return None
    data = bytearray(found[0])
    data[18:20] = b"\x01\x01"
    conn = apsw.Connection(":memory:")
    conn.deserialize("main", bytes(data))
    return [body for (body,) in conn.execute("SELECT body FROM notes ORDER BY id")]


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


def test_replicator_without_replicate_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(shardlite.ConfigurationError, match="does not replicate.*replicate="):
        shardlite.Router(tmp_path / "root", replicator=True)

    async def main() -> None:
        with pytest.raises(shardlite.ConfigurationError, match="does not replicate"):
            shardlite.AsyncRouter(tmp_path / "root", replicator=True)

    asyncio.run(main())
    assert not replicator_child._live


def test_the_child_ships_the_writes_and_is_gone_after_close(tmp_path: Path,
                                                             make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url()
    target = make_replica_target()
    router = shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url, replicator=True)
    try:
        child = router._replicator
        assert child is not None and child.pid is not None
        pid = child.pid
        for n in range(3):
            _write(router, "user:a", f"a{n}")
        _write(router, "user:b", "b0")
        _until("the replica holds user:a's writes", lambda: _replicated(target, "user:a") == ["a0", "a1", "a2"])
        _write(router, "user:a", "last")  # committed just before close: the child's last round ships it
    finally:
        router.close()
    assert _gone(pid)
    assert child.stop() == 0  # stopped cleanly by SIGTERM; stop() is idempotent
    assert _replicated(target, "user:a") == ["a0", "a1", "a2", "last"]
    assert _replicated(target, "user:b") == ["b0"]


def test_the_async_router_child(tmp_path: Path) -> None:
    url = "file://" + str(tmp_path / "replica")

    async def main() -> int:
        async with shardlite.AsyncRouter(tmp_path / "root", schema=SCHEMA, replicate=url, replicator=True) as ar:
            assert ar._replicator is not None and ar._replicator.pid is not None
            async with ar.transaction("user:a") as tx:
                await tx.execute("INSERT INTO notes(body) VALUES ('x')")
            return ar._replicator.pid

    pid = asyncio.run(main())
    assert _gone(pid)
    from shardlite.replica.target import open_target

    target = open_target(url)
    try:
        assert _replicated(target, "user:a") == ["x"]
    finally:
        target.close()


def test_the_run_loop_stops_once_its_parent_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The portable rule: ``os.getppid()`` is compared with ``--parent`` before every round (each capture tick
    of the loop)."""
    with shardlite.Router(tmp_path / "root", replicate="file://" + str(tmp_path / "replica")) as router:
        rep = Replication(router._store)
        rounds: list[int] = []
        real = rep._tick
        monkeypatch.setattr(rep, "_tick", lambda **kw: rounds.append(1) or real(**kw))
        looks = iter([100, 100, 100, 1])
        monkeypatch.setattr(replication.os, "getppid", lambda: next(looks))
        done = threading.Event()
        thread = threading.Thread(target=lambda: (rep.run(threading.Event(), interval=0.01, parent=100),
                                                  done.set()))
        thread.start()
        thread.join(DEADLINE)
        rep.close()
        assert done.is_set() and len(rounds) == 3


def test_replicate_run_with_a_parent_that_is_not_its_parent_exits_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    made = run_script("init", "--root", root, "--replicate", "file://" + str(tmp_path / "replica"), env=child_env())
    assert made.returncode == 0, made.stderr
    done = run_script("--root", root, "replicate", "run", "--parent", "1", env=child_env(), timeout=DEADLINE)
    assert done.returncode == 0, done.stderr


APP = """
import sys
import shardlite
SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}
router = shardlite.Router(sys.argv[1], schema=SCHEMA, replicate=sys.argv[2], replicator=True)
print("child", router._replicator.pid, flush=True)
for line in sys.stdin:
    word = line.split()
    if word[0] == "write":
        with router.transaction(word[1]) as tx:
            tx.execute("INSERT INTO notes(body) VALUES (?)", (word[2],))
        print("ok", flush=True)
    elif word[0] == "close":
        router.close()
        print("closed", flush=True)
        break
"""


class _App:
    def __init__(self, script: Path, root: str, url: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(script), root, url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=child_env())
        self.child = int(self._line().split()[1])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the app died"
        return line

    def say(self, *words: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        return self._line().strip()

    def end(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def test_the_child_exits_when_the_app_is_killed_9(tmp_path: Path) -> None:
    script = write_script(tmp_path, "app.py", APP)
    app = _App(script, str(tmp_path / "root"), "file://" + str(tmp_path / "replica"))
    try:
        assert app.say("write", "user:a", "x") == "ok"
        _until("the child is in its run loop", lambda: _ready(app.child))
        app.proc.send_signal(signal.SIGKILL)
        app.proc.wait()
        _until("the child of a killed app exits", lambda: _gone(app.child))
    finally:
        app.end()
        if not _gone(app.child):
            os.kill(app.child, signal.SIGKILL)


def _owner_of(lock: str) -> int | None:
    """The pid holding ``flock`` on ``lock`` (from /proc/locks), or None."""
    try:
        info = os.stat(lock)
    except FileNotFoundError:
        return None
    where = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if "->" in parts:
                continue
            if parts[1] == "FLOCK" and parts[5] == where:
                return int(parts[4])
    return None


def test_two_apps_one_owner_one_standby_then_takeover(tmp_path: Path) -> None:
    root = str(tmp_path / "root")
    url = "file://" + str(tmp_path / "replica")
    script = write_script(tmp_path, "app.py", APP)
    apps = [_App(script, root, url), _App(script, root, url)]
    lock = os.path.join(root, "n1", ".replica", "replicator.lock")
    try:
        for n, app in enumerate(apps):
            assert app.say("write", f"user:{n}", "first") == "ok"
        _until("one child owns the node", lambda: _owner_of(lock) in {a.child for a in apps})
        owner = next(a for a in apps if a.child == _owner_of(lock))
        standby = next(a for a in apps if a is not owner)
        assert not _gone(standby.child)
        once = run_script("--root", root, "--json", "replicate", "run", "--once", env=child_env(), timeout=DEADLINE)
        assert once.returncode == 0, once.stderr
        assert json.loads(once.stdout)["standby"] == ["n1"]
        assert owner.say("close") == "closed"
        owner.proc.wait(DEADLINE)
        assert _gone(owner.child)
        _until("the standby takes the node over", lambda: _owner_of(lock) == standby.child)
        assert standby.say("write", "user:1", "second") == "ok"
        assert standby.say("close") == "closed"
        assert _gone(standby.child)
    finally:
        for app in apps:
            app.end()
    from shardlite.replica.target import open_target

    target = open_target(url)
    try:
        assert _replicated(target, "user:0") == ["first"]
        assert _replicated(target, "user:1") == ["first", "second"]
    finally:
        target.close()


def test_a_crashed_child_is_logged_once_and_started_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="shardlite.replicator")
    with shardlite.Router(tmp_path / "root", replicate="file://" + str(tmp_path / "replica"),
                          replicator=True) as router:
        child = router._replicator
        assert child is not None and child.pid is not None
        first = child.pid
        os.kill(first, signal.SIGKILL)
        _until("a new child runs", lambda: child.pid not in (None, first))
        assert child.crashes == 1 and not child.gave_up
        second = child.pid
    assert second is not None and _gone(second) and _gone(first)
    crashes = [r for r in caplog.records if "exited with status" in r.getMessage()]
    assert len(crashes) == 1 and str(first) in crashes[0].getMessage()
    assert "-9" in crashes[0].getMessage()


def test_a_forked_copy_of_the_app_never_stops_the_child(tmp_path: Path) -> None:
    with shardlite.Router(tmp_path / "root", replicate="file://" + str(tmp_path / "replica"),
                          replicator=True) as router:
        child = router._replicator
        assert child is not None and child.pid is not None
        pid = os.fork()
        if pid == 0:  # the forked copy: its stop() and its exit handler leave the child alone
            code = 0 if child.stop() is None else 1
            replicator_child._stop_all()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert child.pid is not None and not _gone(child.pid)
        running = child.pid
    assert _gone(running)


def test_a_router_made_in_a_thread_that_ends_keeps_its_child(tmp_path: Path) -> None:
    """Linux sends the parent-death signal when the *thread* that started the child ends: the child checks
    ``os.getppid()`` and goes on while the app lives."""
    url = "file://" + str(tmp_path / "replica")
    made: list[shardlite.Router] = []

    def app_thread() -> None:
        router = shardlite.Router(tmp_path / "root", schema=SCHEMA, replicate=url, replicator=True)
        made.append(router)
        pid = router._replicator.pid  # type: ignore[union-attr]
        assert pid is not None
        _until("the child asked for its parent-death signal", lambda: _ready(pid))  # then this thread ends

    thread = threading.Thread(target=app_thread)
    thread.start()
    thread.join(DEADLINE)
    router = made[0]
    from shardlite.replica.target import open_target

    target = open_target(url)
    try:
        child = router._replicator
        assert child is not None
        first = child.pid
        _write(router, "user:a", "after the thread ended")
        _until("the child ships the write", lambda: _replicated(target, "user:a") == ["after the thread ended"])
        assert child.pid == first and child.crashes == 0
    finally:
        router.close()
        target.close()


def test_a_child_that_cannot_stay_up_is_given_up(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarts are bounded: after MAX_CRASHES quick exits in a row the router logs an error and stops trying."""
    caplog.set_level(logging.WARNING, logger="shardlite.replicator")
    monkeypatch.setattr(replicator_child, "MAX_CRASHES", 2)
    child = replicator_child.ReplicatorChild(str(tmp_path / "no-such-root"))  # `replicate run` exits with 2 there
    child.start()
    try:
        _until("the router gives the child up", lambda: child.gave_up)
    finally:
        child.stop()
    assert child.crashes == 2 and child.pid is None
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "starting it again" in m]) == 1
    assert len([m for m in messages if "not restarting it" in m]) == 1
