"""What an hourly compaction costs on a replica of many packs (the retention window of a busy node): wall time,
CPU and peak RSS of ``replica_retention.compact``, with the header cache cold and then warm.

Usage::

    .venv/bin/python benchmarks/compaction_scale.py 120000     # ~17 hours of packs at the 0.5 s interval
    .venv/bin/python benchmarks/compaction_scale.py 360000 --span-hours 168   # spread over the 7-day window

A root of 1,000 tenants replicates to a ``file://`` target (no S3 server: the figure is the compaction's own
CPU and memory, not request latency); the real replicator ships every tenant's snapshot and one write, then
N packs of 10 tenants' captures each (copied from that round) are written through the real pack writer and
recorded as shipped, as ``benchmarks/replication_longrun.py`` does for rows r2l/cxl. By default every pack
is made now, so nothing is old enough to plan over (the default 7-day window): the compaction reads every
header (cold) or its cached summary (warm), and writes the base key index. With ``--span-hours H`` the packs'
times (and their captures' and commits') are spread evenly over the last H hours, and a third compaction runs
an hour later: with H = 168 its plan reads the headers of the oldest hour's packs only. The copied captures do
not form replayable histories (the same frames again and again), so the plan keeps those tenants whole and
builds no snapshot: the figures are the reading, planning and indexing, not the snapshot writing. Peak RSS is
the process's (``ru_maxrss``), so it also counts what the pack writing held before. Run under ``uptime`` to
read it.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"t": ["CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]}
TENANTS = 1_000
PER_PACK = 10


def main() -> None:
    import msgspec

    import shardlite
    from shardlite.core import pack
    from shardlite.files.staging import Staging
    from shardlite.replica.target import open_target
    from shardlite.services import replica_read, replica_retention
    from shardlite.services.replication import Replication
    from shardlite.services.replicator import pack_name

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("packs", type=int, nargs="?", default=120_000)
    parser.add_argument("--span-hours", type=float, default=0.0, help="spread the packs' times over this many "
                        "hours before now (default: all now)")
    args = parser.parse_args()
    print(f"load average: {os.getloadavg()[0]:.1f}", flush=True)
    base = tempfile.mkdtemp()
    url = "file://" + os.path.join(base, "replica")
    router = shardlite.Router(os.path.join(base, "root"), schema=SCHEMA, replicate=url)
    store = router._store
    target = open_target(url)
    replication = Replication(store, target)
    try:
        for body in ("row", "write"):
            for i in range(TENANTS):
                with router.transaction(f"t:{i}") as tx:
                    tx.execute("INSERT INTO w(v) VALUES (?)", (f"{body} {i}",))
            replication.run_round()
        node = store.meta.nodes.list()[0].name
        name, _size = list(replica_read.list_packs(target))[-1]
        blob = target.get(name)
        header, at = pack.decode_header(blob)
        templates = [(e, pack.entry_bytes(blob, at, e)) for e in header.entries]
        rng = random.Random(1)
        staging = Staging(store.node_path(node))
        began = time.perf_counter()
        start_ns, span_ns = time.time_ns(), int(args.span_hours * 3600e9)
        try:
            for number in range(args.packs):
                seq, now = staging.next_seq(), time.time_ns()
                if span_ns:
                    now = start_ns - span_ns + span_ns * number // args.packs
                items = [(msgspec.structs.replace(e, captured_ns=now, commits=[(f, now) for f, _t in e.commits]), b)
                         for e, b in rng.sample(templates, PER_PACK)]
                data = pack.encode(node, seq, now, items)
                target.put(pack_name(node, seq), data)
                staging.shipped(seq, pack_name(node, seq), now, now, len(data), [])
        finally:
            staging.close()
        print(f"{args.packs:,} packs written in {time.perf_counter() - began:.0f} s", flush=True)
        runs = [("cold cache", 0), ("warm cache", 0)] + ([("an hour later", 3600 * 10**9)] if span_ns else [])
        for label, later in runs:
            before = resource.getrusage(resource.RUSAGE_SELF)
            began = time.perf_counter()
            report = replica_retention.compact(store, target, now_ns=time.time_ns() + later)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            index = max(size for _name, size in target.list("v1/keyindex/base/"))
            print(f"compaction, {label}: {time.perf_counter() - began:.1f} s wall, {cpu:.1f} s CPU, peak RSS "
                  f"{after.ru_maxrss / 1024:.0f} MB; {report.packs:,} packs ({report.deleted_packs:,} deleted), "
                  f"base key index {index / 1e6:.1f} MB",
                  flush=True)
    finally:
        replication.close()
        router.close()
        target.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
