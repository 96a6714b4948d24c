"""Erase against real processes: while `replicate run` runs and a writer writes to other tenants, and the erase
process killed with kill -9 at random points (before, during and after its pack rewrites) then run again:
the tenant ends erased from every object, the others restore exactly, and no state in between ever makes a
restore of the others wrong."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers_cli import run_script, shardlite_command
from helpers_procs import child_env, spawn, write_script
from helpers_s3 import TargetFactory
from test_erase import SCHEMA, VICTIM, _live, _replicated, holders, local_holders

import shardlite
from shardlite.replica.target import ReplicaTarget, parse_target
from shardlite.services import replica_read
from shardlite.services.replica_restore import restore_tenant
from shardlite.services.replicator import NodeReplicator

OTHERS = [f"user:o{i}" for i in range(3)]

WRITER = """
import sys, time
import shardlite
SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}
router = shardlite.Router(sys.argv[1], schema=SCHEMA)
keys = sys.argv[2].split(",")
n = 0
while True:
    n += 1
    with router.transaction(keys[n % len(keys)]) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (f"w{n}",))
    sys.stdout.write(f"{n}\\n")
    time.sleep(0.003)
"""


def _write(router: shardlite.Router, key: str, body: str) -> None:
    with router.transaction(key) as tx:
        tx.execute("INSERT INTO notes(body) VALUES (?)", (body,))


def _wait_for(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _packs(target: ReplicaTarget) -> list[str]:
    return [name for name, _ in replica_read.list_packs(target)]


def test_erase_while_the_replicator_runs_and_a_writer_writes(tmp_path: Path,
                                                             make_replica_target: TargetFactory) -> None:
    url = make_replica_target.url("live")
    target = make_replica_target("live")
    root = str(tmp_path / "root")
    env = child_env()
    assert run_script("init", "--root", root, "--replicate", url, env=env).returncode == 0
    marker = b"LIVE-ERASE-SECRET"
    router = shardlite.Router(root, schema=SCHEMA)
    for key in OTHERS:
        _write(router, key, "first")
    writer = spawn(write_script(tmp_path, "writer.py", WRITER), root, ",".join(OTHERS), env=env)
    replicator = subprocess.Popen([*shardlite_command(), "--root", root, "replicate", "run", "--interval", "0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        for n in range(20):
            _write(router, VICTIM, f"victim {n} {marker.decode()}")
        _wait_for(lambda: holders(target, marker), "the victim's first pack")
        for n in range(200):  # busy right up to the erase: captures of it are staged or in flight
            _write(router, VICTIM, f"victim late {n} {marker.decode()}")
        receipt = router.drop(VICTIM, erase=True)
        assert receipt["complete"] and receipt["objects"], receipt
        shipped = len(_packs(target))
        _wait_for(lambda: len(_packs(target)) >= shipped + 3, "three more packs after the erase")
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        replicator.send_signal(signal.SIGTERM)
        assert replicator.wait(timeout=60) == 0
        last = run_script("--root", root, "replicate", "run", "--once", env=env)  # ships what is left
        assert last.returncode == 0, last.stderr
    finally:
        for proc in (writer, replicator):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert replicator.stderr is not None
        replicator.stderr.close()
        for stream in (writer.stdout, writer.stderr):
            assert stream is not None
            stream.close()
    try:
        assert holders(target, marker) == []
        for node in router.nodes.list():
            assert local_holders(router._store.node_path(node.name), marker) == []
        for key in OTHERS:
            assert _replicated(target, key) == _live(router, key)
        with pytest.raises(shardlite.UnknownTenant):
            restore_tenant(router._store, target, VICTIM)
    finally:
        router.close()


@pytest.mark.parametrize("seed", [7, 8])
def test_kill_9_of_the_erase_at_random_points_then_run_it_again(tmp_path: Path, make_replica_target: TargetFactory,
                                                                 seed: int) -> None:
    rng = random.Random(seed)
    url = make_replica_target.url(f"kill{seed}")
    target = make_replica_target(f"kill{seed}")
    root = str(tmp_path / "root")
    env = child_env()
    marker = f"KILL-ERASE-{seed}"
    with shardlite.Router(root, schema=SCHEMA, replicate=url) as router:
        replicator = NodeReplicator(router._store, router.nodes.list()[0].name, target)
        try:
            for round_ in range(80):  # 80 packs, each shared by the victim and the others
                for key in [VICTIM, *OTHERS]:
                    body = f"{round_} {marker} " if key == VICTIM else f"{key} {round_} "
                    _write(router, key, body + "x" * rng.randrange(3000))
                    replicator.mark(key)
                replicator.reconcile()
                replicator.run_round()
        finally:
            replicator.close()
        expected = {key: _live(router, key) for key in OTHERS}
    total = len(_packs(target))
    assert total == 80

    def holding_victim() -> list[str]:
        return [name for name, size in replica_read.list_packs(target)
                if any(e.key == VICTIM for e in replica_read.read_header(target, name, size).header.entries)]

    def victim_packs() -> int:
        return len(holding_victim())

    location = parse_target(url)
    base = Path(location.path) if location.scheme == "file" else None

    def pack_versions(names: list[str]) -> dict[str, int]:
        """What changes when the erase rewrites one of the packs ``names``: on a directory target its inode (a
        few stat calls, quick enough to stop it mid-way: rewriting a local pack takes about a millisecond), on
        S3 its size (one listing, not a header read per pack; a pack without the victim's captures is smaller)."""
        if base is not None:
            return {name: (base / name).stat().st_ino for name in names if (base / name).exists()}
        sizes = dict(replica_read.list_packs(target))
        return {name: sizes[name] for name in names if name in sizes}

    versions = pack_versions(holding_victim())

    def still_to_rewrite() -> int:
        """Packs holding the victim that the erase has not rewritten yet (they choose the kill's moment only:
        what a kill left is counted by reading the headers)."""
        now = pack_versions(list(versions))
        return sum(1 for name, version in versions.items() if now.get(name) == version)

    kills = []
    for attempt in range(4):
        proc = subprocess.Popen([*shardlite_command(), "--root", root, "tenants", "drop", VICTIM, "--erase", "--json"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        if attempt == 0:
            time.sleep(rng.uniform(0.2, 0.6))  # around the start, the drop and the scan
        else:  # mid-rewrite: once the packs still holding the victim fall to a random count
            left = still_to_rewrite()
            goal = rng.randrange(0, max(1, left))
            deadline = time.monotonic() + 60
            while proc.poll() is None and still_to_rewrite() > goal and time.monotonic() < deadline:
                time.sleep(0.001 if base is not None else 0.02)  # S3: a listing per poll, not a busy server
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(victim_packs())
        versions = pack_versions(holding_victim())
        # whatever the point of the kill: the others restore exactly (no pack half-written, none twice)
        for key in OTHERS:
            assert _replicated(target, key) == expected[key]
    ran = run_script("--root", root, "tenants", "drop", VICTIM, "--erase", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    receipt = json.loads(ran.stdout)
    assert receipt["complete"] and receipt["live"]["action"] in ("dropped", "already dropped")
    assert receipt["totals"]["objects_rewritten"] == kills[-1]  # what the last kill left, and nothing else
    assert holders(target, marker.encode()) == []
    with shardlite.Router(root, schema=SCHEMA) as router:
        assert not router.exists(VICTIM)
        for key in OTHERS:
            assert _replicated(target, key) == expected[key]
        with pytest.raises(shardlite.UnknownTenant):
            restore_tenant(router._store, target, VICTIM)
    assert len(_packs(target)) == total  # every pack held others too: rewritten, none deleted
    print(f"packs still holding the victim after each kill: {kills}")
