"""What a one-tenant restore reads for a quiet tenant after a week: a tenant written once an hour, whose frames
never reach the ratio bound of a refreshed snapshot nor a checkpoint, with the aged refresh (a snapshot a day,
the default) and without it (its age raised past reach), to a directory and to a real S3 server (SeaweedFS on
loopback), in one run.

Usage::

    .venv/bin/python benchmarks/quiet_restore.py                 # 168 hours, 3 rounds
    .venv/bin/python benchmarks/quiet_restore.py --hours 72 --rounds 1

Each measurement builds its own root in a child process: 50 small tenants, each written once an hour, on a
node that ships a pack every 15 minutes (an in-process ``NodeReplicator`` whose clock is moved on 15 minutes
per round; 10 other tenants written each round), retention 30 days. An hourly compaction then joins the packs
older than an hour into rollup parts (one run an hour) and writes the key index (at every simulated hour,
and once more at the end). Then it times
``restore_tenant`` of one quiet tenant at its latest commit and counts the GETs of packs (headers and
captures) and their bytes. Prints one line per measurement; run under ``uptime``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from busy_restore import Counting, run_children  # noqa: E402  (one counting target, one child runner)

SCHEMA = {"user": ["CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT)"]}
TENANTS, BUSY, ROUNDS_PER_HOUR = 50, 10, 4
HOUR_NS = 3600 * 1_000_000_000


def measure(url: str, hours: int, aged: bool) -> str:
    import shardlite
    from shardlite.core import retention
    from shardlite.meta.replica_record import record_windows
    from shardlite.replica.target import open_target
    from shardlite.services import replica_retention
    from shardlite.services.replica_restore import restore_tenant
    from shardlite.services.replicator import NodeReplicator

    now = [time.time_ns() - (hours + 2) * HOUR_NS]
    keys = [f"user:{n}" for n in range(TENANTS)]
    busy = [f"user:busy{n}" for n in range(BUSY)]
    scratch = tempfile.TemporaryDirectory(prefix="quiet-restore-")
    with scratch, shardlite.Router(os.path.join(scratch.name, "root"), schema=SCHEMA, replicate=url) as router:
        record_windows(router._store.meta.kv, retention.Windows(default=30 * 24 * HOUR_NS))
        target = open_target(url)
        replicator = NodeReplicator(router._store, "n1", target, clock=lambda: now[0])
        if not aged:
            replicator.refresh_age = 1 << 62
        refreshed = 0
        try:
            for key in keys + busy:
                with router.transaction(key) as tx:
                    tx.execute("INSERT INTO notes(body) VALUES ('first')")
            replicator.reconcile()
            replicator.run_round()
            for hour in range(hours):
                for quarter in range(ROUNDS_PER_HOUR):
                    now[0] += HOUR_NS // ROUNDS_PER_HOUR
                    for key in busy + (keys if quarter == 0 else []):
                        with router.transaction(key) as tx:
                            tx.execute("UPDATE notes SET body = ? WHERE id = 1", (f"hour {hour}",))
                        replicator.mark(key)
                    refreshed += replicator.run_round().refreshed
                replica_retention.compact(router._store, target, now_ns=now[0])  # hourly, as the replicator does
        finally:
            replicator.close()
        started = time.perf_counter()
        replica_retention.compact(router._store, target, now_ns=now[0] + 2 * HOUR_NS)
        compacted = time.perf_counter() - started
        objects = len(list(target.list("v1/packs/")))
        counting = Counting(target)
        started = time.perf_counter()
        restore_tenant(router._store, counting, keys[7], as_key="user:back")  # type: ignore[arg-type]
        took = time.perf_counter() - started
        assert [tuple(r) for r in router.query("user:back", "SELECT body FROM notes")] == [(f"hour {hours - 1}",)]
        target.close()
    return (f"{url.split(':')[0]:4} aged={'on ' if aged else 'off'} hours={hours} refreshed={refreshed} "
            f"last compaction {compacted:.1f} s, {objects} pack objects (parts and packs) "
            f"restore {took * 1000:.0f} ms ({counting.gets} GETs of packs, {counting.pack_bytes / 1e3:.0f} KB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=int, default=168)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs=3, metavar=("URL", "HOURS", "AGED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(measure(args.child[0], int(args.child[1]), args.child[2] == "on"), flush=True)
        return
    run_children(__file__, "quiet", args.rounds, args.hours)


if __name__ == "__main__":
    main()
