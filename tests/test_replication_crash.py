"""Disk loss after kill -9: writers and the replicator killed at random moments, the root deleted, every
tenant restored from the replica. Every write acknowledged more than the lag bound before the kill is
there exactly once, and each tenant comes back as a prefix of its acknowledged writes (never a hole). With
``durability="replicated"`` every acknowledged write is there, whenever the kill came. The writers register
accounts too (metadata): every account registered more than the lag bound before the kill is there (the
metadata's deltas, not only its 30 s snapshots)."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers_cli import run_script, shardlite_command
from helpers_procs import child_env, spawn, write_script
from helpers_s3 import TargetFactory

import shardlite
from shardlite.core import metasnap
from shardlite.replica.target import ReplicaTarget
from shardlite.services import replica_read
from shardlite.services.replica_restore import restore_root_from_replica

SCHEMA = {"user": ["CREATE TABLE log(n INTEGER PRIMARY KEY, body TEXT)"]}
KEYS = [f"user:{i}" for i in range(4)]
#: The lag bound the test holds the replicator to at --interval 0.2 (a round every 0.2 s, plus its work, with
#: room for a loaded machine: the whole suite shares two cores).
LAG_BOUND_S = 3.0

WRITER = """
import os, sys, time
import shardlite
SCHEMA = {"user": ["CREATE TABLE log(n INTEGER PRIMARY KEY, body TEXT)"]}
durability = sys.argv[3] if len(sys.argv) > 3 else "local"
router = shardlite.Router(sys.argv[1], schema=SCHEMA, durability=durability, durability_timeout=20.0)
keys = sys.argv[2].split(",")
n = 0
next_account = 0.0
while True:
    n += 1
    key = keys[n % len(keys)]
    try:
        with router.transaction(key) as tx:
            tx.execute("INSERT INTO log(n, body) VALUES (?, ?)", (n, "x" * (n % 300)))
    except shardlite.ReplicationUnavailable:
        sys.stdout.write(f"unconfirmed {n}\\n")  # committed, not acknowledged
        sys.stdout.flush()
        continue
    sys.stdout.write(f"{key} {n} {time.time_ns()}\\n")
    if time.monotonic() >= next_account:  # an account every 0.2 s, however slow the writes
        next_account = time.monotonic() + 0.2
        email = f"w{os.getpid()}-{n}@example.com"
        router.accounts.register(email)
        sys.stdout.write(f"account {email} {time.time_ns()}\\n")
    sys.stdout.flush()
    time.sleep(0.002)
"""


def _until_shipped(target: ReplicaTarget, prefix: str, before: set[str], timeout: float = 120.0) -> None:
    """Wait until ``target`` holds an object under ``prefix`` not in ``before`` (a replicator's start is slow
    on a loaded machine: waiting for it is not what the lag bound measures)."""
    deadline = time.monotonic() + timeout
    while not {name for name, _size in target.list(prefix)} - before:
        assert time.monotonic() < deadline, f"nothing new under {prefix} within {timeout} s"
        time.sleep(0.05)


def _replicator(root: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([*shardlite_command(), "--root", root, "replicate", "run", "--interval", "0.2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


class Run(NamedTuple):
    acked: dict[str, dict[int, int]]  #: per key, acknowledged n -> when
    rows: dict[str, list[int]]  #: per key, the restored rows
    killed_ns: int
    accounts: dict[str, int]  #: registered e-mail address -> when
    restored_accounts: set[str]  #: the addresses the restored root holds


def _write_kill_restore(tmp_path: Path, factory: TargetFactory, seed: int, durability: str) -> Run:
    """Two writers and a replicator, the replicator killed -9 once and restarted, then everything killed -9 at
    once, the root deleted and restored from the replica."""
    rng = random.Random(seed)
    url = factory.url(f"crash{seed}")
    root = str(tmp_path / "root")
    env = child_env()
    made = run_script("init", "--root", root, "--replicate", url, env=env)
    assert made.returncode == 0, made.stderr
    script = write_script(tmp_path, "writer.py", WRITER)
    writers = [spawn(script, root, ",".join(KEYS[i::2]), durability, env=env) for i in range(2)]
    replicator = _replicator(root, env)
    first: list[str] = []
    target = factory(f"crash{seed}")
    try:
        for proc in writers:  # the kill clock starts once both writers acknowledge (start-up is slow under load)
            assert proc.stdout is not None
            first.append(proc.stdout.readline())
        # ... and the replicator has shipped its first round (the metadata snapshot a restore needs)
        _until_shipped(target, metasnap.PREFIX, set())
        time.sleep(rng.uniform(0.8, 1.5))
        replicator.send_signal(signal.SIGKILL)  # the replicator dies mid-work and comes back
        replicator.wait()
        assert replicator.stderr is not None
        replicator.stderr.close()
        shipped = {name for name, _size in replica_read.list_packs(target)}
        replicator = _replicator(root, env)
        # the lag bound is a running replicator's: its clock starts once the new one has shipped a round
        _until_shipped(target, replica_read.PACKS_PREFIX, shipped)
        time.sleep(rng.uniform(3.5, 4.5))
        for proc in [*writers, replicator]:  # then everything dies at once
            proc.send_signal(signal.SIGKILL)
        killed_ns = time.time_ns()
    finally:
        for proc in [*writers, replicator]:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    acked: dict[str, dict[int, int]] = {key: {} for key in KEYS}
    accounts: dict[str, int] = {}
    for proc, line_one in zip(writers, first, strict=False):
        assert proc.stdout is not None
        for line in [line_one, *proc.stdout.read().splitlines()]:
            parts = line.split()
            if len(parts) != 3 or not parts[2].isdigit():
                continue  # a torn last line is no acknowledgement
            if parts[0] == "account":
                accounts[parts[1]] = int(parts[2])
            else:
                acked[parts[0]][int(parts[1])] = int(parts[2])
        proc.stdout.close()
        assert proc.stderr is not None
        proc.stderr.close()
    assert replicator.stderr is not None
    replicator.stderr.close()
    shutil.rmtree(root)  # the disk is lost

    done = restore_root_from_replica(target, str(tmp_path / "new"))  # the whole root: nodes, metadata, tenants
    assert sorted(done.tenants) == sorted(KEYS)
    with shardlite.Router(str(tmp_path / "new"), schema=SCHEMA, create=False) as router:
        rows = {key: [n for (n,) in router.query(key, "SELECT n FROM log ORDER BY n")] for key in KEYS}
        restored_accounts = {email for email in accounts if router.accounts.by_email(email) is not None}
    return Run(acked, rows, killed_ns, accounts, restored_accounts)


def _accounts_within_the_lag(run: Run) -> None:
    must = {email for email, at in run.accounts.items() if at < run.killed_ns - LAG_BOUND_S * 1e9}
    assert len(must) >= 3, "the test registered too few accounts early enough to check"
    missing = sorted(must - run.restored_accounts)
    assert not missing, f"{len(missing)} accounts registered > {LAG_BOUND_S} s before the kill are lost: {missing[:5]}"


@pytest.mark.parametrize("seed", [1, 2])
def test_disk_loss_after_kill_9_loses_only_the_lag(tmp_path: Path, make_replica_target: TargetFactory,
                                                   seed: int) -> None:
    run = _write_kill_restore(tmp_path, make_replica_target, seed, "local")
    acked, restored, killed_ns = run.acked, run.rows, run.killed_ns
    _accounts_within_the_lag(run)
    for key in KEYS:
        rows = restored[key]
        ordered = sorted(acked[key])
        known = [n for n in rows if n in acked[key]]
        # a prefix of the acknowledged writes, in order, plus at most the one commit whose writer died
        # before acknowledging it, at the end: never a hole, never a duplicate (n is the primary key)
        assert known == ordered[:len(known)], key
        assert rows[:len(known)] == known and len(rows) - len(known) <= 1, key
        must = [n for n, at in acked[key].items() if at < killed_ns - LAG_BOUND_S * 1e9]
        assert must, "the test wrote nothing early enough to check"
        missing = sorted(set(must) - set(rows))
        assert not missing, f"{key}: {len(missing)} writes acknowledged > {LAG_BOUND_S} s before the kill are lost"


@pytest.mark.parametrize("seed", [3, 4])
def test_disk_loss_after_kill_9_with_replicated_durability_loses_no_acknowledged_write(
        tmp_path: Path, make_replica_target: TargetFactory, seed: int) -> None:
    run = _write_kill_restore(tmp_path, make_replica_target, seed, "replicated")
    acked, restored = run.acked, run.rows
    _accounts_within_the_lag(run)
    for key in KEYS:
        rows = restored[key]
        assert len(acked[key]) >= 5, f"{key}: the test acknowledged too few writes to check"
        missing = sorted(set(acked[key]) - set(rows))
        # every acknowledged write, however close to the kill (n is the primary key: never twice)
        assert not missing, f"{key}: acknowledged writes {missing[:10]} are not in the replica"
        # beyond them the replica holds only commits not acknowledged yet: at most the writer's last one
        # (committed, killed before its answer), after every acknowledged one
        extra = [n for n in rows if n not in acked[key]]
        assert len(extra) <= 1 and all(n > max(acked[key]) for n in extra), (key, extra)
