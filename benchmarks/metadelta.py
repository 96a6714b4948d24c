"""What a metadata delta costs (shardlite.services.replica_meta): the replication process reads ``global.db``
and ``app_global.db`` whole, digests their pages and uploads the pages changed since the last snapshot.

Usage::

    .venv/bin/python benchmarks/metadelta.py                    # 10,000 and 100,000 catalog rows
    .venv/bin/python benchmarks/metadelta.py --tenants 100000 --rounds 5

For each size: a root whose catalog holds N tenants (registered through the metadata contract, no tenant
files) and N/10 accounts; a snapshot, then per round 20 accounts registered and a delta taken by a
``MetaUploader`` on a ``file://`` target. Prints the snapshot's size, each delta's size, and the CPU and wall
time of a delta's read, digests and upload (the share of a core that bounds deltas is ``DELTA_SHARE``). Run
under ``uptime`` to read it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(tenants: int, rounds: int) -> str:
    import shardlite
    from shardlite.core import metadelta, metasnap
    from shardlite.replica.target import open_target
    from shardlite.services import replica_meta

    base = tempfile.mkdtemp()
    url = "file://" + os.path.join(base, "replica")
    with shardlite.Router(os.path.join(base, "root"), replicate=url) as router:
        meta = router._store.meta
        for i in range(tenants):
            generation = meta.tenants.allocate_generation(f"user:{i}", "n1", "create")
            meta.tenants.register(f"user:{i}", "n1", generation, os.urandom(16).hex(), 1)
        for i in range(tenants // 10):
            router.accounts.register(f"person{i}@example.com", name=f"Person {i}")
        target = open_target(url)
        share, replica_meta.DELTA_SHARE = replica_meta.DELTA_SHARE, 1e9  # every delta is timed, not the cadence
        uploader = replica_meta.MetaUploader(router._store, target, lambda: os.open(base, os.O_RDONLY))
        try:
            uploader.round(every=3600.0, delta_every=0.0)
            (snapshot,) = [name for name, _ in target.list(metasnap.PREFIX)]
            snapshot_size = len(target.get(snapshot))
            cpu, wall, sizes = [], [], []
            for r in range(rounds):
                for j in range(20):
                    router.accounts.register(f"later{r}-{j}@example.com")
                before = uploader.deltas
                c0, t0 = time.thread_time(), time.perf_counter()
                uploader.round(every=3600.0, delta_every=0.0)
                cpu.append(time.thread_time() - c0)
                wall.append(time.perf_counter() - t0)
                assert uploader.deltas == before + 1, "no delta was taken"
            sizes = sorted(size for name, size in target.list(metadelta.PREFIX))
        finally:
            uploader.close()
            target.close()
            replica_meta.DELTA_SHARE = share
    return (f"{tenants:>7,} tenants: snapshot {snapshot_size / 1e6:.1f} MB; delta {sizes[0] / 1e3:.0f}-"
            f"{sizes[-1] / 1e3:.0f} KB (cumulative, {rounds} rounds of 20 accounts); per delta CPU "
            f"{1e3 * statistics.median(cpu):.1f} ms (min {1e3 * min(cpu):.1f}), wall "
            f"{1e3 * statistics.median(wall):.1f} ms; cadence floor "
            f"{statistics.median(cpu) / share:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, action="append", help="catalog rows (repeatable)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f}")
    for tenants in args.tenants or [10_000, 100_000]:
        print(measure(tenants, args.rounds), flush=True)


if __name__ == "__main__":
    main()
