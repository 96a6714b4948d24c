"""``relay retry`` re-emits a dead letter exactly once, also when the process is killed (kill -9) between the
source's commit of the new event and the letter's deletion from the metadata (brief rules 9 and 12)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from shardlite import Router
from shardlite.core.outbox import Event, RetryPolicy

SCHEMA = ["CREATE TABLE applied(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, seq INTEGER NOT NULL)"]
POLICY = RetryPolicy(max_attempts=1, backoff_base=0.001, backoff_cap=0.01)

_RETRY = """
import os, signal
from shardlite import Router
from shardlite.core.outbox import RetryPolicy

router = Router({root!r}, schema={schema!r}, retry=RetryPolicy(max_attempts=1, backoff_base=0.001, backoff_cap=0.01))

def kill_at(step):
    if step == {step!r}:
        os.kill(os.getpid(), signal.SIGKILL)

router.relay.fault = kill_at
print(router.relay.retry_dead(), flush=True)
router.close()
"""


def _retry_killed_at(router: Router, tmp_path: Path, step: str) -> None:
    """Run ``relay retry`` in a process killed (SIGKILL) at ``step``; the letter outlives it."""
    script = tmp_path / "retry.py"
    script.write_text(textwrap.dedent(_RETRY.format(root=router.root, schema=SCHEMA, step=step)))
    killed = subprocess.run([sys.executable, os.fspath(script)], capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [d.seq for d in router._store.meta.dead_letters.list()] == [1]


def _dead_letter(router: Router, fail: dict[str, bool]) -> None:
    @router.handler("t")
    def apply(tx: Any, event: Event) -> None:
        if fail["on"]:
            raise RuntimeError("not yet")
        tx.execute("INSERT INTO applied(n, seq) VALUES (?, ?)", (event.payload["n"], event.seq))

    with router.transaction("user:src") as tx:
        tx.emit("user:dst", "t", {"n": 1})
    router.relay.drain(timeout=30)
    assert [d.seq for d in router._store.meta.dead_letters.list()] == [1]


def test_a_retry_killed_after_the_re_emit_commits_is_not_emitted_twice(root: str, tmp_path: Path) -> None:
    fail = {"on": True}
    with Router(root, schema=SCHEMA, retry=POLICY) as router:
        _dead_letter(router, fail)
        _retry_killed_at(router, tmp_path, "re-emitted")  # the new event committed in the source
        assert router._store.meta.pending.row("user:src") is not None  # and it is flagged

        assert router.relay.retry_dead() == 1  # the re-run finds the re-emit done and only deletes the letter
        assert router._store.meta.dead_letters.list() == []
        assert router.relay.retry_dead() == 0
        fail["on"] = False
        router.relay.drain(timeout=30)
        assert router.query("user:dst", "SELECT n FROM applied") == [(1,)]  # exactly once
        assert router.relay.status()["pending"] == 0


def test_a_retry_killed_before_the_re_emit_commits_emits_it_on_the_next_run(root: str, tmp_path: Path) -> None:
    """A kill before the source's commit: nothing was re-emitted, the letter stays, the next run emits it."""
    fail = {"on": True}
    with Router(root, schema=SCHEMA, retry=POLICY) as router:
        _dead_letter(router, fail)
        _retry_killed_at(router, tmp_path, "re-emitting")
        fail["on"] = False
        router.relay.drain(timeout=30)
        assert router.query("user:dst", "SELECT n FROM applied") == []  # nothing was re-emitted
        assert router.relay.retry_dead() == 1
        router.relay.drain(timeout=30)
        assert router.query("user:dst", "SELECT n FROM applied") == [(1,)]
        assert router._store.meta.dead_letters.list() == []


def test_retrying_a_letter_again_after_it_died_again_re_emits_it_again(root: str) -> None:
    """The re-emitted event is a new event: when it dies too, its own letter is retried like any other
    (the once-only mark is per letter, not per payload)."""
    fail = {"on": True}
    with Router(root, schema=SCHEMA, retry=POLICY) as router:
        _dead_letter(router, fail)
        assert router.relay.retry_dead() == 1
        router.relay.drain(timeout=30)  # dies again, under its new seq
        assert [d.seq for d in router._store.meta.dead_letters.list()] == [2]
        assert router.relay.retry_dead() == 1
        fail["on"] = False
        router.relay.drain(timeout=30)
        assert router.query("user:dst", "SELECT n, seq FROM applied") == [(1, 3)]
        assert router._store.meta.dead_letters.list() == []
