"""How the relay reports errors (brief rule 15): the real cause, the tenant, without flooding the log.

* A handler's statement fails in a way after which SQLite rolled the whole destination transaction back
  (``INSERT OR ROLLBACK``, a full disk): the event's dead letter carries that error, never "no such
  savepoint", and the other sources' events for the same destination still go in, exactly once.
* A full disk, for real: a node on a 2 MB tmpfs mounted under the test's tmp dir (needs root; the test
  is skipped, with a warning, where mounting fails), filled up.
* Repeated identical errors are logged once per interval with a count of those suppressed
  (:class:`~shardlite.services.relay_health.ErrorLog`, with an injected clock); the last error is kept for
  ``status()`` and recorded in the global DB, where ``shardlite relay status`` shows it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers_fs import tmpfs
from helpers_routers import run_cli

from shardlite import Router
from shardlite.core.outbox import Event, RetryPolicy
from shardlite.services.relay_health import ErrorLog

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, n INTEGER NOT NULL, "
          "blob TEXT)",
          "CREATE TABLE uniq(k INTEGER PRIMARY KEY)"]
FAST = RetryPolicy(max_attempts=3, backoff_base=0.001, backoff_cap=0.01)
DEADLINE = 30.0  # generous bound for waiting loops; never a timing assertion


def record(tx: Any, event: Event) -> None:
    tx.execute("INSERT INTO applied(source, n, blob) VALUES (?, ?, ?)",
               (event.source, event.payload["n"], "x" * event.payload.get("size", 0)))


def applied(router: Router, dest: str, source: str) -> list[int]:
    return [n for (n,) in router.query(dest, "SELECT n FROM applied WHERE source = ? ORDER BY id", (source,))]


def emit(router: Router, source: str, dest: str, n: int, topic: str = "t", **extra: Any) -> None:
    with router.transaction(source) as tx:
        tx.emit(dest, topic, {"n": n, **extra})


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Callable[..., Router]]:
    made: list[Router] = []

    def factory(root: Path | None = None, **kwargs: Any) -> Router:
        kwargs.setdefault("schema", SCHEMA)
        kwargs.setdefault("retry", FAST)
        router = Router(root or tmp_path / "data", **kwargs)
        router.handler("t")(record)
        made.append(router)
        return router

    yield factory
    for router in reversed(made):
        router.close()


# -- the real error, not "no such savepoint" ----------------------------------------------------------------


@pytest.mark.parametrize("handler_kind", ["raises", "swallows"])
def test_a_handler_after_which_sqlite_rolled_back_the_transaction_is_recorded_with_its_real_error(
        make: Callable[..., Router], handler_kind: str) -> None:
    router = make()

    @router.handler("rb")
    def conflicting(tx: Any, event: Event) -> None:
        record(tx, event)
        tx.execute("INSERT OR ROLLBACK INTO uniq(k) VALUES (1)")
        try:
            tx.execute("INSERT OR ROLLBACK INTO uniq(k) VALUES (1)")  # rolls the whole transaction back
        except Exception:
            if handler_kind == "raises":
                raise

    for n in range(3):  # the same destination, in the same pass: these must still go in, once
        emit(router, "src:a", "user:d", n)
        emit(router, "src:c", "user:d", n)
    emit(router, "src:b", "user:d", 0, topic="rb")
    emit(router, "src:b", "user:d", 1)  # behind the culprit on its pair: goes on once it is dead
    stats = router.relay.drain(timeout=DEADLINE)
    assert applied(router, "user:d", "src:a") == [0, 1, 2] == applied(router, "user:d", "src:c")
    assert applied(router, "user:d", "src:b") == [1]
    assert stats.dead == 1
    (letter,) = router._store.meta.dead_letters.list()
    assert (letter.source, letter.seq, letter.attempts) == ("src:b", 1, FAST.max_attempts)
    assert "savepoint" not in letter.error
    expected = ("ConstraintError: UNIQUE constraint failed" if handler_kind == "raises"
                else "rolled its transaction back")
    assert expected in letter.error and "destination 'user:d'" in letter.error
    assert router.query("user:d", "SELECT count(*) FROM uniq") == [(0,)]


# -- a full disk, for real ---------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs under tmp_path (unmounted at teardown, after the routers closed; without one the test
    skips loudly, or fails under CI=true)."""
    with tmpfs(tmp_path / "small", "2m") as mnt:
        yield mnt


def fill(directory: Path, leave: int) -> None:
    """Fill the file system of ``directory`` but ``leave`` bytes."""
    free = shutil.disk_usage(directory).free
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def key_on(router: Router, node: str, prefix: str) -> str:
    return next(k for k in (f"{prefix}:{i}" for i in range(10_000)) if router.locate(k).node == node)


def test_a_full_disk_names_the_real_error_and_the_tenant_and_logs_once(
        small_disk: Path, make: Callable[..., Router], tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    router = make()
    router.nodes.add("small", path=os.fspath(small_disk / "node"))
    full, fine = key_on(router, "small", "user"), key_on(router, "n1", "user")
    source = key_on(router, "n1", "src")
    with router.transaction(full):
        pass
    fill(small_disk, leave=150_000)
    for n in range(3):
        emit(router, source, full, n, size=400_000)  # more than the disk has left
        emit(router, source, fine, n)
    with caplog.at_level(logging.WARNING, logger="shardlite.relay"):
        stats = router.relay.drain(timeout=DEADLINE)
    assert applied(router, fine, source) == [0, 1, 2]
    assert stats.dead == 3
    path = router.locate(full).path
    for letter in router._store.meta.dead_letters.list():
        assert letter.dest == full and letter.attempts == FAST.max_attempts
        error = letter.error
        assert "FullError: database or disk is full" in error and "savepoint" not in error
        assert f"destination {full!r}" in error and path is not None and path in error
    lines = [r.getMessage() for r in caplog.records if "FullError" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines  # 9 failed attempts: logged once, then the count suppressed
    assert "more like it suppressed" in lines[-1]
    assert all(r.exc_info is None for r in caplog.records)
    last = router.relay.status()["last_error"]
    assert last["tenant"] == full and "FullError" in last["error"]
    code, out, _err = run_cli(capsys, "relay", "status", "--root", router.root)  # any process sees it
    assert code == 0 and "last relay error" in out and "FullError" in out


def test_a_full_disk_under_everything_does_not_flood_the_log(
        small_disk: Path, make: Callable[..., Router], caplog: pytest.LogCaptureFixture) -> None:
    # the whole root on the small disk: tenants and the global DB fail; the relay thread keeps failing
    router = make(small_disk / "data")
    for n in range(40):
        emit(router, f"src:{n % 4}", f"user:{n % 5}", n, size=20_000)
    fill(small_disk, leave=0)
    with caplog.at_level(logging.WARNING, logger="shardlite.relay"):
        router.relay.start()
        end = time.monotonic() + DEADLINE
        while router.relay.errors.reported < 100:  # a hundred failures and more...
            assert time.monotonic() < end, router.relay.errors.reported
            time.sleep(0.01)
        router.relay.stop()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) <= 12, messages  # ...a few lines: each kind once, then its count suppressed
    assert any("more like it suppressed" in m for m in messages)
    assert sum(1 for r in caplog.records if r.exc_info is not None) <= 1  # a pass failure's traceback: once
    assert router.relay.running is False and router.relay.last_error is not None


# -- rate-limited lines ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_error_log_logs_a_kind_once_per_interval_with_the_count_suppressed(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    recorded: list[dict[str, Any]] = []
    errors = ErrorLog(logging.getLogger("shardlite.relay"), interval=30.0, on_logged=recorded.append, clock=clock)
    with caplog.at_level(logging.WARNING, logger="shardlite.relay"):
        for i in range(100):
            errors.report(f"destination 'user:{i % 7}': FullError: database or disk is full",
                          kind="destination: FullError: database or disk is full", tenant=f"user:{i % 7}")
            clock.now += 0.1  # 100 errors in 10 s
        errors.report("source 'src:1': SQLError: foreign key mismatch", kind="source: SQLError: fk", tenant="src:1")
        assert [r.getMessage() for r in caplog.records] == [
            "relay: destination 'user:0': FullError: database or disk is full",
            "relay: source 'src:1': SQLError: foreign key mismatch"]
        clock.now += 25.0  # 35 s after the first line
        errors.report("destination 'user:3': FullError: database or disk is full",
                      kind="destination: FullError: database or disk is full", tenant="user:3")
        assert caplog.records[-1].getMessage() == (
            "relay: destination 'user:3': FullError: database or disk is full "
            "[99 more like it suppressed in the last 35 s, on 7 tenants]")
        errors.report("destination 'user:4': FullError: database or disk is full",
                      kind="destination: FullError: database or disk is full", tenant="user:4")
        clock.now += 1.0
        errors.flush()  # what was suppressed since the last line is said, not lost
        assert caplog.records[-1].getMessage() == (
            "relay: destination 'user:4': FullError: database or disk is full "
            "[1 more like it suppressed in the last 1 s]")
        errors.flush()
    assert len(caplog.records) == 4 and errors.reported == 103 and errors.logged == 4
    assert [r["tenant"] for r in recorded] == ["user:0", "src:1", "user:3", "user:4"]
    assert errors.last is not None and errors.last["tenant"] == "user:4"
