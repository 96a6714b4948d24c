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
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCHEMA = {"t": ["CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]}
TENANTS = 1_000
PER_PACK = 10


def _now(store: Any, target: Any, node: str, count: int) -> None:
    """``count`` packs made now, each of ``PER_PACK`` captures copied from the last round's pack."""
    import msgspec

    from shardlite.core import pack
    from shardlite.files.staging import Staging
    from shardlite.services import replica_read
    from shardlite.services.replicator import pack_name

    name, _size = list(replica_read.list_packs(target))[-1]
    blob = target.get(name)
    header, at = pack.decode_header(blob)
    templates = [(e, pack.entry_bytes(blob, at, e)) for e in header.entries]
    rng = random.Random(1)
    staging = Staging(store.node_path(node))
    try:
        for _ in range(count):
            seq, now = staging.next_seq(), time.time_ns()
            items = [(msgspec.structs.replace(e, captured_ns=now), b) for e, b in rng.sample(templates, PER_PACK)]
            data = pack.encode(node, seq, now, items)
            target.put(pack_name(node, seq), data)
            staging.shipped(seq, pack_name(node, seq), now, now, len(data), [])
    finally:
        staging.close()


def _spread(store: Any, target: Any, node: str, count: int, span_ns: int) -> None:
    """Replayable histories over the last ``span_ns``: a pack of every tenant's snapshot (from the first round),
    then ``count`` packs of ``PER_PACK`` tenants' one-frame captures, each continuing its tenant's log (the
    commit frame of the second round's capture, again), times spread evenly. The real rounds' packs go."""
    import msgspec

    from shardlite.core import pack
    from shardlite.files.staging import Staging
    from shardlite.services import replica_read
    from shardlite.services.replicator import pack_name

    snapshots: dict[str, tuple[Any, bytes]] = {}
    frames: dict[str, tuple[Any, bytes]] = {}
    real = replica_read.list_packs(target)
    for name, _size in real:
        blob = target.get(name)
        header, at = pack.decode_header(blob)
        for e in header.entries:
            data = pack.entry_bytes(blob, at, e)
            if e.kind == "snapshot":
                snapshots[e.key] = (e, data)
            else:
                frames[e.key] = (e, data[-(24 + e.page_size):])  # its commit frame
    target.delete_many([name for name, _size in real])
    rng = random.Random(1)
    keys = sorted(frames)
    last = {key: snapshots[key][0].last for key in keys}
    start = time.time_ns() - span_ns
    staging = Staging(store.node_path(node))
    try:
        seq = staging.next_seq()
        items = [(msgspec.structs.replace(snapshots[k][0], captured_ns=start, commits=[(last[k], start)]),
                  snapshots[k][1]) for k in keys]
        data = pack.encode(node, seq, start, items)
        target.put(pack_name(node, seq), data)
        staging.shipped(seq, pack_name(node, seq), start, start, len(data), [])
        for number in range(count):
            seq, now = staging.next_seq(), start + span_ns * (number + 1) // count
            items = []
            for key in rng.sample(keys, PER_PACK):
                entry, frame = frames[key]
                last[key] += 1
                items.append((msgspec.structs.replace(entry, first=last[key], last=last[key], captured_ns=now,
                                                      commits=[(last[key], now)], length=len(frame)), frame))
            data = pack.encode(node, seq, now, items)
            target.put(pack_name(node, seq), data)
            staging.shipped(seq, pack_name(node, seq), now, now, len(data), [])
    finally:
        staging.close()


def main() -> None:
    import shardlite
    from shardlite.replica.target import open_target
    from shardlite.services import replica_read, replica_retention
    from shardlite.services.replication import Replication

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
        began = time.perf_counter()
        if args.span_hours:
            _spread(store, target, node, args.packs, int(args.span_hours * 3600e9))
        else:
            _now(store, target, node, args.packs)
        print(f"{args.packs:,} packs written in {time.perf_counter() - began:.0f} s", flush=True)
        if args.span_hours:
            runs = [("backlog", 0)] * 8 + [("an hour later", 3600 * 10**9), ("again", 3600 * 10**9)]
        else:
            runs = [("cold cache", 0), ("warm cache", 0)]
        while runs:
            label, later = runs.pop(0)
            before = resource.getrusage(resource.RUSAGE_SELF)
            began = time.perf_counter()
            report = replica_retention.compact(store, target, now_ns=time.time_ns() + later)
            after = resource.getrusage(resource.RUSAGE_SELF)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            index = max(size for _name, size in target.list("v1/keyindex/base/"))
            print(f"compaction, {label}: {time.perf_counter() - began:.1f} s wall, {cpu:.1f} s CPU, peak RSS "
                  f"{after.ru_maxrss / 1024:.0f} MB; {report.packs:,} packs: {report.deleted_packs:,} deleted, "
                  f"{report.rolled_packs:,} joined into {len(report.rollup_parts):,} parts, {report.snapshots:,} "
                  f"snapshots; base key index {index / 1e6:.1f} MB", flush=True)
            if label == "backlog" and not report.rolled_packs:
                runs = [run for run in runs if run[0] != "backlog"]  # the backlog is joined
        if args.span_hours:
            began = time.perf_counter()
            replica_read.captures_of(target, ["t:1"])
            print(f"one-tenant read of t:1 after: {time.perf_counter() - began:.2f} s; "
                  f"{len(replica_read.list_packs(target)):,} packs", flush=True)
    finally:
        replication.close()
        router.close()
        target.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
