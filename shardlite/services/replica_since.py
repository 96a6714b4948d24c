"""One tenant's captures from its last snapshot at or before a time on: the packs a one-tenant restore reads.

A restore replays a tenant file from its last snapshot at or before the time asked for
(:func:`shardlite.core.timeline.plan_replay`), so it needs no capture older than that snapshot. Reading every
pack the key index names for the key (:func:`shardlite.services.replica_read.captures_of`) reads one header per
pack the tenant was ever in: a rollup part per hour it was active, 168 over a week. Here the index's packs are
read newest first, per node folder, and a folder's older packs are left unread once a snapshot of the key at or
before the time has been read in it (refreshed snapshots, :mod:`shardlite.core.refresh`, make that recent
for a busy tenant).

Why that is safe. Within one node folder, pack order is capture order: numbered packs by sequence number,
rollup parts by the last sequence number of their run (a run's parts together), and one replicator captures
the folder's files one after the other (a tenant file lives on one node, and a newer file of the key starts
after the older one's last capture there). Let S be the newest usable snapshot (not of an erased or expired
history) of the key at or before the time in a folder. The history a restore replays is the newest file whose
first snapshot is at or before the time. If it is S's file, it replays from S or later. A file after S's in the
folder started after S, at or before the time? then it is newer than S's file and has a snapshot at or before the
time after S, which contradicts S being the newest. A file before S's ended before S, so it is never the newest
that started by the time unless S's file started after the time, which S itself contradicts. So every capture
a restore replays in that folder is in S's pack or a newer one. Compaction packs (``compact-<time>-<n>.pack``:
base snapshots with the times of the captures they stand for) have no place in that order and are always read.

Anything unexpected (no usable key index, a pack the index names that is gone or fails its checks) returns
None: the caller reads the way :func:`~shardlite.services.replica_read.captures_of` does, which reports damage.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait

from ..core import keyindex, pack, rollup, timeline
from ..errors import ReplicaObjectMissing
from ..replica.target import ReplicaTarget
from . import replica_index
from .replica_read import erased_names, read_pack, tombstone_name

__all__ = ["captures_since_snapshot"]


def _order(name: str) -> tuple[str, int] | None:
    """(node folder, position) of a pack in its folder's capture order; None for a compaction pack."""
    numbered = keyindex.pack_seq(name)
    if numbered is not None:
        return numbered[0], numbered[1]
    run = rollup.parse(name)
    if run is not None and run.part >= 0:
        return run.folder, run.last
    return None


def captures_since_snapshot(target: ReplicaTarget, key: str, at_ns: int | None,
                            usable: Callable[[timeline.Capture], bool]) -> tuple[list[timeline.Capture], int] | None:
    """The captures of ``key`` (bytes read lazily, as ``captures_of(..., lazy=True)``, tombstoned ones left out)
    of every pack a restore at ``at_ns`` (None: the latest) may replay, and how many packs the index named
    that were left unread; ``usable(capture)``: False for a capture of a history the restore ignores (expired).
    None when the key index cannot be used or a pack fails: read with ``captures_of`` instead."""
    pool = replica_index.readers()
    erased = pool.submit(erased_names, target)
    found = replica_index.candidates(target, {key}, pool)
    if found is None:
        erased.result()
        return None
    folders: dict[str, list[tuple[int, str, int]]] = {}
    always: list[tuple[str, int]] = []
    for name, size in found.packs.items():
        where = _order(name)
        if where is None:
            always.append((name, size))
        else:
            folders.setdefault(where[0], []).append((where[1], name, size))
    # each folder's packs newest first (a run's parts have one place: their order among them does not matter)
    queues = {folder: [(name, size) for _o, name, size in sorted(packs, reverse=True)]
              for folder, packs in folders.items()}
    tombstones = erased.result()
    wanted = {key}

    def start(name: str, size: int) -> Future[list[tuple[str, timeline.Capture]]]:
        return pool.submit(read_pack, target, name, size, wanted, None, True)

    def kept(future: Future[list[tuple[str, timeline.Capture]]]) -> list[timeline.Capture]:
        return [c for _k, c in future.result()
                if not (tombstones and tombstone_name(c.entry.incarnation) in tombstones)]

    reads = [start(name, size) for name, size in always]
    pending: dict[Future[list[tuple[str, timeline.Capture]]], str] = {}

    def top_up() -> None:  # as many reads in flight as there are readers, taking the folders in turn
        while len(pending) < replica_index.READERS and queues:
            for folder in list(queues):
                if len(pending) >= replica_index.READERS:
                    break
                name, size = queues[folder].pop(0)
                pending[start(name, size)] = folder
                if not queues[folder]:
                    del queues[folder]

    captures: list[timeline.Capture] = []
    left = 0
    try:
        top_up()
        while pending:
            done, _running = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                folder = pending.pop(future)
                got = kept(future)
                captures.extend(got)
                # every newer pack of the folder was started before this one: the older ones are not needed
                if folder in queues and any(_stops(c, at_ns, usable) for c in got):
                    left += len(queues.pop(folder))
            top_up()
        for future in reads:
            captures.extend(kept(future))
    except (pack.PackError, ReplicaObjectMissing):
        for future in [*pending, *reads]:
            future.cancel()
        return None
    return captures, left


def _stops(capture: timeline.Capture, at_ns: int | None, usable: Callable[[timeline.Capture], bool]) -> bool:
    """Whether ``capture`` is a snapshot a restore at ``at_ns`` may start from (module doc)."""
    entry = capture.entry
    return entry.kind == "snapshot" and (at_ns is None or entry.commits[0][1] <= at_ns) and usable(capture)
