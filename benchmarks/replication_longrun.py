"""Rows r2l, r2lm, r2lo and cxl of benchmarks/replication.py: a one-tenant restore from a long-running replica,
and the hourly compaction of that replica.

The replica holds an hour of packs at the default interval (0.5 s: 7,200 packs) from a node of 1,000 tenants
with writes, built in minutes instead of an hour: the real replicator ships the tenants' snapshots and one
round of writes to all of them, then packs are written through the real pack writer (``core.pack.encode``),
each holding the captures of 10 tenants taken from that round, uploaded under the node's next sequence
numbers and recorded as shipped in the node's staging (what the replicator does after each upload). Every
600 packs (5 minutes of packs) the restored tenant gets a real write shipped by the real replicator. The key
index's segment is then brought up to date as the replication service does every 30 s, and 40 more packs
(20 s of packs, the last holding a real write of the tenant) are uploaded past it: a restore reads those
through their headers.

r2l: ``restore_tenant`` of that tenant (--as a new key), checked against the live rows. r2lo: the same restore
with the key index hidden (the behaviour before it on a replica never compacted, as any replica in its first
hour: every pack listed and every header read, one after the other).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import msgspec
from compare import log

if TYPE_CHECKING:
    from shardlite.replica.target import ReplicaTarget

SCHEMA = ["CREATE TABLE w(id INTEGER PRIMARY KEY, v TEXT NOT NULL)"]
PACKS = 7_200
PER_PACK = 10
REAL_EVERY = 600
#: packs past the key index's segment: the median (the segment is written every 15 s: 0 to 30 packs past it),
#: then the most
TAIL = 15
TAIL_MOST = 30


class NoKeyIndex:
    """A replica target whose key index cannot be listed (a restore then reads every pack's header)."""

    def __init__(self, target: Any) -> None:
        self._target = target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def list(self, prefix: str = "") -> Any:
        return iter(()) if prefix.startswith("v1/keyindex/") else self._target.list(prefix)


class Counting:
    def __init__(self, target: Any) -> None:
        self._target: ReplicaTarget = target
        self.gets, self.lists = 0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def get_range(self, name: str, start: int, length: int) -> bytes:
        self.gets += 1
        return self._target.get_range(name, start, length)

    def get(self, name: str) -> bytes:
        self.gets += 1
        return self._target.get(name)

    def list(self, prefix: str = "") -> Any:
        self.lists += 1
        return self._target.list(prefix)


def long_restore_rows(b: Any, tenants: int = 1_000, packs: int = PACKS, reps: int = 7,
                      old_reps: int = 2) -> list[dict[str, Any]]:
    import shardlite
    from shardlite.core import pack
    from shardlite.files.staging import Staging
    from shardlite.services import replica_index, replica_read, replica_retention
    from shardlite.services.replica_restore import restore_tenant
    from shardlite.services.replication import Replication
    from shardlite.services.replicator import pack_name

    root = os.path.join(b.tmp, "longrun")
    prefix = "longrun"
    b.create(root, prefix, tenants)
    target = b.target(prefix)
    b.stops.append(target.close)
    router = shardlite.Router(root, schema=SCHEMA)
    store = router._store
    replication = Replication(store, target)
    victim = f"t:{tenants // 2}"
    rng = random.Random(16)
    try:
        t0 = time.perf_counter()
        replication.run_round()  # every tenant's snapshot
        for i in range(tenants):
            with router.transaction(f"t:{i}") as tx:
                tx.execute("INSERT INTO w(v) VALUES (?)", (f"write {i}",))
        replication.run_round()
        node = store.meta.nodes.list()[0].name
        path = store.node_path(node)
        listed = list(replica_read.list_packs(target))
        name, size = listed[-1]
        blob = target.get(name)
        header, at = pack.decode_header(blob)
        templates = [(e, pack.entry_bytes(blob, at, e)) for e in header.entries if e.key != victim]
        log(f"r2l: {tenants} tenants shipped ({len(listed)} packs, {len(templates)} captures to copy) in "
            f"{time.perf_counter() - t0:.1f} s; writing {packs} packs")
        staging = Staging(path)
        real = 0

        def fabricate(count: int) -> None:
            jobs: list[tuple[int, str, int, bytes]] = []
            for _ in range(count):
                seq = staging.next_seq() + len(jobs)
                now = time.time_ns()
                items = [(msgspec.structs.replace(e, captured_ns=now), d) for e, d in rng.sample(templates, PER_PACK)]
                jobs.append((seq, pack_name(node, seq), now, pack.encode(node, seq, now, items)))
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda job: target.put(job[1], job[3]), jobs))
            for seq, name, now, data in jobs:
                staging.shipped(seq, name, now, now, len(data), [])

        def real_write(n: int) -> None:
            nonlocal real
            with router.transaction(victim) as tx:
                tx.execute("INSERT INTO w(v) VALUES (?)", (f"victim write {n}",))
            replication.run_round()
            real += 1

        t0 = time.perf_counter()
        done = 0
        while done < packs:
            step = min(REAL_EVERY, packs - done)
            fabricate(step)
            done += step
            real_write(done)
        log(f"r2l: {done} packs written in {time.perf_counter() - t0:.1f} s; the segment brought up to date")
        t0 = time.perf_counter()
        writer = replica_index.SegmentWriter()
        while replica_retention.refresh_index(store, target, writer=writer) is not None:
            pass
        segment = [(n, s) for n, s in target.list(replica_index.SEGMENT_PREFIX)]
        seg_s = time.perf_counter() - t0
        fabricate(TAIL - 1)
        real_write(done + TAIL)

        def one(t: Any, as_key: str) -> float:
            began = time.perf_counter()
            restore_tenant(store, t, victim, as_key=as_key)
            took = time.perf_counter() - began
            got = [tuple(r) for r in router.query(as_key, "SELECT id, v FROM w ORDER BY id")]
            if got != expected:
                raise RuntimeError(f"the restore of {victim} holds {len(got)} rows, not {len(expected)}")
            return took

        total = sum(1 for _ in replica_read.list_packs(target))
        expected = [tuple(r) for r in router.query(victim, "SELECT id, v FROM w ORDER BY id")]
        holding = len([1 for n, s in replica_read.list_packs(target)
                       if any(e.key == victim for e in replica_read.read_header(target, n, s).header.entries)])
        counting = Counting(target)
        one(counting, "restored-l:count")
        reads = []
        for _ in range(reps):
            began = time.perf_counter()
            replica_read.captures_of(target, [victim])
            reads.append(time.perf_counter() - began)
        log("r2l: the read path alone (captures_of): " + ", ".join(f"{v * 1e3:.0f} ms" for v in reads))
        fast = [one(target, f"restored-l:{r}") for r in range(reps)]
        fabricate(TAIL_MOST - TAIL - 1)
        real_write(done + TAIL_MOST)
        staging.close()
        expected = [tuple(r) for r in router.query(victim, "SELECT id, v FROM w ORDER BY id")]
        most = [one(target, f"restored-lm:{r}") for r in range(reps)]
        slow = [one(NoKeyIndex(target), f"restored-lo:{r}") for r in range(old_reps)]
        # the first compaction reads every header (in parallel), the next ones only the headers not cached
        compactions: list[tuple[float, int]] = []
        for _ in range(3):
            counting = Counting(target)
            began = time.perf_counter()
            replica_retention.compact(store, counting)
            compactions.append((time.perf_counter() - began, counting.gets))
    finally:
        replication.close()
        router.close()
    seg_note = (f"segment {segment[0][1] / 1e6:.1f} MB after {seg_s:.0f} s of catching up" if segment else "no segment")
    what = (f"the replica holds {total:,} packs (an hour at 0.5 s) of a node of {tenants:,} tenants, {holding} holding "
            f"the tenant; key index {seg_note}; one restore with {TAIL} packs past it: {counting.gets} GETs, "
            f"{counting.lists} LISTs")
    rows = []
    for rid, label, values, baseline in (
            ("r2l", f"restore one small tenant from a long-running replica (key index: base + segment, then {TAIL} "
                    "packs past it: the median)", fast,
             f"{statistics.median(slow):.2f} s without the key index (r2lo)"),
            ("r2lm", f"the same with {TAIL_MOST} packs past the segment (the most at its 15 s period)", most,
             f"{statistics.median(slow):.2f} s without the key index (r2lo)"),
            ("r2lo", "the same restore with the key index hidden (the behaviour before it: every header read)", slow,
             "-")):
        med = statistics.median(values)
        rows.append({"id": rid, "what": f"{label}; {what}", "shardlite": f"{med * 1e3:.0f} ms (median of "
                     f"{len(values)}; " + ", ".join(f"{v * 1e3:.0f} ms" for v in values) + ")", "baseline": baseline,
                     "ratio": f"{med / 0.1:.2f}× of limit", "target": "≤ 100 ms",
                     "result": "PASS" if med <= 0.1 else "FAIL", "data": {"seconds": values, "median_s": med}})
    cold, warm = compactions[0], compactions[1:]
    rows.append({"id": "cxl", "what": f"an hourly compaction of that replica ({total:,} packs; nothing old enough "
                 "to delete): the first, with no header cached (every header read, in parallel), then two more (the "
                 "headers read from <root>/.replica/headers.db)", "shardlite": f"first {cold[0]:.1f} s ({cold[1]:,} "
                 "GETs), then " + ", ".join(f"{t:.1f} s ({g:,} GETs)" for t, g in warm),
                 "baseline": f"reading every header one by one: {statistics.median(slow):.1f} s (r2lo)",
                 "ratio": "-", "target": "reference", "result": "info",
                 "data": {"seconds": [t for t, _ in compactions], "gets": [g for _, g in compactions]}})
    return rows


def index_lookup_row(b: Any, packs: int = 200_000, reps: int = 9) -> dict[str, Any]:
    """Row r2lx: one key's lookup (head and one section) in a base index covering ``packs`` packs of 10 of 1,000
    tenants each (200,000: a day at 0.5 s), the object written directly."""
    from shardlite.core import keyindex
    from shardlite.services import replica_index

    rng = random.Random(3)
    keys = [keyindex.digest(f"t:{i}") for i in range(1000)]
    blob = keyindex.encode("base", 5, 5, {"n1": packs}, [(f"v1/packs/n1/{seq:020d}.pack", 45_000, rng.sample(keys, 10))
                                                         for seq in range(1, packs + 1)])
    target = b.target("lookup")
    b.stops.append(target.close)
    name = replica_index.base_name(5)
    target.put(name, blob)
    head = keyindex.decode_head(blob, len(blob))
    times = []
    for i in range(reps):
        began = time.perf_counter()
        got = replica_index.read_shards(target, name, replica_index.read_head(target, name, len(blob)),
                                        {keyindex.digest(f"t:{i}")})
        times.append(time.perf_counter() - began)
    med = statistics.median(times)
    return {"id": "r2lx", "what": f"the key index lookup of one tenant in a base covering {packs:,} packs (a day at "
            f"0.5 s) of 10 of 1,000 tenants each: {len(blob) / 1e6:.0f} MB, {head.meta.shards} shards, a "
            f"{head.size / 1e3:.0f} KB head; the tenant is in {len(got)} packs",
            "shardlite": f"{med * 1e3:.1f} ms (median of {reps}; {min(times) * 1e3:.1f}-{max(times) * 1e3:.1f} ms)",
            "baseline": "-", "ratio": "-", "target": "part of ≤ 100 ms", "result": "-",
            "data": {"seconds": times, "median_s": med}}
