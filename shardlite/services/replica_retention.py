"""Compacting a root's replica by its retention windows (``shardlite replicate compact``, and the replicator
every :data:`COMPACT_EVERY` seconds).

A compaction, in this order (each step safe to repeat: a kill -9 at any point, then a rerun, is fine):

0. **Clear** what readers ignore (:func:`shardlite.core.rollup.sort_out`): parts of rollup runs a killed
   compaction left without a marker, numbered packs a marked run superseded, markers of runs with nothing left.
1. **Read** a summary of every pack and the headers (validated whole) of the packs older than the latest
   retention start: only those can go (:mod:`shardlite.services.compact_scan`,
   through the root's header cache), the root's windows (:mod:`shardlite.meta.replica_record`), the live
   catalog, and the erase tombstones (:func:`erased_incarnations`).
2. **Plan** (:func:`shardlite.core.retention.plan`, over those headers, told which keys the other packs may
   hold): which packs go, and which tenants get a new base
   snapshot (the image at the end of their last capture at or before their retention start). A pack holding
   the drop record of a plain drop stays while any capture of the dropped incarnation does (a whole-root
   restore after the drop needs the record to leave the tenant out).
3. **Write** the snapshots, replayed from the captures they stand for (:mod:`shardlite.core.timeline`), into
   new packs ``v1/packs/<node>/compact-<time>-<n>.pack`` (sequence 0: they sort before any capture of the same
   time), then **verify** them: each is read back whole and every entry checked against its digest. Nothing has
   been deleted yet, so a crash here leaves extra snapshots of positions the history already holds, which
   restores skip (:func:`shardlite.core.timeline.plan_replay`) and the next compaction plans around.
4. The tombstones are listed again: an erase that ran meanwhile makes this compaction delete the packs it just
   wrote and stop (run it again), so a snapshot never brings back an erased history.
5. **Horizon** (:mod:`shardlite.services.replica_index`): the windows and the compaction's time (a restore
   before a tenant's window is refused from now on).
5b. **Join** each node's packs older than an hour into rollup parts, each read back and compared, then each
   run's marker (:mod:`shardlite.services.compact_rollup`): from the marker on, readers read the parts and
   ignore the packs joined (a run never holds a pack the plan deletes). Incarnations with a tombstone or that
   the horizon ignores are not carried. The tombstones are listed once more (an erase meanwhile: markers, parts
   and snapshots deleted, stop).
5c. **Index**: the base key index of the packs and parts that stay (a restore that read the previous one and
   meets a pack deleted below reads every header instead; one that notices the newer base uses it).
6. **Delete** the packs the rollups joined (first: a part never goes while a pack its run superseded is left),
   the planned packs, older key indexes (bases, their segments), and metadata snapshots outside the
   longest window (the newest at or before its start stays: a whole-root restore at the window's start needs
   it), with the metadata deltas made against the snapshots deleted
   (:func:`shardlite.services.replica_meta_read.prune`).
7. **Prune** every node staging's pack list of the deleted and joined packs (:meth:`Staging.forget_packs`).

One compaction at a time per root: ``<root>/.replica/compact.lock`` (``flock``). Between compactions the
replicator writes a key index segment every :data:`~shardlite.services.replica_index.SEGMENT_EVERY` seconds
(:func:`refresh_index`: the headers of the packs shipped since), so a one-tenant restore reads the headers of
at most the last half minute or so of packs besides those holding the tenant.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..core import keyindex, metasnap, pack, retention, rollup, timeline
from ..errors import Busy, ReplicaError
from ..files.headercache import HeaderCache
from ..files.replica_locks import STAGING_DIR, erase_lock
from ..files.staging import Staging
from ..front.store import Store
from ..meta.replica_record import recorded_windows
from ..replica.target import ReplicaTarget
from . import compact_rollup, compact_scan, replica_index, replica_meta_read, replica_owners, replica_read
from .pack_upload import pack_name

__all__ = ["compact", "CompactionReport", "COMPACT_EVERY", "erased_incarnations",
           "compaction_due", "compact_lock", "refresh_index"]

log = logging.getLogger("shardlite.replicate")

#: Seconds between compactions run by a replicator.
COMPACT_EVERY = 3600.0
#: Bytes of captures read at once to build snapshots (tenants are done in batches below it).
READ_BUDGET = 256 * 1024 * 1024
#: Bytes of snapshots per compaction pack.
PACK_BYTES = 64 * 1024 * 1024


@dataclass
class CompactionReport:
    compacted_ns: int
    packs: int = 0  #: packs before the compaction
    deleted_packs: int = 0
    deleted_bytes: int = 0
    snapshots: int = 0  #: new base snapshots written
    snapshot_bytes: int = 0
    written: list[str] = field(default_factory=list)  #: compaction packs written
    pinned: list[str] = field(default_factory=list)  #: tenants whose history could not be compacted
    rolled_packs: int = 0  #: numbered packs joined into rollups
    rollup_parts: list[str] = field(default_factory=list)  #: rollup parts written
    #: runs not joined (their first pack -> why: a damaged or missing pack): left as they are
    rollups_skipped: dict[str, str] = field(default_factory=dict)
    #: packs whose header is not valid (name -> why): kept, and while one is there no tenant's history expires
    damaged: dict[str, str] = field(default_factory=dict)
    meta_deleted: int = 0  #: metadata snapshots and deltas deleted
    staging_rows: int = 0
    index: str = ""
    seconds: float = 0.0


def erased_incarnations(target: ReplicaTarget) -> set[str]:
    """The names of the erase tombstones in the replica (``tenants drop --erase``:
    :func:`~shardlite.services.replica_read.erased_names`); :func:`is_erased` tells whether a capture's
    incarnation has one."""
    return replica_read.erased_names(target)


def is_erased(tombstones: set[str], incarnation: str) -> bool:
    return replica_read.tombstone_name(incarnation) in tombstones


def compact_lock(store: Store) -> int | None:
    """A descriptor holding the root's compaction lock, or None when another process holds it."""
    from .replication import _try_lock

    return _try_lock(os.path.join(store.root, STAGING_DIR), "compact.lock")


def refresh_index(store: Store, target: ReplicaTarget, now_ns: int | None = None,
                  writer: replica_index.SegmentWriter | None = None) -> str | None:
    """Bring the key index up to date between compactions: a segment covering the packs shipped since the
    base (:class:`~shardlite.services.replica_index.SegmentWriter`; a writer kept between calls reads only
    the headers shipped since its last run). The segment's name, None when nothing was shipped since. The
    caller holds the compaction lock."""
    return (writer or replica_index.SegmentWriter()).run(store, target, now_ns)


def compaction_due(target: ReplicaTarget, now_ns: int) -> bool:
    """Whether a replicator should compact now: :data:`COMPACT_EVERY` after the last compaction, or, on a
    replica never compacted, after its first metadata snapshot."""
    try:
        horizon = replica_index.read_horizon(target)
    except Exception:  # noqa: BLE001 - a damaged horizon is rewritten by the next compaction
        return True
    if horizon is not None:
        since = horizon.compacted_ns
    else:
        times = [t for name, _ in target.list(metasnap.PREFIX) if (t := metasnap.time_of(name)) is not None]
        if not times:
            return False
        since = min(times)
    return now_ns - since >= COMPACT_EVERY * 1e9


def _final(name: str, shipped: dict[str, int]) -> bool:
    """Whether pack ``name``'s header can be cached: a compaction pack, or a numbered pack its replicator
    recorded as shipped (:mod:`shardlite.files.headercache`)."""
    seq = keyindex.pack_seq(name)
    return seq is None or seq[1] <= shipped.get(seq[0], -1)


def _compacted_name(node: str, created_ns: int, part: int) -> str:
    return pack_name(node, 0).rsplit("/", 1)[0] + f"/compact-{created_ns:020d}-{part:04d}.pack"


def _read_bytes(target: ReplicaTarget, infos: dict[str, replica_read.PackInfo],
                wanted: Iterable[retention.Located]) -> dict[int, bytes]:
    """The bytes of ``wanted`` captures (by ``id`` of the capture), one ranged GET per pack, digests checked."""
    by_pack: dict[str, list[retention.Located]] = {}
    for item in wanted:
        by_pack.setdefault(item.pack, []).append(item)
    out: dict[int, bytes] = {}
    for name, items in by_pack.items():
        info = infos[name]
        low = min(i.capture.entry.offset for i in items)
        high = max(i.capture.entry.offset + i.capture.entry.length for i in items)
        blob = target.get_range(name, info.payload_at + low, high - low)
        for item in items:
            entry = item.capture.entry
            data = blob[entry.offset - low:entry.offset - low + entry.length]
            pack.check_bytes(entry, data)
            out[id(item.capture)] = data
    return out


def _build(target: ReplicaTarget, infos: dict[str, replica_read.PackInfo],
           snapshots: list[retention.Snapshot]) -> list[tuple[str, pack.Entry, bytes]]:
    """(node, entry, image) of each planned snapshot, in batches of :data:`READ_BUDGET` bytes read."""
    out: list[tuple[str, pack.Entry, bytes]] = []
    batch: list[retention.Snapshot] = []
    size = 0
    for snap in [*snapshots, None]:
        if snap is not None:
            batch.append(snap)
            size += sum(item.capture.entry.length for item in snap.through)
            if size < READ_BUDGET:
                continue
        data = _read_bytes(target, infos, [item for s in batch for item in s.through])
        for done in batch:
            caps = [c._replace(data=data[id(c)]) for c in (item.capture for item in done.through)]
            end = caps[-1].entry
            plan = timeline.plan_replay(caps)
            if plan is None or (plan.point.frame, plan.point.time_ns) != (end.last, end.commits[-1][1]):
                raise ReplicaError(f"the history of {done.key!r} did not replay to its capture's end; nothing was "
                                   "deleted")
            image = bytes(timeline.replay(plan))
            entry = retention.snapshot_capture(done, 0, image).entry
            out.append((caps[-1].node, entry, image))
        batch, size = [], 0
    return out


def _write_packs(target: ReplicaTarget, built: list[tuple[str, pack.Entry, bytes]], now_ns: int) -> list[
        tuple[str, int, list[str]]]:
    """Write the snapshots as packs per node, read each back and check it; (name, size, keys) of each."""
    by_node: dict[str, list[tuple[pack.Entry, bytes]]] = {}
    for node, entry, image in built:
        by_node.setdefault(node, []).append((entry, image))
    written: list[tuple[str, int, list[str]]] = []
    for node, items in sorted(by_node.items()):
        part, chunk, size = 0, [], 0
        for item in [*items, None]:
            if item is not None:
                chunk.append(item)
                size += len(item[1])
                if size < PACK_BYTES:
                    continue
            if not chunk:
                break
            name = _compacted_name(node, now_ns, part)
            blob = pack.encode(node, 0, now_ns, chunk)
            target.put(name, blob)
            back = target.get(name)
            header, payload_at = pack.decode_header(back)
            if len(header.entries) != len(chunk):
                raise ReplicaError(f"the compaction pack {name} read back differs from what was written")
            for entry, (_planned, image) in zip(header.entries, chunk, strict=True):
                if pack.entry_bytes(back, payload_at, entry) != image:
                    raise ReplicaError(f"the compaction pack {name} read back differs from what was written")
            written.append((name, len(blob), [entry.key for entry, _ in chunk]))
            part, chunk, size = part + 1, [], 0
    return written


def _prune_staging(store: Store, deleted: list[str]) -> int:
    rows = 0
    for node in store.meta.nodes.list():
        path = store.node_path(node.name)
        if not os.path.exists(os.path.join(path, STAGING_DIR, "staging.db")):
            continue
        staging = Staging(path)
        try:
            rows += staging.forget_packs(deleted)
        finally:
            staging.close()
    return rows


def compact(store: Store, target: ReplicaTarget, *, now_ns: int | None = None) -> CompactionReport:
    """Compact ``target`` (``store``'s replica) as of ``now_ns`` (default: now); module docstring. The caller
    holds the compaction lock (:func:`compact_lock`). It holds the root's erase lock throughout (an erase
    waits for it, and a compaction finding an erase under way is :class:`~shardlite.Busy`), so a snapshot
    it writes never holds a tenant an erase has already scanned the replica for."""
    # a location another root replicates to is not this root's to compact (replica_owners)
    replica_owners.claim(target, store.meta.kv, store.replicate or target.url)
    fd = erase_lock(store.root, wait=None)
    if fd is None:
        raise Busy("an erase (tenants drop --erase) is running on this root: compact again once it is done")
    try:
        return _compact(store, target, now_ns)
    finally:
        os.close(fd)


def _compact(store: Store, target: ReplicaTarget, now_ns: int | None) -> CompactionReport:
    started = time.monotonic()
    now = time.time_ns() if now_ns is None else now_ns
    report = CompactionReport(now)
    windows = recorded_windows(store.meta.kv)
    tombstones = erased_incarnations(target)
    try:
        previous = replica_index.read_horizon(target)
    except Exception:  # noqa: BLE001 - a damaged horizon: this compaction writes a new one
        previous = None
    located: list[retention.Located] = []
    drops: list[retention.LocatedDrop] = []
    # rollups (core/rollup.py): what readers ignore (parts of unfinished runs, numbered packs a run superseded)
    # and markers of runs with nothing left go first (this compaction may write a part or a marker of the same
    # name: a rerun at the same time); everything else is listed
    listing = rollup.sort_out(target.list(replica_read.PACKS_PREFIX))
    if listing.hidden or listing.spent:
        target.delete_many([*listing.hidden, *listing.spent])
    listed = listing.packs
    # what each replicator recorded as shipped (read after the listing: a pack listed above it may still be
    # uploaded again, so it is not cached; one recorded meanwhile is cached only from the next compaction on)
    shipped = replica_index.part_coverage(store, [name for name, _size in listed])
    # only what is older than every retention start can be deleted or snapshotted: the plan reads the headers
    # of those packs only (compact_scan)
    cutoff = now - windows.shortest()
    cache = HeaderCache(os.path.join(store.root, STAGING_DIR))
    try:
        scanned = compact_scan.scan(target, listed, cache, final=lambda name: _final(name, shipped),
                                    planned=lambda _name, summary: summary.newest_ns <= cutoff)
    finally:
        cache.close()
    infos = scanned.planned
    for name, info in infos.items():
        drops.extend(retention.LocatedDrop(name, drop.key, drop.incarnation, drop.dropped_ns)
                     for drop in info.header.drops if not (tombstones and is_erased(tombstones, drop.incarnation)))
        for position, entry in enumerate(info.header.entries):
            if tombstones and is_erased(tombstones, entry.incarnation):
                continue  # an erased history: never kept, never snapshotted
            located.append(retention.Located(name, timeline.Capture(
                (entry.captured_ns, info.header.seq, position), entry, b"", info.header.node)))
    report.packs = len(listed)
    report.damaged = dict(scanned.damaged)
    for name, why in report.damaged.items():
        log.warning("replicate: the pack %r is damaged (%s): it is kept, and while it is there no tenant's history "
                    "expires (it may hold any key); restores that read it say so", name, why)
    # keys that may have captures or drop records in the packs the plan does not see (kept whatever it says); a
    # damaged pack may hold any
    recent = {digest for name, summary in scanned.summaries.items() if name not in infos
              for digest in summary.all_digests()}
    anything_recent = bool(scanned.damaged)
    live = {record.key for record in store.meta.tenants.iter_tenants() if record.state in ("active", "moving")}
    starts: dict[str, int] = {}

    def start_of(key: str) -> int:
        if key not in starts:
            starts[key] = now - retention.window_for(windows, key)
        return starts[key]

    planned = retention.plan(located, start_of, live=live, packs=infos, drops=drops,
                             recent=lambda key: anything_recent or keyindex.digest(key) in recent)
    report.pinned = planned.pinned
    built = _build(target, infos, planned.snapshots)
    written = _write_packs(target, built, now)
    report.written = [name for name, _size, _keys in written]
    report.snapshots = len(built)
    report.snapshot_bytes = sum(len(image) for _node, _entry, image in built)
    if erased_incarnations(target) != tombstones:
        target.delete_many(report.written)
        raise Busy("an erase ran during the compaction: its snapshots were deleted and nothing else was; run "
                   "`shardlite replicate compact` again")
    keep = set(planned.keep)
    # dropped tenants past their window: whatever of their history stays in packs kept for others is ignored
    gone_keys = set(planned.expired)
    expired = {replica_index.key_digest(item.capture.entry.incarnation) for item in located
               if item.pack in keep and item.capture.entry.key in gone_keys}
    # the horizon before any rollup marker: a marker hides the packs of its range at once, and restores before
    # the new window start must be refused by then
    replica_index.write_horizon(target, now, windows, sorted(expired))
    ignored = expired | set(previous.expired if previous is not None else ())
    runs = compact_rollup.choose(listed, scanned.summaries, final=lambda name: _final(name, shipped), now_ns=now,
                                 deleting=set(planned.delete))
    rolled, report.rollups_skipped = compact_rollup.roll_all(
        target, runs, now, lambda inc: (bool(tombstones) and is_erased(tombstones, inc))
        or replica_index.key_digest(inc) in ignored)
    for first, why in report.rollups_skipped.items():
        log.warning("replicate: the rollup of the run from %s was left as it is: %s", first, why)
    joined = {name for done in rolled for name, _size in done.run.packs}
    report.rolled_packs = len(joined)
    report.rollup_parts = [name for done in rolled for name, _size, _keys in done.parts]
    if erased_incarnations(target) != tombstones:
        target.delete_many([done.marker for done in rolled])
        target.delete_many(report.written + report.rollup_parts)
        raise Busy("an erase ran during the compaction: its snapshots and rollups were deleted and nothing else "
                   "was; run `shardlite replicate compact` again")
    # the key index of what stays: numbered packs up to what each replicator recorded as shipped (a pack
    # uploaded and not recorded yet may be uploaded again with more captures: restores read it), every
    # compaction pack kept or written
    coverage = replica_index.part_coverage(store, [name for name, _size in listed])
    rows: list[keyindex.PackRow] = []
    extra: list[str] = []
    unreadable: list[tuple[str, int]] = []
    for name, size in listed:
        seq = keyindex.pack_seq(name)
        if ((name in infos and name not in keep) or name in joined
                or (seq is not None and seq[1] > coverage.get(seq[0], 0))):
            continue
        if seq is None:
            extra.append(name)
        if name in scanned.damaged:  # restores read it themselves (and say it is damaged)
            unreadable.append((name, size))
            continue
        held = infos.get(name)
        digests = (sorted({keyindex.digest(e.key) for e in held.header.entries}) if held is not None
                   else scanned.summaries[name].key_digests())
        rows.append((name, size, digests))
    for name, size, keys in [*written, *(part for done in rolled for part in done.parts)]:
        extra.append(name)
        rows.append((name, size, sorted({keyindex.digest(k) for k in keys})))
    newest = max((int(n[len(replica_index.BASE_PREFIX):][:20]) for n, _ in target.list(replica_index.BASE_PREFIX)
                  if n[len(replica_index.BASE_PREFIX):][:20].isdigit()), default=-1)
    report.index = replica_index.write_base(target, max(now, newest + 1), coverage, rows, extra, unreadable)
    # first what runs superseded (so that a run's parts never go while a pack it superseded is left), then the plan's
    superseded = sorted(joined)
    if superseded:
        target.delete_many(superseded)
    if planned.delete:
        target.delete_many(planned.delete)
    sizes = dict(listed)
    report.deleted_packs = len(planned.delete)
    report.deleted_bytes = sum(sizes[name] for name in planned.delete)
    replica_index.prune(target, report.index)
    report.meta_deleted = replica_meta_read.prune(target, now - windows.longest())
    report.staging_rows = _prune_staging(store, [*planned.delete, *superseded, *listing.hidden])
    report.seconds = time.monotonic() - started
    log.info("replicate: compaction deleted %d of %d packs, wrote %d snapshots in %d packs, joined %d packs into %d",
             report.deleted_packs, report.packs, report.snapshots, len(report.written), report.rolled_packs,
             len(report.rollup_parts))
    return report

