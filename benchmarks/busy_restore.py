"""What a one-tenant restore reads and how long it takes for a busy tenant: a 2 MB tenant whose rows are
rewritten thousands of times, with refreshed snapshots (the default) and without (the bound raised past
reach), to a directory and to a real S3 server (SeaweedFS on loopback), in one run.

Usage::

    .venv/bin/python benchmarks/busy_restore.py                    # 20,000 rewrites, 3 rounds
    .venv/bin/python benchmarks/busy_restore.py --commits 50000 --rounds 1

Each measurement builds its own root in a child process: 500 rows of 4 KB, then ``--commits`` commits that
each rewrite one row, an in-process ``NodeReplicator`` round (capture, checkpoint when due, upload) after
every 500. A compaction then writes the key index (as the hourly one does; nothing is old enough to join or
delete). Then it times ``restore_tenant`` at the latest commit and at the middle of the history, and counts
the bytes of packs each read and its GETs of packs. Prints one line per measurement; run under ``uptime`` to read it.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from typing import Any

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body BLOB)"]}
ROWS, ROW_BYTES, PER_ROUND = 500, 4000, 500


class Counting:
    """A replica target counting the bytes of packs read from it."""

    def __init__(self, target: Any) -> None:
        self.target, self.pack_bytes, self.gets = target, 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        data: bytes = self.target.get_range(name, start, length)
        if name.startswith("v1/packs/"):
            self.pack_bytes += len(data)
            self.gets += 1
        return data


def measure(url: str, commits: int, refresh: bool) -> str:
    import shardlite
    from shardlite.replica.target import open_target
    from shardlite.services import replica_retention
    from shardlite.services.replica_restore import restore_tenant
    from shardlite.services.replicator import NodeReplicator

    rng = random.Random(1)
    scratch = tempfile.TemporaryDirectory(prefix="busy-restore-")
    with scratch, shardlite.Router(os.path.join(scratch.name, "root"), schema=SCHEMA, replicate=url) as router:
        target = open_target(url)
        replicator = NodeReplicator(router._store, "n1", target)
        if not refresh:
            replicator.refresh_ratio = 1 << 40
        refreshed, middle = 0, 0
        try:
            with router.transaction("user:busy") as tx:
                for _ in range(ROWS):
                    tx.execute("INSERT INTO notes(body) VALUES (randomblob(?))", (ROW_BYTES,))
            replicator.reconcile()
            replicator.run_round()
            for n in range(commits):
                with router.transaction("user:busy") as tx:
                    tx.execute("UPDATE notes SET body = randomblob(?) WHERE id = ?",
                               (ROW_BYTES, rng.randrange(ROWS) + 1))
                if n % PER_ROUND == PER_ROUND - 1:
                    replicator.mark("user:busy")
                    refreshed += replicator.run_round().refreshed
                if n == commits // 2:
                    middle = time.time_ns()
            replicator.mark("user:busy")
            refreshed += replicator.run_round().refreshed
        finally:
            replicator.close()
        replica_retention.compact(router._store, target)
        sizes = [size for _name, size in target.list("v1/packs/")]
        out = []
        for label, at in (("latest", None), ("middle", middle)):
            counting = Counting(target)
            started = time.perf_counter()
            restore_tenant(router._store, counting, "user:busy", as_key=f"user:{label}", at_ns=at)  # type: ignore[arg-type]
            took = time.perf_counter() - started
            out.append(f"{label}={took * 1000:.0f} ms ({counting.pack_bytes / 1e6:.1f} MB in {counting.gets} GETs)")
        target.close()
    return (f"{url.split(':')[0]:4} refresh={'on ' if refresh else 'off'} commits={commits} packs={len(sizes)} "
            f"replica={sum(sizes) / 1e6:.0f} MB refreshed={refreshed} restore " + ", ".join(out))


def run_children(script: str, name: str, rounds: int, size: int) -> None:
    """Run ``script --child URL SIZE on|off`` for each round, setting and target (a directory, then a throwaway
    SeaweedFS on loopback), alternating, so that the machine's load hits every measurement alike."""
    from shardlite.testing.s3 import seaweedfs

    with seaweedfs() as server, tempfile.TemporaryDirectory(prefix=f"{name}-replicas-") as replicas:
        env = dict(os.environ)
        env.update(server.env())
        for round_ in range(rounds):
            for setting in ("on", "off"):
                for url in ("file://" + os.path.join(replicas, f"{round_}-{setting}"),
                            server.url(f"{name}{round_}-{setting}")):
                    subprocess.run([sys.executable, script, "--child", url, str(size), setting], env=env, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--commits", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("URL", "COMMITS", "REFRESH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child[0], int(args.child[1]), args.child[2] == "on"), flush=True)
        return
    run_children(__file__, "busy", args.rounds, args.commits)


if __name__ == "__main__":
    main()
