"""The relay under process crashes and concurrency (brief rules 9 and 12).

* a relay run as a subprocess (``shardlite relay run --app``) is killed with SIGKILL at random moments,
  several times, while the test process keeps emitting; then drained: every event applied exactly once and
  in order per (source, destination), every file passes ``PRAGMA integrity_check``;
* a relay killed at each step of its protocol (``Relay.fault``: "claimed", "delivered", "acknowledged"),
  in particular between the destination's commit and the source's acknowledgement: no duplicate effect;
  and killed after parking flags ahead of the acknowledgements ("parked-ahead": parked flags over events
  still in the outboxes): nothing lost, no duplicate effect;
* two relays at once over the same tenants (two subprocesses, or a subprocess and the test process): no
  duplicate effect, order kept.

The handler's effect is countable: one row per application in ``applied`` (no UNIQUE constraint) in the
destination; its AUTOINCREMENT id is the order in which the destination applied them.

The relays' lease is shortened (``relay.lease``) so that a killed relay's claims expire quickly and the
file's runtime stays small; with a tiny lease, relays overlap on one source all the time.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import apsw
import pytest
from helpers_routers import internal_rows

from shardlite import Busy, Router
from shardlite.core.outbox import Event, RetryPolicy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("any_meta")]  # both metadata backends (issue 15)

SCHEMA = [
    "CREATE TABLE applied(id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL, dest TEXT NOT NULL, "
    "n INTEGER NOT NULL, seq INTEGER NOT NULL, event_id TEXT NOT NULL, pid INTEGER NOT NULL)",
]
SOURCES = [f"src:{i}" for i in range(4)]
DESTS = ["dst:a", "dst:b"]
DEADLINE = 30.0  # generous bound for waiting loops; never a timing assertion
SHARDLITE = Path(sys.executable).with_name("shardlite")

_APP = """
import os
import signal
import time

from shardlite import Router
from shardlite.core.outbox import RetryPolicy

ROOT = {root!r}
SCHEMA = {schema!r}
DELAY = float(os.environ.get("T_DELAY", "0"))


def record(tx, event):
    tx.execute("INSERT INTO applied(source, dest, n, seq, event_id, pid) VALUES (?, ?, ?, ?, ?, ?)",
               (event.source, event.dest, event.payload["n"], event.seq, event.id, os.getpid()))
    if DELAY:
        time.sleep(DELAY)  # widen the window in which a kill lands mid-pass


def make():
    router = Router(ROOT, schema=SCHEMA, retry=RetryPolicy(max_attempts=50, backoff_base=0.001, backoff_cap=0.05))
    router.handler("t")(record)
    router.relay.lease = float(os.environ.get("T_LEASE", "10"))
    router.relay.batch = int(os.environ.get("T_BATCH", "500"))
    fault = os.environ.get("T_FAULT")
    if fault:
        def kill_at(step):
            if step == fault:
                os.kill(os.getpid(), signal.SIGKILL)
        router.relay.fault = kill_at
    return router
"""


def record(tx: Any, event: Event) -> None:
    tx.execute("INSERT INTO applied(source, dest, n, seq, event_id, pid) VALUES (?, ?, ?, ?, ?, ?)",
               (event.source, event.dest, event.payload["n"], event.seq, event.id, os.getpid()))


class Emitter:
    """Emits numbered events per (source, destination) pair from the test process and remembers how many."""

    def __init__(self, router: Router, rng: random.Random) -> None:
        self.router = router
        self.rng = rng
        self.sent = {(s, d): 0 for s in SOURCES for d in DESTS}

    def one_transaction(self) -> None:
        source = self.rng.choice(SOURCES)
        picks = [self.rng.choice(DESTS) for _ in range(self.rng.randint(1, 3))]

        def body(tx: Any) -> list[tuple[str, int]]:
            out = []
            counts: dict[str, int] = {}
            for dest in picks:
                n = self.sent[(source, dest)] + counts.get(dest, 0)
                counts[dest] = counts.get(dest, 0) + 1
                tx.emit(dest, "t", {"n": n})
                out.append((dest, n))
            return out

        self.router.run(source, body)  # retried whole on Busy: counted only once it committed
        for dest in picks:
            self.sent[(source, dest)] += 1

    def burst(self, count: int) -> None:
        for _ in range(count):
            self.one_transaction()

    @property
    def total(self) -> int:
        return sum(self.sent.values())


@pytest.fixture
def root(tmp_path: Path) -> str:
    return os.fspath(tmp_path / "data")


@pytest.fixture
def router(root: str) -> Iterator[Router]:
    r = Router(root, schema=SCHEMA, retry=RetryPolicy(max_attempts=50, backoff_base=0.001, backoff_cap=0.05))
    r.handler("t")(record)
    r.relay.lease = 0.5
    yield r
    r.close()


@pytest.fixture
def app(tmp_path: Path, root: str, router: Router) -> str:
    """Writes the relay app module into tmp_path (the subprocesses' cwd); the root exists already."""
    (tmp_path / "relay_app.py").write_text(_APP.format(root=root, schema=SCHEMA))
    return "relay_app:make"


def relay_process(tmp_path: Path, app: str, *, once: bool = False, **env: str) -> subprocess.Popen[str]:
    argv = [os.fspath(SHARDLITE), "relay", "run", "--app", app] + (["--once", "--json"] if once else [])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.Popen(argv, cwd=tmp_path, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_running(proc: subprocess.Popen[str]) -> None:
    """Block until `relay run` reports that its relay thread is running."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], DEADLINE)  # bounded: never hang on a stuck child
    line = proc.stdout.readline() if ready else ""  # the first line is printed right after relay.start()
    if "relay running" not in line:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"relay subprocess did not start: {line!r} {err}")


def expect_exactly_once(router: Router, sent: dict[tuple[str, str], int]) -> dict[int, int]:
    """Every event applied once, in order per pair; returns how many applications each pid made."""
    by_pid: dict[int, int] = {}
    for dest in DESTS:
        rows = router.query(dest, "SELECT source, n, pid FROM applied ORDER BY id") if router.exists(dest) else []
        for source in SOURCES:
            got = [n for s, n, _ in rows if s == source]
            assert got == list(range(sent[(source, dest)])), f"{source} -> {dest}: {got}"
        for _, _, pid in rows:
            by_pid[pid] = by_pid.get(pid, 0) + 1
    for source in SOURCES:
        if router.exists(source):
            assert internal_rows(router, source, "SELECT count(*) FROM _shardlite_outbox") == [(0,)]
    assert router._store.meta.dead_letters.list() == []
    return by_pid


def expect_intact(router: Router) -> None:
    """Rule 12: every file passes PRAGMA integrity_check after the kills."""
    embedded = os.path.join(router.root, "global.db")  # absent when the metadata is on PostgreSQL
    paths = [embedded] if os.path.exists(embedded) else []
    paths += [router.locate(key).path for key in router.tenants()]  # type: ignore[misc]
    for path in paths:
        conn = apsw.Connection(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], path
        finally:
            conn.close()


def drain_all(router: Router) -> None:
    end = time.monotonic() + DEADLINE
    while True:
        try:
            router.relay.drain(timeout=DEADLINE)
        except Busy:
            pass
        if router.relay.status()["pending"] == 0:
            return
        assert time.monotonic() < end, router.relay.status()


def test_relay_killed_with_sigkill_at_random_moments_then_drained(
        tmp_path: Path, router: Router, app: str) -> None:
    seed = int.from_bytes(os.urandom(4), "big")
    rng = random.Random(seed)
    emitter = Emitter(router, rng)
    kills = 0
    for _round in range(6):
        emitter.burst(rng.randint(20, 60))  # a backlog for the relay to start on
        proc = relay_process(tmp_path, app, T_LEASE="0.3", T_BATCH=str(rng.choice([5, 17, 64])),
                             T_DELAY="0.0005")
        try:
            wait_running(proc)
            stop_at = time.monotonic() + rng.uniform(0.0, 0.5)
            while time.monotonic() < stop_at:  # keep emitting while the relay works, then kill it
                emitter.one_transaction()
                time.sleep(rng.uniform(0.0, 0.003))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}"
        kills += 1
    assert kills == 6
    drain_all(router)
    by_pid = expect_exactly_once(router, emitter.sent)
    assert sum(by_pid.values()) == emitter.total, f"seed {seed}"
    expect_intact(router)


@pytest.mark.parametrize("step", ["claimed", "delivered", "acknowledged"])
def test_relay_killed_at_each_step_of_the_protocol_has_no_duplicate_effect(
        tmp_path: Path, router: Router, app: str, step: str) -> None:
    rng = random.Random(step)
    emitter = Emitter(router, rng)
    emitter.burst(40)
    proc = relay_process(tmp_path, app, once=True, T_FAULT=step, T_LEASE="0.3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    killer = proc.pid

    applied_before = {d: router.query(d, "SELECT count(*) FROM applied")[0][0] if router.exists(d) else 0
                      for d in DESTS}
    left = sum(internal_rows(router, s, "SELECT count(*) FROM _shardlite_outbox")[0][0] for s in SOURCES
               if router.exists(s))
    first_source_events = None
    if step == "claimed":
        assert sum(applied_before.values()) == 0 and left == emitter.total
    elif step == "delivered":
        # one pass claims every source, so the destinations committed all the events; no source has
        # acknowledged them
        assert sum(applied_before.values()) == emitter.total and left == emitter.total
        first_source_events = sum(applied_before.values())
    else:
        # everything was applied, then the first source acknowledged its share and the relay died
        assert sum(applied_before.values()) == emitter.total and 0 < left < emitter.total

    emitter.burst(10)  # new events after the crash
    drain_all(router)
    by_pid = expect_exactly_once(router, emitter.sent)
    if first_source_events is not None:
        assert by_pid.get(killer) == first_source_events  # redelivery had no effect: not re-applied
    assert sum(by_pid.values()) == emitter.total
    expect_intact(router)


def test_relay_killed_after_parking_flags_ahead_loses_nothing(tmp_path: Path, router: Router, app: str) -> None:
    emitter = Emitter(router, random.Random("ahead"))
    emitter.burst(20)
    drain_all(router)  # every source drained: its flag parked, its file names the version
    emitter.burst(20)
    wakes = router._store.emitter.wakes
    if wakes is not None:
        wakes.flush()
    proc = relay_process(tmp_path, app, once=True, T_FAULT="parked-ahead", T_LEASE="0.3")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, (out, err)
    pending = router._store.meta.pending
    stranded = [s for s in SOURCES if internal_rows(router, s, "SELECT count(*) FROM _shardlite_outbox")[0][0]
                and (flag := pending.row(s)) is not None and flag.parked is not None]
    assert stranded, "the kill left parked flags over events still in their outboxes"
    emitter.burst(10)
    drain_all(router)  # its sweep wakes the parked sources that hold events
    by_pid = expect_exactly_once(router, emitter.sent)
    assert sum(by_pid.values()) == emitter.total
    expect_intact(router)


@pytest.mark.parametrize("mode, lease", [("two-subprocesses", "10"), ("two-subprocesses", "0.002"),
                                         ("subprocess-and-test-process", "0.002")])
def test_two_relays_at_once_produce_no_duplicate_effect(
        tmp_path: Path, router: Router, app: str, mode: str, lease: str) -> None:
    rng = random.Random(f"{mode}{lease}")
    emitter = Emitter(router, rng)
    emitter.burst(300)  # a backlog both relays start on
    procs = [relay_process(tmp_path, app, T_LEASE=lease, T_BATCH="8", T_DELAY="0.0002")]
    if mode == "two-subprocesses":
        procs.append(relay_process(tmp_path, app, T_LEASE=lease, T_BATCH="8", T_DELAY="0.0002"))
    try:
        for proc in procs:
            wait_running(proc)
        if mode != "two-subprocesses":
            router.relay.lease = float(lease)
            router.relay.batch = 8
            router.relay.start()
        for _ in range(150):  # emit while both relays run
            emitter.one_transaction()
            if rng.random() < 0.2:
                time.sleep(0.002)
        end = time.monotonic() + DEADLINE
        while router.relay.status()["pending"]:
            assert time.monotonic() < end, "the relays did not deliver everything"
            time.sleep(0.02)
    finally:
        router.relay.stop()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        results = [proc.communicate(timeout=60) for proc in procs]
    for proc, (_out, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err  # SIGTERM stops `relay run` cleanly
    drain_all(router)  # nothing left; this also waits out any lease still held
    by_pid = expect_exactly_once(router, emitter.sent)
    assert sum(by_pid.values()) == emitter.total
    relays = {p.pid for p in procs} | ({os.getpid()} if mode != "two-subprocesses" else set())
    assert set(by_pid) <= relays
    expect_intact(router)
